"""UniPC (to be written)."""

from __future__ import annotations

from .semilinear import Sampler

__all__ = ["SAMPLERS"]

SAMPLERS: tuple[Sampler, ...] = ()
