"""Brownian motion on a fixed time grid for torchsde's solvers and flowsolve's stochastic
samplers (see :class:`GridBrownian`)."""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchsde import BaseBrownian
from torchsde.settings import LEVY_AREA_APPROXIMATIONS

from .._core.checks import generator_or_fresh
from ..ode.args import grid_indices

__all__ = ["GridBrownian"]

#: flowsolve's names of the Levy-area approximations -> torchsde's
LEVY_AREAS = {"none": LEVY_AREA_APPROXIMATIONS.none,
              "space-time": LEVY_AREA_APPROXIMATIONS.space_time}


def check_steps(steps) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int; got {steps!r}")


def check_grid(grid) -> list[float]:
    """``grid`` as float64 Python floats: a 1-d sequence (list, tuple, tensor, array) of at
    least two finite, strictly increasing times; ValueError / TypeError naming what is wrong."""
    try:
        ts = torch.as_tensor(grid, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"grid must be a 1-d sequence of times (floats); got "
                        f"{type(grid).__name__} {grid!r}") from err
    values = ts.reshape(-1).tolist()
    problem = ("not 1-d" if ts.dim() != 1 else
               "fewer than two times" if len(values) < 2 else
               "not finite" if not all(math.isfinite(t) for t in values) else
               "not strictly increasing" if not all(
                   b > a for a, b in zip(values[:-1], values[1:], strict=True)) else None)
    if problem:
        shown = values if len(values) <= 8 else [*values[:4], "...", *values[-4:]]
        raise ValueError(f"grid must be a 1-d sequence of at least two finite, strictly "
                         f"increasing times; got {shown} ({problem})")
    return values


def _rounded_from(t, point: float) -> bool:
    """``t`` is a tensor of a lower precision holding ``point`` rounded to it (the grid of a
    float32 state, whose cells may be smaller than a hundred float32 ulps)."""
    dtype = getattr(t, "dtype", torch.float64)
    return dtype != torch.float64 and torch.tensor(point, dtype=dtype).item() == float(t)


def nearest_index(times: Tensor, v: Tensor) -> Tensor:
    """Index of the point of the increasing ``times`` (``N + 1`` of them) nearest to each
    of ``v``, computed on their device (``searchsorted``: no host synchronisation)."""
    j = torch.searchsorted(times, v).clamp(1, times.numel() - 1)
    lo, hi = times.index_select(0, j - 1), times.index_select(0, j)
    return torch.where(hi - v < v - lo, j, j - 1)


