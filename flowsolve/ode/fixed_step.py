"""flowsolve's own fixed-step loop: explicit Runge-Kutta tableaus as data, and a loop over a
precomputed grid with no host synchronisation (finiteness recorded on the device, read once
at the end), so that on a GPU the whole loop can be captured in a CUDA graph."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .._core.errors import NonFiniteStateError
from .._core.finite import FiniteRecord
from .._core.types import Field

__all__ = ["Tableau", "TABLEAUS", "FixedStepLoop"]



@dataclass(frozen=True)
class Tableau:
    r"""An explicit Runge-Kutta method as data (Butcher 2016, "Numerical Methods for ODEs"):

        k_i = u(x_n + h sum_{j<i} a_ij k_j, t_n + c_i h),    x_{n+1} = x_n + h sum_i b_i k_i.

    It checks itself: ``a`` strictly lower triangular (row i has i entries),
    ``sum_i b_i = 1`` and ``c_i = sum_j a_ij``; ValueError otherwise.
    """

    name: str
    order: int
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]

    def __post_init__(self):
        s = len(self.b)
        if len(self.c) != s or len(self.a) != s or any(len(r) != i for i, r in enumerate(self.a)):
            raise ValueError(f"tableau {self.name!r}: need len(c) = len(b) = len(a) = s and row "
                             f"i of a with i entries; got c={self.c}, a={self.a}, b={self.b}")
        if abs(sum(self.b) - 1) > 1e-14:
            raise ValueError(f"tableau {self.name!r}: sum(b) = {sum(self.b)!r}, must be 1")
        for i, row in enumerate(self.a):
            if abs(sum(row) - self.c[i]) > 1e-14:
                raise ValueError(f"tableau {self.name!r}: row {i} of a sums to {sum(row)!r}, "
                                 f"must equal c[{i}] = {self.c[i]!r}")

    @property
    def stages(self) -> int:
        return len(self.b)

    def stage_times(self, grid: list[float]) -> list[list[float]]:
        """``t_n + c_i h_n`` for every cell of ``grid``, as torchdiffeq computes them
        (``c = 0`` is ``t_n`` and ``c = 1`` is ``t_{n+1}`` exactly)."""
        out = []
        for t_n, t_next in zip(grid[:-1], grid[1:], strict=True):
            h = t_next - t_n
            out.append([t_n if c == 0 else t_next if c == 1 else t_n + h * c for c in self.c])
        return out


_THIRD = 1 / 3
TABLEAUS: dict[str, Tableau] = {t.name: t for t in (
    Tableau("euler", 1, (0.0,), ((),), (1.0,)),
    Tableau("midpoint", 2, (0.0, 0.5), ((), (0.5,)), (0.0, 1.0)),
    Tableau("heun2", 2, (0.0, 1.0), ((), (1.0,)), (0.5, 0.5)),
    Tableau("heun3", 3, (0.0, _THIRD, 2 / 3), ((), (_THIRD,), (0.0, 2 / 3)), (0.25, 0.0, 0.75)),
    # Kutta's 3/8 rule: torchdiffeq's "rk4" (rk4_alt_step_func)
    Tableau("rk4", 4, (0.0, _THIRD, 2 / 3, 1.0), ((), (_THIRD,), (-_THIRD, 1.0), (1.0, -1.0, 1.0)),
            (0.125, 0.375, 0.375, 0.125)),
)}
"""The explicit Runge-Kutta methods of the ``fast_*`` solvers, torchdiffeq's tableaus."""


def _combine(coefficients: Sequence[float], ks: list[Tensor]) -> Tensor | None:
    """``sum_j c_j k_j`` skipping zero coefficients (Python floats: no device branch)."""
    acc = None
    for c, k in zip(coefficients, ks, strict=True):
        if c == 0.0:
            continue
        if acc is None:
            acc = k if c == 1.0 else k * c
        else:
            acc = torch.add(acc, k, alpha=c)
    return acc


class FixedStepLoop:
    r"""flowsolve's explicit Runge-Kutta loop for ``dx/dt = u_t(x)`` over a precomputed grid.

    Everything the loop needs is computed on the host before it starts: the step sizes
    ``h_n`` as Python floats (kernel arguments), the stage times ``t_n + c_i h_n`` as one
    ``(N, s)`` tensor on ``x``'s device. A call then reads nothing back from the device (no
    ``.item()``, no Python branch on a device tensor; finiteness of each state is recorded
    on the device), so it runs without host synchronisation and can be captured whole in a
    CUDA graph.

    Args:
        tableau: the method.
        grid: ``t_0 .. t_N`` (Python floats, either direction).
        x_like: a tensor with the state's dtype and device.
        record: grid indices whose states to keep.
    """

    def __init__(self, tableau: Tableau, grid: list[float], x_like: Tensor,
                 record: Sequence[int] = ()):
        self.tableau, self.grid, self.record = tableau, list(grid), list(record)
        self.h = [b - a for a, b in zip(self.grid[:-1], self.grid[1:], strict=True)]
        self.stage_t = torch.tensor(tableau.stage_times(self.grid), dtype=x_like.dtype,
                                    device=x_like.device)

    def __call__(self, field: Field, x: Tensor, check_finite: bool = True
                 ) -> tuple[Tensor, list[Tensor], Tensor | None]:
        """``(x_N, [x_k for k in record], finite)``, ``finite`` the :class:`FiniteRecord`
        of the states, keyed by step (None when not checked); on the CPU the loop stops at
        the first non-finite state."""
        tab, stage_t = self.tableau, self.stage_t
        saved = [x] if 0 in self.record else []
        finite = FiniteRecord(x.device) if check_finite else None
        for n, h in enumerate(self.h):
            ks: list[Tensor] = []
            for i in range(tab.stages):
                incr = _combine(tab.a[i], ks)
                x_i = x if incr is None else torch.add(x, incr, alpha=h)
                ks.append(field(x_i, stage_t[n, i]))
            x = torch.add(x, _combine(tab.b, ks), alpha=h)
            if finite is not None and finite.add(x, n):  # CPU: known at once
                break
            if n + 1 in self.record:
                saved.append(x)
        return x, saved, finite

    def check(self, finite: FiniteRecord | None, solver: str) -> None:
        """Raise :class:`NonFiniteStateError` naming the first non-finite step of a run's
        record (on an accelerator, the run's one host synchronisation)."""
        n = None if finite is None else finite.first_bad()
        if n is not None:
            g = self.grid
            raise NonFiniteStateError(
                solver, g[n + 1], f"the state became non-finite in step {n + 1} of "
                f"{len(self.h)}, from t={g[n]:.6g} to t={g[n + 1]:.6g}")
