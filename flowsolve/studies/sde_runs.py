"""The SDE solves of a solver study: one :class:`~flowsolve.sde.brownian.GridBrownian` of
``N_ref`` cells shared by every SDE solver and step count (``N_ref`` a multiple of every SDE
budget), so that ``error`` is the strong error against a fine solve on the same Brownian
path: ``reference_solver`` (``srk``) at ``N_ref`` for torchsde's solvers, and each
stochastic sampler (``needs_path``) itself at ``N_ref``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ..sde.brownian import GridBrownian
from ..sde.solve import SDE_SOLVERS, sample_sde
from .specs import check_count

__all__ = ["SDESetup", "prepare_sde"]

_SDE_KEYS = ("score", "path", "diffusion", "reference_solver", "reference_steps")


@dataclass(frozen=True)
class SDESetup:
    """What the SDE solves of a study share: the keywords of the torchsde solvers' and of the
    stochastic samplers' solves (one Brownian path, ``bm``), the references and the meta."""

    kwargs: dict
    x_ref: Tensor | None  # the torchsde solvers' reference (None: no torchsde solver)
    meta: dict
    sampler_kwargs: dict
    sampler_refs: dict  # {name: the sampler's own fine solve}


def prepare_sde(field, x0, specs, sde, generator, t0, t1, path=None, model=None,
                prediction: str = "velocity") -> SDESetup | None:
    """The shared setup of the SDE solves, or None without SDE solvers. The study's ``path``
    is the SDE solves' where ``sde`` names none; stochastic samplers (``needs_path``) may
    then leave ``sde`` out. A torchsde solver is measured against ``reference_solver`` at
    ``reference_steps`` on the shared path, a sampler against itself there (its SDE is its
    own, not the one of ``sde``'s diffusion)."""
    sde_specs = [s for s in specs if s.kind == "sde"]
    steps = [n for s in sde_specs for n in s.budgets]
    if not steps:
        return None
    samplers = [s.info.name for s in sde_specs if s.info.needs_path]
    if sde is None and path is not None and len(samplers) == len(sde_specs):
        sde = {}
    if not isinstance(sde, Mapping):
        raise ValueError("SDE solvers need sde=dict(path=..., diffusion=..., score=...) (the "
                         f"arguments of sample_sde); got sde={sde!r}")
    unknown = [k for k in sde if k not in _SDE_KEYS]
    if unknown:
        raise ValueError(f"unknown sde keys {unknown!r}; accepted: {', '.join(_SDE_KEYS)}")
    cfg = {"score": None, "path": None, "diffusion": 1.0,
           "reference_solver": "srk" if "srk" in SDE_SOLVERS.names() else "euler",
           "reference_steps": None, **sde}
    if cfg["path"] is None:
        cfg["path"] = path
    SDE_SOLVERS[cfg["reference_solver"]]  # ValueError listing the accepted names
    lcm = math.lcm(*steps)
    n_ref = cfg["reference_steps"]
    if n_ref is None:
        n_ref = lcm
        while n_ref < 16 * max(steps):
            n_ref *= 2
    elif check_count("sde reference_steps", n_ref, 1) % lcm:
        raise ValueError(f"sde reference_steps must be a multiple of every SDE step budget "
                         f"(of {lcm}) so that all solves share its Brownian path; got {n_ref}")
    bm = GridBrownian(x0.shape, steps=n_ref, t0=t0, t1=t1, generator=generator,
                      dtype=x0.dtype, device=x0.device, levy_area="space-time")
    kwargs = {"score": cfg["score"], "path": cfg["path"], "diffusion": cfg["diffusion"],
              "t0": t0, "t1": t1, "bm": bm}
    # the samplers read the model itself as posterior means; no diffusion, no score
    sampler_kwargs = {"path": cfg["path"], "t0": t0, "t1": t1, "bm": bm}
    if prediction != "velocity":
        sampler_kwargs["prediction"] = prediction
    meta = {"diffusion": repr(cfg["diffusion"]), "reference_solver": cfg["reference_solver"],
            "reference_steps": n_ref, "reference_nfe": None}
    ref = None
    with torch.no_grad():
        if len(samplers) < len(sde_specs):
            sol = sample_sde(field, x0, solver=cfg["reference_solver"], steps=n_ref, **kwargs)
            ref, meta["reference_nfe"] = sol.x, sol.nfe
        refs = {name: sample_sde(field if model is None else model, x0, solver=name,
                                 steps=n_ref, **sampler_kwargs).x for name in samplers}
    if samplers:
        meta["sampler_reference"] = "each stochastic sampler itself at reference_steps"
    return SDESetup(kwargs, ref, meta, sampler_kwargs, refs)
