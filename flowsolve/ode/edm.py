r"""EDM's deterministic Heun sampler (Karras et al. 2022, Algorithm 1) on any affine path.

EDM integrates in the noise level ``r = sigma / alpha = e^{-lambda}`` with the scaled state
``y = x / alpha``, where the probability-flow ODE reads ``dy/dr = (y - D) / r = eps`` (the
noise prediction; notation of :mod:`flowsolve.ode.semilinear`). On a step from ``s`` to
``t``:

* Euler: ``y' = y_s + (r_t - r_s) eps_s``, i.e. ``x' = alpha_t D_s + sigma_t eps_s`` (DDIM,
  :func:`~flowsolve.ode.semilinear.ddim_step`);
* Heun: ``y_t = y_s + (r_t - r_s) (eps_s + eps'_t) / 2`` with ``eps'_t`` the noise prediction
  at ``(x', t)``, i.e. in ``x`` (finite wherever ``alpha_s > 0``)

      x_t = x' + c (eps'_t - eps_s),   c = alpha_t (r_t - r_s) / 2 = (sigma_t - alpha_t r_s) / 2.

The last step to ``sigma_t = 0`` is Euler (as in EDM), and so is a step from ``alpha_s = 0``
(``r_s`` infinite: the DDIM step is its limit). NFE: 2 per finite step, 1 per such step.

Example:
    >>> import torch, flowsolve as fs
    >>> from flowsolve.ode.solve import sample
    >>> path = fs.AffineGaussianPath(fs.CondOTScheduler())
    >>> u = fs.analytic.marginal_velocity(fs.GaussianMixture.ring(4), path)
    >>> x0 = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> sample(u, x0, "edm_heun", steps=10, path=path, grid="edm").nfe  # 1 + 8 * 2 + 1
    18
"""

from __future__ import annotations

from torch import Tensor

from ..paths.schedules import Scheduler
from .semilinear import Denoiser, Node, Noise, Sampler, ddim_step, infinite_step

__all__ = ["EDMHeun", "SAMPLERS"]


def _euler_only(s: Node, t: Node) -> bool:
    """The step from ``s`` to ``t`` is an Euler (DDIM) step: it ends at ``sigma = 0`` or
    starts at ``alpha = 0``."""
    return infinite_step(s, t) or t.sigma == 0.0


class EDMHeun(Sampler):
    r"""EDM's Heun sampler: ``x' = alpha_t D_s + sigma_t eps_s`` then
    ``x_t = x' + (sigma_t - alpha_t sigma_s / alpha_s) (eps(x', t) - eps_s) / 2`` (order 2);
    Euler on a step to ``sigma_t = 0`` or from ``alpha_s = 0``."""

    name = "edm_heun"
    order = 2.0

    def evaluation_times(self, grid: list[Node], scheduler: Scheduler) -> list[float]:
        """Every grid time but the last, and the end of every Heun step."""
        ends = [t.t for s, t in zip(grid[:-1], grid[1:], strict=True) if not _euler_only(s, t)]
        return [n.t for n in grid[:-1]] + ends

    def step(self, x: Tensor, i: int, grid: list[Node], denoiser: Denoiser, memory: dict,
             noise: Noise | None) -> Tensor:
        s, t = grid[i], grid[i + 1]
        post = denoiser(x, s.t)
        x_euler = ddim_step(t, post)
        if _euler_only(s, t):
            return x_euler
        eps_t = denoiser(x_euler, t.t).eps
        c = 0.5 * (t.sigma - t.alpha * s.r)
        return x_euler + (eps_t - post.eps) * c


SAMPLERS: tuple[Sampler, ...] = (EDMHeun(),)
"""``edm_heun``, registered in :data:`flowsolve.ode.backends.ODE_SOLVERS`."""
