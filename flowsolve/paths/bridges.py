r"""Gaussian bridges between two arbitrary samples: the paths of I-CFM, OT-CFM and SB-CFM.

Given a coupled pair ``(x0, x1)`` from any source and data distributions (the source need
not be Gaussian), a bridge puts

    x_t = (1 - t) x0 + t x1 + sigma_t eps,   eps ~ N(0, I),

with conditional velocity ``dx_t = x1 - x0 + sigma'_t eps``. Two noise schedules:

* ``"constant"``: ``sigma_t = sigma`` (``sigma'_t = 0``), I-CFM / OT-CFM of Tong et al.
  (TMLR 2024); ``sigma = 0`` is rectified flow;
* ``"brownian"``: ``sigma_t = sigma sqrt(t (1 - t))``, the Brownian bridge of diffusion
  coefficient ``sigma``: with an entropic-OT coupling of regularisation ``2 sigma^2`` it
  gives the Schrodinger bridge (SB-CFM). ``sigma'_t eps = (1 - 2t) / (2 t (1 - t)) (x_t -
  mu_t)`` is infinite at t = 0 and t = 1 (a draw of exactly t = 0 or 1 raises).

The regression :func:`~flowsolve.training.losses.bridge_matching_loss` is minimised by the
marginal velocity of the bridge's mixture path; for Gaussian sources
:class:`~flowsolve.paths.affine.AffineGaussianPath` is
the richer tool (conversions, scores, closed forms).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._core.checks import as_time, check_same_shape, generator_or_fresh, per_sample
from .affine import PathSample

__all__ = ["GaussianBridge", "BRIDGE_SCHEDULES"]

BRIDGE_SCHEDULES = ("constant", "brownian")


class GaussianBridge:
    """``x_t = (1 - t) x0 + t x1 + sigma_t eps`` with ``sigma_t`` from ``schedule``."""

    def __init__(self, sigma: float = 0.0, schedule: str = "constant"):
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma >= 0):
            raise ValueError(f"sigma must be a finite number >= 0; got {sigma!r}")
        if schedule not in BRIDGE_SCHEDULES:
            raise ValueError(
                f"schedule={schedule!r} is not a bridge schedule; accepted: "
                f"{', '.join(BRIDGE_SCHEDULES)}"
            )
        self.sigma, self.schedule = float(sigma), schedule

    def __repr__(self) -> str:
        return f"GaussianBridge(sigma={self.sigma!r}, schedule={self.schedule!r})"

    def sigma_t(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(sigma_t, sigma'_t)``."""
        if self.schedule == "constant" or self.sigma == 0:
            return torch.full_like(t, self.sigma), torch.zeros_like(t)
        root = torch.sqrt(t * (1 - t))
        return self.sigma * root, self.sigma * (1 - 2 * t) / (2 * root)

    def sample(
        self,
        x0: Tensor,
        x1: Tensor,
        t: Tensor | float,
        *,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> PathSample:
        """A draw ``x_t`` and its conditional velocity ``dx_t = x1 - x0 + sigma'_t eps``;
        ``eps`` is ``noise`` or drawn from ``generator`` (on its device; None: a fresh
        unseeded generator on x1's device; torch's global RNG is never used)."""
        check_same_shape(x0, x1, "x0", "x1")
        t = as_time(t, x1)
        s, ds = self.sigma_t(t)
        if self.sigma > 0 and self.schedule == "brownian" and x1.device.type == "cpu":
            if bool(((t == 0) | (t == 1)).any()):
                raise ValueError("the Brownian bridge's velocity is infinite at t = 0 and 1; "
                                 "draw t in the open interval (0, 1)")
        if noise is None:
            generator = generator_or_fresh(generator, x1.device)
            noise = torch.randn(x1.shape, generator=generator, dtype=x1.dtype,
                                device=generator.device)
            noise = noise.to(x1.device)
        check_same_shape(noise, x1, "noise", "x1")
        tt = per_sample(t, x1)
        x_t = (1 - tt) * x0 + tt * x1 + per_sample(s, x1) * noise
        return PathSample(t=t, x0=x0, x1=x1, x_t=x_t, dx_t=x1 - x0 + per_sample(ds, x1) * noise)