class GridBrownian(BaseBrownian):
    r"""Brownian motion ``W`` (and its space-time Levy area) at the points of a time grid
    ``t_0 < ... < t_N``, drawn at construction from ``generator``: the uniform grid
    ``t_k = t0 + k h``, ``h = (t1 - t0) / steps``, or the times given as ``grid=``.

    Cell k of length ``h_k = t_{k+1} - t_k``: ``dW_k = sqrt(h_k) z``,
    ``H_k = sqrt(h_k / 12) z'`` (z, z' independent N(0, I)),
    ``U_k = int_{t_k}^{t_{k+1}} (W_s - W_{t_k}) ds = h_k (dW_k / 2 + H_k)``. Kept cumulatively
    in float64, ``W(t_k)`` and ``I(t_k) = int_{t_0}^{t_k} W ds``, so a query ``bm(ta, tb)``
    between any two grid points is exact: ``W = W(tb) - W(ta)``,
    ``U = I(tb) - I(ta) - (tb - ta) W(ta)``. Queries off the grid raise ValueError (checked
    on CPU, to a hundredth of the smaller cell beside the nearest point; on an accelerator
    the nearest grid point is used, so queries never synchronise).

    Args:
        size: ``(B, *event_shape)`` of the state; the motion is ``(B, D)``, D = prod(event).
        steps: number of cells N of the uniform grid on ``[t0, t1]`` (default ``[0, 1]``).
        grid: the times themselves instead (strictly increasing, at least two; ``t0``,
            ``t1`` are then its ends): e.g. the grid of a sampler,
            :func:`flowsolve.ode.grids.time_grid` ``("logsnr", 32, path=path)``. Give
            exactly one of ``steps`` and ``grid``.
            Memory: ``(N + 1) B D`` float64 (twice with Levy area).
        levy_area: ``"none"`` or ``"space-time"`` (needed by ``srk``).
        generator: draws the increments (on its device, then moved to ``device``), all in
            one ``randn`` call of shape ``(1 or 2, N, B, D)``; None: a fresh unseeded
            generator; torch's global RNG is never used.

    Example:
        >>> bm = GridBrownian((3, 2), steps=4, generator=torch.Generator().manual_seed(0))
        >>> bool((bm(0.0, 0.5) == bm(0.0, 0.25) + bm(0.25, 0.5)).all())
        True
        >>> bm = GridBrownian((3, 2), grid=[0.0, 0.1, 0.5, 1.0],
        ...                   generator=torch.Generator().manual_seed(0))
        >>> bm.steps, bm.t1, torch.allclose(bm(0.1, 1.0), bm(0.1, 0.5) + bm(0.5, 1.0))
        (3, 1.0, True)
    """

    def __init__(self, size: Sequence[int], *, steps: int | None = None,
                 t0: float | None = None, t1: float | None = None,
                 grid: Sequence[float] | Tensor | None = None,
                 generator: torch.Generator | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, levy_area: str = "none"):
        size = tuple(int(s) for s in size)
        if len(size) < 2 or min(size) < 1:
            raise ValueError(f"size must be (B, *event_shape) with positive entries; got {size}")
        if (steps is None) == (grid is None):
            raise ValueError(f"give exactly one of steps= (a uniform grid on [t0, t1]) or grid= "
                             f"(the times); got steps={steps!r}, grid={grid!r}")
        if grid is None:
            check_steps(steps)
            t0 = 0.0 if t0 is None else t0
            t1 = 1.0 if t1 is None else t1
            if not (math.isfinite(t0) and math.isfinite(t1) and t0 < t1):
                raise ValueError(f"need finite t0 < t1; got t0={t0!r}, t1={t1!r}")
            times = None
        else:
            times = check_grid(grid)
            for name, given, end in (("t0", t0, times[0]), ("t1", t1, times[-1])):
                if given is not None and float(given) != end:
                    raise ValueError(f"{name}={given!r} disagrees with grid=, which runs from "
                                     f"{times[0]!r} to {times[-1]!r}; leave {name} out")
            t0, t1, steps = times[0], times[-1], len(times) - 1
        if levy_area not in LEVY_AREAS:
            raise ValueError(f"levy_area={levy_area!r}; accepted: {', '.join(LEVY_AREAS)}")
        self._shape = (size[0], math.prod(size[1:]))
        self._dtype = dtype or torch.get_default_dtype()
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self._levy = LEVY_AREAS[levy_area]
        self.t0, self.t1, self.steps = float(t0), float(t1), int(steps)
        self._given = times  # None: the uniform grid t0 + k h
        gen = generator_or_fresh(generator, self._device)
        n_draws = 2 if levy_area == "space-time" else 1
        z = torch.randn(n_draws, self.steps, *self._shape, generator=gen, dtype=self._dtype,
                        device=gen.device).to(device=self._device, dtype=torch.float64)
        zero = z.new_zeros(1, *self._shape)
        if times is None:
            h = (self.t1 - self.t0) / self.steps  # a number: the uniform grid's cell
            d_w, root = math.sqrt(h) * z[0], math.sqrt(h / 12)
            self._scale = self.steps / (self.t1 - self.t0)
        else:
            self._times = torch.tensor(times, dtype=torch.float64, device=self._device)
            h = (self._times[1:] - self._times[:-1]).view(-1, 1, 1)  # cells h_k, (N, 1, 1)
            d_w, root = h.sqrt() * z[0], (h / 12).sqrt()
        self._w = torch.cat([zero, d_w.cumsum(0)])  # W(t_k), (N + 1, B, D)
        self._i = None
        if n_draws == 2:
            d_u = h * (0.5 * d_w + root * z[1])
            self._i = torch.cat([zero, (h * self._w[:-1] + d_u).cumsum(0)])  # I(t_k)

    @property
    def uniform(self) -> bool:
        """True for the uniform grid of ``steps=``, False for times given as ``grid=``."""
        return self._given is None

    @property
    def grid(self) -> list[float]:
        """The grid's times ``t_0 .. t_N`` (float64 Python floats; the uniform grid as
        ``linspace(t0, t1, N + 1)``)."""
        if self._given is not None:
            return list(self._given)
        return torch.linspace(self.t0, self.t1, self.steps + 1, dtype=torch.float64).tolist()

    def _off_grid(self, t) -> ValueError:
        where = (f"[{self.t0}, {self.t1}] with {self.steps} steps" if self._given is None else
                 f"the {self.steps + 1} times of its grid= ({self.t0} .. {self.t1})")
        return ValueError(f"GridBrownian on {where} can only be queried at its grid points; "
                          f"got t={float(t)!r}")

    def _index(self, t: Tensor | float) -> Tensor:
        if self._given is not None:
            return self._given_index(t)
        k = torch.as_tensor(t, dtype=torch.float64, device=self._device)
        k = ((k - self.t0) * self._scale).round().clamp(0, self.steps).long().reshape(1)
        if self._device.type == "cpu":
            off = abs(float(t) - (self.t0 + int(k) / self._scale))
            if off > 1e-2 / self._scale:  # a hundredth of a cell: float32 grids pass
                raise self._off_grid(t)
        return k

    def _given_index(self, t: Tensor | float) -> Tensor:
        """The nearest grid point (on the host and checked on the CPU; on an accelerator by
        ``searchsorted`` on the device, unchecked: no synchronisation)."""
        ts, n = self._given, self.steps
        if self._device.type == "cpu":
            v = float(t)
            j = min(max(bisect.bisect_left(ts, v), 1), n)  # ts[j - 1] <= v <= ts[j] inside
            k = j if ts[j] - v < v - ts[j - 1] else j - 1
            cells = [ts[i + 1] - ts[i] for i in (k - 1, k) if 0 <= i < n]
            if abs(v - ts[k]) > 1e-2 * min(cells) and not _rounded_from(t, ts[k]):
                raise self._off_grid(t)  # within a hundredth of a cell, or the point rounded
            return torch.tensor([k])
        return nearest_index(self._times, torch.as_tensor(t, dtype=torch.float64,
                                                          device=self._device).reshape(1))

    def _span(self, ia: Tensor, ib: Tensor) -> Tensor:
        if self._given is None:
            return (ib - ia).to(torch.float64) / self._scale
        return self._times.index_select(0, ib) - self._times.index_select(0, ia)

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
        span = self._span(ia, ib)
        u = self._i.index_select(0, ib)[0] - self._i.index_select(0, ia)[0] - span * w_a
        return w, u.to(self._dtype)

    def __repr__(self) -> str:
        where = (f"t0={self.t0}, t1={self.t1}, steps={self.steps}" if self._given is None else
                 f"grid=[{self.t0} .. {self.t1}] ({self.steps} cells)")
        return f"GridBrownian(size={self._shape}, {where}, levy_area={self._levy!r})"

    dtype = property(lambda self: self._dtype)
    device = property(lambda self: self._device)
    shape = property(lambda self: self._shape)
    levy_area_approximation = property(lambda self: self._levy)


