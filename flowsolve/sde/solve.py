r"""Stochastic sampling: the marginal-preserving SDE, Langevin dynamics, torchsde's solvers.

For a path with marginals ``p_t``, velocity ``u_t`` and score ``s_t = grad log p_t``, every
diffusion coefficient ``g_t >= 0`` gives an SDE with the same marginals (Fokker-Planck):

    dX = [u_t(X) + g_t^2 / 2 s_t(X)] dt + g_t dW,        t from t0 to t1.

``g_t = 0`` is the probability-flow ODE. The noise is *additive* (``g_t`` does not depend
on X), so Ito and Stratonovich agree, Milstein terms vanish, Euler-Maruyama has strong
order 1, and every torchsde method runs; ``g_prod(t, y, v) = g_t v`` means no ``d x d``
matrix is ever built. Images are flattened to the ``(B, D)`` state torchsde wants.

Given only one model on an :class:`~flowsolve.paths.affine.AffineGaussianPath` the other comes
from the path's conversion ``u = (alpha'/alpha) x + (sigma^2 alpha'/alpha - sigma sigma') s``:

* score only: ``drift = (alpha'/alpha) x + (sigma^2 alpha'/alpha - sigma sigma' + g^2/2) s``
  (singular where ``alpha_t = 0``: t = 0 for CondOT / cosine; start at ``t0 = eps``);
* velocity only: ``g^2/2 s = -(g^2 / (2 sigma)) eps_hat`` with ``eps_hat`` the epsilon
  prediction converted from ``u`` (finite on [0, 1] for CondOT), so the drift is finite
  at ``sigma_t = 0`` exactly when ``g_t^2 / (2 sigma_t)`` is: true for ``"sigma_scaled"``
  (``scale^2 sigma_t / 2``) on any path; for ``"forward"``
  (``scale^2 (sigma_t alpha'_t / alpha_t - sigma'_t)``) only where ``sigma'_t`` is finite,
  as for CondOT and cosine but not linear VP (``sigma = sqrt(1 - alpha^2)``, ``sigma'_1``
  infinite, ``g_1 = sqrt(beta_min)`` not 0); false for a constant (end at ``t1 = 1 - eps``).

The endpoint coefficients are checked before integrating; a non-finite state during the
solve raises :class:`~flowsolve._core.errors.NonFiniteStateError` (a ``FloatingPointError``,
the ODE front door's error too) naming the time and the solver.

Noise comes from a :class:`GridBrownian`: all increments on the solver's own grid drawn in
one ``randn`` call from a ``torch.Generator`` (the fastest choice measured, no host sync per
query, no tiny last step in float32). Solves on coarser sub-grids of the same object see
the same Brownian path, so two solvers or two step sizes can be compared path by path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torchsde import BaseBrownian
from torchsde._core.base_sde import ForwardSDE
from torchsde._core.methods import select as _select_method
from torchsde.settings import METHODS, NOISE_TYPES, SDE_TYPES

from .._core.counting import CountingField
from .._core.errors import NonFiniteStateError
from .._core.finite import FiniteRecord
from .._core.registry import SolverInfo, SolverRegistry
from .._core.types import Field
from ..ode.args import check_times, grid_indices, uniform_grid
from ..paths.affine import AffineGaussianPath
from .brownian import LEVY_AREAS, GridBrownian, check_steps
from .diffusions import DIFFUSIONS, DiffusionSchedule, diffusion_schedule

__all__ = [
    "GridBrownian", "DiffusionSchedule", "DIFFUSIONS", "diffusion_schedule",
    "SDE_SOLVERS", "SDESolution", "sample_sde", "langevin",
]



# -- the system handed to torchsde -------------------------------------------------------------
class _Drift:
    """``f(x, t) = u + g^2/2 s`` from (velocity, score), velocity only, or score only."""

    def __init__(self, velocity, score, path, diffusion: DiffusionSchedule):
        if velocity is None and score is None:
            raise ValueError("give a velocity field, a score (score=...), or both")
        if (velocity is None or score is None) and not isinstance(path, AffineGaussianPath):
            given = "score" if velocity is None else "velocity"
            raise ValueError(f"only a {given} model was given: path=AffineGaussianPath(...) is "
                             f"needed to convert it; got path={path!r}")
        self.velocity, self.score, self.path, self.g = velocity, score, path, diffusion

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(a_t, b_t) with drift = a_t x + b_t * model output (one model only)."""
        if self.velocity is None:  # drift from the score, see the module doc
            a, b = self.path.conversion_coefficients(t, "score", "velocity")
            return a, b + 0.5 * self.g(t) ** 2
        a, b = self.path.conversion_coefficients(t, "velocity", "epsilon")  # eps = a x + b u
        k = self.g.half_g2_over_sigma(t)
        return -k * a, 1 - k * b

    def check(self, t: Tensor) -> None:
        """Raise ValueError naming the first t where the drift's coefficients are not finite."""
        if self.velocity is not None and self.score is not None:
            parts = [self.g(t)]
        else:
            parts = list(self.coefficients(t))
        bad = ~torch.stack([torch.isfinite(p.expand_as(t)) for p in parts]).all(0)
        if bool(bad.any()):
            where = t[bad][0].item()
            raise ValueError(
                f"the SDE drift/diffusion is singular at t={where!r} (diffusion "
                f"{self.g.name}, path {self.path!r}, models: "
                f"{'velocity ' if self.velocity else ''}{'score' if self.score else ''}): "
                "restrict the interval (t0=eps or t1=1-eps); for a velocity-only drift at "
                "sigma_t = 0, diffusion='sigma_scaled' keeps g_t^2 / (2 sigma_t) finite on any "
                "path, 'forward' only where sigma'_t is finite (CondOT, cosine; not linear VP)")

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        if self.velocity is not None and self.score is not None:
            return self.velocity(x, t) + 0.5 * self.g(t) ** 2 * self.score(x, t)
        a, b = self.coefficients(t)
        return a * x + b * (self.velocity or self.score)(x, t)


