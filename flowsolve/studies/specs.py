"""What a solver study compares: each solver looked up in the ODE and SDE registries, its
budgets checked, one :class:`SolverSpec` per (solver, time grid), the grids and their labels
in the records, and the path and prediction the solves need; every check runs before any
solve.

A fixed-step solver (the low-NFE samplers among them) runs on every grid of ``grids=``
(given times fix their own single budget), an adaptive one once (no grid), an SDE solver
(``"sde:<name>"``) on the uniform grid of the study's shared Brownian path.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import torch

from .._core.registry import SolverInfo
from ..ode.args import as_path
from ..ode.grids import GivenGrid, ShiftGrid, TimeGrid, as_grid, time_grid
from ..ode.solve import ODE_SOLVERS
from ..paths.affine import AffineGaussianPath, canonical_prediction
from ..sde.solve import SDE_SOLVERS

__all__ = ["SDE_PREFIX", "SolverSpec", "lookup_solver", "check_budgets", "parse_solvers",
           "parse_grids", "check_paths", "check_count", "grid_label"]


SDE_PREFIX = "sde:"


@dataclass(frozen=True)
class SolverSpec:
    """One solver of a study on one grid, with its checked budgets (step counts, or
    tolerances ``rtol = atol`` of an adaptive solver)."""

    name: str  # as written by the user: "rk4", "sde:euler"
    info: SolverInfo
    kind: str  # "fixed", "adaptive" or "sde"
    budgets: tuple
    grid: str | None = None  # the grid's label: fixed and SDE solves; None: adaptive
    timegrid: TimeGrid | None = None  # a fixed-step solve's grid


def lookup_solver(name) -> tuple[SolverInfo, str]:
    """``(registry entry, kind)`` of a solver name, kind ``"fixed"``, ``"adaptive"`` or
    ``"sde"`` (``"sde:<name>"``); ValueError listing the accepted names."""
    if isinstance(name, str):
        # names(): ``in`` on a SolverRegistry raises ValueError (its lookup never KeyErrors)
        if name.startswith(SDE_PREFIX) and name[len(SDE_PREFIX):] in SDE_SOLVERS.names():
            return SDE_SOLVERS[name[len(SDE_PREFIX):]], "sde"
        if name in ODE_SOLVERS.names():
            info = ODE_SOLVERS[name]
            return info, "adaptive" if info.adaptive else "fixed"
    raise ValueError(
        f"unknown solver {name!r}; accepted ODE solvers: {', '.join(sorted(ODE_SOLVERS))}; "
        f"SDE solvers (with sde=dict(...)): "
        f"{', '.join(SDE_PREFIX + n for n in sorted(SDE_SOLVERS))}")


def check_budgets(name: str, kind: str, values) -> tuple:
    """``values`` as a tuple of distinct tolerances in (0, 1) (``kind="adaptive"``) or
    step counts >= 1 (otherwise); ValueError saying which."""
    adaptive = kind == "adaptive"
    what = ("tolerances in (0, 1) (rtol = atol)" if adaptive
            else "step counts (positive ints)")
    ok = isinstance(values, Sequence) and not isinstance(values, str) and len(values) > 0
    if ok and adaptive:
        ok = all(isinstance(v, numbers.Real) and not isinstance(v, bool) and 0 < v < 1
                 for v in values)
    elif ok:
        ok = all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1
                 for v in values)
    if not ok or len(set(values)) != len(values):
        raise ValueError(f"budgets of solver {name!r} ({kind}) must be a non-empty sequence of "
                         f"distinct {what}; got {values!r}")
    return tuple(float(v) if adaptive else int(v) for v in values)


def parse_solvers(solvers, steps, tolerances, budgets,
                  grids: list[tuple[str, TimeGrid]]) -> list[SolverSpec]:
    """One spec per solver and grid: a fixed-step solver on each of ``grids`` (on given times
    with the one budget they fix), an adaptive one once (no grid), an SDE solver on the
    uniform grid of the shared Brownian path."""
    names = [solvers] if isinstance(solvers, str) else list(solvers)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"solvers must be a non-empty list of distinct names; got {solvers!r}")
    budgets = {} if budgets is None else budgets
    if not isinstance(budgets, Mapping):
        raise TypeError("budgets must be a mapping {solver: [steps or tolerances]} (steps= and "
                        f"tolerances= set the defaults); got {type(budgets).__name__}")
    extra = [k for k in budgets if k not in names]
    if extra:
        raise ValueError(f"budgets names solvers not in solvers={names!r}: {extra!r}")
    specs = []
    for name in names:
        info, kind = lookup_solver(name)
        values = budgets.get(name, tolerances if kind == "adaptive" else steps)
        checked = check_budgets(name, kind, values)
        if kind == "fixed":
            specs += [SolverSpec(name, info, kind, checked if g.steps is None else (g.steps,),
                                 label, g) for label, g in grids]
        else:
            specs.append(SolverSpec(name, info, kind, checked,
                                    "uniform" if kind == "sde" else None))
    return specs


_GRIDS_ACCEPTED = ("a sequence of grids, each a name (uniform, logsnr, edm), a shift s > 0, a "
                   "TimeGrid (LogSNRGrid(...), EDMGrid(...), ShiftGrid(s), GivenGrid(times)) "
                   "or times as a tensor or a nested list [[t0, ..., t1]]; or a mapping "
                   "{label: grid}")


def grid_label(grid: TimeGrid) -> str:
    """The label of a grid in the records: its name (``"uniform"``, ``"logsnr"``, ``"edm"``),
    ``"shift<s>"``, ``"given"``, or the name with the options that differ from the
    defaults (``"edm(rho=5)"``)."""
    if isinstance(grid, ShiftGrid):
        return f"shift{grid.shift:g}"
    if isinstance(grid, GivenGrid):
        return "given"
    try:
        changed = [(f.name, getattr(grid, f.name)) for f in fields(grid)
                   if f.init and getattr(grid, f.name) != f.default]
    except TypeError:  # not a dataclass: a TimeGrid of the user's
        changed = []
    opts = ", ".join(f"{k}={v:g}" if isinstance(v, numbers.Real) else f"{k}={v!r}"
                     for k, v in changed)
    return f"{grid.name}({opts})" if opts else grid.name


def parse_grids(grids) -> list[tuple[str, TimeGrid]]:
    """``[(label, TimeGrid)]`` of ``grids=``: distinct labels (a mapping names them)."""
    if isinstance(grids, Mapping):
        bad = [k for k in grids if not isinstance(k, str) or not k]
        if bad or not grids:
            raise ValueError(f"grids as a mapping must be a non-empty {{label: grid}} with "
                             f"non-empty str labels; got {grids!r}")
        items = list(grids.items())
    else:
        if isinstance(grids, str | numbers.Real | TimeGrid) or torch.is_tensor(grids):
            grids = [grids]
        if not isinstance(grids, Sequence) or not grids:
            raise ValueError(f"grids must be {_GRIDS_ACCEPTED}; got {grids!r}")
        items = [(None, g) for g in grids]
    out = []
    for i, (label, g) in enumerate(items):
        try:
            spec = as_grid(g)
        except (TypeError, ValueError) as err:
            where = f"grids[{label!r}]" if label is not None else f"grids[{i}]"
            raise type(err)(f"{where}: {err}. grids= is {_GRIDS_ACCEPTED}") from None
        out.append((grid_label(spec) if label is None else label, spec))
    labels = [lab for lab, _ in out]
    twice = sorted({lab for lab in labels if labels.count(lab) > 1})
    if twice:
        raise ValueError(f"grids {labels!r} give the label {twice[0]!r} twice (the records "
                         f"could not tell them apart): pass a mapping {{label: grid}}")
    return out


def check_paths(specs: list[SolverSpec], path, prediction: str, sde, t0: float,
                t1: float) -> tuple[AffineGaussianPath | None, str]:
    """``(path, prediction)`` checked: samplers (``needs_path``) and a non-velocity model need
    the path; samplers run from noise to data; every grid of every fixed-step budget is built
    once here, so a bad grid fails before any solve."""
    path = as_path(path)
    prediction = canonical_prediction(prediction, "prediction")
    sde_path = isinstance(sde, Mapping) and sde.get("path") is not None
    samplers = list(dict.fromkeys(
        s.name for s in specs if s.info.needs_path and not (s.kind == "sde" and sde_path)))
    if path is None and (samplers or prediction != "velocity"):
        why = (f"solvers {samplers!r} are samplers that step in the path's log-SNR"
               if samplers else f"a {prediction!r} model is converted to a velocity on it")
        raise ValueError(f"{why}: pass path= (the AffineGaussianPath the model was trained "
                         f"on, or its Scheduler)")
    backward = [s.name for s in specs if s.info.needs_path and not t0 < t1]
    if backward:
        raise ValueError(f"solver {backward[0]!r} integrates from noise to data (t0 < t1); got "
                         f"t0={t0!r}, t1={t1!r}")
    for s in specs:
        for n in s.budgets if s.kind == "fixed" else ():
            time_grid(s.timegrid, n, t0=t0, t1=t1, path=path)
    return path, prediction


def check_count(name: str, v, low: int) -> int:
    """``v`` as an int >= ``low`` (no bool); ValueError naming ``name`` otherwise."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
        raise ValueError(f"{name} must be an int >= {low}; got {v!r}")
    return int(v)
