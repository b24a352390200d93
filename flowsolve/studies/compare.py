r"""Solver comparison studies: error, sample quality and wall time against NFE, and the
empirical order of convergence, for any mix of ODE and SDE solvers on the same field.

The protocol (DiffEqDevTools' ``WorkPrecisionSet`` / ``test_convergence``; the project's
notes on solver studies):

1. **Reference** ``x_ref = x(t1)`` from the same ``x0``: a given tensor (a closed form), or a
   tight adaptive solve (``reference="auto"``: scipy's DOP853 on the CPU, torchdiffeq's
   dopri8 on an accelerator) **in float64** at ``rtol = atol = 1e-10``, whatever the dtype
   of ``x0``: a float32 study starts it from ``x0`` converted to float64, so that the
   reference is tighter than every budget it judges (evaluated in float32, a reference
   stays near float32 round-off, no better than the solves it measures). Only a field that
   cannot take float64 (it raises, or returns another dtype, on one probing call) falls
   back to a reference in ``x0``'s dtype at ``1e-6``. An adaptive budget at or below the
   reference tolerance is refused (ValueError): it would be measured against itself.
   Errors at or below the study's floor (``meta["order_floor"]``, the larger of what the
   reference's tolerance and the round-off of ``x0``'s dtype allow) are flagged
   ``below_floor`` and left out of the fitted orders.
2. **Work**: for every (solver, budget), ``warmup`` untimed solves, then ``repeats`` timed
   ones, each synchronised with the device before and after; minimum and median seconds.
   NFE is the front door's counter (never a formula).
3. **Error at t1**: ``e = (1/B sum_b ||x_hat_b - x_ref_b||^2)^(1/2)`` (``norm="rms"``; also
   ``"mean"``, ``"max"``), the statistics ``mean_error = ||mean x_hat - mean x_ref||`` and
   ``moment2_error = ||mean x_hat^2 - mean x_ref^2||``, W2 to ``data`` samples, and the mean
   absolute error of the log-likelihood (nats) against a reference likelihood.
4. **SDE solvers** (names ``"sde:<torchsde method>"``) all integrate on one
   :class:`~flowsolve.sde.brownian.GridBrownian` of ``N_ref`` cells, so every step count sees the
   same Brownian path; their reference is ``reference_solver`` (``srk``) at ``N_ref`` on that
   path. ``error`` is then the *strong* error, the statistics are the *weak* errors. A
   stochastic sampler (``needs_path``) is measured against itself at ``N_ref`` on that path.
5. **Order**: the least-squares slope ``p`` of ``log e = log C + p log h``,
   ``h = |t1 - t0| / N``, over the budgets whose error is above the reference floor, next
   to the successive estimates ``log(e_k / e_{k+1}) / log(h_k / h_{k+1})`` and the order the
   registry declares; per solver and time grid.
6. **Grids and samplers**: every fixed-step solver, the low-NFE samplers included, runs on
   every grid of ``grids=`` (:mod:`flowsolve.ode.grids`: uniform, log-SNR, EDM, a shift,
   given times); a grid of ``N`` cells other than the uniform one is a family in ``N``, so
   ``h`` is its mean step and the slope against it is the order in ``N``. The samplers
   (``needs_path`` in the registry) read the model as posterior means on ``path=``, the
   other solves integrate its velocity (``prediction=`` converted on ``path``).

Results are a :class:`Study` of plain records (CSV / JSON, a Markdown table, and a
work-precision plot through matplotlib's Agg canvas, an optional dependency).
"""

from __future__ import annotations

import math
import numbers
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from .._core.counting import check_like
from .._core.progress import progress_bar
from .._core.registry import SolverInfo
from .._core.threads import check_threads, intra_op_threads
from .._core.types import Field
from ..likelihood.cnf import log_likelihood
from ..metrics import wasserstein2
from ..ode.args import as_path
from ..ode.grids import GivenGrid, ShiftGrid, TimeGrid, UniformGrid, as_grid, time_grid
from ..ode.solve import ODE_SOLVERS, sample
from ..paths.affine import AffineGaussianPath, canonical_prediction
from ..paths.fields import ConvertedField
from ..paths.schedules import Scheduler
from ..sde.brownian import GridBrownian
from ..sde.solve import SDE_SOLVERS, sample_sde
from .results import RECORD_FIELDS, Study, fit_order, order_entry, order_key

__all__ = ["compare_solvers", "fit_order", "order_key", "Study", "RECORD_FIELDS",
           "SDE_PREFIX", "DEFAULT_STEPS", "DEFAULT_TOLERANCES"]


