"""Counting field evaluations by wrapping the function (STYLE.md convention 5)."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor


class CountingField:
    """Wraps a field ``(x, t) -> Tensor`` and counts its calls in ``nfe`` (a Python int,
    so counting never touches the device)."""

    def __init__(self, field: Callable[..., Tensor]):
        if not callable(field):
            raise TypeError(
                f"a field must be callable (x, t) -> Tensor; got {type(field).__name__}"
            )
        self.field = field
        self.nfe = 0

    def __call__(self, x: Tensor, t: Tensor, *args, **kwargs) -> Tensor:
        self.nfe += 1
        return self.field(x, t, *args, **kwargs)
