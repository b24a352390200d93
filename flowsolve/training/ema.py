r"""Exponential moving average of a model's weights, with the usual warm-up.

    theta_ema_n = beta_n theta_ema_{n-1} + (1 - beta_n) theta_n,   theta_ema_0 = theta_0,
    beta_n = min(beta, (1 + n) / (10 + n))   (warm-up; without it beta_n = beta).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    r"""``theta_ema_n = beta_n theta_ema_{n-1} + (1 - beta_n) theta_n`` over the parameters
    of a copy of ``model`` (buffers are copied); ``theta_ema_0 = theta_0``. ``beta_n =
    decay``, or with ``warmup=True`` ``beta_n = min(decay, (1 + n) / (10 + n))``, so the
    initial weights fade within tens of updates. One fused ``lerp`` per update, no host
    synchronisation. ``ema.model`` is the averaged network (eval mode)."""

    def __init__(self, model: nn.Module, decay: float, *, warmup: bool = False):
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1); got {decay!r}")
        self.decay, self.warmup = float(decay), bool(warmup)
        self.model = copy.deepcopy(model).requires_grad_(False).eval()
        self.num_updates = 0

    def decay_at(self, n: int) -> float:
        """``beta_n`` of the n-th update (n >= 1)."""
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, n: int | None = None) -> None:
        """The n-th update: by default the one after the last (``num_updates + 1``); the
        training loop passes its global step + 1, so a resumed run continues the warm-up."""
        n = self.num_updates + 1 if n is None else n
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be the update's number, an int >= 1; got {n!r}")
        self.num_updates = n
        mine = list(self.model.parameters())
        torch._foreach_lerp_(mine, [p.detach() for p in model.parameters()],
                             1 - self.decay_at(n))
        for b_ema, b in zip(self.model.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        """``{"weights": the averaged model's state_dict, "num_updates": n}``: what a resume
        needs to continue the warm-up at update n + 1."""
        return {"weights": self.model.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output; a bare model state_dict (the averaged
        weights alone) sets the weights and leaves ``num_updates`` as it is."""
        if set(state) == {"weights", "num_updates"}:
            self.model.load_state_dict(state["weights"])
            self.num_updates = int(state["num_updates"])
        else:
            self.model.load_state_dict(state)
