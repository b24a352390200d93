r"""What :func:`flowsolve.sde.solve.sample_sde` hands to torchsde: the additive-noise system
``dX = [u_t(X) + g_t^2/2 s_t(X)] dt + g_t dW`` (:class:`AdditiveSDE`, with its drift
:class:`Drift`), the registry :data:`SDE_SOLVERS` read from torchsde (and flowsolve's
stochastic samplers), :class:`SDESolution`, and :func:`integrate`, one torchsde solve on a
grid with counted evaluations and the finiteness check.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torchsde._core.base_sde import ForwardSDE
from torchsde._core.methods import select as _select_method
from torchsde.settings import METHODS, NOISE_TYPES, SDE_TYPES

from .._core.counting import CountingField
from .._core.errors import NonFiniteStateError
from .._core.finite import FiniteRecord
from .._core.registry import SolverInfo, SolverRegistry
from ..ode.args import uniform_grid
from ..paths.affine import AffineGaussianPath
from .brownian import (
    LEVY_AREAS,
    GridBrownian,
    check_brownian,
)
from .diffusions import DiffusionSchedule
from .samplers import SAMPLERS

__all__ = ["Drift", "AdditiveSDE", "SDE_SOLVERS", "DEFAULT_STEPS", "SDESolution", "integrate"]


# -- the system handed to torchsde -------------------------------------------------------------
class Drift:
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


class AdditiveSDE:
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


def integrate(sde: AdditiveSDE, x0: Tensor, solver_name: str, grid: list[float],
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
