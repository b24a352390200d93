r"""The low-NFE front: which sampler on which time grid is most accurate at each budget of
model evaluations (the question of :doc:`Sampling at low NFE </howto/low-nfe>`).

:func:`low_nfe_front` runs every (solver, grid) pair at the largest step count whose counted
NFE fits each budget and measures the error at ``t1`` against a reference (a tight adaptive
solve, or a closed form given as a tensor): RMS over the batch of ``||x_hat - x_ref||``.

Example:
    >>> import torch, flowsolve as fs
    >>> path = fs.AffineGaussianPath(fs.CosineScheduler())
    >>> u = fs.analytic.marginal_velocity(fs.GaussianMixture.ring(4, radius=2.0), path)
    >>> x0 = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> front = low_nfe_front(u, x0, path=path, budgets=[4, 8], solvers=["ddim", "heun2"],
    ...                       grids=["uniform", "logsnr"])
    >>> [(b.budget, b.nfe <= b.budget) for b in front.best()]
    [(4, True), (8, True)]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .._core.types import Field
from ..ode.args import as_path
from ..ode.grids import as_grid
from ..ode.solve import ODE_SOLVERS, Solution, sample
from ..paths.affine import AffineGaussianPath
from ..paths.schedules import Scheduler
from .grid_search import auto_reference
from .specs import grid_label

__all__ = ["FrontEntry", "Front", "FIELDS", "low_nfe_front", "solve_within", "DEFAULT_BUDGETS",
           "DEFAULT_GRIDS", "BASELINES"]

DEFAULT_BUDGETS = (4, 6, 8, 10, 15, 20)
DEFAULT_GRIDS = ("uniform", "logsnr", "edm", 3.0)
BASELINES = ("euler", "midpoint", "heun2", "rk4")
"""The Runge-Kutta solvers a front compares with the samplers by default."""


@dataclass(frozen=True)
class FrontEntry:
    """One (solver, grid) at one budget: the NFE it used (<= budget), its steps and its
    error at ``t1`` (RMS over the batch of ``||x_hat - x_ref||``)."""

    budget: int
    solver: str
    grid: str
    steps: int
    nfe: int
    error: float


FIELDS = ("budget", "solver", "grid", "steps", "nfe", "error")


@dataclass(frozen=True)
class Front:
    """Every entry of :func:`low_nfe_front`, and the best at each budget."""

    entries: tuple[FrontEntry, ...]
    budgets: tuple[int, ...]

    def best(self) -> list[FrontEntry]:
        """The entry of least error at each budget (budgets no pair fits are left out)."""
        out = []
        for b in self.budgets:
            here = [e for e in self.entries if e.budget == b and math.isfinite(e.error)]
            if here:
                out.append(min(here, key=lambda e: e.error))
        return out

    def to_csv(self) -> str:
        """Every entry as CSV text (budget, solver, grid, steps, nfe, error)."""
        rows = [",".join(FIELDS)]
        rows += [",".join(str(getattr(e, f)) for f in FIELDS) for e in self.entries]
        return "\n".join(rows) + "\n"

    def table(self) -> str:
        """A Markdown table: the best (solver, grid) per budget, with the best uniform-grid
        Runge-Kutta baseline beside it."""
        lines = ["| NFE | best solver | grid | steps | error | best RK on uniform | its error |",
                 "| --- | --- | --- | --- | --- | --- | --- |"]
        for e in self.best():
            base = [f for f in self.entries if f.budget == e.budget and f.grid == "uniform"
                    and f.solver in BASELINES and math.isfinite(f.error)]
            b = min(base, key=lambda f: f.error) if base else None
            lines.append(f"| {e.budget} | {e.solver} | {e.grid} | {e.steps} | {e.error:.3g} | "
                         + (f"{b.solver} | {b.error:.3g} |" if b else "- | - |"))
        return "\n".join(lines)


def solve_within(field: Field, x0: Tensor, solver: str, budget: int, *,
                 path: AffineGaussianPath | None, grid="uniform",
                 prediction: str = "velocity", t0: float = 0.0,
                 t1: float = 1.0) -> Solution | None:
    """The solve of ``solver`` on ``grid`` with the most steps whose counted NFE is at most
    ``budget`` (None if one step already costs more). Tries ``steps = budget`` and, while
    the NFE is over, ``floor(steps * budget / nfe)`` (or one step fewer)."""
    steps = budget
    while steps >= 1:
        res = sample(field, x0, solver, steps=steps, grid=grid, path=path,
                     prediction=prediction, t0=t0, t1=t1)
        if res.nfe <= budget:
            return res
        steps = min(steps - 1, steps * budget // res.nfe)
    return None


def low_nfe_front(field: Field, x0: Tensor, *, path: AffineGaussianPath | Scheduler,
                  budgets: Sequence[int] = DEFAULT_BUDGETS,
                  solvers: Sequence[str] | None = None, grids: Sequence = DEFAULT_GRIDS,
                  reference: Tensor | None = None, prediction: str = "velocity",
                  t0: float = 0.0, t1: float = 1.0) -> Front:
    r"""Error at ``t1`` of every solver on every grid at every NFE budget.

    Args:
        field: the model, predicting ``prediction`` on ``path``.
        x0: ``(B, *event_shape)`` noise at ``t0``.
        path: the :class:`~flowsolve.paths.affine.AffineGaussianPath` (or scheduler).
        budgets: model evaluations per sample (each solve uses at most that many).
        solvers: fixed-step names of :data:`~flowsolve.ode.solve.ODE_SOLVERS`; default: the
            Runge-Kutta :data:`BASELINES` and every low-NFE sampler (``needs_path``).
        grids: ``grid=`` values (names, shifts, grid objects, times).
        reference: ``x(t1)`` shaped like ``x0`` (a closed form); None: a tight adaptive
            solve (:func:`~flowsolve.studies.grid_search.auto_reference`: DOP853 at
            ``rtol = atol = 1e-10`` in float64).
        prediction, t0, t1: as :func:`~flowsolve.ode.solve.sample`.

    Returns:
        :class:`Front` (``.best()``, ``.table()``).
    """
    path = as_path(path)
    if path is None:
        raise ValueError("low_nfe_front needs path= (the samplers and grids read it)")
    names = list(solvers) if solvers is not None else [
        *BASELINES, *(n for n, i in ODE_SOLVERS.items() if i.needs_path)]
    for n in names:
        if ODE_SOLVERS[n].adaptive:
            raise ValueError(f"solver {n!r} is adaptive: a front compares fixed-step solvers "
                             f"at fixed budgets")
    budgets = tuple(int(b) for b in budgets)
    if not budgets or min(budgets) < 1:
        raise ValueError(f"budgets must be positive ints; got {budgets!r}")
    if reference is None:
        reference = auto_reference(field, x0, t0, t1, path, prediction)
    elif not torch.is_tensor(reference) or reference.shape != x0.shape:
        raise ValueError(f"reference must be x(t1) shaped like x0 {tuple(x0.shape)}; got "
                         f"{getattr(reference, 'shape', type(reference).__name__)}")
    entries = []
    for name in names:
        for grid in grids:
            label = grid_label(as_grid(grid))
            for b in budgets:
                res = solve_within(field, x0, name, b, path=path, grid=grid,
                                   prediction=prediction, t0=t0, t1=t1)
                if res is not None:
                    err = float((res.x - reference).flatten(1).norm(dim=1).pow(2).mean().sqrt())
                    entries.append(FrontEntry(b, name, label, res.steps, res.nfe, err))
    return Front(tuple(entries), budgets)
