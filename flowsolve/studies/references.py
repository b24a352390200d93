"""The references of a solver study: ``x(t1)`` from a tight adaptive solve (or a given
tensor) with the floor below which errors are not fitted, and the reference
log-likelihoods.

Both references are solved in float64 at ``rtol = atol = 1e-10`` (DOP853 on the CPU, dopri8
on an accelerator), from ``x0`` converted to float64 whatever its dtype, so that they are
tighter than every budget they judge; only a field that cannot take float64 (one probing
call raises or returns another dtype) gets them in ``x0``'s dtype at ``1e-6``. The floor of
an automatic reference is ``max(30 tol, 1e3 eps(x0.dtype)) (1 + ||x_ref||_rms)``, of a given
one ``1e3 eps(x0.dtype) (1 + ||x_ref||_rms)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._core.counting import check_like
from ..likelihood.cnf import log_likelihood
from ..ode.solve import ODE_SOLVERS, sample
from .specs import SolverSpec

__all__ = ["choose_reference_solver", "reference_precision", "ode_reference",
           "likelihood_setup", "takes_float64", "REFERENCE_TOL", "LOW_PRECISION_REFERENCE_TOL"]


_REFERENCE_MAX_STEPS = 100_000
REFERENCE_TOL = 1e-10  # of a reference solved in float64
LOW_PRECISION_REFERENCE_TOL = 1e-6  # of one in float32 (a field that cannot take float64)


def _scale(x: Tensor) -> float:
    """``1 + ||x||_rms`` over the batch: the size an error floor is relative to."""
    return 1.0 + float(x.flatten(1).norm(dim=1).square().mean().sqrt())


def takes_float64(field, x0: Tensor, t0: float) -> bool:
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


def choose_reference_solver(reference_solver: str | None, x0: Tensor) -> str:
    """The adaptive solver of the references: the one given, or DOP853 on the CPU and
    dopri8 on an accelerator."""
    ref_solver = reference_solver or ("DOP853" if x0.device.type == "cpu" else "dopri8")
    if not ODE_SOLVERS[ref_solver].adaptive:
        raise ValueError(f"reference_solver must be adaptive; {ref_solver!r} is fixed-step "
                         f"(accepted: {', '.join(ODE_SOLVERS.names(adaptive=True))})")
    return ref_solver


def reference_precision(field, x0: Tensor, t0: float, specs: list[SolverSpec], reference,
                        likelihood, reference_tol: float | None) -> tuple[torch.dtype, float]:
    """``(dtype, tolerance)`` of the reference solves: float64 at 1e-10 where the field takes
    float64 (only probed when a reference is solved), else ``x0``'s dtype at 1e-6; a given
    ``reference_tol`` wins. Adaptive budgets at or below it are refused."""
    auto = isinstance(reference, str) and reference == "auto"
    ref_dtype = x0.dtype
    if auto or likelihood is True:
        ref_dtype = torch.float64 if takes_float64(field, x0, t0) else x0.dtype
    ref_tol = reference_tol if reference_tol is not None else (
        REFERENCE_TOL if ref_dtype == torch.float64 else LOW_PRECISION_REFERENCE_TOL)
    if auto or likelihood is True:
        _check_reference_tol(specs, ref_tol, ref_dtype, x0.dtype)
    return ref_dtype, ref_tol


def _check_reference_tol(specs: list[SolverSpec], tol: float, ref_dtype, dtype) -> None:
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


def ode_reference(field, x0, reference, solver, tol, t0, t1,
                  ref_dtype) -> tuple[Tensor | None, dict]:
    """``(x_ref, meta)``: no reference (None), a tight adaptive solve from ``x0`` in
    ``ref_dtype`` at ``rtol = atol = tol`` (``"auto"``), or a given tensor shaped like ``x0``;
    ``meta`` says which, with ``order_floor``, the error below which no order is fitted."""
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


def likelihood_setup(field, likelihood, points, solver, tol, t_interval, ref_dtype):
    """``(points, exact log-likelihood)`` the solved likelihoods are measured against (a
    tight reference solve, or the given callable's ``log p_1``), or None without
    ``likelihood``."""
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
