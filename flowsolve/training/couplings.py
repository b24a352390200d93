r"""Couplings of a source batch ``x0`` with a data batch ``x1``: which x0 goes with which x1.

A coupling is a data-pipeline step: it needs no model, so it can run in DataLoader workers
(e.g. in a ``collate_fn``) and overlap the CPU solve of exact OT with the training step.
Every coupling is a small picklable object with two calls:

* ``x0c, x1c, *extras_c = coupling(x0, x1, *extras, generator=g)`` -- the paired batches.
  Per-sample tensors in ``extras`` (labels, conditions, weights; first dim ``M``) belong to
  ``x1`` and travel with their sample.
* ``res = coupling.plan(x0, x1, *extras, generator=g)`` -- a :class:`CouplingResult`: the
  index pairs ``(i0, i1)``, the plan, its cost and the solver's status. Use
  ``res.take0(y0)`` for per-sample tensors that belong to ``x0``.

By default (``keep="x1"``) the data side is kept whole and in order (``x1c`` *is* ``x1``,
extras come back untouched) and ``x0`` is reordered (exact OT, equal batches: a permutation)
or drawn from the plan column by column (unequal batches, entropic OT); ``keep="x0"`` does
the converse. Failures are never silent: see :class:`OTCoupling`.
"""

from __future__ import annotations

import math
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import ot
import torch
from torch import Tensor

from .._core.checks import check_generator, generator_or_fresh

__all__ = ["COSTS", "COUPLINGS", "ClassConditionalOT", "Coupling", "CouplingError",
           "CouplingResult", "CouplingWarning", "IndependentCoupling", "OTCoupling",
           "PairedCoupling", "get_coupling"]

CostFn = Callable[[Tensor, Tensor], Tensor]

#: cost name -> ``c(x0, x1)`` on flattened batches ``(N, D), (M, D) -> (N, M)``.
COSTS: dict[str, CostFn] = {
    "sqeuclidean": lambda a, b: torch.cdist(a, b).square(),
    "euclidean": lambda a, b: torch.cdist(a, b),
}
_EMD_CODES = {0: "infeasible", 1: "optimal", 2: "unbounded", 3: "max_iter_reached"}


class CouplingError(RuntimeError):
    """An OT solver failed and no correct fallback was allowed; the message has the numbers."""


class CouplingWarning(UserWarning):
    """An OT solver failed and a correct fallback was used (issued once per coupling)."""


@dataclass(frozen=True)
class CouplingResult:
    """The pairs of a coupling and how they were found.

    Attributes:
        i0, i1: ``(K,)`` int64 on the inputs' device; pair k is ``(x0[i0[k]], x1[i1[k]])``.
        plan: ``(N, M)`` plan summing to 1 (rows x0), ``None`` for independent / paired;
            exact plans are float64 on the CPU (where POT solves), entropic ones float64 on
            the inputs' device (MPS, which has no float64: the inputs' dtype).
        cost: 0-d ``<plan, C>`` in units of the unnormalised cost, ``C`` computed in
            float64 (MPS: float32) for a named cost, or by a callable cost at the inputs'
            dtype (at least float32) and converted; returned in the inputs' dtype (at
            least float32); ``None`` without plan.
        method: ``"independent"``, ``"paired"``, ``"exact"``, ``"sinkhorn"``.
        status: ``"given"`` (no solve), ``"optimal"``, ``"optimal_after_retry"`` (the
            iteration limit was hit, a 100x limit reached optimality), ``"converged"``
            (Sinkhorn within ``tol``), ``"fallback_exact"`` (Sinkhorn failed; the exact
            plan, also when its solve needed the 100x retry, which the warning of the
            retry reports).
        n_iter: solver iterations (Sinkhorn), else ``None``.
        marginal_error: ``|plan 1 - a|_1 + |plan^T 1 - b|_1`` of the returned plan, ``a``
            and ``b`` the marginals the plan was solved for: uniform, ``1/N`` and ``1/M``
            (:class:`ClassConditionalOT` with ``y0``: ``a_i = (M_c / M) / N_c``).
        kept: ``"x1"`` (then ``i1 = arange(M)``), ``"x0"`` (``i0 = arange(N)``) or ``None``.
        solver: the algorithm that produced the plan: ``"network_simplex"`` (exact),
            ``"sinkhorn_knopp"`` (kernel domain), ``"sinkhorn_log"`` or ``None`` (no plan).
    """

    i0: Tensor
    i1: Tensor
    plan: Tensor | None = None
    cost: Tensor | None = None
    method: str = "independent"
    status: str = "given"
    n_iter: int | None = None
    marginal_error: float | None = None
    kept: str | None = None
    solver: str | None = None

    def take0(self, t: Tensor) -> Tensor:
        """Per-sample tensor of x0 (first dim N) reordered to the pairs."""
        return t[self.i0.to(t.device)]

    def take1(self, t: Tensor) -> Tensor:
        """Per-sample tensor of x1 (first dim M) reordered to the pairs."""
        return t if self.kept == "x1" else t[self.i1.to(t.device)]