class _AdditiveSDE:
    """``dy = f(t, y) dt + g_t dW`` on the flattened state ``y = x.reshape(B, D)``."""

    def __init__(self, drift: Callable, diffusion: DiffusionSchedule, event_shape, info):
        self.drift = CountingField(drift)
        self.noise = CountingField(lambda v, t: diffusion(t) * v)  # g_t v: counts g evaluations
        self.g_t, self.event_shape = diffusion, tuple(event_shape)
        self.sde_type, self.noise_type = _SOLVER_FACTS[info.name]

    def f(self, t: Tensor, y: Tensor) -> Tensor:
        return self.drift(y.view(y.shape[0], *self.event_shape), t).reshape(y.shape)

    def g_prod(self, t: Tensor, y: Tensor, v: Tensor) -> Tensor:
        return self.noise(v, t)

    def g(self, t: Tensor, y: Tensor) -> Tensor:  # diagonal form, (B, D): never d x d
        return self.noise(torch.ones_like(y), t)


# -- the solver registry, read from torchsde ---------------------------------------------------
class _ProbeSDE:
    def __init__(self, noise_type, sde_type, with_g):
        self.noise_type, self.sde_type = noise_type, sde_type
        self.f = lambda t, y: -y
        self.g_prod = lambda t, y, v: 0.5 * v
        if with_g:
            self.g = lambda t, y: torch.full_like(y, 0.5)


def _probe(method: str):
    """Run one step of ``method`` on a 1-d additive SDE; return (SolverInfo, sde_type, noise
    type) or None if torchsde cannot run it without a d x d Levy area or matrix."""
    cls = _select_method(method, SDE_TYPES.ito)
    if cls.sde_type != SDE_TYPES.ito:
        cls = _select_method(method, SDE_TYPES.stratonovich)
    levy = [a for a in ("none", "space-time") if LEVY_AREAS[a] in cls.levy_area_approximations]
    if not levy:
        return None
    bm = GridBrownian((1, 1), steps=1, generator=torch.Generator().manual_seed(0),
                      dtype=torch.float64, levy_area=levy[0])
    order = None
    for noise_type in (NOISE_TYPES.additive, NOISE_TYPES.diagonal):
        sde = _ProbeSDE(noise_type, cls.sde_type, with_g=noise_type != NOISE_TYPES.additive)
        try:
            solver = cls(sde=ForwardSDE(sde), bm=bm, dt=1.0, adaptive=False, rtol=0.0, atol=0.0,
                         dt_min=0.0, options={})
        except ValueError:
            continue
        order = solver.strong_order if order is None else order  # additive-noise order
        t0, t1, y0 = torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64), \
            torch.ones(1, 1, dtype=torch.float64)
        try:
            solver.step(t0, t1, y0, solver.init_extra_solver_state(t0, y0))
        except RuntimeError:  # needs g itself: run it as diagonal noise (g is (B, D))
            continue
        info = SolverInfo(name=method, kind="sde", adaptive=False, order=float(order),
                          library="torchsde", method=method)
        return info, (cls.sde_type, noise_type), levy[0]
    return None


