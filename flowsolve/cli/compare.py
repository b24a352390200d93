"""``flowsolve compare``: a solver study on a trained model
(:func:`~flowsolve.studies.compare.compare_solvers`): the error of every budget against a
float64 reference solved at ``rtol = atol = 1e-10``, NFE, wall time and fitted orders, per
solver and ``--grid`` (a name, a shift or a grid file), written to a report folder.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from .._core.files import UnreadableFileError
from .common import (
    CliError,
    bridge_noise,
    load_model,
    on_condot_path,
    seeded_generator,
    source_points,
    was_given,
)
from .options import (
    FOLDER_HELP,
    CommaNames,
    Joined,
    StoreNames,
    grid_names,
    model_option,
    sampler_names,
    solver_names,
    subcommand,
)

__all__ = ["add_parser", "check_args", "run_command"]


_REFERENCE_TOL = 1e-10
"""compare: the tolerance of the float64 reference solve that every error is measured
against; the compared tolerances must be looser."""


_GRID_FILE = "a FILE of times written by the grid search (JSON)"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``flowsolve compare`` and its options, added to ``sub``."""
    p = subcommand(sub, "compare", "solver comparison study on a trained model",
                   "Measure ODE solvers on a trained model: the error of every budget\n"
                   "against a tight float64 reference solve, its NFE and wall time, and\n"
                   "fitted orders of convergence. Writes study.csv, study.json and study.png\n"
                   "into a report folder.")
    model_option(p)
    solvers = p.add_argument(
        "--solvers", nargs="+", default=["euler", "midpoint", "rk4", "dopri5"],
        choices=CommaNames(solver_names()), action=StoreNames, metavar="NAME",
        help="the ODE solvers to compare (separated by spaces or commas): %(choices)s. Of "
             "these, the low-NFE samplers %(samplers)s step in the log-SNR of the model's "
             "path: they need a model trained with --method cfm, or icfm / otcfm with "
             "--sigma 0")
    solvers.samplers = Joined(sampler_names())
    p.add_argument("--budget-steps", nargs="+", type=int, default=[2, 4, 8, 16, 32],
                   metavar="N", help="step counts of the fixed-step solvers")
    grid = p.add_argument(
        "--grid", action="append", metavar="NAME|NUMBER|FILE",
        help="where the steps of the fixed-step solvers (samplers included) lie; repeat it "
             "to compare grids: %(names)s (uniform in t; uniform in log-SNR; EDM's rho = 7, "
             f"the last two on the CondOT path only), a number s > 0 (the rectified-flow "
             f"shift, SD3: 3) or {_GRID_FILE}, whose times fix the steps "
             "(default: uniform)")
    grid.names = Joined(grid_names())
    p.add_argument("--tolerances", nargs="+", type=float, default=[1e-3, 1e-5, 1e-7],
                   metavar="TOL",
                   help=f"tolerances (rtol = atol) of the adaptive solvers, in "
                        f"({_REFERENCE_TOL:g}, 1): the reference is solved at "
                        f"{_REFERENCE_TOL:g}")
    p.add_argument("--n", type=int, default=512, help="source points solved from")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs of each solve (min and median wall time)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads while timing (recorded in study.json)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N or mps")
    p.add_argument("--out", default="solver-study", metavar="FOLDER",
                   help=f"report folder; {FOLDER_HELP}")
    p.add_argument("--force", action="store_true",
                   help="write into --out even if it exists (files of the same names are "
                        "replaced)")
    p.set_defaults(run=run_command, check=check_args)


def check_args(args: argparse.Namespace) -> None:
    """Each name once; ``--grid`` read into ``args.grids`` (``(label, TimeGrid)``);
    budgets and grids only where a solver reads them; tolerances looser than the
    reference's."""
    from ..ode.solve import ODE_SOLVERS

    for flag, values in (("--solvers", args.solvers), ("--budget-steps", args.budget_steps),
                         ("--tolerances", args.tolerances), ("--grid", args.grid or [])):
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            raise CliError(f"{flag} names {', '.join(map(str, twice))} more than once")
    adaptive = [s for s in args.solvers if ODE_SOLVERS[s].adaptive]
    fixed = [s for s in args.solvers if s not in adaptive]
    args.grids = [_grid_option(v) for v in args.grid or ["uniform"]]
    labels = [label for label, _ in args.grids]
    twice = sorted({lab for lab in labels if labels.count(lab) > 1})
    if twice:
        raise CliError(f"--grid {' '.join(args.grid)}: two grids would be recorded as "
                       f"{twice[0]!r}: give each grid once (a grid file is recorded by its "
                       "name without the suffix: rename one)")
    if args.grid and not fixed:
        raise CliError(f"--grid places the steps of fixed-step solvers, and --solvers "
                       f"{' '.join(args.solvers)} has none (adaptive solvers choose their own): "
                       "drop --grid, or add a fixed-step solver (e.g. rk4)")
    if was_given(args, "budget_steps") and all(g.steps is not None for _, g in args.grids):
        raise CliError("--budget-steps are the step counts of fixed-step solvers, and every "
                       "--grid is a file whose times fix the steps: drop --budget-steps, or "
                       "add a --grid such as uniform")
    if not fixed and was_given(args, "budget_steps"):
        raise CliError(f"--budget-steps are the step counts of fixed-step solvers, and "
                       f"--solvers {' '.join(args.solvers)} has none: drop --budget-steps, or "
                       "add a fixed-step solver (e.g. rk4)")
    if not adaptive and was_given(args, "tolerances"):
        raise CliError(f"--tolerances are those of adaptive solvers, and --solvers "
                       f"{' '.join(args.solvers)} has none: drop --tolerances, or add an "
                       "adaptive solver (e.g. dopri5)")
    bad = [t for t in args.tolerances if not _REFERENCE_TOL < t < 1]
    if adaptive and bad:
        raise CliError(f"--tolerances must lie in ({_REFERENCE_TOL:g}, 1): every error is "
                       f"measured against a reference solved at rtol = atol = "
                       f"{_REFERENCE_TOL:g}, which must be tighter; got "
                       f"{' '.join(map(str, bad))}")