def _batches(x0: Tensor, x1: Tensor, extras: tuple, generator=None) -> tuple[Tensor, Tensor]:
    check_generator(generator)
    for name, x in (("x0", x0), ("x1", x1)):
        if not torch.is_tensor(x) or x.dim() < 1 or x.shape[0] < 1:
            raise TypeError(f"{name} must be a tensor shaped (B, *event_shape) with B >= 1 "
                            "((B,): B scalar samples); got "
                            f"{getattr(x, 'shape', type(x).__name__)}")
    if x0[0].numel() != x1[0].numel() or x0.device != x1.device:
        raise ValueError(f"x0 and x1 must have the same number of entries per sample, on one "
                         f"device; got x0 {tuple(x0.shape)} on {x0.device}, x1 "
                         f"{tuple(x1.shape)} on {x1.device}")
    for k, e in enumerate(extras):
        if not torch.is_tensor(e) or e.dim() < 1 or e.shape[0] != x1.shape[0]:
            raise ValueError(f"extras[{k}] must be a per-sample tensor of x1 with first dim "
                             f"{x1.shape[0]}; got {getattr(e, 'shape', type(e).__name__)}")
    # (B,) is B scalar samples (event_shape ()), as in the bridges, losses and metrics
    return tuple(x.detach().unsqueeze(1) if x.dim() == 1 else x.detach().flatten(1)
                 for x in (x0, x1))