_SOLVER_FACTS: dict[str, tuple[str, str]] = {}
_SOLVER_LEVY: dict[str, str] = {}


def _build_registry() -> SolverRegistry:
    infos = []
    for method in METHODS.all():
        if method == METHODS.adjoint_reversible_heun:
            continue  # only valid as the adjoint of reversible_heun
        found = _probe(method)
        if found is not None:
            info, facts, levy = found
            infos.append(info)
            _SOLVER_FACTS[method], _SOLVER_LEVY[method] = facts, levy
    return SolverRegistry(infos, what="SDE solver")


SDE_SOLVERS: SolverRegistry = _build_registry()
"""torchsde methods that run on flowsolve's additive-noise SDE, with their strong order for
additive noise (``log_ode`` is left out: it needs a d x d Levy-area approximation and equals
``midpoint`` for additive noise)."""


# -- integration -------------------------------------------------------------------------------
@dataclass(frozen=True)
class SDESolution:
    """Result of :func:`sample_sde` / :func:`langevin`.

    Attributes:
        x: the state at ``t1``, ``(B, *event_shape)``.
        nfe: model evaluations (velocity + score calls), counted.
        nfe_drift: evaluations of the drift f, counted.
        nfe_diffusion: evaluations of the noise term ``g_t dW``, counted.
        steps: grid cells.
        solver: the solver's name.
        times: requested times ``(T,)`` (``None`` unless ``times`` was given).
        trajectory: states at ``times``, ``(T, B, *event_shape)`` (``None`` unless ``times``
            was given).
    """

    x: Tensor
    nfe: int
    nfe_drift: int
    nfe_diffusion: int
    steps: int
    solver: str
    times: Tensor | None = None
    trajectory: Tensor | None = None


def _grid(t0: float, t1: float, steps: int, x: Tensor) -> Tensor:
    return torch.linspace(t0, t1, steps + 1, dtype=torch.float64).to(x.dtype)


def _record_indices(times, t0: float, t1: float, steps: int) -> list[int]:
    """Indices in ``linspace(t0, t1, steps + 1)`` of the requested ``times``, through the
    ODE front door's checks (:func:`flowsolve.ode.args.check_times`, ``grid_indices``):
    strictly increasing, inside ``[t0, t1]`` (float32 rounding just beyond an end names
    that end), each a grid point (to 1e-3 of a cell, so float32 times name their point)
    named once."""
    grid = uniform_grid(t0, t1, steps)
    return grid_indices(check_times(times, t0, t1), grid)


def _check_on_grid(bm: GridBrownian, t0: float, t1: float, steps: int) -> None:
    """Every point of the solve's grid must be a point of ``bm``'s grid (checked here on the
    host, once: on an accelerator ``bm`` itself rounds off-grid queries to avoid syncs)."""
    lo, hi = min(t0, t1), max(t0, t1)
    h = (bm.t1 - bm.t0) / bm.steps
    cells, offset = (hi - lo) / steps / h, (lo - bm.t0) / h
    if not (round(cells) >= 1 and abs(cells - round(cells)) < 1e-6
            and abs(offset - round(offset)) < 1e-6 and lo >= bm.t0 - 1e-9 * h
            and hi <= bm.t1 + 1e-9 * h):
        raise ValueError(
            f"bm is a GridBrownian on [{bm.t0}, {bm.t1}] with {bm.steps} cells of {h:.6g}; the "
            f"solve on [{lo}, {hi}] with {steps} steps of {(hi - lo) / steps:.6g} does not lie "
            "on its grid. Give bm steps that are a multiple of the solve's on the same "
            "interval (e.g. GridBrownian(size, steps=k * steps, t0=..., t1=...))")


