r"""DDIM, DPM-Solver and DPM-Solver++: exponential integrators of the probability-flow ODE
in ``lambda = log(alpha / sigma)`` (see :mod:`flowsolve.ode.semilinear` for the semi-linear
form and the notation; ``h_i = lambda_{t_i} - lambda_{t_{i-1}}``, ``D`` the data and ``eps``
the noise prediction).

* ``ddim`` (Song et al. 2021; = DPM-Solver-1 = DPM-Solver++(1)):
  ``x_i = alpha_i D_{i-1} + sigma_i eps_{i-1}``.
* ``dpmpp_2m`` (Lu et al. 2022b, Algorithm 2), with ``r_i = h_{i-1} / h_i``:
  ``x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (e^{-h_i} - 1) [(1 + 1/(2 r_i)) D_{i-1}
  - 1/(2 r_i) D_{i-2}]``; the first step is DDIM.

A step with an infinite end (``alpha = 0`` at its start, ``sigma = 0`` at its end) is a
DDIM step: it is the exact limit of the first-order part of every update, and the
higher-order corrections of a step of infinite length have no finite limit. A model value
at an infinite ``lambda`` is not used by a later multistep extrapolation (``r_i = inf``:
the correction's limit is 0).
"""

from __future__ import annotations

import math

from torch import Tensor

from .semilinear import Denoiser, Node, Noise, Sampler, ddim_step, infinite_step

__all__ = ["DDIM", "DPMSolverPP2M", "SAMPLERS"]


class DDIM(Sampler):
    r"""DDIM with eta = 0: ``x_t = alpha_t D_s + sigma_t eps_s`` (first order)."""

    name = "ddim"
    order = 1.0

    def step(self, x: Tensor, i: int, grid: list[Node], denoiser: Denoiser, memory: dict,
             noise: Noise | None) -> Tensor:
        return ddim_step(grid[i + 1], denoiser(x, grid[i].t))


class DPMSolverPP2M(Sampler):
    r"""DPM-Solver++(2M): second-order multistep in the data prediction (Lu et al. 2022b,
    Algorithm 2); first step DDIM."""

    name = "dpmpp_2m"
    order = 2.0
    multistep = True

    def step(self, x: Tensor, i: int, grid: list[Node], denoiser: Denoiser, memory: dict,
             noise: Noise | None) -> Tensor:
        s, t = grid[i], grid[i + 1]
        post = denoiser(x, s.t)
        prev = memory.get("prev")  # (lambda, D) of the last evaluation
        memory["prev"] = (s.lam, post.D)
        if infinite_step(s, t) or prev is None or not math.isfinite(prev[0]):
            return ddim_step(t, post)
        h, h_prev = t.lam - s.lam, s.lam - prev[0]
        c = h / (2 * h_prev)  # 1 / (2 r)
        d = post.D * (1 + c) - prev[1] * c
        return x * (t.sigma / s.sigma) - d * (t.alpha * math.expm1(-h))


SAMPLERS: tuple[Sampler, ...] = (DDIM(), DPMSolverPP2M())
"""The samplers of this module, registered in :data:`flowsolve.ode.backends.ODE_SOLVERS`."""
