r"""The ODE back ends behind :func:`flowsolve.ode.solve.sample`, the registry of their
solvers (:data:`ODE_SOLVERS`) and the result they return (:class:`Solution`).

Every back end has the one signature :data:`Backend`, ``(field, x0, info, args) ->
Solution``, with ``args`` the checked arguments
(:class:`~flowsolve.ode.args.SolverArguments`), and :data:`BACKENDS` maps each library
named by the registry to its back end:

* ``"torchdiffeq"``: :func:`solve_torchdiffeq`, ``odeint`` (or ``odeint_adjoint``) on an
  :class:`~flowsolve.ode.systems.ODESystem`;
* ``"scipy"``: :func:`solve_scipy`, scipy's ``OdeSolver`` classes on a
  :class:`~flowsolve.ode.systems.ScipySystem`;
* ``"flowsolve"``: :func:`solve_fast`, flowsolve's own fixed-step loop
  (:class:`~flowsolve.ode.fixed_step.FixedStepLoop`), eager or replayed from a CUDA graph
  (:class:`CapturedSampler`).

The registry is read from the installed libraries at import time, never typed by hand:
every method of ``torchdiffeq._impl.odeint.SOLVERS`` (a newer torchdiffeq's methods appear
by themselves), scipy's ``solve_ivp`` methods (``RK23, RK45, DOP853, Radau, BDF, LSODA``,
for reference solutions) and flowsolve's own synchronisation-free fixed-step loop
(``fast_euler, fast_midpoint, fast_heun2, fast_heun3, fast_rk4``).

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

Example:
    >>> sorted(BACKENDS) == sorted({info.library for info in ODE_SOLVERS.values()})
    True
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from scipy.integrate._ivp.ivp import METHODS as _SCIPY_METHODS  # solve_ivp's {name: class}
from torch import Tensor
from torchdiffeq import odeint, odeint_adjoint
from torchdiffeq._impl.odeint import SOLVERS as _TORCHDIFFEQ_SOLVERS
from torchdiffeq._impl.solvers import AdaptiveStepsizeODESolver

from .._core.checks import check_span
from .._core.counting import CountingField
from .._core.errors import IntegrationError
from .._core.registry import SolverInfo, SolverRegistry
from .._core.types import Field
from .args import (
    SolverArguments,
    check_times,
    fixed_grid,
    grid_indices,
    times_tensor,
    uniform_grid,
)
from .fixed_step import TABLEAUS, FixedStepLoop
from .per_sample import EmbeddedTableau, PerSampleLoop
from .samplers import SAMPLERS
from .semilinear import SamplerLoop
from .systems import ODESystem, ScipySystem

__all__ = ["ODE_SOLVERS", "Solution", "Backend", "BACKENDS", "solve_torchdiffeq",
           "solve_scipy", "solve_fast", "solve_sampler", "solve_flowsolve", "CapturedSampler",
           "takes_tolerances", "EMBEDDED_TABLEAUS", "solve_per_sample", "PER_SAMPLE_OPTIONS"]


# -- the registry, read from the libraries -----------------------------------------------------
# Global orders of the methods torchdiffeq 0.2.5 ships (its classes' `order` attribute agrees
# for the Runge-Kutta ones). The Adams family starts with RK4 and raises the order of its
# multistep formula as history accumulates (up to max_order = 12; solve_torchdiffeq caps
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
                                _order(name, cls), "torchdiffeq", name,
                                multistep="adams" in name))
    for name, cls in _SCIPY_METHODS.items():
        infos.append(SolverInfo(name, "ode", True, _order(name, cls), "scipy", name))
    for name, tab in TABLEAUS.items():
        infos.append(SolverInfo(f"fast_{name}", "ode", False, float(tab.order), "flowsolve",
                                name))
    for name, smp in SAMPLERS.items():
        infos.append(SolverInfo(name, "ode", False, smp.order, "flowsolve", name,
                                multistep=smp.multistep, needs_path=True))
    return SolverRegistry(infos, what="ODE solver")


ODE_SOLVERS: SolverRegistry = _build_registry()
"""Every ODE solver :func:`~flowsolve.ode.solve.sample` accepts, with its declared facts
(kind, adaptive, order, library, the library's name for it)."""


def _embedded_tableaus() -> dict[str, EmbeddedTableau]:
    """torchdiffeq's adaptive Runge-Kutta pairs that are FSAL (the last stage is the field at
    the new state), as :class:`~flowsolve.ode.per_sample.EmbeddedTableau`. torchdiffeq's
    ``fehlberg2`` and ``adaptive_heun`` are not: their last stage is evaluated away from
    the new state (torchdiffeq still reuses it as the next step's first stage), so they
    are not offered per sample."""
    out = {}
    for name, cls in _TORCHDIFFEQ_SOLVERS.items():
        tab = getattr(cls, "tableau", None)
        if tab is None or not issubclass(cls, AdaptiveStepsizeODESolver):
            continue
        try:
            out[name] = EmbeddedTableau(
                name, int(cls.order), (0.0, *tab.alpha.tolist()),
                ((), *(tuple(row.tolist()) for row in tab.beta)),
                tuple(tab.c_sol.tolist()), tuple(tab.c_error.tolist()))
        except ValueError:  # not FSAL
            continue
    return out


EMBEDDED_TABLEAUS: dict[str, EmbeddedTableau] = _embedded_tableaus()
"""The adaptive solvers that run with ``step_control="per_sample"`` (dopri5, dopri8, bosh3),
with torchdiffeq's tableaus."""

PER_SAMPLE_OPTIONS = ("safety", "ifactor", "dfactor", "first_step", "max_step")
"""``options=`` accepted with ``step_control="per_sample"`` (torchdiffeq's names and
defaults: 0.9, 10, 0.2, None, inf)."""


@functools.cache
def takes_tolerances(info: SolverInfo) -> bool:
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
    """Result of :func:`~flowsolve.ode.solve.sample`.

    Attributes:
        x: the state at ``t1``, ``(B, *event_shape)``.
        nfe: field evaluations, counted by wrapping the field (per-sample step control:
            batched calls, each on the samples still running).
        steps: accepted steps (fixed-step: grid cells; scipy: steps taken; per-sample step
            control: the most of any sample).
        rejected: rejected steps where the library reports them (torchdiffeq's adaptive
            Runge-Kutta methods; 0 for fixed-step; per-sample: the most of any sample),
            else None.
        solver: the solver's name.
        t0: the start of the interval.
        t1: its end.
        times: the requested times ``(T,)``; None unless ``times`` was given.
        trajectory: the states at ``times``, ``(T, B, *event_shape)``; None unless ``times``
            was given.
        grid: a fixed-step solve's time grid ``t_0 .. t_N`` (float64, on the CPU; see
            ``grid=`` of :func:`~flowsolve.ode.solve.sample`); None for an adaptive one.
        step_control: ``"shared"`` (one step size for the batch) or ``"per_sample"``.
        nfe_per_sample, steps_per_sample, rejected_per_sample: ``(B,)`` int64 on the CPU,
            with ``step_control="per_sample"``: the field calls each sample took part in,
            its accepted and its rejected steps; None otherwise.
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
    grid: Tensor | None = None
    step_control: str = "shared"
    nfe_per_sample: Tensor | None = None
    steps_per_sample: Tensor | None = None
    rejected_per_sample: Tensor | None = None


Backend = Callable[[Field, Tensor, SolverInfo, SolverArguments], Solution]
"""A back end: ``(field, x0, info, args) -> Solution``, ``field`` already re-bound to the
interval, ``x0`` and ``args`` checked (:func:`~flowsolve.ode.args.check_solver_arguments`)."""


# -- torchdiffeq -------------------------------------------------------------------------------
def solve_torchdiffeq(field: Field, x0: Tensor, info: SolverInfo,
                      args: SolverArguments) -> Solution:
    """torchdiffeq's ``odeint`` (``odeint_adjoint`` with ``args.adjoint``) on an
    :class:`~flowsolve.ode.systems.ODESystem`; fixed-step on the explicit grid ``args.grid``
    (its ``grid_constructor``; the adjoint's backward pass on the same grid reversed)."""
    t0, t1, steps, out_times = args.t0, args.t1, args.steps, args.out_times
    cls = _TORCHDIFFEQ_SOLVERS[info.method]
    span = (min(t0, t1), max(t0, t1)) if info.adaptive else None
    system = ODESystem(field, info.name, callbacks=frozenset(cls.valid_callbacks()),
                       max_steps=args.max_steps, span=span)
    opts = dict(args.options or {})
    if info.method == "explicit_adams":  # 12 (torchdiffeq's default) is unstable; see sample
        opts.setdefault("max_order", 4)
    kwargs = {k: v for k, v in (("rtol", args.rtol), ("atol", args.atol)) if v is not None}
    if info.adaptive:
        inner = [t for t in out_times if t not in (t0, t1)]
        t_out = [t0, *inner, t1]
        # land exactly on t1: torchdiffeq otherwise steps past it and interpolates back
        opts.setdefault("step_t", torch.tensor([t1], dtype=torch.float64, device=x0.device))
    else:
        for key in ("grid_constructor", "step_size"):
            if key in opts:
                raise ValueError(f"options[{key!r}] is not accepted: the grid is "
                                 f"linspace(t0, t1, steps + 1) or the one of grid=; pass "
                                 f"steps=N and grid=")
        grid = args.grid
        t_out = [grid[k] for k in sorted({0, steps, *grid_indices(out_times, grid)})]
        grid_dev = torch.tensor(grid, dtype=torch.float64, device=x0.device)
        opts["grid_constructor"] = lambda func, y0, t: grid_dev
        out_times = [grid[k] for k in grid_indices(out_times, grid)]
    t = torch.tensor(t_out, dtype=torch.float64, device=x0.device)
    if args.adjoint:
        params = tuple(p for p in system.parameters() if p.requires_grad)
        if not params:
            raise ValueError("adjoint=True needs a field that is an nn.Module holding the "
                             "parameters to differentiate (a lambda hides them)")
        adjoint_opts = {"norm": "seminorm"}
        if not info.adaptive and grid == uniform_grid(t0, t1, steps):
            # the backward pass: the same number of equal steps, t1 to t0
            def equal_steps(func, y0, tt):  # tt in torchdiffeq's own (maybe negated) time
                return torch.linspace(tt[0], tt[-1], steps + 1, dtype=tt.dtype, device=tt.device)

            adjoint_opts["grid_constructor"] = equal_steps
        elif not info.adaptive:  # the backward pass on the forward grid, t1 to t0
            backward = grid[::-1]

            def reversed_grid(func, y0, tt):
                # tt is [t1, t0] (t0 < t1), or [-t1, -t0] for a backward solve: torchdiffeq's
                # adjoint then runs in negated time; tt[0] > 0 exactly in the first case
                sign = 1.0 if float(tt[0]) > 0 else -1.0
                return sign * torch.tensor(backward, dtype=tt.dtype, device=tt.device)

            adjoint_opts["grid_constructor"] = reversed_grid
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
                    times_tensor(out_times, x0), traj, _grid_tensor(args.grid))


# -- scipy -------------------------------------------------------------------------------------
def solve_scipy(field: Field, x0: Tensor, info: SolverInfo, args: SolverArguments) -> Solution:
    """scipy's ``OdeSolver`` class for ``info`` stepped by
    :class:`~flowsolve.ode.systems.ScipySystem` (our loop: step budget, dense output)."""
    system = ScipySystem(field, x0, info.name)
    x, taken, traj = system.integrate(_SCIPY_METHODS[info.method], x0, args.t0, args.t1,
                                      rtol=args.rtol, atol=args.atol,
                                      max_steps=args.max_steps, times=args.out_times,
                                      options=args.options)
    return Solution(x, system.nfe, taken, None, info.name, args.t0, args.t1,
                    times_tensor(args.out_times, x0), traj)


def _grid_tensor(grid: list[float] | None) -> Tensor | None:
    return None if grid is None else torch.tensor(grid, dtype=torch.float64)


# -- flowsolve's own fixed-step loop -----------------------------------------------------------
def _fast_loop(info: SolverInfo, x0: Tensor, grid: list[float],
               out_times: list[float]) -> FixedStepLoop:
    return FixedStepLoop(TABLEAUS[info.method], grid, x0, grid_indices(out_times, grid))


def _fast_solution(loop: FixedStepLoop, info: SolverInfo, out, nfe: int) -> Solution:
    x, saved, finite = out
    loop.check(finite, info.name)
    times = [loop.grid[k] for k in loop.record]
    return Solution(x, nfe, len(loop.h), 0, info.name, loop.grid[0], loop.grid[-1],
                    times_tensor(times, x), torch.stack(saved) if saved else None,
                    _grid_tensor(loop.grid))


def solve_fast(field: Field, x0: Tensor, info: SolverInfo, args: SolverArguments) -> Solution:
    """flowsolve's :class:`~flowsolve.ode.fixed_step.FixedStepLoop`, run eagerly, or with
    ``args.cuda_graph`` captured once in a CUDA graph and replayed (:class:`CapturedSampler`)."""
    if args.cuda_graph:
        return CapturedSampler(field, x0, info.name, grid=args.grid, t0=args.t0, t1=args.t1,
                               times=args.out_times or None,
                               check_finite=args.check_finite)(x0)
    loop = _fast_loop(info, x0, args.grid, args.out_times)
    counter = CountingField(field, like_input=True)
    return _fast_solution(loop, info, loop(counter, x0, args.check_finite), counter.nfe)


class CapturedSampler:
    r"""A ``fast_*`` solve captured once in a CUDA graph and replayed for each new ``x0``.

    Built by the recipe of ``torch.cuda.graphs``: the eager loop (:class:`FixedStepLoop`,
    which never synchronises with the host) runs ``warmup`` times on a side stream, then is
    captured with ``x_like``'s static copy as input; a call copies ``x0`` into that buffer,
    replays, clones the outputs and reads the finiteness record (one synchronisation). The
    replayed kernels are the eager loop's, so the numbers are the eager loop's. ``nfe`` is
    the count of the captured run (a replay does not enter Python). Under ``torch.no_grad``.
    ``steps``, ``t0``, ``t1``, ``grid``, ``path`` and ``times`` are those of
    :func:`~flowsolve.ode.solve.sample`.

    **Untested on a GPU**: this code was written and tested where no GPU exists; only its
    CPU refusal is tested. The field must be capturable (no host reads, no CPU tensors
    created per call).

    Example (on a CUDA machine)::

        sampler = CapturedSampler(model, torch.randn(1024, 2, device="cuda"), "fast_euler",
                                  steps=100)
        x1 = sampler(torch.randn(1024, 2, device="cuda")).x
    """

    def __init__(self, field: Field, x_like: Tensor, solver: str = "fast_euler", *,
                 steps: int | None = None, t0: float = 0.0, t1: float = 1.0,
                 times: Sequence[float] | Tensor | None = None, check_finite: bool = True,
                 warmup: int = 3, grid="uniform", path=None):
        info = ODE_SOLVERS[solver]
        if info.library != "flowsolve" or info.method not in TABLEAUS:
            raise ValueError(f"only fast_* solvers can be captured; got solver={solver!r} "
                             f"(accepted: {', '.join('fast_' + n for n in TABLEAUS)})")
        if not torch.is_tensor(x_like) or not x_like.is_cuda:
            raise ValueError("a CUDA graph needs x_like on a CUDA device; got "
                             f"{getattr(x_like, 'device', type(x_like).__name__)}")
        t0, t1 = check_span(t0, t1)
        self.info = info
        self.loop = _fast_loop(info, x_like, fixed_grid(grid, steps, t0, t1, path, solver),
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


# -- the low-NFE samplers ----------------------------------------------------------------------
def solve_sampler(field: Field, x0: Tensor, info: SolverInfo,
                  args: SolverArguments) -> Solution:
    """A low-NFE sampler of :data:`~flowsolve.ode.samplers.SAMPLERS` on the grid ``args.grid``
    (:class:`~flowsolve.ode.semilinear.SamplerLoop`: the model, of kind ``args.prediction``,
    read as its posterior means on ``args.path``)."""
    loop = SamplerLoop(SAMPLERS[info.method], field, args.path, args.prediction, args.grid, x0,
                       grid_indices(args.out_times, args.grid))
    x, saved, finite = loop(x0, None, args.check_finite)
    loop.check(finite)
    times = [args.grid[k] for k in loop.record]
    return Solution(x, loop.nfe, args.steps, 0, info.name, args.t0, args.t1,
                    times_tensor(times, x0), torch.stack(saved) if saved else None,
                    _grid_tensor(args.grid))


def solve_flowsolve(field: Field, x0: Tensor, info: SolverInfo,
                    args: SolverArguments) -> Solution:
    """flowsolve's own solvers: the ``fast_*`` Runge-Kutta loop (:func:`solve_fast`) or a
    low-NFE sampler (:func:`solve_sampler`)."""
    if info.method in TABLEAUS:
        return solve_fast(field, x0, info, args)
    return solve_sampler(field, x0, info, args)


# -- per-sample step control -------------------------------------------------------------------
def solve_per_sample(field: Field, x0: Tensor, info: SolverInfo,
                     args: SolverArguments) -> Solution:
    """An adaptive torchdiffeq method with one step size per sample
    (:class:`~flowsolve.ode.per_sample.PerSampleLoop`, its tableau, its controller's
    constants; ``args.options`` may set :data:`PER_SAMPLE_OPTIONS`)."""
    loop = PerSampleLoop(EMBEDDED_TABLEAUS[info.method], info.name, rtol=args.rtol,
                         atol=args.atol, max_steps=args.max_steps, **(args.options or {}))
    res = loop(field, x0, args.t0, args.t1, args.out_times)
    return Solution(res.x, res.calls, int(res.accepted.max()), int(res.rejected.max()),
                    info.name, args.t0, args.t1, times_tensor(args.out_times, x0),
                    res.trajectory, None, "per_sample", res.nfe_per_sample, res.accepted,
                    res.rejected)


BACKENDS: dict[str, Backend] = {
    "torchdiffeq": solve_torchdiffeq,
    "scipy": solve_scipy,
    "flowsolve": solve_flowsolve,
}
"""``{library: back end}`` for every library named in :data:`ODE_SOLVERS`."""
