"""``flowsolve transfer``: a model trained on the CondOT path sampled under other
schedulers without retraining (its velocity re-expressed in the target's time and scale),
with the W2 distance to the data after a few fixed steps from the same source draws.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import (
    CliError,
    bridge_noise,
    load_model,
    on_condot_path,
    out_path,
    seeded_generator,
    source_points,
)
from .options import common_options, model_option, scheduler_names, solver_names, subcommand

__all__ = ["add_parser", "check_args", "run_command"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``flowsolve transfer`` and its options, added to ``sub``."""
    p = subcommand(sub, "transfer", "sample a CondOT-trained model under other schedulers",
                   "Sample a model trained on the CondOT path under other schedulers without\n"
                   "retraining: its velocity is re-expressed in the target's time and scale.\n"
                   "Exact for a velocity of the CondOT path under any coupling of the\n"
                   "endpoints: --method cfm, or icfm / otcfm with --sigma 0 (bridge noise\n"
                   "makes another path). Prints the W2 distance to the data after a few\n"
                   "fixed steps from the same source draws.")
    model_option(p)
    p.add_argument("--target", nargs="+", default=["cosine", "linear_vp"],
                   choices=scheduler_names(), metavar="NAME",
                   help="schedulers to sample under, after condot (the model's own): "
                        "%(choices)s; ve is refused (it starts from a wider Gaussian than the "
                        "model's source)")
    p.add_argument("--n", type=int, default=2000,
                   help="number of samples (and of data points for W2)")
    p.add_argument("--solver", default="euler", choices=solver_names(adaptive=False),
                   metavar="NAME", help="a fixed-step ODE solver: %(choices)s")
    p.add_argument("--steps", type=int, default=4, help="steps of the solver")
    common_options(p, "a figure of the samples under every scheduler beside the data (.png, "
                      ".pdf or .svg) (default: print the W2 table only)")
    p.set_defaults(run=run_command, check=check_args)


def check_args(args: argparse.Namespace) -> None:
    """Targets that start from ``N(0, I)`` like the model; with ``--out`` a figure
    suffix and matplotlib."""
    from ..paths.schedules import get_scheduler
    from . import plots

    for name in args.target:
        std = get_scheduler(name).source_std
        if std != 1:
            raise CliError(f"--target {name}: {get_scheduler(name)!r} starts from "
                           f"N(0, {std:g}^2 I), the model from its own source; a transfer "
                           f"keeps the source draws, so {name} cannot be a target")
    if args.out is not None:
        if Path(args.out).suffix.lower() not in plots.FIGURE_SUFFIXES:
            raise CliError(f"--out {args.out}: the figure is written as "
                           f"{', '.join(plots.FIGURE_SUFFIXES)}, as the name's suffix says")
        if not plots.have_matplotlib():
            raise CliError("--out draws a figure, which needs matplotlib (pip install "
                           "flowsolve[plot]); without --out the W2 table is printed only")


def run_command(args: argparse.Namespace) -> int:
    """W2 to the data after a few steps under each scheduler, from the same source draws; with
    ``--out`` a figure of those samples beside the data."""
    import torch

    from ..metrics import wasserstein2
    from ..ode.solve import sample
    from ..paths.schedules import CondOTScheduler, get_scheduler
    from ..paths.transfer import transfer
    from ..training.data import sample_dataset
    from . import plots

    out = out_path(args.out, args.force)
    model, saved = load_model(args.model, args.device)
    _check_transferable(args.model, saved["trained"])
    names = ["condot", *(t for t in dict.fromkeys(args.target) if t != "condot")]
    gen = seeded_generator(args.seed)
    x0 = source_points(saved, args.n, gen, args.device)
    data = saved["trained"]["data"]
    ref = sample_dataset(data, args.n, generator=gen).to(args.device)
    field = lambda x, t: model(x, t)  # noqa: E731
    print(f"W2 to {args.n} data points after {args.solver} with {args.steps} steps")
    panels = [(f"{data} (data)", ref)]
    with torch.no_grad():
        for name in names:
            v = transfer(field, source=CondOTScheduler(), target=get_scheduler(name))
            res = sample(v, x0, args.solver, steps=args.steps)
            w2 = float(wasserstein2(res.x, ref))
            print(f"  {name:<12} W2 {w2:.4f}   NFE {res.nfe}")
            panels.append((f"{name}: W2 {w2:.3f}", res.x))
    if out is not None:
        plots.scatter_panels(out, panels, overwrite=args.force,
                             title=f"{args.steps} {args.solver} steps from the same "
                                   f"{args.n} source draws")
        print(f"wrote {out}")
    return 0


def _check_transferable(path: str, trained: dict) -> None:
    """Scheduler transfer rescales the CondOT path ``x_t = t x1 + (1 - t) x0``; it is exact
    for a velocity of that path's marginals under any coupling of the endpoints (independent
    or OT pairs), and only without bridge noise."""
    if on_condot_path(trained):
        return
    method, sigma = trained["method"], float(trained.get("sigma", 0.0))
    noise = bridge_noise(trained)
    raise CliError(
        f"--model {path} was trained with --method {method} --sigma {sigma:g}: its path is "
        f"{noise} around the line between the pairs, not the CondOT path x_t = t x1 + "
        "(1 - t) x0 that scheduler transfer rescales (exact for any coupling of the "
        "endpoints, but only without bridge noise). Transfer a model trained with --method "
        "cfm, or --method icfm or otcfm with --sigma 0")
