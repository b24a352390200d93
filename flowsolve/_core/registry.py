"""Solver registry: names with their declared facts.

The ODE and SDE front doors each build a :class:`SolverRegistry`; studies enumerate them.
Unknown names (and non-names such as a list) raise a ValueError that lists the accepted
ones; a name registered twice is refused when the registry is built.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

__all__ = ["SolverInfo", "SolverRegistry", "UnknownSolverError"]


class UnknownSolverError(ValueError, KeyError):
    """An unknown solver name: a ValueError for users, a KeyError for ``Mapping`` methods
    (so ``name in registry`` and ``registry.get(name)`` work)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class SolverInfo:
    """Declared facts about one solver.

    Attributes:
        name: the name users pass (``solver="rk4"``).
        kind: ``"ode"`` or ``"sde"``.
        adaptive: step size chosen by error control (takes ``rtol`` / ``atol``) rather
            than a fixed grid (takes ``steps``).
        order: global order of convergence (strong order for SDE solvers), ``None`` if
            not a fixed number (e.g. variable-order multistep methods).
        library: who implements it (``"torchdiffeq"``, ``"torchsde"``, ``"scipy"``,
            ``"flowsolve"``).
        method: the name the library knows it by.
        multistep: reuses earlier evaluations of the field (Adams, DPM-Solver++(2M), UniPC).
        stochastic: draws noise (every SDE solver; the stochastic samplers).
        needs_path: works on the path's ``alpha_t``, ``sigma_t`` (the low-NFE samplers:
            ``path=`` is required).
    """

    name: str
    kind: str
    adaptive: bool
    order: float | None
    library: str
    method: str
    multistep: bool = False
    stochastic: bool = False
    needs_path: bool = False


class SolverRegistry(Mapping[str, SolverInfo]):
    """A read-only ``{name: SolverInfo}`` mapping whose lookups fail helpfully."""

    def __init__(self, infos: list[SolverInfo], what: str = "solver"):
        self._infos: dict[str, SolverInfo] = {}
        for info in infos:
            if info.name in self._infos:
                raise ValueError(f"{what} {info.name!r} is registered twice: "
                                 f"{self._infos[info.name]} and {info}; names must be unique")
            self._infos[info.name] = info
        self._what = what

    def __getitem__(self, name: str) -> SolverInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise UnknownSolverError(
                f"unknown {self._what} {name!r}; accepted: {', '.join(sorted(self._infos))}"
            ) from None
        except TypeError:  # unhashable, e.g. solver=["rk4"]
            raise UnknownSolverError(
                f"{self._what} must be a name (str); got {name!r} of type "
                f"{type(name).__name__}; accepted: {', '.join(sorted(self._infos))}"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def names(self, *, adaptive: bool | None = None) -> list[str]:
        """Registered names, optionally only the adaptive (or only the fixed-step) ones."""
        return [n for n, i in self._infos.items() if adaptive is None or i.adaptive == adaptive]
