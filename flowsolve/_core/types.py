"""The type every layer shares: a field, and how a field follows a subset of its batch."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

__all__ = ["Field", "restrict_rows"]

Field = Callable[[Tensor, Tensor], Tensor]
"""A velocity, score or other prediction: a callable ``(x, t) -> Tensor`` shaped like ``x``,
with ``x`` ``(B, *event_shape)`` and ``t`` a 0-d or ``(B,)`` tensor."""


def restrict_rows(field: Field, index: Tensor) -> Field:
    """The field for the samples ``index`` (a 1-d index into the batch ``field`` was built
    for): ``field.rows(index)`` where the field holds per-sample data (labels, Hutchinson
    probes) and defines that method, else ``field`` itself (a field that treats its rows
    independently, as a network does, needs nothing).

    A solver that drops finished samples from its batch (per-sample step control) calls
    this with the original indices of the samples still running.

    >>> import torch
    >>> class Scaled:                       # u = c_i x_i, c per sample
    ...     def __init__(self, c): self.c = c
    ...     def __call__(self, x, t): return self.c[:, None] * x
    ...     def rows(self, index): return Scaled(self.c[index])
    >>> f = restrict_rows(Scaled(torch.tensor([1.0, 2.0, 3.0])), torch.tensor([2]))
    >>> f(torch.ones(1, 2), torch.tensor(0.0)).tolist()
    [[3.0, 3.0]]
    """
    rows = getattr(field, "rows", None)
    return rows(index) if callable(rows) else field
