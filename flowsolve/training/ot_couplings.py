r"""Minibatch optimal transport between the uniform measures on x0 and x1: exact (POT's
network simplex) and entropic (POT's Sinkhorn, on the kernel or in the log domain), with
POT's result codes and warnings read and acted on (:class:`OTCoupling`).

By default (``keep="x1"``) the data side is kept whole and in order (``x1c`` *is* ``x1``,
extras come back untouched) and ``x0`` is reordered (exact OT, equal batches: a permutation)
or drawn from the plan column by column (unequal batches, entropic OT); ``keep="x0"`` does
the converse. Failures are never silent: see :class:`OTCoupling`.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import ot
import torch
from torch import Tensor

from .._core.checks import generator_or_fresh
from .coupling_base import (
    COSTS,
    CostFn,
    Coupling,
    CouplingError,
    CouplingResult,
    check_choice,
    check_positive,
    cost_matrix,
    flat_batches,
)

__all__ = ["OTCoupling", "call_pot", "kernel_is_safe", "kernel_underflows",
           "normalized_cost"]

_EMD_CODES = {0: "infeasible", 1: "optimal", 2: "unbounded", 3: "max_iter_reached"}


class OTCoupling(Coupling):
    r"""Minibatch optimal transport between the uniform measures on x0 and x1.

    ``method="exact"`` solves :math:`\min_{\pi \in \Pi(a, b)} \langle \pi, C \rangle` with POT's
    network simplex (``ot.emd``, CPU; Bonneel et al. 2011). For ``N == M`` the optimum is a
    vertex of the Birkhoff polytope, a permutation, which is recovered from the plan and
    applied without replacement (every x0 used once). The iteration limit defaults to
    ``max(1e5, N M)`` (iterations measured to optimality: 33k at N=1024 and 82k at N=2048
    for d=2; 159k at N=2048 for d=16, beyond POT's default 1e5); if it is hit (result
    code 3) a warning with the numbers is issued once per coupling object and the solve is
    repeated with a 100x limit; if that fails too, :class:`CouplingError`. Other result
    codes raise at once.

    ``method="sinkhorn"`` solves the entropic problem
    :math:`\min_\pi \langle \pi, \tilde C \rangle - \varepsilon H(\pi)` (Cuturi 2013),
    :math:`\pi = \mathrm{diag}(u) K \mathrm{diag}(v)`, :math:`K = e^{-\tilde C/\varepsilon}`,
    by Sinkhorn's iterations on POT's torch backend, in float64 (the plan stays on the
    inputs' device).
    The cost is normalised, :math:`\tilde C = C / \mathrm{mean}(C)` (``normalize="mean"``;
    ``"max"`` divides by the largest entry, ``None`` keeps C so that ``reg = 2 sigma^2``
    gives the Schrodinger-bridge plan), so ``reg`` = :math:`\varepsilon` is relative to a
    typical pair cost. ``domain="auto"`` (default) iterates on the kernel K
    (``method="sinkhorn"``, about 10x cheaper an iteration than the log domain: 0.14 ms
    against 1.35 ms at 512 x 512 on one CPU thread) when every row and column of K has an
    entry above :math:`\sqrt{\text{tiny}}` of the dtype, and in the log domain
    (``method="sinkhorn_log"``, never underflows, whatever ``reg``) otherwise, or when the
    kernel iterations fail to converge and K had entries below the dtype's smallest normal
    number (:math:`\tilde C_{ij}/\varepsilon > -\log \text{tiny}`, 708 in float64: that
    kernel solves another problem), ended non-finite or stopped on POT's numerical-error
    check (read from POT's warning, on the last iteration too) -- not when a kernel of
    normal entries merely runs out of iterations: the log domain would repeat its
    iterates. ``domain="log"`` always uses the log domain. :attr:`CouplingResult.solver`
    says which one produced the plan. Convergence is checked on the returned plan: marginal
    error (L1, both marginals) ``<= tol``.
    Otherwise a warning with reg, iterations and error is issued once per object and, with
    ``fallback="exact"``, the exact plan (the :math:`\varepsilon \to 0` limit, a valid
    coupling) is used, status ``"fallback_exact"`` (also when its network simplex needed the
    100x retry, which that warning reports), its plan on the inputs' device like an
    entropic plan; ``fallback=None`` raises :class:`CouplingError`.

    Args:
        method: ``"exact"`` or ``"sinkhorn"``.
        cost: a name in :data:`COSTS` (computed in float64) or ``c(x0_flat, x1_flat) ->
            (N, M)``, called on the batches at their dtype (at least float32) under
            ``torch.no_grad()``, its result converted to float64 for the solve. A cost
            matrix with a non-finite entry is refused (ValueError) before any solve, saying
            why: non-finite points (counted in x0 and in x1), else an overflow of finite
            points (squared distances beyond float64's range, about 1.8e308, e.g. from
            points near 1e154 or beyond: rescale the data), else a callable cost's own
            non-finite result.
        reg: entropic regularisation :math:`\varepsilon` (Sinkhorn), relative to the
            normalised cost.
        normalize: ``"mean"``, ``"max"`` or ``None`` (Sinkhorn).
        max_iter: iteration limit; default ``max(1e5, N M)`` (exact), ``1000`` (Sinkhorn).
        tol: largest accepted marginal error of a Sinkhorn plan.
        keep: ``"x1"`` (data kept in order, x0 matched to it) or ``"x0"``.
        fallback: ``"exact"`` or ``None`` (raise) when Sinkhorn does not converge.
        domain: ``"auto"`` (kernel iterations where they cannot underflow, else the log
            domain) or ``"log"`` (Sinkhorn).

    Pairs are drawn (unequal batches, Sinkhorn) with the call's ``generator``, which must
    be on the plan's device: the CPU for exact plans, the inputs' device for Sinkhorn
    (None: a fresh unseeded generator there; torch's global RNG is never used).

    References: Bonneel, van de Panne, Paris & Heidrich, "Displacement interpolation using
    Lagrangian mass transport", SIGGRAPH Asia 2011 (network simplex); Cuturi, "Sinkhorn
    distances", NeurIPS 2013; Schmitzer, "Stabilized sparse scaling algorithms for
    entropy regularized transport problems", SIAM J. Sci. Comput. 2019 (log domain);
    Tong et al., "Improving and generalizing flow-based generative models with minibatch
    optimal transport", TMLR 2024 (minibatch OT for flow matching).
    """

    def __init__(self, method: str = "exact", *, cost: str | CostFn = "sqeuclidean",
                 reg: float = 0.05, normalize: str | None = "mean", max_iter: int | None = None,
                 tol: float = 1e-4, keep: str = "x1", fallback: str | None = "exact",
                 domain: str = "auto"):
        check_choice("method", method, ("exact", "sinkhorn"))
        check_choice("domain", domain, ("auto", "log"))
        check_choice("normalize", normalize, ("mean", "max", None))
        check_choice("keep", keep, ("x1", "x0"))
        check_choice("fallback", fallback, ("exact", None))
        if not callable(cost):
            check_choice("cost", cost, tuple(COSTS))
        for name, val in (("reg", reg), ("tol", tol)):
            check_positive(name, val)
        if max_iter is not None and not (isinstance(max_iter, int) and max_iter >= 1):
            raise ValueError(f"max_iter must be a positive int or None; got {max_iter!r}")
        self.method, self.cost, self.reg, self.normalize = method, cost, float(reg), normalize
        self.max_iter, self.tol, self.keep, self.fallback = max_iter, float(tol), keep, fallback
        self.domain = domain
        self._warned: set[str] = set()

    def plan(self, x0, x1, *extras, generator=None):
        x0f, x1f = flat_batches(x0, x1, extras, generator)
        return self._couple(x0f, x1f, generator)

    def settings(self) -> dict[str, Any]:
        """The public attributes; for ``method="exact"`` less Sinkhorn's (reg, normalize,
        tol, fallback, domain), which an exact solve never reads."""
        out = super().settings()
        if self.method == "exact":
            for key in ("reg", "normalize", "tol", "fallback", "domain"):
                out.pop(key, None)
        return out

    # -- one block ------------------------------------------------------------------------
    def _cost(self, x0f: Tensor, x1f: Tensor) -> Tensor:
        """The cost matrix in float64 (MPS: float32), non-finite entries refused
        (:func:`~flowsolve.training.coupling_base.cost_matrix`)."""
        return cost_matrix(self.cost, x0f, x1f)

    def _couple(self, x0f: Tensor, x1f: Tensor, generator) -> CouplingResult:
        # the reported cost's dtype: the inputs' (at least float32)
        dtype = torch.promote_types(torch.promote_types(x0f.dtype, x1f.dtype), torch.float32)
        c = self._cost(x0f, x1f)
        if self.method == "exact":
            return self._exact(c, generator, dtype)
        return self._sinkhorn(c, generator, dtype)

    def _exact(self, c: Tensor, generator, dtype: torch.dtype, *,
               fallback: bool = False) -> CouplingResult:
        """The exact plan of cost ``c``; ``fallback``: it stands in for a failed Sinkhorn
        solve (status ``"fallback_exact"`` whatever the retries, plan on c's device)."""
        n, m = c.shape
        status = "fallback_exact" if fallback else "optimal"
        c_np = np.ascontiguousarray(c.to("cpu", torch.float64).numpy())  # finite: _cost
        a, b = np.full(n, 1.0 / n), np.full(m, 1.0 / m)
        own = self.max_iter if self.method == "exact" else None  # not Sinkhorn's limit
        limit = own or max(100_000, n * m)
        plan, code = _emd(a, b, c_np, limit)
        if code == 3:
            what = "ot.emd (the exact fallback of Sinkhorn)" if fallback else "ot.emd"
            advice = ("" if fallback else
                      " Pass a larger max_iter to avoid the repeated solve.")
            self._warn_once("emd", f"{what} stopped at max_iter={limit} before optimality "
                            f"(result code 3) on a {n}x{m} batch; re-solving with "
                            f"max_iter={100 * limit}.{advice}")
            limit *= 100
            plan, code = _emd(a, b, c_np, limit)
            if code == 1 and not fallback:  # a fallback stays "fallback_exact"
                status = "optimal_after_retry"
        err = float(np.abs(plan.sum(1) - a).sum() + np.abs(plan.sum(0) - b).sum())
        if code != 1:
            raise CouplingError(
                f"ot.emd failed on a {n}x{m} batch: result code {code} "
                f"({_EMD_CODES.get(code, 'unknown')}) with max_iter={limit}; marginal error "
                f"of the unfinished plan {err:.3g}. Increase max_iter or use method='sinkhorn'.")
        plan_t = torch.from_numpy(plan)
        if fallback:  # stand-in for an entropic plan: live where it would
            plan_t = plan_t.to(c.device, c.dtype)
        device = c.device
        if n == m:  # a permutation matrix / n: read it off, pair without replacement
            rows = plan.argmax(0)
            if not (np.all(plan[rows, np.arange(m)] > 0.5 / n)
                    and np.all(np.bincount(rows, minlength=n) == 1)):
                raise CouplingError(f"ot.emd returned a non-permutation optimum on a {n}x{n} "
                                    "batch (should not happen); please report it")
            rows_t = torch.from_numpy(rows).to(device)
            if self.keep == "x1":
                i0, i1 = rows_t, torch.arange(m, device=device)
            else:
                i0, i1 = torch.arange(n, device=device), torch.argsort(rows_t)
        else:
            i0, i1 = self._draw(plan_t, generator)
            i0, i1 = i0.to(device), i1.to(device)
        cost = torch.tensor(float((plan * c_np).sum()), dtype=dtype, device=device)
        return CouplingResult(i0, i1, plan_t, cost, self.method, status, None, err, self.keep,
                              "network_simplex")

    def _sinkhorn(self, c: Tensor, generator, dtype: torch.dtype) -> CouplingResult:
        n, m = c.shape
        # float64 (where the device has it; MPS has not): a float32 kernel exp(-C / reg)
        # underflows once C / reg passes 87 (float64: 708), and float32 log-domain
        # iterations ran 3.8x slower than float64 ones on SB-CFM's moons->8gaussians batches
        # (512 x 512, costs up to 1000, reg 2: 5.0 ms against 1.33 ms on a CPU), whose
        # exponentials reach float32's subnormal range. (_cost gives float64 already.)
        c64 = c if c.device.type == "mps" else c.to(torch.float64)
        cn = normalized_cost(c64, self.normalize)
        a = torch.full((n,), 1.0 / n, dtype=c64.dtype, device=c64.device)
        b = torch.full((m,), 1.0 / m, dtype=c64.dtype, device=c64.device)
        max_iter = self.max_iter or 1000
        log_domain = True  # unless the kernel is tried and its failure would recur there
        if self.domain == "auto" and kernel_is_safe(cn, self.reg):
            plan, n_iter, err, numerical = _sinkhorn_pot(a, b, cn, self.reg, "sinkhorn",
                                                         max_iter, self.tol)
            solver = "sinkhorn_knopp"
            # With every entry of K = exp(-cn / reg) a normal number, the log domain runs
            # the kernel's iterations from the same start: running out of iterations would
            # recur there. It solves another problem where K underflowed (to 0 or to
            # subnormals, cn / reg > -log(tiny): 708 in float64, 87 in float32), where the
            # iterates went non-finite, where POT stopped on its numerical-error check
            # (detected from its warning, on the last iteration too) or where the kernel
            # stopped early for any other reason without meeting tol.
            log_domain = not err <= self.tol and (math.isnan(err) or numerical or n_iter < max_iter
                                                  or kernel_underflows(cn, self.reg))
        if log_domain:
            plan, n_iter, err, _ = _sinkhorn_pot(a, b, cn, self.reg, "sinkhorn_log", max_iter,
                                                 self.tol)
            solver = "sinkhorn_log"
        if not err <= self.tol:
            msg = (f"Sinkhorn ({solver}) did not converge on a {n}x{m} batch: marginal error "
                   f"{err:.3g} > tol={self.tol:g} after {n_iter} iterations (max_iter="
                   f"{max_iter}) at reg={self.reg:g} (cost normalised by its "
                   f"{self.normalize or 'identity'}). Increase reg or max_iter")
            if self.fallback is None:
                raise CouplingError(msg + ".")
            self._warn_once("sinkhorn", msg + "; using the exact OT plan (reg -> 0) instead.")
            return self._exact(c64, generator, dtype, fallback=True)
        i0, i1 = self._draw(plan, generator)
        return CouplingResult(i0, i1, plan, (plan * c64).sum().to(dtype), "sinkhorn",
                              "converged", n_iter, err, self.keep, solver)

    def _draw(self, plan: Tensor, generator) -> tuple[Tensor, Tensor]:
        """One partner per kept sample from the plan's conditional, by inverse CDF (a cumsum
        and a search: cheaper than ``torch.multinomial``'s exponential per plan entry)."""
        if generator is not None and torch.device(generator.device).type != plan.device.type:
            raise ValueError(f"generator must be on {plan.device.type}, where the plan is "
                             f"(exact: CPU; sinkhorn: the inputs' device); got a generator on "
                             f"{generator.device}")
        generator = generator_or_fresh(generator, plan.device)
        w = plan.T if self.keep == "x1" else plan  # rows: the kept samples
        cdf = w.cumsum(1)
        u = torch.rand(w.shape[0], 1, generator=generator, dtype=cdf.dtype, device=cdf.device)
        # side="right": cdf[k] > u >= cdf[k - 1], so the drawn entry has positive mass
        drawn = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1)
        drawn = drawn.clamp_max(w.shape[1] - 1)
        kept = torch.arange(w.shape[0], device=plan.device)
        return (drawn, kept) if self.keep == "x1" else (kept, drawn)


def normalized_cost(c: Tensor, normalize: str | None) -> Tensor:
    r""":math:`\tilde C = C / \mathrm{mean}(C)` (``normalize="mean"``), ``C / max(C)``
    (``"max"``) or ``C`` (``None``); the divisor is kept above the dtype's tiny."""
    scale = {"mean": c.mean, "max": c.max, None: lambda: c.new_ones(())}[normalize]
    return c / scale().clamp_min(torch.finfo(c.dtype).tiny)


def kernel_is_safe(cn: Tensor, reg: float) -> bool:
    """Every row and column of ``K = exp(-cn / reg)`` has an entry above sqrt(tiny) (one
    sync). A heuristic for the first iterations only (later scalings can still
    overflow); what makes the kernel path safe is the finiteness and convergence check of
    its plan, after which a log-domain solver takes over."""
    worst = torch.maximum(cn.amin(1).max(), cn.amin(0).max()) / reg
    return bool(worst < -0.5 * math.log(torch.finfo(cn.dtype).tiny))


def kernel_underflows(cn: Tensor, reg: float) -> bool:
    """Some entry of ``K = exp(-cn / reg)`` is below the dtype's smallest normal number
    (0 or subnormal): the kernel iterations then solve another problem than the log
    domain's (one sync)."""
    return bool(cn.max() / reg > -math.log(torch.finfo(cn.dtype).tiny))


_POT_DIR = os.path.dirname(os.path.abspath(ot.__file__)) + os.sep


def call_pot(fn: Callable, *args, catch: tuple[type[Exception], ...] = (),
             **kwargs) -> tuple[Any, list[str], Exception | None]:
    """``fn(*args, **kwargs)`` (a POT solver), the messages of the user warnings POT issued
    meanwhile, for the caller to act on (every other warning is re-issued), and the
    exception of a type in ``catch`` that it raised (then the result is None), else None."""
    out, error = None, None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = fn(*args, **kwargs)
        except catch as err:
            error = err
    messages = []
    for w in caught:
        if not (issubclass(w.category, UserWarning)
                and os.path.abspath(w.filename).startswith(_POT_DIR)):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
        else:
            messages.append(str(w.message))
    return out, messages, error


def _sinkhorn_pot(a: Tensor, b: Tensor, c: Tensor, reg: float, method: str, max_iter: int,
                  tol: float) -> tuple[Tensor, int, float, bool]:
    """POT's Sinkhorn (``method`` "sinkhorn": kernel domain, "sinkhorn_log": log domain):
    its plan, the iterations run, the L1 marginal error of the plan (nan when the plan is
    not finite; one sync) and whether POT stopped on its numerical-error check (read from
    its warning "numerical errors at iteration i", which the caller acts on; POT's other
    user warnings are dropped, all other warnings re-issued)."""
    (plan, log), messages, _ = call_pot(ot.sinkhorn, a, b, c, reg, method=method,
                                     numItermax=max_iter, stopThr=tol / math.sqrt(b.shape[0]),
                                     log=True, warn=False)
    numerical = any("numerical errors" in m for m in messages)
    err = (plan.sum(1) - a).abs().sum() + (plan.sum(0) - b).abs().sum()
    err = float(torch.where(torch.isfinite(plan).all(), err, torch.nan))
    return plan, int(log["niter"]) + 1, err, numerical


def _emd(a: np.ndarray, b: np.ndarray, c: np.ndarray, limit: int) -> tuple[np.ndarray, int]:
    with warnings.catch_warnings():  # POT only warns; the caller reads the result code
        warnings.filterwarnings("ignore", category=UserWarning, module=r"ot\.")
        plan, log = ot.emd(a, b, c, numItermax=limit, log=True)
    return plan, int(log["result_code"])