def _integrate(sde: _AdditiveSDE, x0: Tensor, solver_name: str, t0: float, t1: float,
               steps: int, generator, bm, times) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Step torchsde's solver over the grid ``linspace(t0, t1, steps + 1)``. With a
    GridBrownian the loop reads nothing back from the device (non-finite states are flagged
    there and read once at the end); torchsde's Brownian objects call ``float(t)`` per query."""
    record = _record_indices(times, t0, t1, steps)  # [] for times=None
    y = x0.reshape(x0.shape[0], -1)
    levy = _SOLVER_LEVY[solver_name]
    if bm is None:
        bm = GridBrownian(x0.shape, steps=steps, t0=t0, t1=t1, generator=generator,
                          dtype=x0.dtype, device=x0.device, levy_area=levy)
    elif not isinstance(bm, BaseBrownian) or tuple(bm.shape) != tuple(y.shape):
        raise ValueError(f"bm must be a torchsde Brownian object of shape (B, D) = "
                         f"{tuple(y.shape)}; got {bm!r}")
    if isinstance(bm, GridBrownian):
        _check_on_grid(bm, t0, t1, steps)
    if levy != "none" and bm.levy_area_approximation not in (LEVY_AREAS[levy], "davie", "foster"):
        raise ValueError(f"solver {solver_name!r} needs a Brownian motion with Levy area "
                         f"{levy!r}; got bm={bm!r}")
    cls = _select_method(solver_name, sde.sde_type)
    solver = cls(sde=ForwardSDE(sde), bm=bm, dt=(t1 - t0) / steps, adaptive=False, rtol=0.0,
                 atol=0.0, dt_min=0.0, options={})
    grid = _grid(t0, t1, steps, x0).to(x0.device)
    saved = {0: y} if 0 in record else {}
    finite = FiniteRecord(x0.device)
    extra = solver.init_extra_solver_state(grid[0], y)
    for k in range(steps):
        y, extra = solver.step(grid[k], grid[k + 1], y, extra)
        if finite.add(y, k):  # known at once on the CPU; on a device read once at the end
            break
        if k + 1 in record:
            saved[k + 1] = y
    k_bad = finite.first_bad()
    if k_bad is not None:
        raise NonFiniteStateError(
            solver_name, float(grid[k_bad]),
            f"the state became non-finite in step {k_bad + 1} of {steps}, from "
            f"t={float(grid[k_bad]):.6g} to t={float(grid[k_bad + 1]):.6g}")
    shape = x0.shape
    traj = torch.stack([saved[k].reshape(shape) for k in record]) if record else None
    t_rec = grid[record] if record else None
    return y.reshape(shape), t_rec, traj


def sample_sde(field: Field | None, x0: Tensor, *, score: Field | None = None,
               path: AffineGaussianPath | None = None,
               diffusion: float | str | Callable | DiffusionSchedule = 1.0,
               solver: str = "euler", steps: int = 100, t0: float = 0.0, t1: float = 1.0,
               generator: torch.Generator | None = None, bm: BaseBrownian | None = None,
               times: Sequence[float] | Tensor | None = None) -> SDESolution:
    r"""Integrate ``dX = [u_t(X) + g_t^2/2 s_t(X)] dt + g_t dW`` from ``x0`` at ``t0`` to ``t1``.

    Args:
        field: the velocity ``u_t(x)`` (a field ``(x, t) -> Tensor``), or None with ``score``.
        x0: ``(B, *event_shape)``, a sample of ``p_{t0}``.
        score: ``s_t(x) = grad log p_t(x)``; a missing model is converted on ``path``.
        diffusion: ``g_t``: a number, a callable of t, a :class:`DiffusionSchedule` or a name
            in :data:`DIFFUSIONS` (``"constant"``, ``"sigma_scaled"``, ``"forward"``).
        solver: a name in :data:`SDE_SOLVERS`; steps: cells of the grid
            ``linspace(t0, t1, steps + 1)``; ``[t0, t1]`` within [0, 1].
        generator: seeds the :class:`GridBrownian` (None: a fresh unseeded generator;
            torch's global RNG is never used); ``bm``: a torchsde Brownian object of shape
            ``(B, D)`` to use instead (e.g. a finer GridBrownian).
        times: grid points at which to keep the state: strictly increasing, each a point
            of ``linspace(t0, t1, steps + 1)`` given once (checked as by
            :func:`flowsolve.ode.solve.sample` for a fixed-step solver, so float32 times such
            as ``torch.linspace(0, 1, steps + 1)`` name their grid points).

    Returns:
        :class:`SDESolution` with ``x`` at ``t1`` and the counted evaluations.

    Raises:
        ValueError: a model's first output is not shaped like ``x`` with ``x``'s dtype
            (it would be broadcast into the drift, or change the state's dtype).

    Example:
        >>> import flowsolve as fs
        >>> path = fs.AffineGaussianPath(fs.CondOTScheduler())
        >>> data = fs.Gaussian(torch.zeros(2), torch.ones(2))
        >>> u = fs.analytic.marginal_velocity(data, path)
        >>> g = torch.Generator().manual_seed(0)
        >>> res = sample_sde(u, torch.randn(4, 2, generator=g), path=path,
        ...                  diffusion="sigma_scaled", steps=10, generator=g)
        >>> res.x.shape, res.nfe, res.nfe_diffusion
        (torch.Size([4, 2]), 10, 10)
    """
    info = SDE_SOLVERS[solver]
    _check_state(x0)
    check_steps(steps)
    if not (0.0 <= t0 < t1 <= 1.0):
        raise ValueError(f"need 0 <= t0 < t1 <= 1 (0 = noise, 1 = data); got t0={t0!r}, "
                         f"t1={t1!r}")
    g = diffusion_schedule(diffusion, path=path)
    velocity = CountingField(field, like_input=True) if field is not None else None
    score_c = CountingField(score, like_input=True) if score is not None else None
    drift = _Drift(velocity, score_c, path, g)
    drift.check(torch.tensor([t0, t1], dtype=torch.float64))
    sde = _AdditiveSDE(drift, g, x0.shape[1:], info)
    x, t_rec, traj = _integrate(sde, x0, solver, float(t0), float(t1), steps, generator, bm,
                                times)
    nfe = (velocity.nfe if velocity else 0) + (score_c.nfe if score_c else 0)
    return SDESolution(x, nfe, sde.drift.nfe, sde.noise.nfe, steps, solver, t_rec, traj)


