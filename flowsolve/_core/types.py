"""The type every layer shares: a field."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

__all__ = ["Field"]

Field = Callable[[Tensor, Tensor], Tensor]
"""A velocity, score or other prediction: a callable ``(x, t) -> Tensor`` shaped like ``x``,
with ``x`` ``(B, *event_shape)`` and ``t`` a 0-d or ``(B,)`` tensor."""
