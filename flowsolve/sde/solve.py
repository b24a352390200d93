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

Every solve runs on a time grid (``grid=``, as the fixed-step ODE solvers: uniform by
default, log-SNR, EDM, a shift or given times; :func:`flowsolve.ode.grids.time_grid`),
recorded in :attr:`SDESolution.grid`. Besides torchsde's methods, :data:`SDE_SOLVERS` holds
flowsolve's stochastic low-NFE samplers (:mod:`flowsolve.sde.samplers`: ``ancestral``,
``dpmpp_2m_sde``, ``edm_stochastic``), which take one model of any parameterisation
(``prediction=``), the path, and their own ``options=``; their noise ``z_i`` comes from the
same generator or Brownian path, ``z_i = (W(t_{i+1}) - W(t_i)) / sqrt(t_{i+1} - t_i)``.
"""

from __future__ import annotations

import inspect
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
from ..ode.args import as_path, check_times, grid_indices, uniform_grid
from ..ode.grids import as_grid, time_grid
from ..ode.semilinear import SamplerLoop
from ..paths.affine import AffineGaussianPath, canonical_prediction
from ..paths.fields import ConvertedField
from .brownian import (
    LEVY_AREAS,
    GridBrownian,
    check_brownian,
    check_steps,
    standard_increments,
)
from .diffusions import DIFFUSIONS, DiffusionSchedule, diffusion_schedule
from .samplers import SAMPLERS, make_sampler

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
                          library="torchsde", method=method, stochastic=True)
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
    for smp in SAMPLERS:
        infos.append(SolverInfo(smp.name, "sde", False, smp.order, "flowsolve", smp.name,
                                multistep=smp.multistep, stochastic=True, needs_path=True))
    return SolverRegistry(infos, what="SDE solver")


SDE_SOLVERS: SolverRegistry = _build_registry()
"""The SDE solvers of :func:`sample_sde`: torchsde's methods that run on flowsolve's
additive-noise SDE, with their strong order for additive noise (``log_ode`` is left out: it
needs a d x d Levy-area approximation and equals ``midpoint`` for additive noise), and
flowsolve's stochastic samplers (library ``"flowsolve"``, ``needs_path``; see
:mod:`flowsolve.sde.samplers`: their ``order`` is the strong order towards the SDE they
discretise, None for ``edm_stochastic``)."""


# -- integration -------------------------------------------------------------------------------
DEFAULT_STEPS = 100
"""Grid cells of :func:`sample_sde` when neither ``steps`` nor given grid times fix them."""


@dataclass(frozen=True)
class SDESolution:
    """Result of :func:`sample_sde` / :func:`langevin`.

    Attributes:
        x: the state at ``t1``, ``(B, *event_shape)``.
        nfe: model evaluations (velocity + score calls), counted.
        nfe_drift: evaluations of the drift f, counted (a sampler of
            :mod:`flowsolve.sde.samplers`: its model evaluations).
        nfe_diffusion: evaluations of the noise term ``g_t dW``, counted (0 for a sampler:
            its noise scales are host numbers computed before the loop).
        steps: grid cells.
        solver: the solver's name.
        times: requested times ``(T,)`` (``None`` unless ``times`` was given).
        trajectory: states at ``times``, ``(T, B, *event_shape)`` (``None`` unless ``times``
            was given).
        grid: the solve's time grid ``t_0 .. t_N`` (float64, on the CPU; Langevin: in its
            own time s), as ``Solution.grid`` of :func:`flowsolve.ode.solve.sample`.
    """

    x: Tensor
    nfe: int
    nfe_drift: int
    nfe_diffusion: int
    steps: int
    solver: str
    times: Tensor | None = None
    trajectory: Tensor | None = None
    grid: Tensor | None = None


def _integrate(sde: _AdditiveSDE, x0: Tensor, solver_name: str, grid: list[float],
               generator, bm, record: list[int]
               ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Step torchsde's solver over ``grid`` (float64 times, increasing; the uniform grid is
    ``linspace(t0, t1, steps + 1)``). With a GridBrownian the loop reads nothing back from
    the device (non-finite states are flagged there and read once at the end); torchsde's
    Brownian objects call ``float(t)`` per query."""
    steps, t0, t1 = len(grid) - 1, grid[0], grid[-1]
    y = x0.reshape(x0.shape[0], -1)
    levy = _SOLVER_LEVY[solver_name]
    if bm is None:
        where = ({"steps": steps, "t0": t0, "t1": t1} if grid == uniform_grid(t0, t1, steps)
                 else {"grid": grid})  # the uniform motion as it always was
        bm = GridBrownian(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device,
                          levy_area=levy, **where)
    check_brownian(bm, y.shape, grid)
    if levy != "none" and bm.levy_area_approximation not in (LEVY_AREAS[levy], "davie", "foster"):
        raise ValueError(f"solver {solver_name!r} needs a Brownian motion with Levy area "
                         f"{levy!r}; got bm={bm!r}")
    cls = _select_method(solver_name, sde.sde_type)
    solver = cls(sde=ForwardSDE(sde), bm=bm, dt=(t1 - t0) / steps, adaptive=False, rtol=0.0,
                 atol=0.0, dt_min=0.0, options={})
    ts = torch.tensor(grid, dtype=torch.float64).to(x0.dtype)
    if not bool((ts[1:] > ts[:-1]).all()):
        k = int((ts[1:] <= ts[:-1]).nonzero()[0, 0])
        raise ValueError(f"the grid's times {grid[k]!r} and {grid[k + 1]!r} are one time in "
                         f"{x0.dtype}, the state's dtype: use fewer steps, another grid or a "
                         f"float64 state")
    ts = ts.to(x0.device)
    saved = {0: y} if 0 in record else {}
    finite = FiniteRecord(x0.device)
    extra = solver.init_extra_solver_state(ts[0], y)
    for k in range(steps):
        y, extra = solver.step(ts[k], ts[k + 1], y, extra)
        if finite.add(y, k):  # known at once on the CPU; on a device read once at the end
            break
        if k + 1 in record:
            saved[k + 1] = y
    k_bad = finite.first_bad()
    if k_bad is not None:
        raise NonFiniteStateError(
            solver_name, float(ts[k_bad]),
            f"the state became non-finite in step {k_bad + 1} of {steps}, from "
            f"t={float(ts[k_bad]):.6g} to t={float(ts[k_bad + 1]):.6g}")
    shape = x0.shape
    traj = torch.stack([saved[k].reshape(shape) for k in record]) if record else None
    t_rec = ts[record] if record else None
    return y.reshape(shape), t_rec, traj