class Coupling(ABC):
    """Base class: subclasses implement :meth:`plan`."""

    @abstractmethod
    def plan(self, x0: Tensor, x1: Tensor, *extras: Tensor,
             generator: torch.Generator | None = None) -> CouplingResult:
        """The pairing of ``x0`` with ``x1`` as a :class:`CouplingResult`."""

    def __call__(self, x0: Tensor, x1: Tensor, *extras: Tensor,
                 generator: torch.Generator | None = None, **kwargs) -> tuple[Tensor, ...]:
        """``(x0c, x1c, *extras_c)``, the pairs of :meth:`plan` (extras follow x1)."""
        res = self.plan(x0, x1, *extras, generator=generator, **kwargs)
        return (res.take0(x0), res.take1(x1), *(res.take1(e) for e in extras))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"

    def settings(self) -> dict[str, Any]:
        """The settings that decide the pairs: the public attributes (those of the repr),
        less any this coupling never reads. A training checkpoint records them and a resume
        refuses any change (:func:`~flowsolve.training.loop.train`)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


class IndependentCoupling(Coupling):
    """``pi = mu0 x mu1``: x1[j] with x0[j] (the batches are independent draws). With a
    ``generator``, x0 is shuffled first, so the pairing is independent even when x0's
    order carries information. Needs ``N >= M``; the first M (shuffled) x0 are used."""

    def plan(self, x0, x1, *extras, generator=None):
        _batches(x0, x1, extras, generator)
        n, m = x0.shape[0], x1.shape[0]
        if n < m:
            raise ValueError(f"IndependentCoupling needs at least as many x0 as x1; got "
                             f"N={n} < M={m}")
        i0 = torch.arange(m) if generator is None else \
            torch.randperm(n, generator=generator, device=generator.device)[:m]
        return CouplingResult(i0.to(x0.device), torch.arange(m, device=x0.device), kept="x1")


class PairedCoupling(Coupling):
    """The pairs as given, ``(x0[k], x1[k])`` (e.g. a degraded image and its original)."""

    def plan(self, x0, x1, *extras, generator=None):
        _batches(x0, x1, extras, generator)
        if x0.shape[0] != x1.shape[0]:
            raise ValueError(f"PairedCoupling needs x0 and x1 of one batch size; got "
                             f"{x0.shape[0]} and {x1.shape[0]}")
        idx = torch.arange(x1.shape[0], device=x1.device)
        return CouplingResult(idx, idx, method="paired", kept="x1")


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
        _choice("method", method, ("exact", "sinkhorn"))
        _choice("domain", domain, ("auto", "log"))
        _choice("normalize", normalize, ("mean", "max", None))
        _choice("keep", keep, ("x1", "x0"))
        _choice("fallback", fallback, ("exact", None))
        if not callable(cost):
            _choice("cost", cost, tuple(COSTS))
        for name, val in (("reg", reg), ("tol", tol)):
            if not (isinstance(val, (int, float)) and val > 0 and math.isfinite(val)):
                raise ValueError(f"{name} must be a positive finite number; got {val!r}")
        if max_iter is not None and not (isinstance(max_iter, int) and max_iter >= 1):
            raise ValueError(f"max_iter must be a positive int or None; got {max_iter!r}")
        self.method, self.cost, self.reg, self.normalize = method, cost, float(reg), normalize
        self.max_iter, self.tol, self.keep, self.fallback = max_iter, float(tol), keep, fallback
        self.domain = domain
        self._warned: set[str] = set()

    def plan(self, x0, x1, *extras, generator=None):
        x0f, x1f = _batches(x0, x1, extras, generator)
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
        """The cost matrix in float64 (MPS, which has none: float32). A named cost is
        computed in float64: in float32, ``torch.cdist``'s matmul route
        (``|a|^2 + |b|^2 - 2 a.b``) cancels away from the origin: batches offset by 300
        (N = 256, d = 2) were paired 1.3% above the optimum, with a reported cost below it.
        A callable cost gets the inputs at their own dtype (promoted to at least float32),
        since it may hold a model of that dtype (a learned feature map: float64 inputs to a
        float32 ``nn.Module`` fail), and is called without autograd (a coupling needs no
        gradients); its result is converted to float64 for the solve."""
        solve = torch.float32 if x0f.device.type == "mps" else torch.float64
        if isinstance(self.cost, str):
            c = COSTS[self.cost](x0f.to(solve), x1f.to(solve))
        else:
            given = torch.promote_types(torch.promote_types(x0f.dtype, x1f.dtype),
                                        torch.float32)
            with torch.no_grad():
                c = self.cost(x0f.to(given), x1f.to(given))
            if not torch.is_tensor(c):
                raise TypeError(f"cost must return a tensor (N, M); got {type(c).__name__}")
        if c.shape != (x0f.shape[0], x1f.shape[0]):
            raise ValueError(f"cost must return ({x0f.shape[0]}, {x1f.shape[0]}); got "
                             f"{tuple(c.shape)}")
        if not bool(torch.isfinite(c).all()):  # one sync; Sinkhorn's own checks sync too
            self._refuse_non_finite(c, x0f, x1f)
        return c.to(solve)

    def _refuse_non_finite(self, c: Tensor, x0f: Tensor, x1f: Tensor) -> None:
        """Say why the cost matrix ``c`` is not finite: non-finite points (counted per side),
        else an overflow of finite points (a named cost) or a callable cost's own result."""
        _check_points(x0f, x1f)
        n, m = c.shape
        k = int((~torch.isfinite(c)).sum())
        big = max(float(x0f.abs().max()), float(x1f.abs().max()))
        if isinstance(self.cost, str):
            what = "squared distances" if self.cost == "sqeuclidean" else \
                "squared differences (inside the distance)"
            raise ValueError(
                f"the cost matrix overflowed: x0 and x1 are finite (largest magnitude "
                f"{big:.3g}), but {k} of the {n}x{m} {self.cost!r} costs are not: the {what} "
                f"of points this far apart exceed the range of {_name(c.dtype)} (largest "
                f"{torch.finfo(c.dtype).max:.3g}). Rescale the data (e.g. standardise x0 and "
                "x1, or divide both by a common scale) before coupling")
        raise ValueError(
            f"cost returned {k} non-finite entries (of {n}x{m}) on finite x0 and x1 (largest "
            f"magnitude {big:.3g}; returned as {_name(c.dtype)}): the cost function overflowed "
            "or failed there. Rescale the data or fix the cost function")

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
        scale = {"mean": c64.mean, "max": c64.max, None: lambda: c64.new_ones(())}[
            self.normalize]
        cn = c64 / scale().clamp_min(torch.finfo(c64.dtype).tiny)
        a = torch.full((n,), 1.0 / n, dtype=c64.dtype, device=c64.device)
        b = torch.full((m,), 1.0 / m, dtype=c64.dtype, device=c64.device)
        max_iter = self.max_iter or 1000
        log_domain = True  # unless the kernel is tried and its failure would recur there
        if self.domain == "auto" and self._kernel_is_safe(cn):
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
            log_domain = not err <= self.tol and (
                math.isnan(err) or numerical or n_iter < max_iter or self._kernel_underflows(cn))
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

    def _kernel_is_safe(self, cn: Tensor) -> bool:
        """Every row and column of ``K = exp(-cn / reg)`` has an entry above sqrt(tiny) (one
        sync). A heuristic for the first iterations only (later scalings can still
        overflow); what makes the kernel path safe is the finiteness and marginal check of
        its plan, after which the log domain takes over."""
        worst = torch.maximum(cn.amin(1).max(), cn.amin(0).max()) / self.reg
        return bool(worst < -0.5 * math.log(torch.finfo(cn.dtype).tiny))

    def _kernel_underflows(self, cn: Tensor) -> bool:
        """Some entry of ``K = exp(-cn / reg)`` is below the dtype's smallest normal number
        (0 or subnormal): the kernel iterations then solve another problem than the log
        domain's (one sync)."""
        return bool(cn.max() / self.reg > -math.log(torch.finfo(cn.dtype).tiny))

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

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, CouplingWarning, stacklevel=2)


