"""Counting field evaluations by wrapping the function: every solver's ``nfe`` is counted
the same way, whatever its library reports."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


class CountingField:
    """Wraps a field ``(x, t) -> Tensor`` and counts its calls in ``nfe`` (a Python int,
    so counting never touches the device).

    With ``like_input=True`` the first call's output ``u`` must have ``x``'s shape and
    dtype (host metadata only: no device synchronisation); otherwise ValueError naming
    both, instead of a silent broadcast or dtype change inside a solver."""

    def __init__(self, field: Callable[..., Tensor], *, like_input: bool = False):
        if not callable(field):
            raise TypeError(
                f"a field must be callable (x, t) -> Tensor; got {type(field).__name__}"
            )
        self.field = field
        self.like_input = like_input
        self.nfe = 0

    def __call__(self, x: Tensor, t: Tensor, *args, **kwargs) -> Tensor:
        self.nfe += 1
        if self.nfe > 1 or not self.like_input:
            return self.field(x, t, *args, **kwargs)
        try:  # the first call: a failure there is most often the argument order
            u = self.field(x, t, *args, **kwargs)
        except (TypeError, ValueError, RuntimeError, IndexError) as err:
            err.add_note(ARGUMENT_ORDER)
            raise
        check_like(u, x)
        return u


ARGUMENT_ORDER = ("flowsolve calls a field as field(x, t), x (B, *event_shape) first and t "
                  "a 0-d tensor second; a torchdiffeq-style f(t, x) must be wrapped: "
                  "lambda x, t: f(t, x)")


def check_like(u, x: Tensor) -> None:
    """``u`` is a tensor with ``x``'s shape and dtype (TypeError / ValueError otherwise)."""
    if not torch.is_tensor(u):
        raise TypeError(f"the field must return a tensor shaped like x {tuple(x.shape)}; got "
                        f"{type(u).__name__}")
    if u.shape != x.shape or u.dtype != x.dtype:
        hint = f" ({ARGUMENT_ORDER})" if u.shape != x.shape else ""
        raise ValueError(f"the field must return a tensor of x's shape and dtype: x is "
                         f"{tuple(x.shape)} {x.dtype}, the field returned {tuple(u.shape)} "
                         f"{u.dtype}{hint}")
