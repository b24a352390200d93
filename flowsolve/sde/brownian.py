"""Brownian motion on a fixed time grid for torchsde's solvers (see :class:`GridBrownian`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchsde import BaseBrownian
from torchsde.settings import LEVY_AREA_APPROXIMATIONS

from .._core.checks import generator_or_fresh

__all__ = ["GridBrownian"]

#: flowsolve's names of the Levy-area approximations -> torchsde's
LEVY_AREAS = {"none": LEVY_AREA_APPROXIMATIONS.none,
              "space-time": LEVY_AREA_APPROXIMATIONS.space_time}


def check_steps(steps) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int; got {steps!r}")


class GridBrownian(BaseBrownian):
    r"""Brownian motion ``W`` (and its space-time Levy area) at the points of the grid
    ``t_k = t0 + k h``, ``h = (t1 - t0) / steps``, drawn at construction from ``generator``.

    Cell k: ``dW_k = sqrt(h) z``, ``H_k = sqrt(h / 12) z'`` (z, z' independent N(0, I)),
    ``U_k = int_{t_k}^{t_{k+1}} (W_s - W_{t_k}) ds = h (dW_k / 2 + H_k)``. Kept cumulatively
    in float64, ``W(t_k)`` and ``I(t_k) = int_{t0}^{t_k} W ds``, so a query ``bm(ta, tb)``
    between any two grid points is exact: ``W = W(tb) - W(ta)``,
    ``U = I(tb) - I(ta) - (tb - ta) W(ta)``. Queries off the grid raise ValueError (checked
    on CPU; on an accelerator the nearest grid point is used, so queries never synchronise).

    Args:
        size: ``(B, *event_shape)`` of the state; the motion is ``(B, D)``, D = prod(event).
        steps: number of cells N. Memory: ``(N + 1) B D`` float64 (twice with Levy area).
        levy_area: ``"none"`` or ``"space-time"`` (needed by ``srk``).
        generator: draws the increments (on its device, then moved to ``device``);
            None: a fresh unseeded generator; torch's global RNG is never used.

    Example:
        >>> bm = GridBrownian((3, 2), steps=4, generator=torch.Generator().manual_seed(0))
        >>> bool((bm(0.0, 0.5) == bm(0.0, 0.25) + bm(0.25, 0.5)).all())
        True
    """

    def __init__(self, size: Sequence[int], *, steps: int, t0: float = 0.0, t1: float = 1.0,
                 generator: torch.Generator | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, levy_area: str = "none"):
        size = tuple(int(s) for s in size)
        if len(size) < 2 or min(size) < 1:
            raise ValueError(f"size must be (B, *event_shape) with positive entries; got {size}")
        check_steps(steps)
        if not (math.isfinite(t0) and math.isfinite(t1) and t0 < t1):
            raise ValueError(f"need finite t0 < t1; got t0={t0!r}, t1={t1!r}")
        if levy_area not in LEVY_AREAS:
            raise ValueError(f"levy_area={levy_area!r}; accepted: {', '.join(LEVY_AREAS)}")
        self._shape = (size[0], math.prod(size[1:]))
        self._dtype = dtype or torch.get_default_dtype()
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self._levy = LEVY_AREAS[levy_area]
        self.t0, self.t1, self.steps = float(t0), float(t1), int(steps)
        h = (self.t1 - self.t0) / self.steps
        gen = generator_or_fresh(generator, self._device)
        n_draws = 2 if levy_area == "space-time" else 1
        z = torch.randn(n_draws, self.steps, *self._shape, generator=gen, dtype=self._dtype,
                        device=gen.device).to(device=self._device, dtype=torch.float64)
        zero = z.new_zeros(1, *self._shape)
        d_w = math.sqrt(h) * z[0]
        self._w = torch.cat([zero, d_w.cumsum(0)])  # W(t_k), (N + 1, B, D)
        self._i = None
        if n_draws == 2:
            d_u = h * (0.5 * d_w + math.sqrt(h / 12) * z[1])
            self._i = torch.cat([zero, (h * self._w[:-1] + d_u).cumsum(0)])  # I(t_k)
        self._scale = self.steps / (self.t1 - self.t0)

    def _index(self, t: Tensor | float) -> Tensor:
        k = torch.as_tensor(t, dtype=torch.float64, device=self._device)
        k = ((k - self.t0) * self._scale).round().clamp(0, self.steps).long().reshape(1)
        if self._device.type == "cpu":
            off = abs(float(t) - (self.t0 + int(k) / self._scale))
            if off > 1e-2 / self._scale:  # a hundredth of a cell: float32 grids pass
                raise ValueError(f"GridBrownian on [{self.t0}, {self.t1}] with {self.steps} steps "
                                 f"can only be queried at its grid points; got t={float(t)!r}")
        return k

    def __call__(self, ta, tb=None, return_U=False, return_A=False):
        if tb is None:
            ta, tb = self.t0, ta
        if return_A:
            raise ValueError("GridBrownian provides no d x d Levy area (return_A); flowsolve's "
                             "additive-noise solvers never need it")
        ia, ib = self._index(ta), self._index(tb)
        w_a = self._w.index_select(0, ia)[0]
        w = (self._w.index_select(0, ib)[0] - w_a).to(self._dtype)
        if not return_U:
            return w
        if self._i is None:
            raise ValueError("this GridBrownian has no Levy area; build it with "
                             "levy_area='space-time' for solvers such as 'srk'")
        span = (ib - ia).to(torch.float64) / self._scale
        u = self._i.index_select(0, ib)[0] - self._i.index_select(0, ia)[0] - span * w_a
        return w, u.to(self._dtype)

    def __repr__(self) -> str:
        return (f"GridBrownian(size={self._shape}, t0={self.t0}, t1={self.t1}, steps={self.steps}, "
                f"levy_area={self._levy!r})")

    dtype = property(lambda self: self._dtype)
    device = property(lambda self: self._device)
    shape = property(lambda self: self._shape)
    levy_area_approximation = property(lambda self: self._levy)
