r"""Relaxed minibatch optimal transport: unbalanced OT (the marginal constraints relaxed to KL
penalties, :class:`UnbalancedOTCoupling`) and partial OT (only a fraction of the mass
transported, :class:`PartialOTCoupling`), through POT.

The plan of a relaxed problem is not a coupling of the two uniform batches: its mass need
not be 1 and its marginals are not uniform, so neither batch is kept whole. The pairs are
entries ``(i, j)`` drawn from the normalised plan :math:`\pi / |\pi|` by systematic sampling
(one uniform ``u`` from the call's generator; the entries at the cumulative masses
``(u + k) / K``, ``k = 0 .. K-1``): an entry of normalised mass ``p`` comes back
``floor(K p)`` or ``ceil(K p)`` times (``K p`` on average), so the pairs are distinct
wherever the plan allows (every entry below ``1 / K``), and a plan of ``K`` entries of
equal mass (a partial permutation) gives each of its pairs exactly once. ``K`` is
``n_pairs``, by default ``M`` (the data batch), so that a training batch keeps its size.
The plan is on the inputs' device and the generator must be there too. Each
:class:`RelaxedCouplingResult` says how much mass moved and how far the marginals are from
uniform.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
from .ot_couplings import call_pot, kernel_underflows, normalized_cost

__all__ = ["PartialOTCoupling", "RelaxedCouplingResult", "UnbalancedOTCoupling"]


@dataclass(frozen=True)
class RelaxedCouplingResult(CouplingResult):
    """The pairs of a relaxed coupling (a
    :class:`~flowsolve.training.coupling_base.CouplingResult` with ``kept=None``: both
    batches are indexed) and what the relaxation did.

    ``plan`` is the solver's plan, of mass ``mass`` (not normalised), on the inputs'
    device; ``cost`` is ``<plan, C>`` in units of the unnormalised cost, ``C`` computed as
    :class:`~flowsolve.training.ot_couplings.OTCoupling` does; ``method`` is
    ``"unbalanced_sinkhorn"`` (``solver`` ``"sinkhorn_translation_invariant"``, ``status``
    ``"converged"``) or ``"partial_exact"`` (``"network_simplex"``, ``"optimal"`` or
    ``"optimal_after_retry"``).

    Attributes:
        mass: :math:`|\\pi| = \\sum_{ij} \\pi_{ij}`, the transported mass (uniform
            marginals of mass 1 each).
        marginal_deviation: ``(|plan 1 - a|_1, |plan^T 1 - b|_1)``, how far the plan's
            marginals are from the uniform ``a = 1/N`` and ``b = 1/M``.
        residual: unbalanced OT: the largest residual of the scaling equations of the
            returned potentials, in log units (the convergence measure, at most ``tol``);
            ``None`` for partial OT.
        marginal_error: partial OT: how far the plan is from its constraints,
            ``sum (plan 1 - a)_+ + sum (plan^T 1 - b)_+ + ||plan| - m|`` (rounding); ``None``
            for unbalanced OT, whose marginals are penalised, not constrained.
        unmatched0, unmatched1: partial OT: ``(n,)`` int64 indices of the x0 and x1 that
            carry no transported mass (none beyond the network simplex's rounding, at most
            1e-9 of their uniform share: they take part in no pair); ``None`` for
            unbalanced OT, where every point carries some.
    """

    mass: float | None = None
    marginal_deviation: tuple[float, float] | None = None
    residual: float | None = None
    unmatched0: Tensor | None = None
    unmatched1: Tensor | None = None


def _check_options(cost, normalize, max_iter, n_pairs) -> None:
    check_choice("normalize", normalize, ("mean", "max", None))
    if not callable(cost):
        check_choice("cost", cost, tuple(COSTS))
    for name, val in (("max_iter", max_iter), ("n_pairs", n_pairs)):
        if val is not None and not (isinstance(val, int) and not isinstance(val, bool)
                                    and val >= 1):
            raise ValueError(f"{name} must be a positive int or None; got {val!r}")


def _draw(plan: Tensor, n_pairs: int, generator) -> tuple[Tensor, Tensor]:
    """``n_pairs`` entries ``(i0, i1)`` of ``plan / |plan|`` by systematic sampling (the
    module's docstring): one uniform, then a cumsum and a search over the plan's entries."""
    if generator is not None and torch.device(generator.device).type != plan.device.type:
        raise ValueError(f"generator must be on {plan.device.type}, where the inputs and the "
                         f"plan are; got a generator on {generator.device}")
    generator = generator_or_fresh(generator, plan.device)
    cdf = plan.flatten().cumsum(0)
    u = torch.rand((), generator=generator, dtype=cdf.dtype, device=cdf.device)
    at = (u + torch.arange(n_pairs, dtype=cdf.dtype, device=cdf.device)) * (cdf[-1] / n_pairs)
    # side="right": cdf[e] > at >= cdf[e - 1], so every drawn entry has positive mass
    flat = torch.searchsorted(cdf, at, right=True).clamp_max(cdf.shape[0] - 1)
    m = plan.shape[1]
    return flat // m, flat % m


def _deviation(plan: Tensor, a: Tensor, b: Tensor) -> tuple[float, float]:
    return (float((plan.sum(1) - a).abs().sum()), float((plan.sum(0) - b).abs().sum()))


def _reported_dtype(x0f: Tensor, x1f: Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(x0f.dtype, x1f.dtype), torch.float32)


class UnbalancedOTCoupling(Coupling):
    r"""Minibatch unbalanced optimal transport: entropic OT whose marginal constraints are
    relaxed to Kullback-Leibler penalties (Chizat, Peyré, Schmitzer & Vialard 2018),

    .. math::
        \pi = \arg\min_{\pi \ge 0} \langle \pi, \tilde C \rangle
        + \varepsilon\, \mathrm{KL}(\pi \,|\, a \otimes b)
        + \tau_0\, \mathrm{KL}(\pi 1 \,|\, a) + \tau_1\, \mathrm{KL}(\pi^T 1 \,|\, b),

    ``a = 1/N``, ``b = 1/M``. The optimum is :math:`\pi = \mathrm{diag}(u) K \mathrm{diag}(v)`,
    :math:`K = e^{-\tilde C / \varepsilon} a \otimes b`, at the fixed point of
    :math:`u = (a / K v)^{\tau_0 / (\tau_0 + \varepsilon)}`,
    :math:`v = (b / K^T u)^{\tau_1 / (\tau_1 + \varepsilon)}`, which POT's translation-invariant
    Sinkhorn iterations reach (``ot.unbalanced.sinkhorn_unbalanced``,
    ``method="sinkhorn_translation_invariant"``, Séjourné, Vialard & Peyré 2022; on POT's
    torch backend, in float64, on the inputs' device: 4-17 iterations to 1e-5 at
    ``reg=0.05`` for any ``reg_m`` on 64 x 64 Gaussian batches, where the plain iterations
    need 862 at ``reg_m=10`` and 6298 at ``reg_m=100``). A point that is expensive to
    transport anywhere (an outlier) costs less left (partly) out: its marginal falls
    below uniform and the plan's mass :math:`|\pi|` below 1. :math:`\tau \to \infty` is
    entropic OT (:class:`~flowsolve.training.ot_couplings.OTCoupling` ``("sinkhorn")`` with
    the same ``reg`` and ``normalize`` gives the same plan at :math:`\tau = \infty`, and
    plans that tend to it as :math:`\tau` grows, by about :math:`0.7 / \tau` in L1 on
    64 x 64 Gaussian batches at ``reg=0.05``); :math:`\tau \to 0` drops the marginals
    altogether, :math:`\pi \to e^{-\tilde C / \varepsilon} a \otimes b`, which moves
    almost nothing when :math:`\varepsilon` is small against the costs.

    The cost is normalised as :class:`~flowsolve.training.ot_couplings.OTCoupling`'s,
    :math:`\tilde C = C / \mathrm{mean}(C)` by default, so ``reg`` = :math:`\varepsilon` and
    ``reg_m`` = :math:`\tau` are relative to a typical pair cost.

    Convergence is checked on the returned potentials, not by POT's stopping rule (a
    relative change of ``u``, which can stop early: the solve then goes on from POT's last
    potentials, ``warmstart``, with a 10x smaller threshold, within ``max_iter`` iterations
    in all): the residual of both scaling equations in log units,
    :math:`\max_i |\log u_i - \tfrac{\tau_0}{\tau_0 + \varepsilon} (\log a_i - \log (K v)_i)|`
    and the same for v, must be at most ``tol`` (a relative mismatch of the scalings; at
    :math:`\tau = \infty` a relative error of each marginal). Otherwise -- the iteration
    limit, non-finite iterates or POT's numerical-error exit (read from its warning) --
    :class:`~flowsolve.training.coupling_base.CouplingError` with the numbers and the
    setting to change: increase ``max_iter``, or ``reg`` (a kernel with entries below
    float64's smallest normal number, :math:`\tilde C_{ij} / \varepsilon` beyond about 708,
    is named as the cause). There is no fallback: exact OT solves another problem.

    Pairs: ``n_pairs`` entries of :math:`\pi / |\pi|` (default ``M``) by systematic
    sampling (:mod:`flowsolve.training.relaxed_couplings`); each point appears about as
    often as its share of the transported mass.

    Args:
        reg: :math:`\varepsilon > 0`, relative to the normalised cost.
        reg_m: :math:`\tau > 0` for both marginals, or a pair ``(tau0, tau1)`` (x0's, x1's);
            ``math.inf`` keeps that marginal exact.
        cost: a name in :data:`~flowsolve.training.coupling_base.COSTS` or
            ``c(x0_flat, x1_flat) -> (N, M)``, as
            :class:`~flowsolve.training.ot_couplings.OTCoupling`'s (non-finite costs are
            refused the same way).
        normalize: ``"mean"``, ``"max"`` or ``None``.
        max_iter: iteration limit (default 1000).
        tol: largest accepted residual of the scaling equations.
        n_pairs: number of pairs drawn; ``None``: ``M``.

    References: Chizat, Peyré, Schmitzer & Vialard, "Scaling algorithms for unbalanced
    optimal transport problems", Math. Comp. 2018; Séjourné, Vialard & Peyré, "Faster
    unbalanced optimal transport: translation invariant Sinkhorn and 1-D Frank-Wolfe",
    AISTATS 2022; Fatras, Séjourné, Flamary & Courty, "Unbalanced minibatch optimal
    transport; applications to domain adaptation", ICML 2021.
    """

    def __init__(self, reg: float = 0.05, reg_m: float | tuple[float, float] = 1.0, *,
                 cost: str | CostFn = "sqeuclidean", normalize: str | None = "mean",
                 max_iter: int | None = None, tol: float = 1e-5, n_pairs: int | None = None):
        _check_options(cost, normalize, max_iter, n_pairs)
        check_positive("reg", reg)
        check_positive("tol", tol)
        pair = reg_m if isinstance(reg_m, (tuple, list)) else (reg_m, reg_m)
        if len(pair) != 2 or not all(
                isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0
                and not math.isnan(t) for t in pair):
            raise ValueError(f"reg_m must be a positive number (math.inf: that marginal "
                             f"exact) or a pair (tau0, tau1) of them; got {reg_m!r}")
        self.reg, self.tol, self.cost, self.normalize = float(reg), float(tol), cost, normalize
        self.reg_m = (float(pair[0]), float(pair[1])) if isinstance(reg_m, (tuple, list)) \
            else float(reg_m)
        self.max_iter, self.n_pairs = max_iter, n_pairs

    def plan(self, x0, x1, *extras, generator=None) -> RelaxedCouplingResult:
        x0f, x1f = flat_batches(x0, x1, extras, generator)
        dtype = _reported_dtype(x0f, x1f)
        c = cost_matrix(self.cost, x0f, x1f)
        c64 = c if c.device.type == "mps" else c.to(torch.float64)
        cn = normalized_cost(c64, self.normalize)
        n, m = cn.shape
        a = torch.full((n,), 1.0 / n, dtype=cn.dtype, device=cn.device)
        b = torch.full((m,), 1.0 / m, dtype=cn.dtype, device=cn.device)
        tau = self.reg_m if isinstance(self.reg_m, tuple) else (self.reg_m, self.reg_m)
        max_iter = self.max_iter or 1000
        spent, stop, warm = 0, self.tol / 2, None
        while True:  # POT's stopping rule (a relative change of u) need not meet tol: go on
            (plan, log), messages, _ = call_pot(
                ot.unbalanced.sinkhorn_unbalanced, a, b, cn, self.reg, tau,
                method="sinkhorn_translation_invariant", warmstart=warm,
                numItermax=max_iter - spent, stopThr=stop, log=True)
            spent += len(log["err"])
            numerical = any("numerical errors" in s.lower() for s in messages)
            residual = _scaling_residual(log["logu"], log["logv"], cn, a, b, self.reg, tau)
            if numerical or not residual > self.tol or spent >= max_iter:
                break  # converged, or failed (a nan residual included)
            warm, stop = (log["logu"], log["logv"]), stop / 10
        n_iter = spent
        if numerical or not (residual <= self.tol and bool(torch.isfinite(plan).all())):
            why = ("POT stopped on non-finite iterates (its numerical-error check)" if numerical
                   else f"the scaling equations' residual is {residual:.3g} > tol={self.tol:g}")
            advice = ("the kernel exp(-C/reg) has entries below float64's smallest normal "
                      "number: increase reg" if kernel_underflows(cn, self.reg) else
                      "increase max_iter or reg")
            raise CouplingError(
                f"unbalanced Sinkhorn did not converge on a {n}x{m} batch: {why} after "
                f"{n_iter} iterations (max_iter={max_iter}) at reg={self.reg:g}, "
                f"reg_m={self.reg_m} (cost normalised by its {self.normalize or 'identity'}); "
                f"{advice}.")
        i0, i1 = _draw(plan, self.n_pairs or m, generator)
        return RelaxedCouplingResult(
            i0.to(x0f.device), i1.to(x0f.device), plan, (plan * c64).sum().to(dtype),
            "unbalanced_sinkhorn", "converged", n_iter, None, None,
            "sinkhorn_translation_invariant", mass=float(plan.sum()),
            marginal_deviation=_deviation(plan, a, b), residual=residual)


def _scaling_residual(logu: Tensor, logv: Tensor, cn: Tensor, a: Tensor, b: Tensor,
                      reg: float, tau: tuple[float, float]) -> float:
    """The largest residual of ``log u = f0 (log a - log K v)`` and ``log v = f1 (log b -
    log K^T u)``, ``f = tau / (tau + reg)`` (1 for an infinite tau), ``log K = -cn / reg +
    log a + log b``, in the log domain (no underflow); nan for non-finite potentials."""
    f0, f1 = (1.0 if math.isinf(t) else t / (t + reg) for t in tau)
    log_k = -cn / reg + a.log()[:, None] + b.log()[None, :]
    ru = logu - f0 * (a.log() - torch.logsumexp(log_k + logv[None, :], 1))
    rv = logv - f1 * (b.log() - torch.logsumexp(log_k + logu[:, None], 0))
    worst = torch.maximum(ru.abs().max(), rv.abs().max())
    return float(worst) if bool(torch.isfinite(worst)) else math.nan


_EMD_FAILED = "Error in the EMD resolution"


class PartialOTCoupling(Coupling):
    r"""Minibatch partial optimal transport: only a fraction ``m`` of the mass is moved,

    .. math::
        \pi = \arg\min_{\pi \ge 0,\ \pi 1 \le a,\ \pi^T 1 \le b,\ 1^T \pi 1 = m}
        \langle \pi, C \rangle, \qquad a = 1/N,\ b = 1/M,

    so the share ``1 - m`` of each batch that is costliest to transport (outliers, or data
    of a mode the other batch lacks) is left out (Caffarelli & McCann 2010; Chapel, Alaya &
    Gasso 2020; minibatches: Nguyen et al. 2022). Solved exactly by POT's
    ``ot.partial.partial_wasserstein``: the network simplex (``ot.emd``, CPU) on the problem
    extended by a dummy point on each side that absorbs the mass left out. For ``N == M``
    and ``m N`` an integer the optimum is a vertex: ``m N`` pairs of mass ``1/N``, a partial
    permutation (every point used at most once).

    Points left out: an x0 or x1 with no transported mass takes part in no pair;
    :class:`RelaxedCouplingResult` lists them (``unmatched0``, ``unmatched1``). The pairs are
    ``n_pairs`` entries of :math:`\pi / m` by systematic sampling
    (:mod:`flowsolve.training.relaxed_couplings`): by default ``M``, so that a training batch
    keeps its size and each transported pair appears about ``1 / m`` times;
    ``n_pairs = m N`` (``N == M``, an integer) gives each transported pair exactly once.
    The plan is moved to the inputs' device for the draw (the generator must be there).

    The iteration limit is :class:`~flowsolve.training.ot_couplings.OTCoupling`'s,
    ``max(1e5, (N + 1)(M + 1))`` by default (``nb_dummies`` dummy points: ``N +
    nb_dummies``); when it is hit (POT's warning "numItermax reached", after which POT
    raises) a :class:`~flowsolve.training.coupling_base.CouplingWarning` is issued once per
    object and the solve is repeated with a 100x limit; if that fails too, or POT fails
    otherwise,
    :class:`~flowsolve.training.coupling_base.CouplingError` with POT's words. ``m = 1``
    is exact OT (the optimal cost of :class:`~flowsolve.training.ot_couplings.OTCoupling`
    ``("exact")``).

    Args:
        mass_fraction: ``m`` in ``(0, 1]``, the transported mass.
        cost: a name in :data:`~flowsolve.training.coupling_base.COSTS` or a callable, as
            :class:`~flowsolve.training.ot_couplings.OTCoupling`'s.
        max_iter: the network simplex's iteration limit.
        n_pairs: number of pairs drawn; ``None``: ``M``.
        nb_dummies: dummy points that share the mass left out (POT's ``nb_dummies``; more
            can help the network simplex on large batches).

    References: Caffarelli & McCann, "Free boundaries in optimal transport and
    Monge-Ampère obstacle problems", Ann. Math. 2010; Chapel, Alaya & Gasso, "Partial
    optimal transport with applications on positive-unlabeled learning", NeurIPS 2020;
    Nguyen, Nguyen, Pham, Le, Bui & Ho, "Improving mini-batch optimal transport via
    partial transportation", ICML 2022.
    """

    def __init__(self, mass_fraction: float = 0.9, *, cost: str | CostFn = "sqeuclidean",
                 max_iter: int | None = None, n_pairs: int | None = None,
                 nb_dummies: int = 1):
        _check_options(cost, None, max_iter, n_pairs)
        if isinstance(mass_fraction, bool) or not (
                isinstance(mass_fraction, (int, float)) and 0 < mass_fraction <= 1):
            raise ValueError(f"mass_fraction must be a number in (0, 1] (1: exact OT); got "
                             f"{mass_fraction!r}")
        if isinstance(nb_dummies, bool) or not (isinstance(nb_dummies, int) and nb_dummies >= 1):
            raise ValueError(f"nb_dummies must be a positive int; got {nb_dummies!r}")
        self.mass_fraction, self.cost, self.max_iter = float(mass_fraction), cost, max_iter
        self.n_pairs, self.nb_dummies = n_pairs, nb_dummies

    def plan(self, x0, x1, *extras, generator=None) -> RelaxedCouplingResult:
        x0f, x1f = flat_batches(x0, x1, extras, generator)
        dtype = _reported_dtype(x0f, x1f)
        c = cost_matrix(self.cost, x0f, x1f)
        n, m = c.shape
        c_np = np.ascontiguousarray(c.to("cpu", torch.float64).numpy())
        a, b = np.full(n, 1.0 / n), np.full(m, 1.0 / m)
        mass = min(self.mass_fraction, float(a.sum()), float(b.sum()))  # 1: rounding of sums
        limit = self.max_iter or max(100_000, (n + self.nb_dummies) * (m + self.nb_dummies))
        plan, failure = self._solve(a, b, c_np, mass, limit)
        status = "optimal"
        if failure == "max_iter":
            self._warn_once("emd", f"ot.partial.partial_wasserstein stopped at max_iter="
                            f"{limit} before optimality on a {n}x{m} batch; re-solving with "
                            f"max_iter={100 * limit}. Pass a larger max_iter to avoid the "
                            "repeated solve.")
            limit *= 100
            plan, failure = self._solve(a, b, c_np, mass, limit)
            status = "optimal_after_retry"
        if failure is not None:
            what = ("the network simplex stopped before optimality (POT: numItermax reached)"
                    if failure == "max_iter" else failure)
            raise CouplingError(f"ot.partial.partial_wasserstein failed on a {n}x{m} batch "
                                f"with max_iter={limit}, mass_fraction={self.mass_fraction:g}: "
                                f"{what}. Increase max_iter (or nb_dummies).")
        rows, cols = plan.sum(1), plan.sum(0)
        excess = float(np.clip(rows - a, 0, None).sum() + np.clip(cols - b, 0, None).sum()
                       + abs(plan.sum() - mass))
        plan_t = torch.from_numpy(plan).to(c.device)
        i0, i1 = _draw(plan_t, self.n_pairs or m, generator)
        # network-simplex flows are exact zeros off the support; 1e-9 of a point's mass
        # leaves room for the rounding of the ones that sum to it
        unmatched0 = torch.from_numpy(np.flatnonzero(rows <= 1e-9 / n)).to(c.device)
        unmatched1 = torch.from_numpy(np.flatnonzero(cols <= 1e-9 / m)).to(c.device)
        return RelaxedCouplingResult(
            i0, i1, plan_t, torch.tensor(float((plan * c_np).sum()), dtype=dtype,
                                         device=c.device),
            "partial_exact", status, None, excess, None, "network_simplex",
            mass=float(plan.sum()), marginal_deviation=(float(np.abs(rows - a).sum()),
                                                        float(np.abs(cols - b).sum())),
            unmatched0=unmatched0, unmatched1=unmatched1)

    def _solve(self, a: np.ndarray, b: np.ndarray, c: np.ndarray, mass: float,
               limit: int) -> tuple[np.ndarray | None, str | None]:
        """POT's exact partial plan and None, or None and what failed: ``"max_iter"`` (its
        warning "numItermax reached") or POT's own words."""
        plan, messages, err = call_pot(ot.partial.partial_wasserstein, a, b, c, m=mass,
                                       nb_dummies=self.nb_dummies, numItermax=limit,
                                       catch=(ValueError,))
        if err is None:
            return plan, None
        if not str(err).startswith(_EMD_FAILED):  # not a failed solve: POT refused the input
            raise err
        if any("numItermax reached" in s for s in messages):
            return None, "max_iter"
        return None, f"{err} ({'; '.join(messages) or 'no warning'})"