# -- the stochastic samplers -------------------------------------------------------------------
def _sample_with_sampler(info: SolverInfo, field, x0: Tensor, *, score, path, diffusion,
                         grid: list[float], record: list[int], generator, bm, prediction,
                         options) -> tuple[Tensor, int, Tensor | None, Tensor | None]:
    """A stochastic sampler of :mod:`flowsolve.sde.samplers` over ``grid``: ``(x, nfe,
    times, trajectory)``."""
    name = info.name
    if diffusion is not None:
        others = ", ".join(_torchsde_names())
        raise ValueError(f"solver {name!r} sets its own noise from the path (its options: "
                         f"{_options_help(name)}); diffusion= applies to the torchsde solvers "
                         f"({others}); got diffusion={diffusion!r}")
    if score is not None:
        raise ValueError(f"solver {name!r} takes one model, field=, with what it predicts as "
                         f"prediction= ('velocity', 'score', 'epsilon', 'x1', 'v'); got score= "
                         f"as well (for a score model: field=score, prediction='score')")
    if field is None:
        raise ValueError(f"solver {name!r} needs the model as field= (with prediction=); got "
                         f"field=None")
    if path is None:
        raise ValueError(f"solver {name!r} steps in the path's log-SNR: pass path= (the "
                         f"AffineGaussianPath the model was trained on, or its Scheduler)")
    sampler = make_sampler(name, options)
    loop = SamplerLoop(sampler, field, path, prediction, grid, x0, record)
    z = standard_increments(x0, grid, generator, bm)
    x, saved, finite = loop(x0, lambda i, _x: z[i], True)
    loop.check(finite)
    times = (torch.tensor([grid[k] for k in record], dtype=torch.float64).to(x0.dtype)
             .to(x0.device) if record else None)
    return x, loop.nfe, times, torch.stack(saved) if saved else None


def _torchsde_names() -> list[str]:
    return [n for n, i in SDE_SOLVERS.items() if i.library == "torchsde"]


def _options_help(name: str) -> str:
    """The options of sampler ``name`` with their defaults, for messages."""
    cls = type(make_sampler(name))
    return ", ".join(f"{p.name}={p.default!r}" for p in
                     inspect.signature(cls).parameters.values()) or "none"