SDE_PREFIX = "sde:"
DEFAULT_STEPS = (4, 8, 16, 32, 64)
DEFAULT_TOLERANCES = (1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)
_NORMS = ("rms", "mean", "max")
_SDE_KEYS = ("score", "path", "diffusion", "reference_solver", "reference_steps")
_REFERENCE_MAX_STEPS = 100_000
_REFERENCE_TOL = 1e-10  # of a reference solved in float64
_LOW_PRECISION_REFERENCE_TOL = 1e-6  # of one in float32 (a field that cannot take float64)


@dataclass(frozen=True)
class _Spec:
    name: str  # as written by the user: "rk4", "sde:euler"
    info: SolverInfo
    kind: str  # "fixed", "adaptive" or "sde"
    budgets: tuple
    grid: str | None = None  # the grid's label: fixed and SDE solves; None: adaptive
    timegrid: TimeGrid | None = None  # a fixed-step solve's grid


def _lookup(name) -> tuple[SolverInfo, str]:
    if isinstance(name, str):
        # names(): ``in`` on a SolverRegistry raises ValueError (its lookup never KeyErrors)
        if name.startswith(SDE_PREFIX) and name[len(SDE_PREFIX):] in SDE_SOLVERS.names():
            return SDE_SOLVERS[name[len(SDE_PREFIX):]], "sde"
        if name in ODE_SOLVERS.names():
            info = ODE_SOLVERS[name]
            return info, "adaptive" if info.adaptive else "fixed"
    raise ValueError(
        f"unknown solver {name!r}; accepted ODE solvers: {', '.join(sorted(ODE_SOLVERS))}; "
        f"SDE solvers (with sde=dict(...)): "
        f"{', '.join(SDE_PREFIX + n for n in sorted(SDE_SOLVERS))}")


def _check_budgets(name: str, kind: str, values) -> tuple:
    adaptive = kind == "adaptive"
    what = ("tolerances in (0, 1) (rtol = atol)" if adaptive
            else "step counts (positive ints)")
    ok = isinstance(values, Sequence) and not isinstance(values, str) and len(values) > 0
    if ok and adaptive:
        ok = all(isinstance(v, numbers.Real) and not isinstance(v, bool) and 0 < v < 1
                 for v in values)
    elif ok:
        ok = all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1
                 for v in values)
    if not ok or len(set(values)) != len(values):
        raise ValueError(f"budgets of solver {name!r} ({kind}) must be a non-empty sequence of "
                         f"distinct {what}; got {values!r}")
    return tuple(float(v) if adaptive else int(v) for v in values)


def _parse_solvers(solvers, steps, tolerances, budgets,
                   grids: list[tuple[str, TimeGrid]]) -> list[_Spec]:
    """One spec per solver and grid: a fixed-step solver on each of ``grids`` (on given times
    with the one budget they fix), an adaptive one once (no grid), an SDE solver on the
    uniform grid of the shared Brownian path."""
    names = [solvers] if isinstance(solvers, str) else list(solvers)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"solvers must be a non-empty list of distinct names; got {solvers!r}")
    budgets = {} if budgets is None else budgets
    if not isinstance(budgets, Mapping):
        raise TypeError("budgets must be a mapping {solver: [steps or tolerances]} (steps= and "
                        f"tolerances= set the defaults); got {type(budgets).__name__}")
    extra = [k for k in budgets if k not in names]
    if extra:
        raise ValueError(f"budgets names solvers not in solvers={names!r}: {extra!r}")
    specs = []
    for name in names:
        info, kind = _lookup(name)
        values = budgets.get(name, tolerances if kind == "adaptive" else steps)
        checked = _check_budgets(name, kind, values)
        if kind == "fixed":
            specs += [_Spec(name, info, kind, checked if g.steps is None else (g.steps,),
                            label, g) for label, g in grids]
        else:
            specs.append(_Spec(name, info, kind, checked, "uniform" if kind == "sde" else None))
    return specs


_GRIDS_ACCEPTED = ("a sequence of grids, each a name (uniform, logsnr, edm), a shift s > 0, a "
                   "TimeGrid (LogSNRGrid(...), EDMGrid(...), ShiftGrid(s), GivenGrid(times)) "
                   "or times as a tensor or a nested list [[t0, ..., t1]]; or a mapping "
                   "{label: grid}")


