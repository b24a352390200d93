r"""The ODE front door: ``sample(field, x0, solver=...)`` integrates ``dx/dt = u_t(x)``
from ``t0`` to ``t1`` with any solver in :data:`ODE_SOLVERS` and returns a
:class:`Solution` with counted evaluations.

* **Fixed-step** solvers take ``steps`` and integrate on an explicit grid: by default
  ``linspace(t0, t1, steps + 1)`` (torchdiffeq's ``step_size`` grid can end in a spurious
  tiny step), or the one ``grid=`` names (uniform in log-SNR, EDM's, a shift, or given
  times: :mod:`flowsolve.ode.grids`). ``times`` must be points of that grid.
* **Adaptive** solvers take ``rtol``/``atol`` and a budget of ``max_steps`` attempted steps
  (accepted + rejected; scipy: steps taken). Exceeding it raises
  :class:`~flowsolve.ode.systems.IntegrationError` (status ``"max_steps"``); a solve never
  hangs. ``times`` may be anywhere in the interval (the solver's dense output).
* ``t0 > t1`` integrates backwards (data to noise).
* NFE is counted by wrapping the field, never computed from a formula; a non-finite field
  or state raises :class:`~flowsolve.ode.systems.NonFiniteStateError` naming the time.

Where things are: :func:`sample` checks its arguments
(:func:`~flowsolve.ode.args.check_solver_arguments` in :mod:`flowsolve.ode.args`) and hands
them to the back end of the solver's library, ``BACKENDS[info.library]``
(:mod:`flowsolve.ode.backends`: torchdiffeq, scipy's ``OdeSolver`` classes, flowsolve's own
synchronisation-free ``fast_*`` loop). The registry :data:`ODE_SOLVERS` (read from the
installed libraries at import time), :class:`Solution` and :class:`CapturedSampler` (a
``fast_*`` solve captured in a CUDA graph) are defined there and re-exported here; the
systems the libraries integrate are in :mod:`flowsolve.ode.systems`, the ``fast_*`` loop
and its tableaus in :mod:`flowsolve.ode.fixed_step`.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .._core.checks import check_span
from .._core.types import Field
from ..paths.affine import AffineGaussianPath
from ..paths.fields import ConvertedField
from ..paths.schedules import Scheduler
from .args import check_solver_arguments, check_state
from .backends import (
    BACKENDS,
    EMBEDDED_TABLEAUS,
    ODE_SOLVERS,
    PER_SAMPLE_OPTIONS,
    CapturedSampler,
    Solution,
    solve_per_sample,
    takes_tolerances,
)
from .grids import TimeGrid
from .per_sample import STEP_CONTROLS

__all__ = ["ODE_SOLVERS", "Solution", "sample", "CapturedSampler"]


def sample(field: Field, x0: Tensor, solver: str = "rk4", *, steps: int | None = None,
           t0: float = 0.0, t1: float = 1.0, rtol: float | None = None,
           atol: float | None = None, max_steps: int | None = None,
           times: Sequence[float] | Tensor | None = None, options: dict | None = None,
           check_finite: bool = True, cuda_graph: bool = False,
           adjoint: bool = False,
           grid: str | float | TimeGrid | Sequence[float] | Tensor = "uniform",
           path: AffineGaussianPath | Scheduler | None = None,
           prediction: str = "velocity", step_control: str = "shared") -> Solution:
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
        grid: where the ``steps + 1`` times of a fixed-step solver lie
            (:func:`flowsolve.ode.grids.time_grid` builds them; adaptive solvers refuse any
            but ``"uniform"``). ``"uniform"`` (default): ``t_i = t0 + (i / N)(t1 - t0)``.
            ``"logsnr"``: uniform in ``lambda_t = log(alpha_t / sigma_t)``. ``"edm"``:
            ``(sigma_t / alpha_t)^(1/rho)`` uniform, rho = 7 (Karras et al. 2022). Where
            ``alpha_t = 0`` or ``sigma_t = 0`` at an end (lambda infinite) that end stays a
            grid point and the spacing runs from ``sigma/alpha = 80`` / down to ``0.002``
            instead (EDM's ``sigma_max``, ``sigma_min``). A number ``s > 0`` (or
            ``ShiftGrid(s)``): the rectified-flow shift ``t_i = u_i / (1 + (s - 1)(1 -
            u_i))`` of a uniform ``u_i`` (``sigma' = s sigma / (1 + (s - 1) sigma)`` in
            ``sigma = 1 - t``). Other options: ``LogSNRGrid(sigma_min=, sigma_max=)``,
            ``EDMGrid(rho=, sigma_min=, sigma_max=)``. A 1-d tensor or sequence: those
            times exactly (finite, strictly monotone from ``t0`` to ``t1``; ``steps`` may
            be left out). :attr:`Solution.grid` records the grid used.
        path: the :class:`~flowsolve.paths.affine.AffineGaussianPath` (or its scheduler)
            whose ``alpha_t``, ``sigma_t`` the ``"logsnr"`` and ``"edm"`` grids, the
            samplers and the conversion of ``prediction`` read.
        prediction: what ``field`` predicts: ``"velocity"`` (default), ``"score"``,
            ``"epsilon"``, ``"x1"`` or ``"v"`` (needs ``path``). The samplers read the
            model as its posterior means (:class:`~flowsolve.ode.semilinear.Denoiser`); the
            other solvers integrate the velocity converted on ``path``
            (:class:`~flowsolve.paths.fields.ConvertedField`).
        step_control: adaptive solvers: ``"shared"`` (default; the library's one step size
            for the batch, from the RMS error of the whole batch) or ``"per_sample"``: every
            sample has its own step size and error control, so its result does not depend on
            the other samples of its batch (to round-off), a stiff sample no longer shrinks
            everyone's steps, and finished samples leave the batch
            (:mod:`flowsolve.ode.per_sample`; ``dopri5``, ``dopri8``, ``bosh3``, with
            torchdiffeq's tableaus and controller; the field is called with a ``(b,)`` time;
            :attr:`Solution.nfe_per_sample` counts each sample's evaluations; ``options``
            may set ``safety``, ``ifactor``, ``dfactor``, ``first_step``, ``max_step``; no
            ``adjoint``).

    **Low-NFE samplers** (``info.needs_path`` in :data:`ODE_SOLVERS`: ``"ddim"``,
    ``"dpmpp_2m"``, ...; :mod:`flowsolve.ode.samplers`) are fixed-step exponential
    integrators of the probability-flow ODE in ``lambda_t = log(alpha_t / sigma_t)``: they
    need ``path`` and run from noise to data (``t0 < t1``) on any grid.

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
        >>> res = sample(u, x0, "heun2", steps=4, path=path, grid="edm")
        >>> [round(t, 4) for t in res.grid.tolist()]
        [0.0, 0.0123, 0.2845, 0.998, 1.0]
    """
    info = ODE_SOLVERS[solver]
    if not callable(field):
        raise TypeError(f"field must be callable (x, t) -> Tensor; got {type(field).__name__}")
    check_state(x0)
    t0, t1 = check_span(t0, t1)
    args = check_solver_arguments(
        info, x0, t0, t1, steps=steps, rtol=rtol, atol=atol, max_steps=max_steps, times=times,
        options=options, check_finite=check_finite, cuda_graph=cuda_graph, adjoint=adjoint,
        takes_tolerances=takes_tolerances(info),
        adaptive_solvers=ODE_SOLVERS.names(adaptive=True), grid=grid, path=path,
        prediction=prediction)
    per_sample = _check_step_control(step_control, info.name, args.options, adjoint)
    if args.prediction != "velocity" and not info.needs_path:
        field = ConvertedField(field, args.path, args.prediction, "velocity")
    if callable(getattr(field, "on_interval", None)):
        field = field.on_interval(min(t0, t1), max(t0, t1))
    if per_sample:
        return solve_per_sample(field, x0, info, args)
    return BACKENDS[info.library](field, x0, info, args)


def _check_step_control(step_control: str, solver: str, options: dict | None,
                        adjoint: bool) -> bool:
    """Whether the solve steps per sample; ValueError for a value, solver or option that
    per-sample control does not take."""
    if step_control not in STEP_CONTROLS:
        raise ValueError(f"step_control={step_control!r}; accepted: {', '.join(STEP_CONTROLS)}")
    if step_control == "shared":
        return False
    if solver not in EMBEDDED_TABLEAUS:
        raise ValueError(
            f"step_control='per_sample' runs the adaptive Runge-Kutta pairs whose last stage "
            f"is the next step's first (FSAL); got solver={solver!r}. Accepted: "
            f"{', '.join(EMBEDDED_TABLEAUS)}")
    if adjoint:
        raise ValueError("step_control='per_sample' has no adjoint: gradients flow through "
                         "its steps (create_graph); pass adjoint=False")
    unknown = sorted(set(options or {}) - set(PER_SAMPLE_OPTIONS))
    if unknown:
        raise ValueError(f"options {unknown} are not taken with step_control='per_sample'; "
                         f"accepted: {', '.join(PER_SAMPLE_OPTIONS)}")
    return True
