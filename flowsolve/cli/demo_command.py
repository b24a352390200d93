"""``flowsolve demo``: the command's options and checks, and its entry into
:mod:`flowsolve.cli.demo` (imported once the command runs): the closed-form tour of a path,
or the whole job on built-in data written to a fresh report folder.
"""

from __future__ import annotations

import argparse

from .common import CliError, was_given
from .options import FOLDER_HELP, scheduler_names, subcommand

__all__ = ["add_parser", "check_args", "run_command"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``flowsolve demo`` and its options, added to ``sub``."""
    p = subcommand(sub, "demo", "train, likelihood, solver study, low-NFE front, transfer on "
                   "built-in data",
                   "The main job on built-in data, in about a minute on a CPU: the exact path\n"
                   "of an 8-Gaussians mixture, a small OT-CFM model trained on it, its exact\n"
                   "likelihood against the true density, a solver study, the low-NFE front\n"
                   "(the best sampler and time grid at 4-20 evaluations) and scheduler\n"
                   "transfer. Writes a report folder (summary.md, CSV, JSON, plots) and\n"
                   "prints its path.")
    p.add_argument("--out", default="flowsolve-demo", metavar="FOLDER",
                   help=f"report folder; {FOLDER_HELP}")
    p.add_argument("--force", action="store_true",
                   help="write into --out even if it exists (files of the same names are "
                        "replaced)")
    p.add_argument("--steps", type=int, default=1500, help="training steps")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (one is fastest for small tensors on a shared "
                        "CPU)")
    p.add_argument("--closed-form", action="store_true",
                   help="only print the closed-form tour of a path (no training, nothing "
                        "written)")
    p.add_argument("--scheduler", default="condot", choices=scheduler_names(),
                   metavar="NAME", help="the path of --closed-form: %(choices)s")
    p.add_argument("--seed", type=int, default=0, help="seed of the training and every draw")
    p.set_defaults(run=run_command, check=check_args)


def check_args(args: argparse.Namespace) -> None:
    """``--closed-form`` takes no ``--steps``, ``--out``, ``--seed`` or ``--force``;
    ``--scheduler`` is only for it."""
    if args.closed_form:
        ignored = [f"--{n}" for n in ("steps", "out", "seed") if was_given(args, n)]
        ignored += ["--force"] if args.force else []
        if ignored:
            raise CliError(f"--closed-form only prints the closed-form tour: it trains "
                           f"nothing, writes nothing and draws nothing, so "
                           f"{', '.join(ignored)} would be ignored")
    elif was_given(args, "scheduler"):
        raise CliError("--scheduler chooses the path of --closed-form; the full demo trains "
                       "on the CondOT path: drop --scheduler, or add --closed-form")


def run_command(args: argparse.Namespace) -> int:
    """The closed-form tour printed, or the demo's report folder written and the
    path of its summary printed."""
    from .demo import closed_form_tour, fresh_folder, run_demo

    if args.closed_form:
        print("\n".join(closed_form_tour(args.scheduler, args.seed)))
        return 0
    out = fresh_folder(args.out, args.force)
    summary = run_demo(out, steps=args.steps, seed=args.seed)
    print(f"\nreport: {summary}")
    return 0
