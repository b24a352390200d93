"""The pieces the parser of ``flowsolve`` is built from: its help formatter (each option's
help ends with its default), the ``store`` action that notes which options were given
(``args.given``), choices read from the library's registries on first use, and the options
several commands share. Building the parser imports no torch.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Iterator

__all__ = ["HelpFormatter", "Store", "StoreNames", "LazyNames", "CommaNames", "Joined",
           "solver_names", "sampler_names", "grid_names", "dataset_names", "scheduler_names",
           "subcommand", "model_option", "solver_options", "common_options", "FOLDER_HELP"]

FOLDER_HELP = "if it exists, a fresh numbered folder beside it (NAME-2, NAME-3, ...) unless --force"
"""The help of a report folder's ``--out`` (``demo``, ``compare``)."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; each option's help ends with its default where it has one
    (flags, required options and options whose default is "none" say in words what
    happens)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default is None or default is argparse.SUPPRESS or isinstance(default, bool)
                or action.required or "%(default)" in text):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list | tuple) else default
        return f"{text} (default: {str(shown).replace('%', '%%')})"


class Store(argparse.Action):
    """argparse's plain ``store`` that also notes the option in ``args.given``: an option the
    command would ignore is refused when it was given, never for its default."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.given = {*getattr(namespace, "given", ()), self.dest}


class LazyNames:
    """Choices read from a library registry on first use (a command's help, a value to
    check): building the parser imports no torch."""

    def __init__(self, read: Callable[[], Iterable[str]]):
        self._read, self._names = read, None

    def _get(self) -> list[str]:
        if self._names is None:
            self._names = list(self._read())
        return self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __contains__(self, name: object) -> bool:
        return name in self._get()

    def __len__(self) -> int:
        return len(self._get())


def solver_names(adaptive: bool | None = None) -> LazyNames:
    """The ODE solvers' names (only the adaptive or fixed-step ones with ``adaptive``)."""
    def read() -> list[str]:
        from ..ode.solve import ODE_SOLVERS

        return ODE_SOLVERS.names(adaptive=adaptive)

    return LazyNames(read)


def sampler_names() -> LazyNames:
    """The low-NFE samplers' names (``needs_path`` in the registry)."""
    def read() -> list[str]:
        from ..ode.solve import ODE_SOLVERS

        return [n for n, info in ODE_SOLVERS.items() if info.needs_path]

    return LazyNames(read)


def grid_names() -> LazyNames:
    """The time grids by name (a shift is given as its number)."""
    def read() -> list[str]:
        from ..ode.grids import GRIDS

        return [n for n in GRIDS if n != "shift"]  # a shift is given as its number

    return LazyNames(read)


class CommaNames:
    """Choices that also accept names joined by commas (``dpmpp_2m,heun2``), each one of
    ``names``; iterated (the help's list) as ``names``."""

    def __init__(self, names: LazyNames):
        self._names = names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __contains__(self, value: object) -> bool:
        parts = value.split(",") if isinstance(value, str) else [value]
        return all(part in self._names for part in parts)


class StoreNames(Store):
    """``Store`` of a list of names given separated by spaces or commas, as one flat list."""

    def __call__(self, parser, namespace, values, option_string=None):
        values = [part for value in values for part in value.split(",")]
        super().__call__(parser, namespace, values, option_string)


class Joined:
    """``names`` joined by ", " when a help text is formatted (read on first use)."""

    def __init__(self, names: LazyNames):
        self._names = names

    def __str__(self) -> str:
        return ", ".join(self._names)


def dataset_names() -> LazyNames:
    """The built-in data sets."""
    def read() -> list[str]:
        from ..training.data import DATASETS

        return list(DATASETS)

    return LazyNames(read)


def scheduler_names() -> LazyNames:
    """The schedulers by name, sorted."""
    def read() -> list[str]:
        from ..paths.schedules import SCHEDULERS

        return sorted(SCHEDULERS)

    return LazyNames(read)


def subcommand(sub: argparse._SubParsersAction, name: str, summary: str,
               description: str) -> argparse.ArgumentParser:
    """The parser of one command, with :class:`HelpFormatter` and :class:`Store` as its
    plain ``store`` action."""
    p = sub.add_parser(name, help=summary, description=description,
                       formatter_class=HelpFormatter)
    p.register("action", None, Store)
    p.register("action", "store", Store)
    return p


def model_option(p: argparse.ArgumentParser) -> None:
    """``--model FILE`` (required)."""
    p.add_argument("--model", required=True, metavar="FILE",
                   help="a model file written by flowsolve train")


def solver_options(p: argparse.ArgumentParser, solver: str) -> None:
    """``--solver`` (default ``solver``), ``--steps``, ``--rtol``, ``--atol``,
    ``--step-control``."""
    p.add_argument("--solver", default=solver, choices=solver_names(), metavar="NAME",
                   help="the ODE solver, fixed-step or adaptive: %(choices)s")
    p.add_argument("--steps", type=int, default=20,
                   help="steps of a fixed-step solver (refused with an adaptive one)")
    p.add_argument("--rtol", type=float, default=1e-5,
                   help="relative tolerance of an adaptive solver (refused with a fixed-step "
                        "one)")
    p.add_argument("--atol", type=float, default=1e-5,
                   help="absolute tolerance of an adaptive solver (refused with a fixed-step "
                        "one)")
    p.add_argument("--step-control", default="shared", choices=["shared", "per_sample"],
                   help="adaptive solvers: one step size for the batch (shared), or one a "
                        "point (per_sample: dopri5, dopri8, bosh3; a point's result does not "
                        "depend on the others)")


def common_options(p: argparse.ArgumentParser, out_help: str | None = None) -> None:
    """``--seed``, ``--device`` and, with ``out_help``, ``--out FILE`` and ``--force``."""
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N or mps")
    if out_help:
        p.add_argument("--out", metavar="FILE", help=out_help)
        p.add_argument("--force", action="store_true",
                       help="overwrite the files of --out if they exist")
