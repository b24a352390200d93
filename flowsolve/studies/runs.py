"""One run of a solver study, a (solver, grid, budget): ``warmup`` untimed solves, then
``repeats`` timed ones, each synchronised with the device before and after (minimum and
median seconds), and its record with the errors measured outside the timed region:

``error = (1/B sum_b ||x_hat_b - x_ref_b||^2)^(1/2)`` (``norm="rms"``; ``"mean"`` and
``"max"`` over the batch of ``||x_hat_b - x_ref_b||``), ``mean_error = ||mean x_hat - mean
x_ref||``, ``moment2_error = ||mean x_hat^2 - mean x_ref^2||``, W2 to the data, and the mean
absolute error of the log-likelihood against the reference's.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .._core.types import Field
from ..likelihood.cnf import log_likelihood
from ..metrics import wasserstein2
from ..ode.grids import UniformGrid
from ..ode.solve import sample
from ..paths.affine import AffineGaussianPath
from ..sde.solve import sample_sde
from .results import RECORD_FIELDS
from .sde_runs import SDESetup
from .specs import SolverSpec

__all__ = ["sync_device", "timed", "RunContext", "measure"]


def sync_device(device: torch.device) -> None:
    """Wait for the work queued on ``device``: any accelerator through its torch module
    (``torch.cuda``, ``torch.mps``, ``torch.xpu``, ...: ``getattr(torch, device.type)``), so
    that timings measure the solve, not its asynchronous launch. The CPU needs nothing."""
    if device.type == "cpu":
        return
    synchronize = getattr(getattr(torch, device.type, None), "synchronize", None)
    if synchronize is None:
        return
    if device.type == "mps":
        synchronize()  # torch.mps.synchronize() takes no device (there is only one)
    else:
        synchronize(device)


def timed(run: Callable, device: torch.device, repeats: int, warmup: int):
    """(result of the last run, min seconds, median seconds) of ``repeats`` synchronised runs
    after ``warmup`` untimed ones."""
    for _ in range(warmup):
        run()
    seconds = []
    for _ in range(repeats):
        sync_device(device)
        start = time.perf_counter()
        out = run()
        sync_device(device)
        seconds.append(time.perf_counter() - start)
    return out, min(seconds), statistics.median(seconds)


def _distance(x: Tensor, ref: Tensor, norm: str) -> float:
    d = (x - ref).flatten(1).norm(dim=1)
    return float(d.square().mean().sqrt() if norm == "rms" else d.mean() if norm == "mean"
                 else d.max())


def _moment_errors(x: Tensor, ref: Tensor) -> tuple[float, float]:
    x, ref = x.flatten(1), ref.flatten(1)
    return (float((x.mean(0) - ref.mean(0)).norm()),
            float((x.square().mean(0) - ref.square().mean(0)).norm()))


@dataclass(frozen=True)
class RunContext:
    """What every measurement of one study shares: ``field`` is the velocity (of the
    references, the likelihoods, the SDE solves), ``model`` the field as given, which the
    ODE solves receive with ``path`` and ``prediction``."""

    field: Field
    x0: Tensor
    t0: float
    t1: float
    norm: str
    repeats: int
    warmup: int
    max_steps: int | None
    x_ref: Tensor | None
    sde: SDESetup | None
    data: Tensor | None
    ll: tuple[Tensor, Tensor] | None  # (points, reference log-likelihood)
    t_interval: tuple[float, float]
    model: Field | None = None
    path: AffineGaussianPath | None = None
    prediction: str = "velocity"


def measure(ctx: RunContext, spec: SolverSpec, budget) -> dict:
    """One record: time the solve, then measure its errors (outside the timed region)."""
    kw = _budget_keywords(ctx, spec, budget)
    run, ref = _runner(ctx, spec, kw)
    with torch.no_grad():
        sol, t_min, t_med = timed(run, ctx.x0.device, ctx.repeats, ctx.warmup)
    rec = _record(ctx, spec, budget, sol, t_min, t_med)
    if ref is not None:  # in the reference's dtype (float64 for an automatic one)
        x = sol.x.to(torch.promote_types(sol.x.dtype, ref.dtype))
        rec["error"] = _distance(x, ref, ctx.norm)
        rec["mean_error"], rec["moment2_error"] = _moment_errors(x, ref)
    if ctx.data is not None:
        rec["w2"] = float(wasserstein2(sol.x, ctx.data))
    if ctx.ll is not None and spec.kind != "sde" and not spec.info.needs_path:
        # the augmented system of the velocity: no prediction; an adaptive solve no path
        kw = {k: v for k, v in kw.items() if k != "prediction"
              and not (k == "path" and spec.kind == "adaptive")}
        res = log_likelihood(ctx.field, ctx.ll[0], solver=spec.name,
                             t_interval=ctx.t_interval, **kw)
        rec["ll_error"], rec["ll_nfe"] = float((res.log_prob - ctx.ll[1]).abs().mean()), res.nfe
    return rec


def _budget_keywords(ctx: RunContext, spec: SolverSpec, budget) -> dict:
    """The solver keywords of one budget: ``rtol = atol`` (and the study's ``max_steps``) of
    an adaptive solver, else ``steps`` (and a fixed-step solver's ``grid`` other than the
    uniform one); a fixed-step solve gets the study's ``path``, any ODE solve a
    non-velocity ``prediction`` with it."""
    if spec.kind == "sde":
        return {"steps": budget}
    converted = ctx.prediction != "velocity"
    if spec.kind == "fixed":
        kw = {"steps": budget}
        if not isinstance(spec.timegrid, UniformGrid):
            kw["grid"] = spec.timegrid
    else:
        kw = {"rtol": budget, "atol": budget}
        if ctx.max_steps is not None:
            kw["max_steps"] = ctx.max_steps
    if ctx.path is not None and (spec.kind == "fixed" or converted):
        kw["path"] = ctx.path
    if converted:
        kw["prediction"] = ctx.prediction
    return kw


def _runner(ctx: RunContext, spec: SolverSpec, kw: dict) -> tuple[Callable, Tensor | None]:
    """``(run, reference)``: the solve to time, from ``x0`` (an SDE solver's on the shared
    Brownian path), and the ``x(t1)`` its error is measured against."""
    if spec.kind == "sde":

        def run_sde():
            if spec.info.needs_path:  # a stochastic sampler: the model itself
                return sample_sde(ctx.model, ctx.x0, solver=spec.info.name, **kw,
                                  **ctx.sde.sampler_kwargs)
            return sample_sde(ctx.field, ctx.x0, solver=spec.info.name, **kw, **ctx.sde.kwargs)

        return run_sde, (ctx.sde.sampler_refs[spec.info.name] if spec.info.needs_path
                         else ctx.sde.x_ref)

    model = ctx.field if ctx.model is None else ctx.model

    def run_ode():
        return sample(model, ctx.x0, spec.name, t0=ctx.t0, t1=ctx.t1, **kw)

    return run_ode, ctx.x_ref


def _record(ctx: RunContext, spec: SolverSpec, budget, sol, t_min: float, t_med: float) -> dict:
    """A record of :data:`RECORD_FIELDS` with the solve's work filled in, its errors None."""
    rec = dict.fromkeys(RECORD_FIELDS)
    rec.update(solver=spec.name, kind=spec.kind, library=spec.info.library,
               declared_order=spec.info.order, budget=budget, steps=sol.steps,
               rejected=getattr(sol, "rejected", None), nfe=sol.nfe, time_min=t_min,
               time_median=t_med,
               h=None if spec.kind == "adaptive" else abs(ctx.t1 - ctx.t0) / budget,
               grid=spec.grid)
    return rec
