r"""Couplings of a source batch ``x0`` with a data batch ``x1``: which x0 goes with which x1.

The front door of the couplings: every coupling and its result under one name, and the
registry :data:`COUPLINGS` (:func:`get_coupling`) for configuration files and the command
line. Each concept has its module:

* :mod:`~flowsolve.training.coupling_base`: the :class:`Coupling` interface (``coupling(x0,
  x1, *extras, generator=g)`` and ``coupling.plan(...)``), :class:`CouplingResult`, the
  errors, :class:`IndependentCoupling` and :class:`PairedCoupling`, the cost and point
  checks;
* :mod:`~flowsolve.training.ot_couplings`: :class:`OTCoupling`, exact and entropic OT
  through POT;
* :mod:`~flowsolve.training.relaxed_couplings`: :class:`UnbalancedOTCoupling` (KL-relaxed
  marginals) and :class:`PartialOTCoupling` (a fraction of the mass);
* :mod:`~flowsolve.training.conditional_couplings`: :class:`ClassConditionalOT` (OT within
  each class) and :class:`ConditionalOT` (a cost augmented by the distance of the
  conditions).

Failures are never silent: see :class:`OTCoupling`.
"""

from __future__ import annotations

from .conditional_couplings import ClassConditionalOT, ConditionalCouplingResult, ConditionalOT
from .coupling_base import (
    COSTS,
    Coupling,
    CouplingError,
    CouplingResult,
    CouplingWarning,
    IndependentCoupling,
    PairedCoupling,
)
from .ot_couplings import OTCoupling
from .relaxed_couplings import PartialOTCoupling, RelaxedCouplingResult, UnbalancedOTCoupling

__all__ = ["COSTS", "COUPLINGS", "ClassConditionalOT", "ConditionalCouplingResult",
           "ConditionalOT", "Coupling", "CouplingError", "CouplingResult", "CouplingWarning",
           "IndependentCoupling", "OTCoupling", "PairedCoupling", "PartialOTCoupling",
           "RelaxedCouplingResult", "UnbalancedOTCoupling", "get_coupling"]

#: coupling name -> class, for configuration files and the command line.
COUPLINGS: dict[str, type[Coupling]] = {
    "independent": IndependentCoupling, "paired": PairedCoupling, "ot": OTCoupling,
    "class_ot": ClassConditionalOT, "conditional_ot": ConditionalOT,
    "unbalanced_ot": UnbalancedOTCoupling, "partial_ot": PartialOTCoupling}


def get_coupling(name: str, **kwargs) -> Coupling:
    """``COUPLINGS[name](**kwargs)``, e.g. ``get_coupling("ot", method="sinkhorn", reg=0.1)``."""
    if name not in COUPLINGS:
        raise ValueError(f"unknown coupling {name!r}; accepted: {', '.join(COUPLINGS)}")
    return COUPLINGS[name](**kwargs)
