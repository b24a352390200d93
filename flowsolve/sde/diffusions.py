"""Diffusion coefficients ``g_t`` of marginal-preserving SDEs (additive noise)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..paths.affine import AffineGaussianPath

__all__ = ["DiffusionSchedule", "DIFFUSIONS", "diffusion_schedule"]


class DiffusionSchedule:
    r"""A diffusion coefficient ``g_t`` (a function of t only: additive noise).

    ``half_g2_over_sigma(t)`` is ``g_t^2 / (2 sigma_t)``, the factor in front of
    ``-eps_hat`` in the drift of a velocity-only model; subclasses give it in closed form
    where it stays finite at ``sigma_t = 0``.
    """

    def __init__(self, g: Callable[[Tensor], Tensor | float], name: str,
                 path: AffineGaussianPath | None = None):
        self._g, self.name, self.path = g, name, path

    def __call__(self, t: Tensor) -> Tensor:
        g = torch.as_tensor(self._g(t), dtype=t.dtype, device=t.device)
        if g.shape != t.shape and g.dim() != 0:  # metadata only: no device synchronisation
            raise ValueError(
                f"the diffusion coefficient {self.name} must return a number or a tensor shaped "
                f"like t (g_t depends on time only: the noise is additive); at t of shape "
                f"{tuple(t.shape)} it returned shape {tuple(g.shape)}")
        return g

    def half_g2_over_sigma(self, t: Tensor) -> Tensor:
        g2 = self(t) ** 2  # g = 0 (probability flow) is 0 here even where sigma_t = 0
        sigma = _need_path(self.path, self.name).scheduler(t).sigma_t
        return torch.where(g2 == 0, torch.zeros_like(g2), g2 / (2 * sigma))

    def __repr__(self) -> str:
        return f"DiffusionSchedule({self.name})"


class _SigmaScaled(DiffusionSchedule):
    def __init__(self, path: AffineGaussianPath, scale: float):
        super().__init__(lambda t: scale * path.scheduler(t).sigma_t, f"sigma_scaled {scale:g}",
                         path)
        self.scale = scale

    def half_g2_over_sigma(self, t):
        return 0.5 * self.scale**2 * self.path.scheduler(t).sigma_t


class _Forward(DiffusionSchedule):
    def __init__(self, path: AffineGaussianPath, scale: float):
        super().__init__(self._g_forward, f"forward {scale:g}", path)
        self.scale = scale

    def _g_forward(self, t):
        v = self.path.scheduler(t)
        g2 = 2 * (v.sigma_t**2 * v.d_alpha_t / v.alpha_t - self.path.scheduler.sigma_d_sigma(t))
        return self.scale * torch.sqrt(g2.clamp_min(0))

    def half_g2_over_sigma(self, t):
        v = self.path.scheduler(t)
        return self.scale**2 * (v.sigma_t * v.d_alpha_t / v.alpha_t - v.d_sigma_t)


DIFFUSIONS: dict[str, str] = {
    "constant": "g_t = scale",
    "sigma_scaled": "g_t = scale * sigma_t: vanishes where sigma_t = 0 (t = 1), finite on [0, 1]",
    "forward": "g_t^2 = 2 scale^2 (sigma_t^2 alpha'_t / alpha_t - sigma_t sigma'_t) "
               "= 2 scale^2 sigma_t^2 d/dt log(alpha_t / sigma_t): scale 1 is the reverse of the "
               "forward noising SDE (g_t^2 = beta for linear VP); infinite where alpha_t = 0",
}
"""Named diffusion coefficients ``g_t`` of :func:`diffusion_schedule`, with their formulas."""


def _need_path(path, what: str) -> AffineGaussianPath:
    if not isinstance(path, AffineGaussianPath):
        raise ValueError(f"{what} needs path=AffineGaussianPath(...); got path={path!r}")
    return path


def diffusion_schedule(diffusion: float | str | Callable | DiffusionSchedule, *,
                       path: AffineGaussianPath | None = None,
                       scale: float = 1.0) -> DiffusionSchedule:
    """Build ``g_t`` from a number (constant), a callable ``t -> g_t``, or a name in
    :data:`DIFFUSIONS` (``constant``, ``sigma_scaled``, ``forward``; the last two need
    ``path``) multiplied by ``scale``."""
    if isinstance(diffusion, DiffusionSchedule):
        return diffusion
    if isinstance(diffusion, (int, float)) and not isinstance(diffusion, bool):
        if not (math.isfinite(diffusion) and diffusion >= 0):
            raise ValueError(f"diffusion must be a finite number >= 0; got {diffusion!r}")
        g = float(diffusion)
        return DiffusionSchedule(lambda t: torch.full_like(t, g), f"constant {g:g}", path)
    if isinstance(diffusion, str):
        if diffusion not in DIFFUSIONS:
            raise ValueError(f"unknown diffusion {diffusion!r}; accepted: a number >= 0, a "
                             f"callable t -> g_t, or one of {', '.join(DIFFUSIONS)}")
        if diffusion == "constant":
            return diffusion_schedule(float(scale), path=path)
        cls = _SigmaScaled if diffusion == "sigma_scaled" else _Forward
        return cls(_need_path(path, f"diffusion={diffusion!r}"), float(scale))
    if callable(diffusion):
        return DiffusionSchedule(diffusion, getattr(diffusion, "__name__", "callable"), path)
    raise TypeError("diffusion must be a number, a callable t -> g_t, a DiffusionSchedule or "
                    f"one of {', '.join(DIFFUSIONS)}; got {type(diffusion).__name__}")
