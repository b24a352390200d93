r"""Stochastic low-NFE samplers: ancestral DDIM, DPM-Solver++(2M) SDE and EDM's stochastic
Heun sampler, on the semi-linear form of :mod:`flowsolve.ode.semilinear` (notation there:
``D = E[x1 | x_t]``, ``eps = E[x0 | x_t]``, ``lambda = log(alpha / sigma)``, a step from
``s`` to ``t`` of length ``h = lambda_t - lambda_s``, ``z`` fresh N(0, I) noise).

* ``ancestral`` (DDIM with eta, Song et al. 2021, eq. 16): the Gaussian transition that is
  exact when the data is a point,
  ``x_t = alpha_t D + sqrt(sigma_t^2 - c^2) eps + c z``, ``c = eta sigma_t sqrt(1 - e^{-2h})``.
  For variance-preserving paths ``c`` is DDIM's ``sigma_eta = eta sqrt((1 - abar_t) /
  (1 - abar_s)) sqrt(1 - abar_s / abar_t)`` (``abar = alpha^2``); eta = 0 is DDIM, eta = 1
  the ancestral step of DDPM (the posterior ``q(x_t | x_s, x1 = D)``; k-diffusion's
  ``euler_ancestral`` on the variance-exploding form ``x / alpha``).
* ``dpmpp_2m_sde`` (Lu et al. 2022b, SDE-DPM-Solver++(2M); k-diffusion's
  ``sample_dpmpp_2m_sde``, "midpoint", and diffusers' ``"sde-dpmsolver++"``), with
  ``r = h_prev / h`` and ``D1 = (D_s - D_prev) / r``:
  ``x_t = (sigma_t / sigma_s) e^{-eta h} x_s + alpha_t (1 - e^{-(1 + eta) h}) (D_s + D1 / 2)
  + sigma_t sqrt(1 - e^{-2 eta h}) z``. eta = 1 (the default) is the reference method
  (the discretised reverse SDE with ``g_t^2 = 2 sigma_t^2 lambda'_t``, i.e.
  ``diffusion="forward"`` of :func:`~flowsolve.sde.solve.sample_sde`); eta = 0 is
  DPM-Solver++(2M). Its first-order part is ``ancestral`` with
  ``eta_ddim^2 (1 - e^{-2h}) = 1 - e^{-2 eta h}``.
* ``edm_stochastic`` (Karras et al. 2022, Algorithm 2) in the noise level ``r = sigma /
  alpha`` and the scaled state ``y = x / alpha``: for ``r_i`` in ``[s_tmin, s_tmax]``,
  ``gamma = min(s_churn / N, sqrt(2) - 1)``, ``r_hat = r_i (1 + gamma)`` and
  ``y_hat = y_i + sqrt(r_hat^2 - r_i^2) s_noise z`` (a sample of ``p`` at the time
  ``t_hat`` where ``sigma / alpha = r_hat``); then Heun from ``t_hat`` to ``t_{i+1}`` in
  ``dy/dr = eps``: ``y' = y_hat + (r_{i+1} - r_hat) eps_hat`` (which is the DDIM step),
  ``y_{i+1} = y_hat + (r_{i+1} - r_hat) (eps_hat + eps') / 2``; Euler (one evaluation) on a
  last step to ``sigma = 0``.

**Infinite ends** (``alpha = 0`` at a step's start, ``sigma = 0`` at its end): the step
takes its first-order exact limit, never a NaN: ``ancestral`` is finite as written
(``e^{-2h} = 0``); ``dpmpp_2m_sde`` takes its first-order part,
``alpha_t D + sigma_t e^{-eta h} eps + sigma_t sqrt(1 - e^{-2 eta h}) z``
(``= alpha_t D + sigma_t z`` from ``alpha = 0`` with eta > 0, ``alpha_t D`` to
``sigma = 0``), and never extrapolates from a model value at an infinite ``lambda``;
``edm_stochastic`` skips the churn where ``r_i`` is infinite and takes the DDIM (Euler)
step. The churned noise level is clamped to the path's largest, ``r(t = 0)`` (finite for
linear VP and VE paths; ``t_hat = 0`` there), and no churn is added where the clamp leaves
none.

The times, coefficients and churn levels are host floats computed before the loop; the
noise of step ``i`` is ``noise(i, x)``, drawn by :func:`flowsolve.sde.solve.sample_sde` from
its ``generator`` or read from its Brownian path as ``(W(t_{i+1}) - W(t_i)) /
sqrt(t_{i+1} - t_i)``.

Example:
    >>> make_sampler("ancestral", {"eta": 0.5})
    Ancestral(eta=0.5)
    >>> sorted(s.name for s in SAMPLERS)
    ['ancestral', 'dpmpp_2m_sde', 'edm_stochastic']
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Mapping

import torch
from torch import Tensor

from ..ode.semilinear import (
    Denoiser,
    Node,
    Noise,
    Posterior,
    Sampler,
    ddim_step,
    infinite_step,
    nodes,
)
from ..paths.schedules import Scheduler

__all__ = ["Ancestral", "DPMSolverPP2MSDE", "EDMStochastic", "SAMPLERS", "make_sampler"]


def _number(solver: str, name: str, v, lo: float = 0.0, hi: float = math.inf,
            what: str = "") -> float:
    """A real number in ``[lo, hi]`` (finite unless ``hi`` is inf), or the error naming it."""
    accepted = what or f"a number in [{lo:g}, {hi:g}]"
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"solver {solver!r}: option {name} must be {accepted}; got "
                        f"{type(v).__name__} {v!r}")
    v = float(v)
    if math.isnan(v) or not lo <= v <= hi or (hi < math.inf and not math.isfinite(v)):
        raise ValueError(f"solver {solver!r}: option {name} must be {accepted}; got {v!r}")
    return v


def _noise(noise: Noise | None, solver: str, i: int, x: Tensor) -> Tensor:
    if noise is None:
        raise ValueError(f"solver {solver!r} is stochastic: its loop needs noise(i, x) "
                         "(sample_sde gives it)")
    return noise(i, x)


def _add(y: Tensor, c: float, z: Tensor | None) -> Tensor:
    """``y + c z`` with a host-float ``c`` (``y`` itself when ``c = 0``)."""
    return y if c == 0.0 else y.add(z, alpha=c)


def _ancestral_step(s: Node, t: Node, post: Posterior, eta: float, z: Tensor | None
                    ) -> Tensor:
    r"""``x_t = alpha_t D + sqrt(sigma_t^2 - c^2) eps + c z``, ``c = eta sigma_t
    sqrt(1 - e^{-2h})`` (``sqrt(sigma_t^2 - c^2) = sigma_t sqrt(1 - eta^2 + eta^2
    e^{-2h})``); finite for an infinite ``h`` (``e^{-2h} = 0``) and ``alpha_t D`` at
    ``sigma_t = 0``. ``z`` is only read where ``c > 0``."""
    if t.sigma == 0.0 or eta == 0.0:
        return ddim_step(t, post)
    h = t.lam - s.lam
    e2h = math.exp(-2 * h)  # 0 for h = inf
    c = eta * t.sigma * math.sqrt(-math.expm1(-2 * h))
    keep = t.sigma * math.sqrt((1 - eta * eta) + eta * eta * e2h)
    x = post.D * t.alpha
    if keep != 0.0:
        x = x.add(post.eps, alpha=keep)
    return _add(x, c, z)


class Ancestral(Sampler):
    r"""DDIM with ``eta`` in [0, 1] (default 1: DDPM's ancestral step):
    ``x_t = alpha_t D + sqrt(sigma_t^2 - c^2) eps + c z``, ``c = eta sigma_t
    sqrt(1 - e^{-2h})``. One evaluation a step. As the steps shrink it converges pathwise
    (given the same Brownian path) to the SDE of :func:`~flowsolve.sde.solve.sample_sde`
    with ``g_t = eta g_forward``, ``g_forward^2 = 2 sigma_t^2 lambda'_t``
    (``diffusion="forward"``): strong order 1 (the declared order), weak order 1.

    Args:
        eta: the share of fresh noise, 0 (DDIM, deterministic) to 1.
    """

    name = "ancestral"
    order = 1.0
    stochastic = True

    def __init__(self, eta: float = 1.0):
        self.eta = _number(self.name, "eta", eta, 0.0, 1.0)

    def step(self, x: Tensor, i: int, grid: list[Node], denoiser: Denoiser, memory: dict,
             noise: Noise | None) -> Tensor:
        s, t = grid[i], grid[i + 1]
        post = denoiser(x, s.t)
        z = _noise(noise, self.name, i, x) if self.eta > 0 and t.sigma > 0 else None
        return _ancestral_step(s, t, post, self.eta, z)

    def __repr__(self) -> str:
        return f"Ancestral(eta={self.eta!r})"


class DPMSolverPP2MSDE(Sampler):
    r"""SDE-DPM-Solver++(2M), "midpoint" form (Lu et al. 2022b; k-diffusion
    ``sample_dpmpp_2m_sde``): ``x_t = (sigma_t / sigma_s) e^{-eta h} x_s + alpha_t
    (1 - e^{-(1 + eta) h}) (D_s + D1 / 2) + sigma_t sqrt(1 - e^{-2 eta h}) z``,
    ``D1 = (D_s - D_prev) / r``, ``r = h_prev / h``; the first step, a step with an infinite
    end and a step after a model value at an infinite ``lambda`` are first order
    (``D1 = 0``). One evaluation a step. It converges pathwise to the SDE of
    :func:`~flowsolve.sde.solve.sample_sde` with ``g_t^2 = 2 eta sigma_t^2 lambda'_t``
    (``sqrt(eta)`` times ``diffusion="forward"``) with strong order 1 (the declared order:
    the noise is first order); its weak order is 2 on Gaussian data (measured where the
    law of the output is exact, tests/test_stochastic_samplers.py), not claimed in general.

    Args:
        eta: the noise, 0 (DPM-Solver++(2M), deterministic) to 1 (the default: the
            reference SDE sampler).
    """

    name = "dpmpp_2m_sde"
    order = 1.0
    multistep = True
    stochastic = True

    def __init__(self, eta: float = 1.0):
        self.eta = _number(self.name, "eta", eta, 0.0, 1.0)

    def step(self, x: Tensor, i: int, grid: list[Node], denoiser: Denoiser, memory: dict,
             noise: Noise | None) -> Tensor:
        s, t = grid[i], grid[i + 1]
        post = denoiser(x, s.t)
        prev = memory.get("prev")  # (lambda, D) of the last evaluation
        memory["prev"] = (s.lam, post.D)
        eta = self.eta
        if infinite_step(s, t):  # first-order exact limit
            if t.sigma == 0.0 or eta == 0.0:
                return ddim_step(t, post)
            return _add(post.D * t.alpha, t.sigma, _noise(noise, self.name, i, x))
        h = t.lam - s.lam
        b = -t.alpha * math.expm1(-(1 + eta) * h)
        x_t = _add(x * ((t.sigma / s.sigma) * math.exp(-eta * h)), b, post.D)
        if prev is not None and math.isfinite(prev[0]):
            r = (s.lam - prev[0]) / h
            x_t = _add(x_t, 0.5 * b / r, post.D - prev[1])
        if eta == 0.0:
            return x_t
        c = t.sigma * math.sqrt(-math.expm1(-2 * eta * h))
        return _add(x_t, c, _noise(noise, self.name, i, x))

    def __repr__(self) -> str:
        return f"DPMSolverPP2MSDE(eta={self.eta!r})"


class _Churn:
    """One step's plan: the churned node ``hat`` (``hat`` is the grid node where there is
    no churn) and the noise scale ``alpha_hat sqrt(r_hat^2 - r_i^2) s_noise`` in x."""

    __slots__ = ("hat", "scale", "ratio")

    def __init__(self, hat: Node, scale: float, ratio: float):
        self.hat, self.scale, self.ratio = hat, scale, ratio


class EDMStochastic(Sampler):
    r"""EDM's stochastic sampler (Karras et al. 2022, Algorithm 2) on any affine path, in
    the noise level ``r = sigma / alpha`` (module doc). Two evaluations a step (one on a
    step with an infinite end).

    The defaults are EDM's ImageNet-64 settings (their Table 5: ``S_churn = 40``,
    ``S_tmin = 0.05``, ``S_tmax = 50``) except ``s_noise = 1`` (EDM's 1.003 inflates the
    noise to offset an imperfect denoiser; with an exact model it would bias the
    marginals): stochastic by default. ``s_churn = 0`` is EDM's deterministic Heun sampler
    (second order). No order is declared: ``gamma`` depends on the number of steps, so the
    method changes with them.

    Args:
        s_churn: total churn ``S_churn >= 0``; ``gamma = min(s_churn / N, sqrt(2) - 1)``
            on the ``N`` steps of the grid.
        s_tmin, s_tmax: the noise levels ``r_i`` (``sigma / alpha``, EDM's sigma) that get
            churn, ``0 <= s_tmin <= s_tmax`` (``s_tmax`` may be inf).
        s_noise: the scale of the added noise, ``> 0`` (1: exact marginals).
    """

    name = "edm_stochastic"
    order = None
    stochastic = True

    def __init__(self, s_churn: float = 40.0, s_tmin: float = 0.05, s_tmax: float = 50.0,
                 s_noise: float = 1.0):
        n = self.name
        self.s_churn = _number(n, "s_churn", s_churn, what="a finite number >= 0")
        if not math.isfinite(self.s_churn):
            raise ValueError(f"solver {n!r}: option s_churn must be a finite number >= 0; "
                             f"got {s_churn!r}")
        self.s_tmin = _number(n, "s_tmin", s_tmin, what="a number >= 0 (a noise level "
                              "sigma/alpha)")
        self.s_tmax = _number(n, "s_tmax", s_tmax, what="a number >= 0 (a noise level "
                              "sigma/alpha; inf for no upper bound)")
        if self.s_tmin > self.s_tmax:
            raise ValueError(f"solver {n!r}: need s_tmin <= s_tmax; got s_tmin={s_tmin!r}, "
                             f"s_tmax={s_tmax!r}")
        self.s_noise = _number(n, "s_noise", s_noise, what="a finite number > 0")
        if not (0 < self.s_noise < math.inf):
            raise ValueError(f"solver {n!r}: option s_noise must be a finite number > 0; got "
                             f"{s_noise!r}")

    def plan(self, grid: list[Node], scheduler: Scheduler) -> list[_Churn]:
        """The churn of every step of ``grid`` (host floats; ``scheduler.snr_inverse``)."""
        n = len(grid) - 1
        gamma = min(self.s_churn / n, math.sqrt(2) - 1)
        r_max = nodes(scheduler, [0.0])[0].r  # the path's largest noise level
        want: dict[int, float] = {}
        for i, node in enumerate(grid[:-1]):
            r = node.r
            if gamma > 0 and math.isfinite(r) and self.s_tmin <= r <= self.s_tmax:
                r_hat = min(r * (1 + gamma), r_max)
                if r_hat > r:
                    want[i] = r_hat
        t_hat = {}
        if want:
            snr = torch.tensor([1 / r for r in want.values()], dtype=torch.float64)
            ts = scheduler.snr_inverse(snr).tolist()
            for (i, r_hat), t in zip(want.items(), ts, strict=True):
                t_hat[i] = 0.0 if r_hat == r_max else min(t, grid[i].t)
        hats = nodes(scheduler, list(t_hat.values())) if t_hat else []
        hat_of = dict(zip(t_hat, hats, strict=True))
        out = []
        for i, node in enumerate(grid[:-1]):
            hat = hat_of.get(i)
            if hat is None or hat.t >= node.t or not hat.r > node.r:
                out.append(_Churn(node, 0.0, 1.0))
                continue
            extra = math.sqrt(hat.r ** 2 - node.r ** 2) if math.isfinite(hat.r) else math.inf
            if math.isfinite(extra):  # x_hat = (alpha_hat / alpha_i) x_i + scale z
                out.append(_Churn(hat, hat.alpha * extra * self.s_noise, hat.alpha / node.alpha))
            else:  # to alpha = 0 (r_max infinite is never reached: r_hat is finite)
                out.append(_Churn(node, 0.0, 1.0))
        return out

    def prepare(self, grid: list[Node], scheduler: Scheduler) -> dict:
        """The churn plan of ``grid``, each solve's ``memory["plan"]``."""
        return {"plan": self.plan(grid, scheduler)}

    def evaluation_times(self, grid: list[Node], scheduler: Scheduler) -> list[float]:
        plan = self.plan(grid, scheduler)
        times = [p.hat.t for p in plan]
        times += [grid[i + 1].t for i, p in enumerate(plan) if not infinite_step(p.hat,
                                                                                  grid[i + 1])]
        return times

    def step(self, x: Tensor, i: int, grid: list[Node], denoiser: Denoiser, memory: dict,
             noise: Noise | None) -> Tensor:
        churn: _Churn = memory["plan"][i]
        hat, t = churn.hat, grid[i + 1]
        if churn.scale > 0:
            x = _add(x * churn.ratio, churn.scale, _noise(noise, self.name, i, x))
        post = denoiser(x, hat.t)
        x_pred = ddim_step(t, post)  # Euler in (r, y): y_hat + (r_t - r_hat) eps_hat
        if infinite_step(hat, t):
            return x_pred
        post2 = denoiser(x_pred, t.t)
        # y_next = y_hat + (r_t - r_hat) (eps_hat + eps') / 2, times alpha_t
        return _add(x_pred, 0.5 * (t.sigma - t.alpha * hat.r), post2.eps - post.eps)

    def __repr__(self) -> str:
        return (f"EDMStochastic(s_churn={self.s_churn!r}, s_tmin={self.s_tmin!r}, "
                f"s_tmax={self.s_tmax!r}, s_noise={self.s_noise!r})")


SAMPLERS: tuple[Sampler, ...] = (Ancestral(), DPMSolverPP2MSDE(), EDMStochastic())
"""The stochastic samplers with their default options, registered in
:data:`flowsolve.sde.backends.SDE_SOLVERS` (library ``"flowsolve"``, ``stochastic=True``,
``needs_path=True``)."""

_CLASSES = {type(s).name: type(s) for s in SAMPLERS}


def make_sampler(name: str, options: Mapping | None = None) -> Sampler:
    """A fresh sampler ``name`` with ``options`` (its keyword arguments), checked: unknown
    names and values out of range are refused, naming the accepted ones."""
    cls = _CLASSES[name]
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise TypeError(f"options must be a dict of solver {name!r}'s parameters; got "
                        f"{type(options).__name__} {options!r}")
    accepted = list(inspect.signature(cls).parameters)
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise ValueError(f"solver {name!r} takes the options {', '.join(accepted)}; got "
                         f"unknown {', '.join(map(repr, unknown))}")
    return cls(**options)