def _grid_label(grid: TimeGrid) -> str:
    """The label of a grid in the records: its name (``"uniform"``, ``"logsnr"``, ``"edm"``),
    ``"shift<s>"``, ``"given"``, or the name with the options that differ from the
    defaults (``"edm(rho=5)"``)."""
    if isinstance(grid, ShiftGrid):
        return f"shift{grid.shift:g}"
    if isinstance(grid, GivenGrid):
        return "given"
    try:
        changed = [(f.name, getattr(grid, f.name)) for f in fields(grid)
                   if f.init and getattr(grid, f.name) != f.default]
    except TypeError:  # not a dataclass: a TimeGrid of the user's
        changed = []
    opts = ", ".join(f"{k}={v:g}" if isinstance(v, numbers.Real) else f"{k}={v!r}"
                     for k, v in changed)
    return f"{grid.name}({opts})" if opts else grid.name


def _parse_grids(grids) -> list[tuple[str, TimeGrid]]:
    """``[(label, TimeGrid)]`` of ``grids=``: distinct labels (a mapping names them)."""
    if isinstance(grids, Mapping):
        bad = [k for k in grids if not isinstance(k, str) or not k]
        if bad or not grids:
            raise ValueError(f"grids as a mapping must be a non-empty {{label: grid}} with "
                             f"non-empty str labels; got {grids!r}")
        items = list(grids.items())
    else:
        if isinstance(grids, str | numbers.Real | TimeGrid) or torch.is_tensor(grids):
            grids = [grids]
        if not isinstance(grids, Sequence) or not grids:
            raise ValueError(f"grids must be {_GRIDS_ACCEPTED}; got {grids!r}")
        items = [(None, g) for g in grids]
    out = []
    for i, (label, g) in enumerate(items):
        try:
            spec = as_grid(g)
        except (TypeError, ValueError) as err:
            where = f"grids[{label!r}]" if label is not None else f"grids[{i}]"
            raise type(err)(f"{where}: {err}. grids= is {_GRIDS_ACCEPTED}") from None
        out.append((_grid_label(spec) if label is None else label, spec))
    labels = [lab for lab, _ in out]
    twice = sorted({lab for lab in labels if labels.count(lab) > 1})
    if twice:
        raise ValueError(f"grids {labels!r} give the label {twice[0]!r} twice (the records "
                         f"could not tell them apart): pass a mapping {{label: grid}}")
    return out


def _check_paths(specs: list[_Spec], path, prediction: str, sde, t0: float,
                 t1: float) -> tuple[AffineGaussianPath | None, str]:
    """``(path, prediction)`` checked: samplers (``needs_path``) and a non-velocity model need
    the path; samplers run from noise to data; every grid of every fixed-step budget is built
    once here, so a bad grid fails before any solve."""
    path = as_path(path)
    prediction = canonical_prediction(prediction, "prediction")
    sde_path = isinstance(sde, Mapping) and sde.get("path") is not None
    samplers = list(dict.fromkeys(
        s.name for s in specs if s.info.needs_path and not (s.kind == "sde" and sde_path)))
    if path is None and (samplers or prediction != "velocity"):
        why = (f"solvers {samplers!r} are samplers that step in the path's log-SNR"
               if samplers else f"a {prediction!r} model is converted to a velocity on it")
        raise ValueError(f"{why}: pass path= (the AffineGaussianPath the model was trained "
                         f"on, or its Scheduler)")
    backward = [s.name for s in specs if s.info.needs_path and not t0 < t1]
    if backward:
        raise ValueError(f"solver {backward[0]!r} integrates from noise to data (t0 < t1); got "
                         f"t0={t0!r}, t1={t1!r}")
    for s in specs:
        for n in s.budgets if s.kind == "fixed" else ():
            time_grid(s.timegrid, n, t0=t0, t1=t1, path=path)
    return path, prediction


def _check_reference_tol(specs: list[_Spec], tol: float, ref_dtype, dtype) -> None:
    """An adaptive budget at or below the reference's tolerance would be measured against a
    solve no better than itself (at the same tolerance: error exactly 0)."""
    for spec in specs:
        if spec.kind != "adaptive":
            continue
        bad = [b for b in spec.budgets if b <= tol]
        if bad:
            how = ("pass a smaller reference_tol" if ref_dtype == torch.float64 else
                   f"the field cannot take float64, so the reference is solved in "
                   f"{str(dtype).removeprefix('torch.')} at {tol:g}: make it take float64 "
                   "(e.g. net.double()) for a float64 reference at 1e-10, or pass "
                   "reference=<closed form>")
            raise ValueError(
                f"tolerance {bad[0]:g} of solver {spec.name!r} is at or below the reference "
                f"tolerance {tol:g}: its error would be measured against a solve no more "
                f"accurate than itself. Use tolerances above {tol:g}, or {how}")


