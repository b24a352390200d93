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

This module is the front door; the parts live beside it: :mod:`~flowsolve.studies.specs`
(the solvers, budgets and grids compared, checked), :mod:`~flowsolve.studies.references`
(the ODE and likelihood references, the floor), :mod:`~flowsolve.studies.sde_runs` (the
shared Brownian path of the SDE solves) and :mod:`~flowsolve.studies.runs` (one timed run
and its record).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from .._core.progress import progress_bar
from .._core.threads import check_threads, intra_op_threads
from .._core.types import Field
from ..metrics import wasserstein2
from ..paths.affine import AffineGaussianPath
from ..paths.fields import ConvertedField
from ..paths.schedules import Scheduler
from .references import (
    choose_reference_solver,
    likelihood_setup,
    ode_reference,
    reference_precision,
)
from .results import RECORD_FIELDS, Study, fit_order, order_entry, order_key
from .runs import RunContext, measure, sync_device, timed
from .sde_runs import SDESetup, prepare_sde
from .specs import SDE_PREFIX, SolverSpec, check_count, check_paths, parse_grids, parse_solvers

__all__ = ["compare_solvers", "fit_order", "order_key", "Study", "RECORD_FIELDS",
           "SDE_PREFIX", "DEFAULT_STEPS", "DEFAULT_TOLERANCES"]


DEFAULT_STEPS = (4, 8, 16, 32, 64)
DEFAULT_TOLERANCES = (1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)
_NORMS = ("rms", "mean", "max")

# the timing helpers under the names they had here before they moved to runs.py
_sync, _timed = sync_device, timed


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
            :data:`~flowsolve.sde.backends.SDE_SOLVERS`; ValueError lists them. A solver whose
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
    grid_items = parse_grids(grids)
    specs = parse_solvers(solvers, steps, tolerances, budgets, grid_items)
    path, prediction = check_paths(specs, path, prediction, sde, t0, t1)
    model = field
    if prediction != "velocity":  # the references', likelihoods' and SDE solves' velocity
        field = ConvertedField(field, path, prediction, "velocity",
                               interval=(min(t0, t1), max(t0, t1)))
    repeats, warmup = check_count("repeats", repeats, 1), check_count("warmup", warmup, 0)
    if norm not in _NORMS:
        raise ValueError(f"norm={norm!r}; accepted: {', '.join(_NORMS)}")
    data = _check_data(data, x0)
    ref_solver = choose_reference_solver(reference_solver, x0)
    ref_dtype, ref_tol = reference_precision(field, x0, t0, specs, reference, likelihood,
                                             reference_tol)

    with intra_op_threads(threads):
        x_ref, meta = ode_reference(field, x0, reference, ref_solver, ref_tol, t0, t1,
                                    ref_dtype)
        sde_setup = prepare_sde(field, x0, specs, sde, generator, t0, t1, path, model,
                                prediction)
        points = data[: x0.shape[0]] if data is not None else (
            None if x_ref is None else x_ref.to(x0.dtype))  # the solves under test: x0's dtype
        t_interval = (min(t0, t1), max(t0, t1))
        ll = likelihood_setup(field, likelihood, points, ref_solver, ref_tol, t_interval,
                              ref_dtype)
        ctx = RunContext(field, x0, t0, t1, norm, repeats, warmup, max_steps, x_ref, sde_setup,
                         data, ll, t_interval, model, path, prediction)
        runs = [(spec, budget) for spec in specs for budget in spec.budgets]
        with progress_bar(len(runs), "compare", enabled=progress, unit="run") as bar:
            records = []
            for spec, budget in runs:
                records.append(measure(ctx, spec, budget))
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


def _fit_orders(specs: list[SolverSpec], records: list[dict], order_floor: float,
                sde_setup: SDESetup | None) -> dict[str, dict]:
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


def _complete_meta(meta: dict, ctx: RunContext, likelihood) -> None:
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