def sample_sde(field: Field | None, x0: Tensor, *, score: Field | None = None,
               path: AffineGaussianPath | None = None,
               diffusion: float | str | Callable | DiffusionSchedule | None = None,
               solver: str = "euler", steps: int | None = None, t0: float = 0.0,
               t1: float = 1.0, generator: torch.Generator | None = None,
               bm: BaseBrownian | None = None,
               times: Sequence[float] | Tensor | None = None, grid="uniform",
               prediction: str = "velocity", options: dict | None = None) -> SDESolution:
    r"""Sample from ``p_{t1}`` by a stochastic solve from ``x0 ~ p_{t0}``.

    **torchsde's solvers** integrate ``dX = [u_t(X) + g_t^2/2 s_t(X)] dt + g_t dW`` (every
    ``g_t >= 0`` keeps the marginals; see the module doc). **flowsolve's stochastic
    samplers** (``"ancestral"``, ``"dpmpp_2m_sde"``, ``"edm_stochastic"``;
    :mod:`flowsolve.sde.samplers`) take one model of any parameterisation and its path and
    add their own noise (``options=``), a few model evaluations a step.

    Args:
        field: the model, ``(x, t) -> Tensor``: the velocity ``u_t(x)`` (or what
            ``prediction`` says), or None with ``score``.
        x0: ``(B, *event_shape)``, a sample of ``p_{t0}``.
        score: ``s_t(x) = grad log p_t(x)`` (torchsde solvers); a missing model is
            converted on ``path``.
        path: the :class:`~flowsolve.paths.affine.AffineGaussianPath` (or its scheduler):
            converts a single model, shapes the ``"logsnr"`` / ``"edm"`` grids, and is
            required by the samplers.
        diffusion: ``g_t`` of the torchsde solvers (None: 1.0): a number, a callable of t,
            a :class:`DiffusionSchedule` or a name in :data:`DIFFUSIONS` (``"constant"``,
            ``"sigma_scaled"``, ``"forward"``). The samplers refuse it.
        solver: a name in :data:`SDE_SOLVERS`.
        steps: grid cells (default 100 unless given grid times fix them).
        t0, t1: the interval, ``0 <= t0 < t1 <= 1`` (0 = noise, 1 = data).
        grid: where the ``steps + 1`` times lie, as for the fixed-step solvers of
            :func:`flowsolve.ode.solve.sample` (:func:`flowsolve.ode.grids.time_grid`):
            ``"uniform"`` (``linspace(t0, t1, steps + 1)``, the default), ``"logsnr"``,
            ``"edm"`` (with ``path``), a shift ``s > 0``, a grid object or the times.
        generator: seeds the noise (None: a fresh unseeded generator; torch's global RNG is
            never used): for torchsde solvers a :class:`GridBrownian` on the grid; for the
            samplers ``z_i`` of shape ``(N, *x0.shape)`` drawn in one call (the same draws).
        bm: a torchsde Brownian object of shape ``(B, D)`` to use instead (e.g. a finer
            GridBrownian: its grid must contain the solve's); a sampler reads
            ``z_i = (W(t_{i+1}) - W(t_i)) / sqrt(t_{i+1} - t_i)`` from it, so solvers given
            one ``bm`` share one noise path.
        times: grid points at which to keep the state: strictly increasing, each a point
            of the grid given once (checked as by :func:`flowsolve.ode.solve.sample` for a
            fixed-step solver, so float32 times such as ``torch.linspace(0, 1, steps + 1)``
            name their grid points).
        prediction: what ``field`` predicts (``"velocity"``, ``"score"``, ``"epsilon"``,
            ``"x1"``, ``"v"``): read by the samplers as posterior means; for a torchsde
            solver converted to a velocity on ``path``.
        options: a sampler's parameters (``ancestral``: ``eta``; ``dpmpp_2m_sde``: ``eta``;
            ``edm_stochastic``: ``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise``).

    Returns:
        :class:`SDESolution` with ``x`` at ``t1``, the counted evaluations and the grid.

    Raises:
        ValueError: a model's first output is not shaped like ``x`` with ``x``'s dtype
            (it would be broadcast into the drift, or change the state's dtype); arguments
            a solver does not take (``diffusion``/``score`` for a sampler, ``options`` for
            torchsde's), options out of range, a ``bm`` whose grid misses the solve's.

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
        >>> res = sample_sde(u, torch.randn(4, 2, generator=g), solver="dpmpp_2m_sde",
        ...                  path=path, steps=8, grid="logsnr", generator=g)
        >>> res.nfe, [round(t, 3) for t in res.grid[:3].tolist()]
        (8, [0.0, 0.012, 0.068])
    """
    info = SDE_SOLVERS[solver]
    _check_state(x0)
    if steps is not None:
        check_steps(steps)
    if not (0.0 <= t0 < t1 <= 1.0):
        raise ValueError(f"need 0 <= t0 < t1 <= 1 (0 = noise, 1 = data); got t0={t0!r}, "
                         f"t1={t1!r}")
    t0, t1 = float(t0), float(t1)
    path = as_path(path)
    spec = as_grid(grid)
    if steps is None and spec.steps is None:
        steps = DEFAULT_STEPS
    ts = time_grid(spec, steps, t0=t0, t1=t1, path=path)
    record = grid_indices(check_times(times, t0, t1), ts)
    grid_out = torch.tensor(ts, dtype=torch.float64)
    if info.library == "flowsolve":
        x, nfe, t_rec, traj = _sample_with_sampler(
            info, field, x0, score=score, path=path, diffusion=diffusion, grid=ts,
            record=record, generator=generator, bm=bm, prediction=prediction, options=options)
        return SDESolution(x, nfe, nfe, 0, len(ts) - 1, solver, t_rec, traj, grid_out)
    if options:
        raise ValueError(f"solver {solver!r} takes no options (options= are the parameters of "
                         f"flowsolve's stochastic samplers: "
                         f"{', '.join(s.name for s in SAMPLERS)}); got options={options!r}")
    prediction = canonical_prediction(prediction, "prediction")
    if prediction != "velocity":
        if field is None:
            raise ValueError(f"prediction={prediction!r} says what field predicts; got "
                             f"field=None")
        if path is None:
            raise ValueError(f"a {prediction!r} model is converted to a velocity on the path: "
                             f"pass path= (the AffineGaussianPath the model was trained on, "
                             f"or its Scheduler)")
        field = ConvertedField(field, path, prediction, "velocity", interval=(t0, t1))
    g = diffusion_schedule(1.0 if diffusion is None else diffusion, path=path)
    velocity = CountingField(field, like_input=True) if field is not None else None
    score_c = CountingField(score, like_input=True) if score is not None else None
    drift = _Drift(velocity, score_c, path, g)
    drift.check(torch.tensor([t0, t1], dtype=torch.float64))
    sde = _AdditiveSDE(drift, g, x0.shape[1:], info)
    x, t_rec, traj = _integrate(sde, x0, solver, ts, generator, bm, record)
    nfe = (velocity.nfe if velocity else 0) + (score_c.nfe if score_c else 0)
    return SDESolution(x, nfe, sde.drift.nfe, sde.noise.nfe, len(ts) - 1, solver, t_rec, traj,
                       grid_out)


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
    ``solver`` is one of torchsde's (the samplers of :data:`SDE_SOLVERS` need a path).
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
    if info.library != "torchsde":
        raise ValueError(f"langevin runs torchsde's solvers ({', '.join(_torchsde_names())}); "
                         f"solver {solver!r} is a sampler of a path (sample_sde)")
    _check_state(x0)
    g = diffusion_schedule(diffusion)
    s = CountingField(score, like_input=True)
    fixed = torch.tensor(float(score_t), dtype=x0.dtype, device=x0.device)
    sde = _AdditiveSDE(lambda x, t: 0.5 * g(t) ** 2 * s(x, fixed), g, x0.shape[1:], info)
    ts = uniform_grid(s0, s1, steps)
    record = grid_indices(check_times(times, s0, s1), ts)
    x, t_rec, traj = _integrate(sde, x0, solver, ts, generator, bm, record)
    return SDESolution(x, s.nfe, sde.drift.nfe, sde.noise.nfe, steps, solver, t_rec, traj,
                       torch.tensor(ts, dtype=torch.float64))


def _check_state(x0) -> None:
    if not torch.is_tensor(x0) or x0.dim() < 2 or not x0.is_floating_point():
        raise ValueError("x0 must be a floating tensor shaped (B, *event_shape); got "
                         f"{type(x0).__name__} {tuple(getattr(x0, 'shape', ()))}")