def _count(name: str, v, low: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
        raise ValueError(f"{name} must be an int >= {low}; got {v!r}")
    return int(v)


# -- measuring ---------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
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


def _timed(run: Callable, device: torch.device, repeats: int, warmup: int):
    """(result of the last run, min seconds, median seconds) of ``repeats`` synchronised runs
    after ``warmup`` untimed ones."""
    for _ in range(warmup):
        run()
    seconds = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        out = run()
        _sync(device)
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


def _scale(x: Tensor) -> float:
    return 1.0 + float(x.flatten(1).norm(dim=1).square().mean().sqrt())


# -- references --------------------------------------------------------------------------------
def _takes_float64(field, x0: Tensor, t0: float) -> bool:
    """Whether the reference can be solved in float64: True for a float64 ``x0``; otherwise
    one probing call ``field(x0 in float64, t0)`` must return a float64 tensor shaped like
    ``x0`` (a float32 network raises or returns float32: False)."""
    if x0.dtype == torch.float64:
        return True
    try:
        with torch.no_grad():
            x = x0.detach().to(torch.float64)
            check_like(field(x, torch.tensor(float(t0), dtype=torch.float64, device=x0.device)),
                       x)
    except Exception:  # noqa: BLE001 -- any refusal of float64 input means "no"
        return False
    return True


def _ode_reference(field, x0, reference, solver, tol, t0, t1,
                   ref_dtype) -> tuple[Tensor | None, dict]:
    if reference is None:
        return None, {"reference": None}
    if isinstance(reference, str) and reference == "auto":
        with torch.no_grad():
            sol = sample(field, x0.detach().to(ref_dtype), solver, rtol=tol, atol=tol, t0=t0,
                         t1=t1, max_steps=_REFERENCE_MAX_STEPS)
        # the reference's own error, or the round-off of the solves it judges (x0's dtype;
        # the floor of a given reference), whichever is larger
        floor = max(30.0 * tol, 1e3 * torch.finfo(x0.dtype).eps) * _scale(sol.x)
        return sol.x, {"reference": "auto", "reference_solver": solver, "reference_tol": tol,
                       "reference_dtype": str(ref_dtype).removeprefix("torch."),
                       "reference_nfe": sol.nfe, "order_floor": floor}
    if torch.is_tensor(reference):
        if reference.shape != x0.shape:
            raise ValueError(f"reference must be x(t1) shaped like x0 {tuple(x0.shape)}; got "
                             f"{tuple(reference.shape)}")
        ref = reference.detach().to(dtype=x0.dtype, device=x0.device)
        floor = 1e3 * torch.finfo(x0.dtype).eps * _scale(ref)
        return ref, {"reference": "given", "order_floor": floor}
    raise ValueError(f"reference must be 'auto', None or a tensor shaped like x0; got "
                     f"{reference!r}")


@dataclass(frozen=True)
class _SDESetup:
    """What the SDE solves of a study share: the keywords of the torchsde solvers' and of the
    stochastic samplers' solves (one Brownian path, ``bm``), the references and the meta."""

    kwargs: dict
    x_ref: Tensor | None  # the torchsde solvers' reference (None: no torchsde solver)
    meta: dict
    sampler_kwargs: dict
    sampler_refs: dict  # {name: the sampler's own fine solve}


def _sde_setup(field, x0, specs, sde, generator, t0, t1, path=None, model=None,
               prediction: str = "velocity") -> _SDESetup | None:
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
    elif _count("sde reference_steps", n_ref, 1) % lcm:
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
    return _SDESetup(kwargs, ref, meta, sampler_kwargs, refs)


def _likelihood_setup(field, likelihood, points, solver, tol, t_interval, ref_dtype):
    if likelihood is False or likelihood is None:
        return None
    if points is None:
        raise ValueError("likelihood needs points: give data= (its first B rows are used) or "
                         "a reference (its x(t1) is used)")
    if likelihood is True:  # in float64 where the field takes it, like the ODE reference
        exact = log_likelihood(field, points.to(ref_dtype), solver=solver, rtol=tol, atol=tol,
                               t_interval=t_interval, max_steps=_REFERENCE_MAX_STEPS).log_prob
    elif callable(likelihood):
        lo, hi = t_interval
        if (lo, hi) != (0.0, 1.0):
            why = []
            if lo != 0.0:
                why.append(f"put the N(0, I) prior at the lower end min(t0, t1) = {lo!r}, "
                           f"where p_{lo!r} is not N(0, I)")
            if hi != 1.0:
                why.append(f"give log p_{hi!r} (at the upper end max(t0, t1) = {hi!r}), not "
                           "log p_1")
            raise ValueError(
                "likelihood=<callable> is the exact log p_1: it needs the interval to start at "
                "t = 0 and end at t = 1 (t0=0, t1=1, or t0=1, t1=0); got "
                f"[min(t0, t1), max(t0, t1)] = [{lo!r}, {hi!r}], where the solved "
                f"likelihoods {' and '.join(why)}, so their gap to it would not be solver "
                "error only. Use that interval, or likelihood=True (a reference solve on the "
                "same interval)")
        exact = torch.as_tensor(likelihood(points)).detach().to(points)
        if exact.shape != points.shape[:1]:
            raise ValueError(f"likelihood(x) must return ({points.shape[0]},) log-densities; "
                             f"got {tuple(exact.shape)}")
    else:
        raise TypeError("likelihood must be False, True (a tight reference solve) or a "
                        f"callable x -> (B,) exact log-density; got {type(likelihood).__name__}")
    return points, exact


@dataclass(frozen=True)
class _Context:
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
    sde: _SDESetup | None
    data: Tensor | None
    ll: tuple[Tensor, Tensor] | None  # (points, reference log-likelihood)
    t_interval: tuple[float, float]
    model: Field | None = None
    path: AffineGaussianPath | None = None
    prediction: str = "velocity"


def _measure(ctx: _Context, spec: _Spec, budget) -> dict:
    """One record: time the solve, then measure its errors (outside the timed region)."""
    kw = _budget_keywords(ctx, spec, budget)
    run, ref = _runner(ctx, spec, kw)
    with torch.no_grad():
        sol, t_min, t_med = _timed(run, ctx.x0.device, ctx.repeats, ctx.warmup)
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


def _budget_keywords(ctx: _Context, spec: _Spec, budget) -> dict:
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


def _runner(ctx: _Context, spec: _Spec, kw: dict) -> tuple[Callable, Tensor | None]:
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


def _record(ctx: _Context, spec: _Spec, budget, sol, t_min: float, t_med: float) -> dict:
    """A record of :data:`RECORD_FIELDS` with the solve's work filled in, its errors None."""
    rec = dict.fromkeys(RECORD_FIELDS)
    rec.update(solver=spec.name, kind=spec.kind, library=spec.info.library,
               declared_order=spec.info.order, budget=budget, steps=sol.steps,
               rejected=getattr(sol, "rejected", None), nfe=sol.nfe, time_min=t_min,
               time_median=t_med,
               h=None if spec.kind == "adaptive" else abs(ctx.t1 - ctx.t0) / budget,
               grid=spec.grid)
    return rec


# -- the study ---------------------------------------------------------------------------------
def compare_solvers(
    field: Field,
    x0: Tensor,
    *,
    solvers: Sequence[str] = ("euler", "midpoint", "rk4", "dopri5"),
    steps: Sequence[int] = DEFAULT_STEPS,
    tolerances: Sequence[float] = DEFAULT_TOLERANCES,
    budgets: Mapping[str, Sequence[float]] | None = None,
    reference: str | Tensor | None = "auto",
    reference_solver: str | None = None,
    reference_tol: float | None = None,
    data: Tensor | None = None,
    sde: Mapping | None = None,
    likelihood: bool | Callable[[Tensor], Tensor] = False,
    repeats: int = 3,
    warmup: int = 1,
    norm: str = "rms",
    t0: float = 0.0,
    t1: float = 1.0,
    max_steps: int | None = None,
    generator: torch.Generator | None = None,
    threads: int | None = None,
    progress: bool = False,
    path: AffineGaussianPath | Scheduler | None = None,
    prediction: str = "velocity",
    grids: Sequence | Mapping[str, object] = ("uniform",),
) -> Study:
    r"""Measure NFE, wall time and error at ``t1`` of every solver at every budget (and every
    fixed-step solver on every grid).

    Args:
        field: the model ``(x, t) -> Tensor``: a velocity, or what ``prediction`` says.
        x0: ``(B, *event_shape)`` source points; every solve starts from them (dtype and
            device of the study).
        solvers: names of :data:`~flowsolve.ode.solve.ODE_SOLVERS` (fixed-step, the low-NFE
            samplers among them, and adaptive) and ``"sde:<name>"`` for
            :data:`~flowsolve.sde.solve.SDE_SOLVERS`; ValueError lists them. A solver whose
            registry entry has ``needs_path`` (``"ddim"``, ``"dpmpp_2m"``, ...; stochastic
            samplers as ``"sde:<name>"``) needs ``path`` (ValueError without it) and
            ``t0 < t1``.
        steps, tolerances: default budgets: step counts of fixed-step and SDE solvers,
            ``rtol = atol`` of adaptive ones. ``budgets={name: [...]}`` overrides per solver.
        reference: ``"auto"`` (a tight adaptive solve), a tensor ``x(t1)`` shaped like
            ``x0`` (e.g. a closed form) or None (no ODE error, no fitted ODE orders).
        reference_solver, reference_tol: of ``"auto"`` and ``likelihood=True``; default
            DOP853 (CPU) or dopri8, at 1e-10. Both references are solved in float64, from
            ``x0`` (or the likelihood points) converted to it, whatever ``x0``'s dtype; a
            field that cannot take float64 (one probing call raises or returns another
            dtype) gets them in ``x0``'s dtype at 1e-6 instead. An adaptive budget at or
            below the reference tolerance is a ValueError (it would judge itself).
        data: ``(M, *event_shape)`` samples of the data: W2 of every result to them.
        sde: for SDE solvers, the arguments of :func:`~flowsolve.sde.solve.sample_sde`
            (``score``, ``path``, ``diffusion``), and ``reference_solver`` (``"srk"``) and
            ``reference_steps`` (a multiple of every SDE budget; default at least 16 times
            the largest) of the fine solve on the shared Brownian path. A stochastic
            sampler (``"sde:ancestral"``, ...: ``needs_path``) takes the model itself with
            ``path`` and ``prediction`` (no ``diffusion``, no ``score``: its noise is its
            own) and is measured against itself at ``reference_steps`` on the same path
            (its strong self-convergence; the registry declares its weak order); with
            only such samplers ``sde`` may be left out.
        likelihood: True (against a tight reference solve) or a callable ``x -> (B,)``
            exact ``log p_1`` (e.g. ``GaussianMixture.log_prob``): the log-likelihood error
            of every ODE solver at every budget, at ``data[:B]`` or else at the reference.
            Every solve puts the prior ``N(0, I)`` at ``min(t0, t1)`` and gives
            ``log p_{max(t0, t1)}``: a callable therefore needs the interval ``[0, 1]``
            (ValueError otherwise); True works on any interval.
        repeats, warmup: timed and untimed solves per (solver, budget).
        norm: ``"rms"``, ``"mean"`` or ``"max"`` over the batch of ``||x_hat - x_ref||``.
        t0, t1: the interval; max_steps: step budget of the adaptive solves.
        generator: draws the shared Brownian path of the SDE solvers (None: a fresh
            unseeded generator; torch's global RNG is never used).
        threads: torch's intra-op threads during the study, restored afterwards (None:
            torch's current setting); recorded in ``meta["threads"]``. On a shared CPU one
            thread times small tensors most reliably (the CLI's ``compare`` uses 1).
        progress: a tqdm bar on stderr over the (solver, grid, budget) runs (the CLI shows
            it).
        path: the :class:`~flowsolve.paths.affine.AffineGaussianPath` (or its scheduler) the
            model was trained on: read by the samplers, the ``"logsnr"`` and ``"edm"`` grids
            and the conversion of ``prediction``; given to every fixed-step solve (and to the
            SDE solves where ``sde`` names no path).
        prediction: what ``field`` predicts: ``"velocity"`` (default), ``"score"``,
            ``"epsilon"``, ``"x1"`` or ``"v"`` (needs ``path``). Every ODE solve receives it
            (the samplers read the model as posterior means, the other solvers integrate
            its velocity); the references, the likelihoods and the SDE solves use the
            velocity converted on ``path``.
        grids: the time grids of the fixed-step solvers (:mod:`flowsolve.ode.grids`), each
            solver runs on each: a sequence of names (``"uniform"``, ``"logsnr"``,
            ``"edm"``), shifts ``s > 0``, :class:`~flowsolve.ode.grids.TimeGrid` objects or
            times (a tensor or a nested list; given times fix their own single budget,
            ``len(times) - 1`` steps, and must run from ``t0`` to ``t1``), or a mapping
            ``{label: grid}``. Records carry the grid's label (``"uniform"``, ``"logsnr"``,
            ``"edm"``, ``"shift3"``, ``"given"``, ``"edm(rho=5)"`` or the mapping's; labels
            must differ). Adaptive solvers ignore grids (one set of records, ``grid``
            None); SDE solvers run on the uniform grid of their shared Brownian path.
            ``h`` is ``|t1 - t0| / N`` on every grid (a grid's mean step), so a fitted
            order is the order in ``N``.

    Returns:
        :class:`Study`: ``records`` (one dict per solver, grid and budget, keys
        :data:`RECORD_FIELDS`; ``below_floor`` marks an error at or below the floor,
        ``meta["order_floor"]``, which the fitted orders leave out), ``orders`` (declared
        and fitted, per solver and grid, keyed by :func:`order_key`: ``"rk4"`` on the
        uniform grid, ``"dpmpp_2m@logsnr"`` on another) and ``meta`` (with ``threads``,
        torch's intra-op threads during the timings, ``w2_reference``, the W2 of the ODE
        reference itself to ``data``: the finite-sample floor of the ``w2`` column, and
        ``grids``, ``path``, ``prediction``). A sampler's records have no likelihood error
        (it integrates from noise to data only).

    Example:
        >>> import torch, flowsolve as fs
        >>> path = fs.AffineGaussianPath(fs.CondOTScheduler())
        >>> u = fs.analytic.marginal_velocity(fs.GaussianMixture.ring(4, radius=2.0), path)
        >>> x0 = torch.randn(16, 2, dtype=torch.float64,
        ...                  generator=torch.Generator().manual_seed(0))
        >>> study = compare_solvers(u, x0, solvers=["euler", "rk4"], steps=[16, 32, 64],
        ...                         repeats=1, warmup=0)
        >>> [round(study.orders[s]["fitted"]) for s in ("euler", "rk4")]
        [1, 4]
        >>> study = compare_solvers(u, x0, solvers=["ddim", "dpmpp_2m"], steps=[8, 16, 32],
        ...                         path=path, grids=["logsnr"], t0=0.1, t1=0.9,
        ...                         repeats=1, warmup=0)
        >>> [round(study.orders[s]["fitted"]) for s in ("ddim@logsnr", "dpmpp_2m@logsnr")]
        [1, 2]
    """
    _check_x0(x0)
    check_threads(threads)
    grid_items = _parse_grids(grids)
    specs = _parse_solvers(solvers, steps, tolerances, budgets, grid_items)
    path, prediction = _check_paths(specs, path, prediction, sde, t0, t1)
    model = field
    if prediction != "velocity":  # the references', likelihoods' and SDE solves' velocity
        field = ConvertedField(field, path, prediction, "velocity",
                               interval=(min(t0, t1), max(t0, t1)))
    repeats, warmup = _count("repeats", repeats, 1), _count("warmup", warmup, 0)
    if norm not in _NORMS:
        raise ValueError(f"norm={norm!r}; accepted: {', '.join(_NORMS)}")
    data = _check_data(data, x0)
    ref_solver = _reference_solver(reference_solver, x0)
    ref_dtype, ref_tol = _reference_precision(field, x0, t0, specs, reference, likelihood,
                                              reference_tol)

    with intra_op_threads(threads):
        x_ref, meta = _ode_reference(field, x0, reference, ref_solver, ref_tol, t0, t1,
                                     ref_dtype)
        sde_setup = _sde_setup(field, x0, specs, sde, generator, t0, t1, path, model,
                               prediction)
        points = data[: x0.shape[0]] if data is not None else (
            None if x_ref is None else x_ref.to(x0.dtype))  # the solves under test: x0's dtype
        t_interval = (min(t0, t1), max(t0, t1))
        ll = _likelihood_setup(field, likelihood, points, ref_solver, ref_tol, t_interval,
                               ref_dtype)
        ctx = _Context(field, x0, t0, t1, norm, repeats, warmup, max_steps, x_ref, sde_setup,
                       data, ll, t_interval, model, path, prediction)
        runs = [(spec, budget) for spec in specs for budget in spec.budgets]
        with progress_bar(len(runs), "compare", enabled=progress, unit="run") as bar:
            records = []
            for spec, budget in runs:
                records.append(_measure(ctx, spec, budget))
                bar.update()
        orders = _fit_orders(specs, records, meta.get("order_floor", 0.0), sde_setup)
        _complete_meta(meta, ctx, likelihood)
        meta.update(grids={label: repr(g) for label, g in grid_items},
                    path=None if path is None else repr(path), prediction=prediction)
    return Study(records, orders, meta)


def _check_x0(x0) -> None:
    if not torch.is_tensor(x0) or x0.dim() < 2 or not x0.is_floating_point():
        raise ValueError("x0 must be a floating tensor shaped (B, *event_shape); got "
                         f"{type(x0).__name__} {tuple(getattr(x0, 'shape', ()))}")


def _check_data(data, x0: Tensor) -> Tensor | None:
    """``data`` checked and brought to ``x0``'s dtype, device and event shape (or None)."""
    if data is None:
        return None
    if not torch.is_tensor(data) or data.dim() < 2 or data[0].numel() != x0[0].numel():
        raise ValueError(f"data must be (M, *event_shape) with {x0[0].numel()} entries per "
                         f"sample like x0; got {getattr(data, 'shape', type(data))}")
    return data.detach().to(dtype=x0.dtype, device=x0.device).reshape(-1, *x0.shape[1:])


def _reference_solver(reference_solver: str | None, x0: Tensor) -> str:
    """The adaptive solver of the references: the one given, or DOP853 on the CPU and
    dopri8 on an accelerator."""
    ref_solver = reference_solver or ("DOP853" if x0.device.type == "cpu" else "dopri8")
    if not ODE_SOLVERS[ref_solver].adaptive:
        raise ValueError(f"reference_solver must be adaptive; {ref_solver!r} is fixed-step "
                         f"(accepted: {', '.join(ODE_SOLVERS.names(adaptive=True))})")
    return ref_solver


def _reference_precision(field, x0: Tensor, t0: float, specs: list[_Spec], reference,
                         likelihood, reference_tol: float | None) -> tuple[torch.dtype, float]:
    """``(dtype, tolerance)`` of the reference solves: float64 at 1e-10 where the field takes
    float64 (only probed when a reference is solved), else ``x0``'s dtype at 1e-6; a given
    ``reference_tol`` wins. Adaptive budgets at or below it are refused."""
    auto = isinstance(reference, str) and reference == "auto"
    ref_dtype = x0.dtype
    if auto or likelihood is True:
        ref_dtype = torch.float64 if _takes_float64(field, x0, t0) else x0.dtype
    ref_tol = reference_tol if reference_tol is not None else (
        _REFERENCE_TOL if ref_dtype == torch.float64 else _LOW_PRECISION_REFERENCE_TOL)
    if auto or likelihood is True:
        _check_reference_tol(specs, ref_tol, ref_dtype, x0.dtype)
    return ref_dtype, ref_tol


def _fit_orders(specs: list[_Spec], records: list[dict], order_floor: float,
                sde_setup: _SDESetup | None) -> dict[str, dict]:
    """The ``orders`` of the study, per solver and grid (:func:`order_entry`, keyed by
    :func:`order_key`); marks ``below_floor`` on each record with an error. ODE solvers use
    the study's floor, SDE solvers none but only step counts up to a quarter of the fine
    solve's (points too close to it are biased low)."""
    orders = {}
    for spec in specs:
        floor = 0.0 if spec.kind == "sde" else order_floor
        for r in records:
            if r["solver"] == spec.name and r["grid"] == spec.grid and r["error"] is not None:
                r["below_floor"] = not r["error"] > floor
        orders[order_key(spec.name, spec.grid)] = order_entry(
            records, spec.name, spec.kind, spec.info.order, floor=floor, grid=spec.grid,
            max_steps=sde_setup.meta["reference_steps"] // 4 if spec.kind == "sde" else None)
    return orders


def _complete_meta(meta: dict, ctx: _Context, likelihood) -> None:
    """Add to the references' ``meta`` the W2 of the ODE reference to the data and how the
    study was run."""
    x0, data = ctx.x0, ctx.data
    if data is not None and ctx.x_ref is not None:
        meta["w2_reference"] = float(wasserstein2(ctx.x_ref.to(x0.dtype), data))
    meta.update(dtype=str(x0.dtype).removeprefix("torch."), device=str(x0.device),
                batch=x0.shape[0], t0=ctx.t0, t1=ctx.t1, repeats=ctx.repeats,
                warmup=ctx.warmup, norm=ctx.norm,
                data_samples=None if data is None else data.shape[0],
                likelihood=None if ctx.ll is None else ("reference solve" if likelihood is True
                                                        else "given"),
                sde=ctx.sde.meta if ctx.sde else None, threads=torch.get_num_threads(),
                torch=torch.__version__)