def _grid_option(value: str) -> tuple[str, object]:
    """``(label, TimeGrid)`` of one ``--grid``: a name of the grids (uniform, logsnr, edm),
    a number (the shift s > 0: label ``shift<s>``) or a grid file (label: its stem), loaded
    with ``flowsolve.studies.grid_search.load_grid`` and checked to run from t = 0 to 1."""
    from ..ode.grids import GRIDS, ShiftGrid, time_grid

    if value in GRIDS and value != "shift":
        return value, GRIDS[value]()
    try:
        shift = float(value)
    except ValueError:
        shift = None
    if shift is not None:
        if not (math.isfinite(shift) and shift > 0):
            raise CliError(f"--grid {value}: a number is the shift s of the rectified-flow "
                           "grid and must be a finite number > 0 (SD3 uses 3)")
        return f"shift{shift:g}", ShiftGrid(shift)
    file = Path(value)
    if not file.is_file():
        names = ", ".join(n for n in GRIDS if n != "shift")
        raise CliError(f"--grid {value}: not a grid name, a number or a file; accepted: "
                       f"{names}, a shift s > 0 (a number, e.g. 3), or {_GRID_FILE}"
                       + (f" (no such file: {file})" if file.suffix or file.parent != Path()
                          else ""))
    try:
        from ..studies.grid_search import load_grid
    except ImportError:
        raise CliError(f"--grid {value}: grid files need flowsolve.studies.grid_search, which "
                       "this installation lacks; use a grid name or a shift") from None
    try:
        grid = load_grid(file)
        time_grid(grid, t0=0.0, t1=1.0)  # compare solves from t = 0 (noise) to 1 (data)
    except UnreadableFileError as exc:
        raise CliError(f"--grid {exc}") from None
    except (ValueError, TypeError) as exc:
        raise CliError(f"--grid {value}: {exc}") from None
    return file.stem, grid


def run_command(args: argparse.Namespace) -> int:
    """The study of ``--solvers`` on the model in float64 from ``--n`` source draws:
    the table and the orders printed, study.csv, study.json and study.png written to a
    fresh report folder (removed again, empty, if the study fails)."""
    import torch

    from ..studies.compare import compare_solvers
    from .demo import fresh_folder

    model, saved = load_model(args.model, args.device)
    path = _model_path(args, saved["trained"])
    reused = args.force and Path(args.out).is_dir()
    out = fresh_folder(args.out, args.force)
    net = model.double()
    x0 = source_points(saved, args.n, seeded_generator(args.seed), args.device).double()
    try:
        with torch.no_grad():
            study = compare_solvers(lambda x, t: net(x, t), x0, solvers=args.solvers,
                                    steps=args.budget_steps, tolerances=args.tolerances,
                                    reference_tol=_REFERENCE_TOL, repeats=args.repeats,
                                    generator=seeded_generator(args.seed), path=path,
                                    grids=dict(args.grids))
    except BaseException:
        if not reused and not any(out.iterdir()):
            out.rmdir()  # a failed study leaves no empty report folder behind
        raise
    print(study.table())
    for name, o in study.orders.items():
        fitted = "-" if o["fitted"] is None else f"{o['fitted']:.2f}"
        print(f"{name:<16} order: declared {o['declared']}, fitted {fitted}")
    study.to_csv(out / "study.csv")
    study.to_json(out / "study.json")
    png = out / "study.png"
    removed = ""
    if reused and png.is_file():  # an earlier run's plot must not sit beside these results
        png.unlink()
        removed = f"; removed the earlier run's {png}"
    try:
        study.plot(png)
    except ImportError:
        print(f"(matplotlib not installed: no plot{removed}; pip install flowsolve[plot])")
    print(f"wrote {out}")
    return 0


def _model_path(args: argparse.Namespace, trained: dict):
    """The path of the model for ``compare``: the CondOT path where the training record says
    the model is a velocity of it (:func:`on_condot_path`), else None; then the samplers
    and the grids spaced in the log-SNR (which read the path's alpha_t, sigma_t) are
    refused."""
    from ..ode.solve import ODE_SOLVERS
    from ..paths.affine import AffineGaussianPath
    from ..paths.schedules import CondOTScheduler

    if on_condot_path(trained):
        return AffineGaussianPath(CondOTScheduler())
    samplers = [s for s in args.solvers if ODE_SOLVERS[s].needs_path]
    grids = [label for label, g in args.grids if g.needs_path]
    if samplers or grids:
        what = " and ".join(
            part for part in (f"--solvers {' '.join(samplers)} (samplers that step in the "
                              "path's log-SNR)" if samplers else "",
                              f"--grid {' '.join(grids)} (spaced in its log-SNR)"
                              if grids else "") if part)
        raise CliError(
            f"--model {args.model} was trained with --method {trained['method']} --sigma "
            f"{float(trained.get('sigma', 0.0)):g}: its path is {bridge_noise(trained)}, not "
            f"an affine Gaussian path x_t = alpha_t x1 + sigma_t x0, which {what} need. "
            "Compare a model trained with --method cfm, or --method icfm or otcfm with "
            "--sigma 0; or use the other solvers on the uniform grid, a shift or a grid file")
    return None
