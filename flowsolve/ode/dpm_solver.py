r"""DDIM, DPM-Solver and DPM-Solver++: exponential integrators of the probability-flow ODE
in ``lambda = log(alpha / sigma)`` (see :mod:`flowsolve.ode.semilinear` for the semi-linear
form and the notation; a step goes from ``s = t_{i-1}`` to ``t = t_i``,
``h = lambda_t - lambda_s``, ``D`` is the data and ``eps`` the noise prediction).

* ``ddim`` (Song et al. 2021): ``x_t = alpha_t D_s + sigma_t eps_s``. It is also
  DPM-Solver-1 and DPM-Solver++(1) (Lu et al. 2022a, b), so those are not registered again.
* ``dpm_solver_2``, ``dpm_solver_3`` (Lu et al. 2022a, singlestep, noise prediction, orders
  2 and 3; stages at ``lambda_s + r h`` with ``r = 1/2``, resp. ``1/3, 2/3``).
* ``dpmpp_2s`` (Lu et al. 2022b, singlestep, data prediction, ``r = 1/2``, order 2).
* ``dpmpp_2m``, ``dpmpp_3m`` (Lu et al. 2022b, multistep, data prediction, orders 2 and 3;
  they start with lower orders: DDIM, then 2M). ``dpmpp_3m`` doubles the reference code's
  second divided difference, which is half of what third order needs (see
  :class:`DPMSolverPP3M`).

The formulas are in each class's docstring. The first-order part of each update is written
as the DDIM step ``alpha_t D_s + sigma_t eps_s`` (equal to ``(alpha_t / alpha_s) x_s -
sigma_t (e^h - 1) eps_s`` and to ``(sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D_s``),
so the noise-prediction forms are finite wherever the step's ``lambda`` are finite, even
where ``alpha_s`` underflows. A singlestep stage time ``u`` with ``lambda_u = lambda_s + r h``
is ``scheduler.snr_inverse(exp(lambda_u))``, computed for the whole grid in one float64
batch on the CPU before the loop (:func:`stage_nodes`); the updates use the ratios
``r = (lambda_u - lambda_s) / h`` of those nodes.

Infinite ends: a step with an infinite end (``alpha = 0`` at its start, ``sigma = 0`` at its
end) is a DDIM step: it is the exact limit of the first-order part of every update, and the
higher-order corrections of a step of infinite length have no finite limit. A model value
at an infinite ``lambda`` is not used by a later multistep extrapolation (its ratio
``r = inf``: the correction's limit is 0), so a multistep method with fewer usable points
in its history takes a step of lower order.

Example:
    >>> import torch, flowsolve as fs
    >>> path = fs.AffineGaussianPath(fs.CosineScheduler())
    >>> data = fs.Gaussian(torch.tensor([1.0, -1.0]), torch.tensor([0.25, 0.25]))
    >>> u = fs.analytic.marginal_velocity(data, path)
    >>> x0 = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> res = fs.sample(u, x0, "dpm_solver_3", steps=10, grid="logsnr", path=path)
    >>> res.nfe  # 3 calls in each of the 8 finite steps, 1 in the 2 with an infinite end
    26
    >>> exact = data.mean + 0.5 * x0  # the flow of N(m, 0.5^2 I) from t = 0 on this path
    >>> float((res.x - exact).abs().max()) < 0.01
    True
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from ..paths.schedules import Scheduler
from .semilinear import Denoiser, Node, Noise, Posterior, Sampler, ddim_step, infinite_step, nodes

__all__ = ["DDIM", "DPMSolver2", "DPMSolver3", "DPMSolverPP2S", "DPMSolverPP2M",
           "DPMSolverPP3M", "stage_nodes", "SAMPLERS"]

Stages = tuple[Node, ...]


def _sigma_expm1(sigma: float, h: float) -> float:
    """``sigma (e^h - 1)`` for ``h > 0``, without overflow in ``e^h`` where the product is a
    float (``inf`` where it is not)."""
    if h <= 1.0:
        return sigma * math.expm1(h)
    try:
        return math.exp(math.log(sigma) + h) - sigma
    except OverflowError:
        return math.inf


def stage_nodes(grid: Sequence[Node], scheduler: Scheduler, fractions: Sequence[float]
                ) -> list[Stages | None]:
    r"""The singlestep stages of every step of ``grid``: for step ``i`` (from ``grid[i]`` to
    ``grid[i + 1]``) the nodes at ``lambda = lambda_i + r h_i`` for each ``r`` in
    ``fractions``, at times ``scheduler.snr_inverse(exp(lambda))`` evaluated in one float64
    batch on the CPU.

    A step gets None (it will be a DDIM step) where an end is infinite, or where float64
    does not place its stages strictly inside it in ``lambda`` (steps too short or too long
    to resolve).

    Example:
        >>> import flowsolve as fs
        >>> from flowsolve.ode.semilinear import nodes
        >>> sch = fs.CondOTScheduler()
        >>> plan = stage_nodes(nodes(sch, [0.0, 0.5, 0.75, 1.0]), sch, [0.5])
        >>> plan[0], plan[2], round(plan[1][0].lam, 6), round(plan[1][0].t, 6)
        (None, None, 0.549306, 0.633975)
    """
    steps = [i for i in range(len(grid) - 1) if not infinite_step(grid[i], grid[i + 1])]
    plan: list[Stages | None] = [None] * (len(grid) - 1)
    lam = [grid[i].lam + r * (grid[i + 1].lam - grid[i].lam) for i in steps for r in fractions]
    if not lam:
        return plan
    times = scheduler.snr_inverse(torch.tensor(lam, dtype=torch.float64).exp())
    found = nodes(scheduler, times.tolist())
    k = len(fractions)
    for j, i in enumerate(steps):
        stages = tuple(found[j * k:(j + 1) * k])
        lams = [grid[i].lam, *(u.lam for u in stages), grid[i + 1].lam]
        if all(a < b for a, b in zip(lams, lams[1:], strict=False)):  # False at inf, NaN
            plan[i] = stages
    return plan


class DDIM(Sampler):
    r"""DDIM with eta = 0 (= DPM-Solver-1 = DPM-Solver++(1)):
    ``x_t = alpha_t D_s + sigma_t eps_s`` (first order)."""

    name = "ddim"
    order = 1.0

    def step(self, x: Tensor, i: int, grid: list[Node], denoiser: Denoiser, memory: dict,
             noise: Noise | None) -> Tensor:
        return ddim_step(grid[i + 1], denoiser(x, grid[i].t))


class _Singlestep(Sampler):
    """A singlestep method: model calls at ``grid[i]`` and at the stages of
    :func:`stage_nodes` inside each finite step; a DDIM step where the step has none."""

    fractions: ClassVar[tuple[float, ...]]
    noise_form: ClassVar[bool] = False

    def _plan(self, grid: list[Node], scheduler: Scheduler) -> list[Stages | None]:
        plan = stage_nodes(grid, scheduler, self.fractions)
        if self.noise_form:  # sigma_t e^h, the noise form's scale, must be a float
            plan = [None if p is None or math.isinf(_sigma_expm1(t.sigma, t.lam - s.lam))
                    else p for p, s, t in zip(plan, grid[:-1], grid[1:], strict=True)]
        return plan

    def prepare(self, grid: list[Node], scheduler: Scheduler) -> dict:
        """``{"stages": plan}``: the stage nodes of every step (None: a DDIM step)."""
        return {"stages": self._plan(grid, scheduler)}

    def evaluation_times(self, grid: list[Node], scheduler: Scheduler) -> list[float]:
        """Every grid time but the last, and every stage time."""
        stages = self._plan(grid, scheduler)
        return [n.t for n in grid[:-1]] + [u.t for p in stages if p is not None for u in p]

    def step(self, x: Tensor, i: int, grid: list[Node], denoiser: Denoiser, memory: dict,
             noise: Noise | None) -> Tensor:
        try:
            stages = memory["stages"][i]
        except KeyError:
            raise RuntimeError(
                f"sampler {self.name!r} needs its stage nodes in memory['stages'] "
                f"(Sampler.prepare, called once by SamplerLoop before the loop)") from None
        s, t = grid[i], grid[i + 1]
        post = denoiser(x, s.t)
        if stages is None:
            return ddim_step(t, post)
        return self.update(x, s, t, stages, post, denoiser)

    @abstractmethod
    def update(self, x: Tensor, s: Node, t: Node, stages: Stages, post: Posterior,
               denoiser: Denoiser) -> Tensor:
        """The state at ``t`` from ``x`` at ``s`` (finite step) given ``post`` at ``s``."""


class DPMSolver2(_Singlestep):
    r"""DPM-Solver-2 (Lu et al. 2022a, Algorithm 1 with ``r_1 = 1/2``), noise prediction,
    order 2:

        u_1 = alpha_{s_1} D_s + sigma_{s_1} eps_s,   lambda_{s_1} = lambda_s + r_1 h
        x_t = alpha_t D_s + sigma_t eps_s - sigma_t (e^h - 1) / (2 r_1) (eps(u_1, s_1) - eps_s)

    (``alpha_t D_s + sigma_t eps_s = (alpha_t / alpha_s) x_s - sigma_t (e^h - 1) eps_s``; with
    ``r_1 = 1/2`` the update is ``(alpha_t / alpha_s) x_s - sigma_t (e^h - 1) eps(u_1, s_1)``).
    Two model calls per finite step.
    """

    name = "dpm_solver_2"
    order = 2.0
    fractions = (0.5,)
    noise_form = True

    def update(self, x: Tensor, s: Node, t: Node, stages: Stages, post: Posterior,
               denoiser: Denoiser) -> Tensor:
        (u,) = stages
        h = t.lam - s.lam
        r = (u.lam - s.lam) / h
        eps_u = denoiser(ddim_step(u, post), u.t).eps
        return torch.sub(ddim_step(t, post), eps_u - post.eps,
                         alpha=_sigma_expm1(t.sigma, h) / (2 * r))


class DPMSolver3(_Singlestep):
    r"""DPM-Solver-3 (Lu et al. 2022a, Algorithm 2 with ``r_1 = 1/3``, ``r_2 = 2/3``), noise
    prediction, order 3; with ``phi_1(z) = e^z - 1`` and ``phi_2(z) = (e^z - 1) / z - 1``:

        u_1 = alpha_{s_1} D_s + sigma_{s_1} eps_s
        u_2 = alpha_{s_2} D_s + sigma_{s_2} eps_s
              - sigma_{s_2} (r_2 / r_1) phi_2(r_2 h) (eps(u_1, s_1) - eps_s)
        x_t = alpha_t D_s + sigma_t eps_s - sigma_t (1 / r_2) phi_2(h) (eps(u_2, s_2) - eps_s)

    (``lambda_{s_k} = lambda_s + r_k h``; ``alpha_u D_s + sigma_u eps_s = (alpha_u / alpha_s)
    x_s - sigma_u phi_1(lambda_u - lambda_s) eps_s``). Three model calls per finite step.
    """

    name = "dpm_solver_3"
    order = 3.0
    fractions = (1 / 3, 2 / 3)
    noise_form = True

    def update(self, x: Tensor, s: Node, t: Node, stages: Stages, post: Posterior,
               denoiser: Denoiser) -> Tensor:
        u1, u2 = stages
        h = t.lam - s.lam
        h1, h2 = u1.lam - s.lam, u2.lam - s.lam  # r_1 h, r_2 h
        d1 = denoiser(ddim_step(u1, post), u1.t).eps - post.eps
        c2 = (h2 / h1) * (_sigma_expm1(u2.sigma, h2) / h2 - u2.sigma)  # sigma (r2/r1) phi_2
        x2 = torch.sub(ddim_step(u2, post), d1, alpha=c2)
        d2 = denoiser(x2, u2.t).eps - post.eps
        c = (h / h2) * (_sigma_expm1(t.sigma, h) / h - t.sigma)  # sigma_t phi_2(h) / r_2
        return torch.sub(ddim_step(t, post), d2, alpha=c)


class DPMSolverPP2S(_Singlestep):
    r"""DPM-Solver++(2S) (Lu et al. 2022b, Algorithm 1 with ``r = 1/2``), data prediction,
    order 2:

        u = alpha_{s_1} D_s + sigma_{s_1} eps_s,   lambda_{s_1} = lambda_s + r h
        x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) [(1 - 1/(2r)) D_s + 1/(2r) D(u, s_1)]

    (``alpha_u D_s + sigma_u eps_s = (sigma_u / sigma_s) x_s - alpha_u (e^{-r h} - 1) D_s``;
    with ``r = 1/2`` the bracket is ``D(u, s_1)``). Two model calls per finite step.
    """

    name = "dpmpp_2s"
    order = 2.0
    fractions = (0.5,)

    def update(self, x: Tensor, s: Node, t: Node, stages: Stages, post: Posterior,
               denoiser: Denoiser) -> Tensor:
        (u,) = stages
        h = t.lam - s.lam
        c = h / (2 * (u.lam - s.lam))  # 1 / (2 r)
        d_u = denoiser(ddim_step(u, post), u.t).D
        d = torch.add(post.D * (1 - c), d_u, alpha=c)
        return _data_step(x, s, t, d)


def _data_step(x: Tensor, s: Node, t: Node, d: Tensor) -> Tensor:
    """``(sigma_t / sigma_s) x - alpha_t (e^{-h} - 1) d`` (finite ``h``)."""
    return torch.sub(x * (t.sigma / s.sigma), d, alpha=t.alpha * math.expm1(s.lam - t.lam))


def _history(memory: dict, s: Node, depth: int, d_s: Tensor) -> list[tuple[float, Tensor]]:
    """The usable ``(lambda, D)`` of the evaluations before ``s``, newest first: the leading
    ones at finite ``lambda`` strictly below the next (an infinite or repeated ``lambda``
    ends the history). Records ``(lambda_s, D_s)`` in ``memory`` for the next step, keeping
    ``depth`` entries."""
    usable, last = [], s.lam
    for lam, d in memory.get("history", ()):
        if not (math.isfinite(lam) and lam < last):
            break
        usable.append((lam, d))
        last = lam
    memory["history"] = [(s.lam, d_s), *usable[:depth - 1]]
    return usable


def _pp2m(x: Tensor, s: Node, t: Node, d0: Tensor, prev: tuple[float, Tensor]) -> Tensor:
    """DPM-Solver++(2M)'s update from ``x`` at ``s`` with ``D_s = d0`` and ``prev = (lambda,
    D)`` of the evaluation before."""
    c = (t.lam - s.lam) / (2 * (s.lam - prev[0]))  # 1 / (2 r)
    return _data_step(x, s, t, torch.sub(d0 * (1 + c), prev[1], alpha=c))


class DPMSolverPP2M(Sampler):
    r"""DPM-Solver++(2M): second-order multistep in the data prediction (Lu et al. 2022b,
    Algorithm 2), with ``r = h_{i-1} / h_i``:

        x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) [(1 + 1/(2r)) D_s - 1/(2r) D_{s'}]

    (``s'`` the grid time before ``s``); the first step, and a step whose ``D_{s'}`` is at an
    infinite ``lambda`` (or, by rounding, at ``lambda_s`` itself), is DDIM. One model call
    per step.
    """

    name = "dpmpp_2m"
    order = 2.0
    multistep = True

    def step(self, x: Tensor, i: int, grid: list[Node], denoiser: Denoiser, memory: dict,
             noise: Noise | None) -> Tensor:
        s, t = grid[i], grid[i + 1]
        post = denoiser(x, s.t)
        history = _history(memory, s, 1, post.D)
        if infinite_step(s, t) or not t.lam > s.lam or not history:
            return ddim_step(t, post)
        return _pp2m(x, s, t, post.D, history[0])


class DPMSolverPP3M(Sampler):
    r"""DPM-Solver++(3M): third-order multistep in the data prediction (Lu et al. 2022b; the
    third-order update of the reference implementation, with its second difference
    corrected, below). With ``h_0 = lambda_s - lambda_{s'}``, ``h_1 = lambda_{s'} -
    lambda_{s''}`` (the two grid times before ``s``), ``r_0 = h_0 / h``, ``r_1 = h_1 / h``,
    the divided differences

        Delta_0 = (D_s - D_{s'}) / r_0,   Delta_1 = (D_{s'} - D_{s''}) / r_1
        D1 = Delta_0 + r_0 / (r_0 + r_1) (Delta_0 - Delta_1)       (~ h D')
        D2 = 2 (Delta_0 - Delta_1) / (r_0 + r_1)                   (~ h^2 D'')

    and ``phi_1 = e^{-h} - 1``, ``phi_2 = phi_1 / h + 1``, ``phi_3 = phi_2 / h - 1/2``:

        x_t = (sigma_t / sigma_s) x_s - alpha_t phi_1 D_s + alpha_t phi_2 D1 - alpha_t phi_3 D2

    the integral of ``e^lambda`` times the Taylor polynomial ``D_s + tau D' + tau^2 D'' / 2``.
    The reference code (dpm-solver's ``multistep_dpm_solver_third_update``, and diffusers'
    and k-diffusion's copies) has ``D2 = (Delta_0 - Delta_1) / (r_0 + r_1)``, which is
    ``h^2 D'' / 2``: half the ``D''`` term, a local error ``alpha_t h^3 D'' / 12``, so
    global order 2.

    The first step is DDIM and the second DPM-Solver++(2M); history at an infinite
    ``lambda`` is not used (fewer usable points: DDIM or 2M). The DDIM start has a local
    error ``O(h^2)``: on a grid uniform in ``lambda`` it limits the global error to
    ``O(h^2)`` as ``h -> 0`` (seen on mixtures at a few hundred steps); order 3 holds where
    the first step is shorter, ``O(h^{3/2})`` or less. One model call per step.
    """

    name = "dpmpp_3m"
    order = 3.0
    multistep = True

    def step(self, x: Tensor, i: int, grid: list[Node], denoiser: Denoiser, memory: dict,
             noise: Noise | None) -> Tensor:
        s, t = grid[i], grid[i + 1]
        post = denoiser(x, s.t)
        history = _history(memory, s, 2, post.D)
        if infinite_step(s, t) or not t.lam > s.lam or not history:
            return ddim_step(t, post)
        if len(history) == 1:
            return _pp2m(x, s, t, post.D, history[0])
        (l1, d1), (l2, d2) = history
        h = t.lam - s.lam
        r0, r1 = (s.lam - l1) / h, (l1 - l2) / h
        delta0, delta1 = (post.D - d1) / r0, (d1 - d2) / r1
        diff = delta0 - delta1
        first = torch.add(delta0, diff, alpha=r0 / (r0 + r1))
        second = diff * (2 / (r0 + r1))
        phi1 = math.expm1(-h)
        phi2 = phi1 / h + 1.0
        phi3 = phi2 / h - 0.5
        out = _data_step(x, s, t, post.D)
        out = torch.add(out, first, alpha=t.alpha * phi2)
        return torch.sub(out, second, alpha=t.alpha * phi3)


SAMPLERS: tuple[Sampler, ...] = (DDIM(), DPMSolver2(), DPMSolver3(), DPMSolverPP2S(),
                                 DPMSolverPP2M(), DPMSolverPP3M())
"""The samplers of this module, registered in :data:`flowsolve.ode.backends.ODE_SOLVERS`."""