def langevin(score: Field, x0: Tensor, *, diffusion: float | Callable = 1.0, steps: int = 100,
             dt: float | None = None, t_span: tuple[float, float] | None = None,
             score_t: float = 1.0, solver: str = "euler", generator: torch.Generator | None = None,
             bm: BaseBrownian | None = None,
             times: Sequence[float] | Tensor | None = None) -> SDESolution:
    r"""Langevin dynamics ``dX = g_s^2/2 grad log p(X) ds + g_s dW`` for the fixed target
    ``p = p_{score_t}``: ``grad log p(x) = score(x, score_t)``. Its stationary law is ``p``.

    The Langevin time s runs over ``t_span = (s0, s1)`` or ``[0, steps * dt]`` (exactly one
    of the two); ``diffusion`` is a number or a callable of s. The Euler-Maruyama bias in
    the stationary law is O(dt) (unadjusted Langevin). ``times`` are points of the grid
    ``linspace(s0, s1, steps + 1)`` in Langevin time, checked as in :func:`sample_sde`.
    """
    if (dt is None) == (t_span is None):
        raise ValueError(f"give exactly one of dt or t_span; got dt={dt!r}, t_span={t_span!r}")
    check_steps(steps)
    s0, s1 = (0.0, steps * float(dt)) if dt is not None else map(float, t_span)
    if not (math.isfinite(s0) and math.isfinite(s1) and s0 < s1):
        raise ValueError(f"the Langevin time span must be finite and increasing; got "
                         f"dt={dt!r}, t_span={t_span!r}")
    if isinstance(diffusion, str):
        raise ValueError(f"diffusion={diffusion!r}: Langevin takes a number or a callable of "
                         "its own time s (named schedules belong to a path)")
    info = SDE_SOLVERS[solver]
    _check_state(x0)
    g = diffusion_schedule(diffusion)
    s = CountingField(score, like_input=True)
    fixed = torch.tensor(float(score_t), dtype=x0.dtype, device=x0.device)
    sde = _AdditiveSDE(lambda x, t: 0.5 * g(t) ** 2 * s(x, fixed), g, x0.shape[1:], info)
    x, t_rec, traj = _integrate(sde, x0, solver, s0, s1, steps, generator, bm, times)
    return SDESolution(x, s.nfe, sde.drift.nfe, sde.noise.nfe, steps, solver, t_rec, traj)


def _check_state(x0) -> None:
    if not torch.is_tensor(x0) or x0.dim() < 2 or not x0.is_floating_point():
        raise ValueError("x0 must be a floating tensor shaped (B, *event_shape); got "
                         f"{type(x0).__name__} {tuple(getattr(x0, 'shape', ()))}")
