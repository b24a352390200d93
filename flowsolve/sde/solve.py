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

import torch
from torch import Tensor
from torchsde import BaseBrownian

from .._core.counting import CountingField
from .._core.registry import SolverInfo
from .._core.types import Field
from ..ode.args import as_path, check_times, grid_indices, uniform_grid
from ..ode.grids import as_grid, time_grid
from ..ode.semilinear import SamplerLoop
from ..paths.affine import AffineGaussianPath, canonical_prediction
from ..paths.fields import ConvertedField
from .backends import DEFAULT_STEPS, SDE_SOLVERS, AdditiveSDE, Drift, SDESolution, integrate
from .brownian import (
    GridBrownian,
    check_steps,
    standard_increments,
)
from .diffusions import DIFFUSIONS, DiffusionSchedule, diffusion_schedule
from .samplers import SAMPLERS, make_sampler

__all__ = [
    "GridBrownian", "DiffusionSchedule", "DIFFUSIONS", "diffusion_schedule",
    "SDE_SOLVERS", "SDESolution", "sample_sde", "langevin",
]



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
    drift = Drift(velocity, score_c, path, g)
    drift.check(torch.tensor([t0, t1], dtype=torch.float64))
    sde = AdditiveSDE(drift, g, x0.shape[1:], info)
    x, t_rec, traj = integrate(sde, x0, solver, ts, generator, bm, record)
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
    sde = AdditiveSDE(lambda x, t: 0.5 * g(t) ** 2 * s(x, fixed), g, x0.shape[1:], info)
    ts = uniform_grid(s0, s1, steps)
    record = grid_indices(check_times(times, s0, s1), ts)
    x, t_rec, traj = integrate(sde, x0, solver, ts, generator, bm, record)
    return SDESolution(x, s.nfe, sde.drift.nfe, sde.noise.nfe, steps, solver, t_rec, traj,
                       torch.tensor(ts, dtype=torch.float64))


def _check_state(x0) -> None:
    if not torch.is_tensor(x0) or x0.dim() < 2 or not x0.is_floating_point():
        raise ValueError("x0 must be a floating tensor shaped (B, *event_shape); got "
                         f"{type(x0).__name__} {tuple(getattr(x0, 'shape', ()))}")