_POT_DIR = os.path.dirname(os.path.abspath(ot.__file__)) + os.sep


def _sinkhorn_pot(a: Tensor, b: Tensor, c: Tensor, reg: float, method: str, max_iter: int,
                  tol: float) -> tuple[Tensor, int, float, bool]:
    """POT's Sinkhorn (``method`` "sinkhorn": kernel domain, "sinkhorn_log": log domain):
    its plan, the iterations run, the L1 marginal error of the plan (nan when the plan is
    not finite; one sync) and whether POT stopped on its numerical-error check (read from
    its warning "numerical errors at iteration i", which the caller acts on; POT's other
    user warnings are dropped, all other warnings re-issued)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan, log = ot.sinkhorn(a, b, c, reg, method=method, numItermax=max_iter,
                                stopThr=tol / math.sqrt(b.shape[0]), log=True, warn=False)
    numerical = False
    for w in caught:
        if not (issubclass(w.category, UserWarning)
                and os.path.abspath(w.filename).startswith(_POT_DIR)):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
        elif "numerical errors" in str(w.message):
            numerical = True
    err = (plan.sum(1) - a).abs().sum() + (plan.sum(0) - b).abs().sum()
    err = float(torch.where(torch.isfinite(plan).all(), err, torch.nan))
    return plan, int(log["niter"]) + 1, err, numerical


def _emd(a: np.ndarray, b: np.ndarray, c: np.ndarray, limit: int) -> tuple[np.ndarray, int]:
    with warnings.catch_warnings():  # POT only warns; the caller reads the result code
        warnings.filterwarnings("ignore", category=UserWarning, module=r"ot\.")
        plan, log = ot.emd(a, b, c, numItermax=limit, log=True)
    return plan, int(log["result_code"])


def _check_points(x0f: Tensor, x1f: Tensor) -> None:
    """Refuse non-finite points, counted per side (reads two counts: call it on failure)."""
    n0, n1 = (int((~torch.isfinite(x)).sum()) for x in (x0f, x1f))
    if n0 or n1:
        def entries(k: int) -> str:
            return f"{k} non-finite {'entry' if k == 1 else 'entries'}"
        got = (f"{entries(n0)} in x0 and {n1} in x1" if n0 and n1 else
               f"{entries(n0 or n1)} in {'x0' if n0 else 'x1'} (none in {'x1' if n0 else 'x0'})")
        raise ValueError(f"x0 and x1 must be finite; got {got}")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _choice(name: str, value, accepted: tuple) -> None:
    if value not in accepted:
        raise ValueError(f"{name} must be one of {accepted}; got {value!r}")


class ClassConditionalOT(OTCoupling):
    """Optimal transport within each class: x0 is paired only with x1 of the same label.

    Called as ``coupling(x0, x1, y1, *extras, y0=None, generator=g)``: the first extra is
    the label ``y1`` ``(M,)`` of x1 (so ``x0c, x1c, y1c = coupling(x0, x1, y1)`` has the
    shape of every other coupling). Without ``y0`` the source is unlabelled noise (needs
    ``N == M``): it is split into groups of the class counts of ``y1`` -- at random with
    ``generator``, else in order, which is random for i.i.d. draws -- and each group is
    transported to its class. With ``y0`` ``(N,)`` the groups are the source classes (the
    label sets must agree); :class:`~flowsolve.training.pipeline.BatchProducer` (so
    :func:`~flowsolve.training.loop.train`) passes a labelled source's labels as ``y0``. Within a
    class this is :class:`OTCoupling` with the same arguments (exact OT is optimal per
    class); the plan is block diagonal, class c carrying
    mass ``M_c / M``. Its column marginal is uniform, ``1/M``; its row marginal is
    ``a_i = (M_c / M) / N_c`` for x0[i] in class c, uniform only when the class proportions
    of ``y0`` and ``y1`` agree (always without ``y0``), and ``marginal_error`` is measured
    against these ``a`` and ``b`` (a ``y0`` of other proportions cannot give a uniform row
    marginal without crossing classes). Avoids the cross-class pairs that hurt conditional
    generation (torchcfm issue #117; C^2OT, arXiv 2503.10636).
    """

    def plan(self, x0, x1, y1=None, *extras, y0=None, generator=None):
        if y1 is None:
            raise TypeError("ClassConditionalOT needs the labels of x1: coupling(x0, x1, y1)")
        x0f, x1f = _batches(x0, x1, (y1, *extras), generator)
        n, m = x0f.shape[0], x1f.shape[0]
        if y1.dim() != 1:
            raise ValueError(f"y1 must be shaped (M,) = ({m},); got {tuple(y1.shape)}")
        classes, counts = torch.unique(y1, return_counts=True)
        groups1 = [torch.nonzero(y1 == k).squeeze(1) for k in classes]
        if y0 is None:
            if n != m:
                raise ValueError(f"without y0 (unlabelled x0), x0 and x1 need one batch size; "
                                 f"got N={n}, M={m}")
            order = torch.arange(n, device=x0.device) if generator is None else \
                torch.randperm(n, generator=generator, device=generator.device).to(x0.device)
            groups0 = list(torch.split(order, counts.tolist()))
        else:
            if y0.shape != (n,):
                raise ValueError(f"y0 must be shaped (N,) = ({n},); got {tuple(y0.shape)}")
            y0 = y0.to(y1.device)
            classes0 = torch.unique(y0)
            if classes0.shape != classes.shape or not bool((classes0 == classes).all()):
                raise ValueError(f"y0 and y1 must hold the same labels; got y0 "
                                 f"{classes0.tolist()} and y1 {classes.tolist()}")
            groups0 = [torch.nonzero(y0 == k).squeeze(1) for k in classes]
        parts = []
        for g0, g1 in zip(groups0, groups1, strict=True):
            g0, g1 = g0.to(x0f.device), g1.to(x0f.device)
            try:
                parts.append((g0, g1, self._couple(x0f[g0], x1f[g1], generator)))
            except ValueError:
                _check_points(x0f, x1f)  # non-finite points: counted over the whole batches
                raise
        return self._assemble(parts, n, m)

    def _assemble(self, parts, n: int, m: int) -> CouplingResult:
        ref = parts[0][2].plan  # all parts' plans share a device (see _exact)
        plan = torch.zeros(n, m, dtype=ref.dtype, device=ref.device)
        i0 = torch.cat([g0[r.i0] for g0, _, r in parts])
        i1 = torch.cat([g1[r.i1] for _, g1, r in parts])
        weights = [g1.shape[0] / m for _, g1, _ in parts]
        for w, (g0, g1, r) in zip(weights, parts, strict=True):
            plan[g0.to(ref.device)[:, None], g1.to(ref.device)] = w * r.plan
        cost = sum(w * r.cost for w, (_, _, r) in zip(weights, parts, strict=True))
        a = torch.zeros(n, dtype=ref.dtype, device=ref.device)  # row targets (M_c / M) / N_c
        for w, (g0, _, _) in zip(weights, parts, strict=True):
            a[g0.to(ref.device)] = w / g0.shape[0]
        err = float((plan.sum(1) - a).abs().sum() + (plan.sum(0) - 1.0 / m).abs().sum())
        statuses = [r.status for _, _, r in parts]
        status = min(statuses, key=lambda s: {"fallback_exact": 0, "optimal_after_retry": 1}
                     .get(s, 2))
        iters = max(r.n_iter or 0 for _, _, r in parts) if self.method == "sinkhorn" else None
        solvers = sorted({r.solver for _, _, r in parts})  # one name, or the mix
        order = torch.argsort(i1 if self.keep == "x1" else i0)
        return CouplingResult(i0[order], i1[order], plan, cost, self.method, status, iters, err,
                              self.keep, "+".join(solvers))


#: coupling name -> class, for configuration files and the command line.
COUPLINGS: dict[str, type[Coupling]] = {
    "independent": IndependentCoupling, "paired": PairedCoupling, "ot": OTCoupling,
    "class_ot": ClassConditionalOT}


def get_coupling(name: str, **kwargs) -> Coupling:
    """``COUPLINGS[name](**kwargs)``, e.g. ``get_coupling("ot", method="sinkhorn", reg=0.1)``."""
    if name not in COUPLINGS:
        raise ValueError(f"unknown coupling {name!r}; accepted: {', '.join(COUPLINGS)}")
    return COUPLINGS[name](**kwargs)
