r"""The ODE front door: ``sample(field, x0, solver=...)`` integrates ``dx/dt = u_t(x)``
from ``t0`` to ``t1`` with any solver in :data:`ODE_SOLVERS` and returns a
:class:`Solution` with counted evaluations.

The registry is read from the installed libraries at import time, never typed by hand:
every method of ``torchdiffeq._impl.odeint.SOLVERS`` (a newer torchdiffeq's methods appear
by themselves), scipy's ``solve_ivp`` methods (``RK23, RK45, DOP853, Radau, BDF, LSODA``,
for reference solutions) and flowsolve's own synchronisation-free fixed-step loop
(``fast_euler, fast_midpoint, fast_heun2, fast_heun3, fast_rk4``).

* **Fixed-step** solvers take ``steps`` and integrate on the explicit grid
  ``linspace(t0, t1, steps + 1)`` (torchdiffeq's ``step_size`` grid can end in a spurious
  tiny step). ``times`` must be points of that grid.
* **Adaptive** solvers take ``rtol``/``atol`` and a budget of ``max_steps`` attempted steps
  (accepted + rejected; scipy: steps taken). Exceeding it raises
  :class:`~flowsolve.ode.systems.IntegrationError` (status ``"max_steps"``); a solve never
  hangs. ``times`` may be anywhere in the interval (the solver's dense output).
* ``t0 > t1`` integrates backwards (data to noise).
* NFE is counted by wrapping the field, never computed from a formula; a non-finite field
  or state raises :class:`~flowsolve.ode.systems.NonFiniteStateError` naming the time.

scipy is called through its ``OdeSolver`` classes directly rather than through
torchdiffeq's ``scipy_solver`` wrapper (which is therefore not registered): the step loop
is ours, so the step budget, the accepted-step count, failures (the wrapper ignores
``solve_ivp``'s status) and dense output at ``times`` are all available.

The ``fast_*`` solvers run flowsolve's own loop over a precomputed grid: no ``.item()``, no
Python branch on a device tensor, finiteness recorded on the device and read once at the
end, so on a GPU the whole loop can be captured in a CUDA graph
(:class:`CapturedSampler`, or ``cuda_graph=True``). Their tableaus are torchdiffeq's
(``fast_rk4`` is the 3/8 rule that torchdiffeq's ``rk4`` uses) and they give its numbers
to float64 round-off.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from scipy.integrate._ivp.ivp import METHODS as _SCIPY_METHODS  # solve_ivp's {name: class}
from torch import Tensor
from torchdiffeq import odeint, odeint_adjoint
from torchdiffeq._impl.odeint import SOLVERS as _TORCHDIFFEQ_SOLVERS
from torchdiffeq._impl.solvers import AdaptiveStepsizeODESolver

from .._core.counting import CountingField
from .._core.errors import IntegrationError
from .._core.registry import SolverInfo, SolverRegistry
from .._core.types import Field
from .args import (
    check_span,
    check_state,
    check_times,
    count,
    grid_indices,
    positive,
    times_tensor,
    uniform_grid,
)
from .fixed_step import TABLEAUS, FixedStepLoop
from .systems import ODESystem, ScipySystem

__all__ = ["ODE_SOLVERS", "Solution", "sample", "CapturedSampler"]



# -- the registry, read from the libraries -----------------------------------------------------
# Global orders of the methods torchdiffeq 0.2.5 ships (its classes' `order` attribute agrees
# for the Runge-Kutta ones). The Adams family starts with RK4 and raises the order of its
# multistep formula as history accumulates (up to max_order = 12; sample() caps
# explicit_adams at 4): no single order.
_DECLARED_ORDERS: dict[str, float | None] = {
    "euler": 1, "midpoint": 2, "heun2": 2, "heun3": 3, "rk4": 4, "bosh3": 3, "dopri5": 5,
    "dopri8": 8, "fehlberg2": 2, "adaptive_heun": 2,
    "explicit_adams": None, "implicit_adams": None, "fixed_adams": None,
    # scipy: Radau IIA (3 stages) has order 5; BDF and LSODA vary their order (1-5, 1-12)
    "RK23": 3, "RK45": 5, "DOP853": 8, "Radau": 5, "BDF": None, "LSODA": None,
}
_NOT_REGISTERED = {"scipy_solver"}  # scipy's methods are registered by their own names


def _order(name: str, cls: type) -> float | None:
    order = _DECLARED_ORDERS.get(name, getattr(cls, "order", None))
    return None if order is None else float(order)


def _build_registry() -> SolverRegistry:
    infos = []
    for name, cls in _TORCHDIFFEQ_SOLVERS.items():
        if name in _NOT_REGISTERED:
            continue
        infos.append(SolverInfo(name, "ode", issubclass(cls, AdaptiveStepsizeODESolver),
                                _order(name, cls), "torchdiffeq", name))
    for name, cls in _SCIPY_METHODS.items():
        infos.append(SolverInfo(name, "ode", True, _order(name, cls), "scipy", name))
    for name, tab in TABLEAUS.items():
        infos.append(SolverInfo(f"fast_{name}", "ode", False, float(tab.order), "flowsolve",
                                name))
    return SolverRegistry(infos, what="ODE solver")


ODE_SOLVERS: SolverRegistry = _build_registry()
"""Every ODE solver :func:`sample` accepts, with its declared facts (kind, adaptive, order,
library, the library's name for it)."""


def _takes_tolerances(info: SolverInfo) -> bool:
    """Adaptive solvers, and torchdiffeq fixed-step ones whose class uses rtol/atol
    (implicit Adams: the corrector's convergence test)."""
    if info.adaptive:
        return True
    if info.library != "torchdiffeq":
        return False
    return "rtol" in inspect.signature(_TORCHDIFFEQ_SOLVERS[info.method].__init__).parameters


# -- results -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Solution:
    """Result of :func:`sample`.

    Attributes:
        x: the state at ``t1``, ``(B, *event_shape)``.
        nfe: field evaluations, counted by wrapping the field.
        steps: accepted steps (fixed-step: grid cells; scipy: steps taken).
        rejected: rejected steps where the library reports them (torchdiffeq's adaptive
            Runge-Kutta methods; 0 for fixed-step), else None.
        solver, t0, t1: what was solved.
        times, trajectory: the requested times ``(T,)`` and the states there
            ``(T, B, *event_shape)``; None unless ``times`` was given.
    """

    x: Tensor
    nfe: int
    steps: int
    rejected: int | None
    solver: str
    t0: float
    t1: float
    times: Tensor | None = None
    trajectory: Tensor | None = None


# -- the front door ----------------------------------------------------------------------------
DEFAULT_RTOL = DEFAULT_ATOL = 1e-5
DEFAULT_MAX_STEPS = 10_000


def sample(field: Field, x0: Tensor, solver: str = "rk4", *, steps: int | None = None,
           t0: float = 0.0, t1: float = 1.0, rtol: float | None = None,
           atol: float | None = None, max_steps: int | None = None,
           times: Sequence[float] | Tensor | None = None, options: dict | None = None,
           check_finite: bool = True, cuda_graph: bool = False,
           adjoint: bool = False) -> Solution:
    r"""Integrate ``dx/dt = u_t(x)`` from ``x(t0) = x0`` to ``t1``.

    Args:
        field: the velocity ``u_t(x)``, a callable ``(x, t) -> Tensor`` (called with a 0-d
            ``t`` in ``x0``'s dtype) returning ``x``'s shape and dtype (checked on the first
            call, from metadata only: ValueError naming both). A field with an
            ``on_interval(t_lo, t_hi)`` method (the adapters of :mod:`flowsolve.paths.fields`) is
            re-bound to ``[t0, t1]`` first, so its singularity check runs once rather than
            every call.
        x0: ``(B, *event_shape)``, a sample of ``p_{t0}`` (noise when ``t0 = 0``).
        solver: a name in :data:`ODE_SOLVERS` (ValueError listing them otherwise).
        steps: grid cells of a fixed-step solver (required there, refused by adaptive ones).
        t0, t1: in [0, 1]; ``t0 > t1`` integrates backwards (data to noise).
        rtol, atol: tolerances of an adaptive solver (default 1e-5 each); for torchdiffeq's
            implicit Adams, its corrector's tolerance.
        max_steps: budget of attempted steps of an adaptive solver (default 10 000).
        times: where to keep the state (monotone in the direction of integration, within
            the interval; fixed-step: points of the grid).
        options: passed on to the library (torchdiffeq ``options``, scipy keyword
            arguments). ``explicit_adams`` defaults to ``max_order=4`` (Adams-Bashforth
            with 3 steps, order 3, after an RK4 start): torchdiffeq's own default, 12, is
            unstable on smooth problems (a ring mixture's field, 20 steps: RMS error 1.3
            with 12, 0.0057 with 4); pass ``options={"max_order": k}`` to choose.
        check_finite: ``fast_*`` solvers: record finiteness on the device each step and
            raise at the end (the library paths always check).
        cuda_graph: ``fast_*`` solvers with ``x0`` on CUDA: capture the loop in a CUDA graph
            and replay it (for repeated sampling keep a :class:`CapturedSampler` instead).
        adjoint: torchdiffeq solvers only: differentiate by the adjoint method
            (``odeint_adjoint``, seminorm; Chen et al. 2018): memory independent of the
            number of steps, gradients to the parameters of ``field``, which must then be an
            ``nn.Module`` holding them. ``nfe`` counts the forward solve only: the backward
            solve runs later (in ``.backward()``) and its evaluations are not counted.

    Returns:
        :class:`Solution`: ``x`` at ``t1``, counted ``nfe``, accepted (and rejected) steps,
        and the trajectory at ``times``.

    Gradients flow through the torchdiffeq and ``fast_*`` solvers (not scipy's); wrap the
    call in ``torch.no_grad()`` to sample.

    Example:
        >>> import torch, flowsolve as fs
        >>> path = fs.AffineGaussianPath(fs.CondOTScheduler())
        >>> u = fs.analytic.marginal_velocity(fs.GaussianMixture.ring(4), path)
        >>> x0 = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        >>> res = sample(u, x0, "rk4", steps=10)
        >>> res.nfe, res.steps, sample(u, x0, "fast_rk4", steps=10).x.allclose(res.x)
        (40, 10, True)
    """
    info = ODE_SOLVERS[solver]
    if not callable(field):
        raise TypeError(f"field must be callable (x, t) -> Tensor; got {type(field).__name__}")
    check_state(x0)
    t0, t1 = check_span(t0, t1)
    if callable(getattr(field, "on_interval", None)):
        field = field.on_interval(min(t0, t1), max(t0, t1))
    if info.adaptive:
        if steps is not None:
            raise ValueError(f"steps={steps!r}: solver {solver!r} is adaptive; it takes rtol, "
                             "atol and max_steps, not steps")
        rtol = positive("rtol", DEFAULT_RTOL if rtol is None else rtol)
        atol = positive("atol", DEFAULT_ATOL if atol is None else atol)
        max_steps = count("max_steps", DEFAULT_MAX_STEPS if max_steps is None else max_steps)
    else:
        if steps is None:
            raise ValueError(f"solver {solver!r} is fixed-step: give steps=N (the grid "
                             f"linspace(t0, t1, N + 1)); adaptive solvers: "
                             f"{', '.join(ODE_SOLVERS.names(adaptive=True))}")
        steps = count("steps", steps)
        if max_steps is not None:
            raise ValueError(f"max_steps={max_steps!r} applies to adaptive solvers; {solver!r} "
                             f"takes exactly steps={steps}")
        if (rtol is not None or atol is not None) and not _takes_tolerances(info):
            raise ValueError(f"rtol/atol apply to adaptive solvers; {solver!r} is fixed-step "
                             f"(got rtol={rtol!r}, atol={atol!r})")
    if cuda_graph and (info.library != "flowsolve" or not x0.is_cuda):
        raise ValueError(f"cuda_graph=True needs a fast_* solver and x0 on a CUDA device; got "
                         f"solver={solver!r}, x0 on {x0.device}")
    out_times = check_times(times, t0, t1)
    if adjoint and (info.library != "torchdiffeq" or out_times and not info.adaptive):
        raise ValueError(f"adjoint=True needs a torchdiffeq solver (and, fixed-step, no times); "
                         f"got solver={solver!r}, times={times!r}")
    if info.library == "flowsolve":
        if cuda_graph:
            return CapturedSampler(field, x0, solver, steps=steps, t0=t0, t1=t1, times=times,
                                   check_finite=check_finite)(x0)
        return _solve_fast(field, x0, info, _fast_loop(info, x0, t0, t1, steps, out_times),
                           check_finite)
    if info.library == "scipy":
        return _solve_scipy(field, x0, info, t0, t1, rtol, atol, max_steps, out_times, options)
    return _solve_torchdiffeq(field, x0, info, t0, t1, steps, rtol, atol, max_steps,
                              out_times, options, adjoint)


# -- torchdiffeq -------------------------------------------------------------------------------
def _solve_torchdiffeq(field, x0, info, t0, t1, steps, rtol, atol, max_steps, out_times,
                       options, adjoint=False) -> Solution:
    cls = _TORCHDIFFEQ_SOLVERS[info.method]
    span = (min(t0, t1), max(t0, t1)) if info.adaptive else None
    system = ODESystem(field, info.name, callbacks=frozenset(cls.valid_callbacks()),
                       max_steps=max_steps, span=span)
    opts = dict(options or {})
    if info.method == "explicit_adams":  # 12 (torchdiffeq's default) is unstable; see sample
        opts.setdefault("max_order", 4)
    kwargs = {k: v for k, v in (("rtol", rtol), ("atol", atol)) if v is not None}
    if info.adaptive:
        inner = [t for t in out_times if t not in (t0, t1)]
        t_out = [t0, *inner, t1]
        # land exactly on t1: torchdiffeq otherwise steps past it and interpolates back
        opts.setdefault("step_t", torch.tensor([t1], dtype=torch.float64, device=x0.device))
    else:
        for key in ("grid_constructor", "step_size"):
            if key in opts:
                raise ValueError(f"options[{key!r}] is not accepted: the grid is "
                                 f"linspace(t0, t1, steps + 1); pass steps=N")
        grid = uniform_grid(t0, t1, steps)
        t_out = [grid[k] for k in sorted({0, steps, *grid_indices(out_times, grid)})]
        grid_dev = torch.tensor(grid, dtype=torch.float64, device=x0.device)
        opts["grid_constructor"] = lambda func, y0, t: grid_dev
        out_times = [grid[k] for k in grid_indices(out_times, grid)]
    t = torch.tensor(t_out, dtype=torch.float64, device=x0.device)
    if adjoint:
        params = tuple(p for p in system.parameters() if p.requires_grad)
        if not params:
            raise ValueError("adjoint=True needs a field that is an nn.Module holding the "
                             "parameters to differentiate (a lambda hides them)")
        adjoint_opts = {"norm": "seminorm"}
        if not info.adaptive:  # the backward pass: the same number of equal steps, t1 to t0
            def equal_steps(func, y0, tt):  # tt in torchdiffeq's own (maybe negated) time
                return torch.linspace(tt[0], tt[-1], steps + 1, dtype=tt.dtype, device=tt.device)

            adjoint_opts["grid_constructor"] = equal_steps
        run = functools.partial(odeint_adjoint, adjoint_params=params,
                                adjoint_options=adjoint_opts)
    else:
        run = odeint
    try:
        ys = run(system, x0, t, method=info.method, options=opts, **kwargs)
    except AssertionError as err:  # torchdiffeq reports user-triggerable failures by assert
        system.check_finite()
        if "underflow in dt" in str(err):
            raise IntegrationError("step_underflow", info.name, system.t_last, str(err)) \
                from err
        raise
    system.record_state(ys[-1], t1)
    system.check_finite()
    traj = torch.stack([ys[t_out.index(s)] for s in out_times]) if out_times else None
    accepted = system.accepted if info.adaptive else steps
    rejected = system.rejected if "callback_reject_step" in cls.valid_callbacks() else (
        None if info.adaptive else 0)
    return Solution(ys[-1], system.nfe, accepted, rejected, info.name, t0, t1,
                    times_tensor(out_times, x0), traj)


# -- scipy -------------------------------------------------------------------------------------
def _solve_scipy(field, x0, info, t0, t1, rtol, atol, max_steps, out_times,
                 options) -> Solution:
    system = ScipySystem(field, x0, info.name)
    x, taken, traj = system.integrate(_SCIPY_METHODS[info.method], x0, t0, t1, rtol=rtol,
                                      atol=atol, max_steps=max_steps, times=out_times,
                                      options=options)
    return Solution(x, system.nfe, taken, None, info.name, t0, t1,
                    times_tensor(out_times, x0), traj)


# -- flowsolve's own fixed-step loop -----------------------------------------------------------
def _fast_loop(info: SolverInfo, x0: Tensor, t0: float, t1: float, steps: int,
               out_times: list[float]) -> FixedStepLoop:
    grid = uniform_grid(t0, t1, steps)
    return FixedStepLoop(TABLEAUS[info.method], grid, x0, grid_indices(out_times, grid))


def _fast_solution(loop: FixedStepLoop, info: SolverInfo, out, nfe: int) -> Solution:
    x, saved, finite = out
    loop.check(finite, info.name)
    times = [loop.grid[k] for k in loop.record]
    return Solution(x, nfe, len(loop.h), 0, info.name, loop.grid[0], loop.grid[-1],
                    times_tensor(times, x), torch.stack(saved) if saved else None)


def _solve_fast(field, x0, info, loop: FixedStepLoop, check_finite: bool) -> Solution:
    counter = CountingField(field, like_input=True)
    return _fast_solution(loop, info, loop(counter, x0, check_finite), counter.nfe)


class CapturedSampler:
    r"""A ``fast_*`` solve captured once in a CUDA graph and replayed for each new ``x0``.

    Built by the recipe of ``torch.cuda.graphs``: the eager loop (:class:`FixedStepLoop`,
    which never synchronises with the host) runs ``warmup`` times on a side stream, then is
    captured with ``x_like``'s static copy as input; a call copies ``x0`` into that buffer,
    replays, clones the outputs and reads the finiteness record (one synchronisation). The
    replayed kernels are the eager loop's, so the numbers are the eager loop's. ``nfe`` is
    the count of the captured run (a replay does not enter Python). Under ``torch.no_grad``.

    **Untested on a GPU**: this code was written and tested where no GPU exists; only its
    CPU refusal is tested. The field must be capturable (no host reads, no CPU tensors
    created per call).

    Example (on a CUDA machine)::

        sampler = CapturedSampler(model, torch.randn(1024, 2, device="cuda"), "fast_euler",
                                  steps=100)
        x1 = sampler(torch.randn(1024, 2, device="cuda")).x
    """

    def __init__(self, field: Field, x_like: Tensor, solver: str = "fast_euler", *,
                 steps: int, t0: float = 0.0, t1: float = 1.0,
                 times: Sequence[float] | Tensor | None = None, check_finite: bool = True,
                 warmup: int = 3):
        info = ODE_SOLVERS[solver]
        if info.library != "flowsolve":
            raise ValueError(f"only fast_* solvers can be captured; got solver={solver!r} "
                             f"(accepted: {', '.join(ODE_SOLVERS.names(adaptive=False))})")
        if not torch.is_tensor(x_like) or not x_like.is_cuda:
            raise ValueError("a CUDA graph needs x_like on a CUDA device; got "
                             f"{getattr(x_like, 'device', type(x_like).__name__)}")
        t0, t1 = check_span(t0, t1)
        self.info = info
        self.loop = _fast_loop(info, x_like, t0, t1, count("steps", steps),
                               check_times(times, t0, t1))
        self._x = x_like.detach().clone()
        counter = CountingField(field, like_input=True)
        current = torch.cuda.current_stream(x_like.device)
        side = torch.cuda.Stream(device=x_like.device)
        side.wait_stream(current)
        with torch.no_grad():
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    self.loop(counter, self._x, check_finite)
            current.wait_stream(side)
            counter.nfe = 0
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._out = self.loop(counter, self._x, check_finite)
        self.nfe = counter.nfe

    def __call__(self, x0: Tensor) -> Solution:
        x = self._x
        if not torch.is_tensor(x0) or (x0.shape, x0.dtype, x0.device) != (x.shape, x.dtype,
                                                                           x.device):
            raise ValueError(f"x0 must match the captured input: {tuple(x.shape)} {x.dtype} on "
                             f"{x.device}; got {getattr(x0, 'shape', type(x0).__name__)}")
        self._x.copy_(x0)
        self._graph.replay()
        out, saved, finite = self._out
        return _fast_solution(self.loop, self.info, (out.clone(), [s.clone() for s in saved],
                                                     finite), self.nfe)
