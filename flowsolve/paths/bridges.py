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

The regression :func:`bridge_matching_loss` is minimised by the marginal velocity of the
bridge's mixture path; for Gaussian sources :class:`flowsolve.paths.AffineGaussianPath` is
the richer tool (conversions, scores, closed forms).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._checks import as_time, check_same_shape, generator_or_fresh, per_sample
from .losses import _check_model_and_samples, _check_reduction, sample_time
from .paths import AffineGaussianPath, PathSample

__all__ = ["GaussianBridge", "bridge_matching_loss", "BRIDGE_SCHEDULES"]

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


def bridge_matching_loss(
    model: Callable[..., Tensor],
    bridge: GaussianBridge,
    x0: Tensor,
    x1: Tensor,
    t: Tensor | float | None = None,
    *,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
    **model_kwargs: Any,
) -> Tensor:
    r"""``l_i = (1/D) ||v_theta(x_t, t_i) - dx_t||^2`` on a :class:`GaussianBridge`.

    ``model(x_t, t, **model_kwargs)`` returns ``(B, *event_shape)``; ``x0`` and ``x1`` are
    floating ``(B, *event_shape)`` tensors of coupled pairs (``x0`` is required: a bridge's
    source need not be Gaussian). ``t`` is drawn with :func:`~flowsolve.losses.sample_time`
    in (0, 1) (clamped to ``[1e-5, 1 - 1e-5]`` for the Brownian bridge) when omitted;
    ``reduction`` is ``"mean"`` or ``"none"`` (``(B,)``). ``t`` and the bridge noise come
    from ``generator`` (None: a fresh unseeded generator on x1's device; torch's global RNG
    is never used). Bad input: TypeError / ValueError as in
    :func:`flowsolve.losses.flow_matching_loss`.
    """
    _check_reduction(reduction)
    if not isinstance(bridge, GaussianBridge):
        hint = (" (an AffineGaussianPath goes to flowsolve.flow_matching_loss)"
                if isinstance(bridge, AffineGaussianPath) else "")
        raise TypeError(f"bridge must be a flowsolve.bridges.GaussianBridge; got "
                        f"{type(bridge).__name__}{hint}")
    _check_model_and_samples(model, x0, x1, x0_optional=False)
    generator = generator_or_fresh(generator, x1.device)
    if t is None:
        t = sample_time(x1.shape[0], generator=generator, dtype=x1.dtype, device=x1.device)
        if bridge.schedule == "brownian":
            t = t.clamp(1e-5, 1 - 1e-5)
    s = bridge.sample(x0, x1, t, generator=generator)
    out = model(s.x_t, s.t, **model_kwargs)
    if not torch.is_tensor(out) or out.shape != x1.shape:
        raise ValueError(f"model(x, t) must return a tensor shaped like x, {tuple(x1.shape)}")
    loss = (out - s.dx_t).pow(2).reshape(x1.shape[0], -1).mean(1)
    return loss.mean() if reduction == "mean" else loss
