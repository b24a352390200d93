"""The table of flowsolve's low-NFE samplers of the probability-flow ODE, by name: DDIM,
DPM-Solver, DPM-Solver++ (:mod:`flowsolve.ode.dpm_solver`), UniPC
(:mod:`flowsolve.ode.unipc`) and EDM's Heun sampler (:mod:`flowsolve.ode.edm`). They are
registered in :data:`flowsolve.ode.backends.ODE_SOLVERS` (library ``"flowsolve"``,
``needs_path=True``) and run by :func:`flowsolve.ode.solve.sample` with ``path=``."""

from __future__ import annotations

from .dpm_solver import SAMPLERS as DPM_SOLVER_SAMPLERS
from .edm import SAMPLERS as EDM_SAMPLERS
from .semilinear import Sampler
from .unipc import SAMPLERS as UNIPC_SAMPLERS

__all__ = ["SAMPLERS"]

SAMPLERS: dict[str, Sampler] = {
    s.name: s for s in (*DPM_SOLVER_SAMPLERS, *UNIPC_SAMPLERS, *EDM_SAMPLERS)}
"""``{name: sampler}`` of every deterministic low-NFE sampler."""