# -- a solve's noise on its grid ---------------------------------------------------------------
def _describe(grid: list[float]) -> str:
    n = len(grid) - 1
    shown = grid if n <= 8 else [*grid[:4], "...", *grid[-4:]]
    return f"[{', '.join(str(t) for t in shown)}] ({n + 1} times)"


def _check_on_grid(bm: GridBrownian, grid: list[float]) -> None:
    """Every point of the solve's grid must be a point of ``bm``'s grid, to a thousandth of
    the smaller cell beside it (checked here on the host, once: on an accelerator ``bm``
    itself rounds off-grid queries to avoid syncs)."""
    try:
        grid_indices(grid, bm.grid)
        return
    except ValueError:
        pass
    n = len(grid) - 1
    if bm.uniform:  # the uniform motion's own message
        h = (bm.t1 - bm.t0) / bm.steps
        raise ValueError(
            f"bm is a GridBrownian on [{bm.t0}, {bm.t1}] with {bm.steps} cells of {h:.6g}; the "
            f"solve's grid {_describe(grid)} does not lie on its grid. Give bm steps that are "
            f"a multiple of the solve's on the same interval (e.g. GridBrownian(size, "
            f"steps=k * steps, t0=..., t1=...)), or grid= times containing the solve's "
            f"(GridBrownian(size, grid=time_grid(grid, {n}, path=path)))")
    raise ValueError(
        f"bm is a GridBrownian on the grid {_describe(bm.grid)}; the solve's grid "
        f"{_describe(grid)} does not lie on its grid. Build bm on a grid containing the "
        f"solve's: GridBrownian(size, grid=flowsolve.ode.grids.time_grid(grid, {n}, t0=..., "
        f"t1=..., path=path)), or a finer one that contains it")


def _check_shape(bm, y_shape: tuple[int, ...]) -> None:
    if not isinstance(bm, BaseBrownian) or tuple(bm.shape) != tuple(y_shape):
        raise ValueError(f"bm must be a torchsde Brownian object of shape (B, D) = "
                         f"{tuple(y_shape)}; got {bm!r}")


def check_brownian(bm, y_shape: tuple[int, ...], grid: list[float]) -> None:
    """``bm``: a torchsde Brownian object of shape ``(B, D)``; a :class:`GridBrownian` must
    hold every time of the solve's ``grid`` (ValueError naming what to build instead)."""
    _check_shape(bm, y_shape)
    if isinstance(bm, GridBrownian):
        _check_on_grid(bm, grid)


def standard_increments(x0: Tensor, grid: list[float], generator, bm) -> Tensor:
    """``z_i``, ``(N, *x0.shape)`` in ``x0``'s dtype and device, drawn before the loop:
    from ``generator`` in one ``randn`` call (the draws a :class:`GridBrownian` on ``grid``
    makes from the same generator), or from ``bm`` as ``(W(t_{i+1}) - W(t_i)) /
    sqrt(t_{i+1} - t_i)``."""
    n = len(grid) - 1
    if bm is None:
        gen = generator_or_fresh(generator, x0.device)
        return torch.randn(n, *x0.shape, generator=gen, dtype=x0.dtype,
                           device=gen.device).to(x0.device)
    check_brownian(bm, (x0.shape[0], x0[0].numel()), grid)
    dw = torch.stack([bm(grid[i], grid[i + 1]) for i in range(n)]).to(x0.dtype)
    scale = torch.tensor([1 / math.sqrt(b - a) for a, b in zip(grid[:-1], grid[1:],
                                                                strict=True)],
                         dtype=x0.dtype).to(x0.device)
    return (dw * scale.view(n, 1, 1)).view(n, *x0.shape)
