"""The ``flowsolve`` command: ``demo | train | sample | likelihood | compare | transfer``.

Models are saved by ``flowsolve train`` as one file holding the MLP's shape, its (EMA)
weights and how it was trained, loaded with ``torch.load(weights_only=True)``. No command
overwrites an existing output unless ``--force`` is given: ``--out`` and ``--device`` are
checked before any work, outputs are written through a private temporary file and renamed
into place, and a file that appears at ``--out`` during a long run is left as it is (the
result is then kept beside it, and the message says where).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence

from .._core.errors import IntegrationError
from . import compare, demo_command, likelihood, sample, train, transfer
from .common import MODEL_FORMAT, CliError, check_device, load_model
from .options import HelpFormatter

__all__ = ["main", "build_parser", "MODEL_FORMAT"]

# each command's module: its options (add_parser), the checks of them before any work
# (check_args) and the command itself (run_command), which imports torch and the library
# it needs when it runs; in the order ``flowsolve --help`` lists them
_COMMANDS = (demo_command, compare, train, sample, likelihood, transfer)

# the model file's loader under the name it had here (callers of earlier releases reach it)
_load_model = load_model


def _import_the_library() -> None:
    """Import torch once a command runs: it takes seconds, and ``flowsolve --help`` and
    ``--version`` start without it (no torch-heavy import at the top of this file or of the
    command modules, which import the library they need inside their functions)."""
    global torch
    import torch


DESCRIPTION = """\
flowsolve: the dynamics of flow-matching and diffusion models, on built-in 2-D data.

Train a small velocity model (CFM, I-CFM, OT-CFM or SB-CFM), sample it with any ODE
solver, evaluate its exact or Hutchinson CNF log-likelihood, compare solvers (error, NFE,
wall time, fitted orders) and sample it under other schedulers without retraining. Time
runs from t = 0 (noise) to t = 1 (data)."""


EPILOG = """\
Run "flowsolve COMMAND --help" for the options of a command and their defaults.

No command overwrites an existing file unless --force is given. demo and compare write a
report folder: when --out exists, they write into a fresh numbered folder beside it
(NAME-2, NAME-3, ...), or into --out itself with --force."""


def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``flowsolve`` command; building it imports no torch."""
    import flowsolve

    parser = argparse.ArgumentParser(prog="flowsolve", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {flowsolve.__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                title="commands")
    for command in _COMMANDS:
        command.add_parser(sub)
    return parser


def _check_counts(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Counts >= 1 and tolerances > 0, refused through ``parser.error`` before any work."""
    for name in ("n", "steps", "batch_size", "probes", "hidden", "depth", "threads",
                 "repeats"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1; got {value}")
    if any(v < 1 for v in getattr(args, "budget_steps", None) or ()):
        parser.error(f"--budget-steps must all be >= 1; got {args.budget_steps}")
    if any(not v > 0 for v in getattr(args, "tolerances", None) or ()):
        parser.error(f"--tolerances must all be > 0; got {args.tolerances}")


def _check_options(args: argparse.Namespace) -> None:
    """Refuse, before any work, an option the command would ignore or cannot honour, in the
    words of the command line (the library's messages name its Python arguments)."""
    if getattr(args, "force", False) and getattr(args, "out", "") is None:
        raise CliError("--force lets --out replace existing files, and no --out is given")
    args.check(args)


_ADVICE = {
    "max_steps": "the adaptive solver reached its step limit: loosen --rtol / --atol, or "
                 "choose a fixed-step --solver with --steps",
    "step_underflow": "its step size underflowed (the model is probably not smooth there): "
                      "loosen --rtol / --atol, or choose a fixed-step --solver",
    "failed": "choose another --solver, or loosen --rtol / --atol",
    "non_finite": "the model's velocity or the state became inf or NaN: check the model file "
                  "(retrain with a smaller --lr), or use more --steps or tighter --rtol / "
                  "--atol",
}


_FLAGS = {"rtol": "--rtol", "atol": "--atol", "n_probes": "--probes", "steps": "--steps"}


def _in_cli_words(message: str) -> str:
    """A library message with the Python arguments that are options here named as options
    (``rtol=1e-08`` -> ``--rtol 1e-08``; ``steps`` only as ``steps=``, a word of prose too)."""
    def flag(m: re.Match) -> str:
        return _FLAGS[m[1]] + (" " if m[2] else "")

    message = re.sub(r"(?<![\w-])(rtol|atol|n_probes)(?!\w)(=?)", flag, message)
    return re.sub(r"(?<![\w-])(steps)(=)", flag, message)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_counts(parser, args)
    _import_the_library()
    threads = torch.get_num_threads()
    try:
        if getattr(args, "device", None) is not None:
            args.device = check_device(args.device)
        _check_options(args)
        if getattr(args, "threads", None) is not None:  # small tensors: one thread is fastest
            torch.set_num_threads(args.threads)         # on a shared CPU
        return args.run(args)
    except CliError as exc:
        parser.error(str(exc))
    except IntegrationError as exc:  # a solve that could not finish: what to change here
        where = "" if exc.t is None else f" at t={exc.t:.6g}"
        print(f"flowsolve {args.command}: solver {exc.solver} stopped{where} ({exc.status}): "
              f"{_ADVICE.get(exc.status, _ADVICE['failed'])}", file=sys.stderr)
        return 1
    except (ValueError, TypeError) as exc:
        print(f"flowsolve {args.command}: {_in_cli_words(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file or folder the command could not read or write
        print(f"flowsolve {args.command}: {exc}", file=sys.stderr)
        return 2
    finally:  # restored: main() may be called in-process (tests, notebooks)
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
