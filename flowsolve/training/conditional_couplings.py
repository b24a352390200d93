r"""Couplings that respect conditions: optimal transport within each class
(:class:`ClassConditionalOT`) and optimal transport of (point, condition) pairs under a cost
augmented by the distance of the conditions (:class:`ConditionalOT`, for continuous, vector
or class conditions), with the fraction of pairs that cross conditions measured.

Both are called as ``coupling(x0, x1, y1, *extras, y0=None, generator=g)``: the first extra
is the condition ``y1`` of x1 (so ``x0c, x1c, y1c = coupling(x0, x1, y1)`` has the shape of
every other coupling), ``y0`` the conditions of a conditioned source (passed by
:class:`~flowsolve.training.pipeline.BatchProducer` for a labelled source).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from .coupling_base import CostFn, CouplingResult, check_points, flat_batches
from .ot_couplings import OTCoupling

__all__ = ["ClassConditionalOT", "ConditionalCouplingResult", "ConditionalOT"]


class ClassConditionalOT(OTCoupling):
    """Optimal transport within each class: x0 is paired only with x1 of the same label.

    Called as ``coupling(x0, x1, y1, *extras, y0=None, generator=g)``: the first extra is
    the label ``y1`` ``(M,)`` of x1 (so ``x0c, x1c, y1c = coupling(x0, x1, y1)`` has the
    shape of every other coupling). Without ``y0`` the source is unlabelled noise (needs
    ``N == M``): it is split into groups of the class counts of ``y1`` -- at random with
    ``generator``, else in order, which is random for i.i.d. draws -- and each group is
    transported to its class. With ``y0`` ``(N,)`` the groups are the source classes (the
    label sets must agree); :class:`~flowsolve.training.pipeline.BatchProducer` (so
    :func:`~flowsolve.training.loop.train`) passes a labelled source's labels as ``y0``.
    Within a class this is :class:`~flowsolve.training.ot_couplings.OTCoupling` with the
    same arguments (exact OT is optimal per class); the plan is block diagonal, class c
    carrying mass ``M_c / M``. Its column marginal is uniform, ``1/M``; its row marginal is
    ``a_i = (M_c / M) / N_c`` for x0[i] in class c, uniform only when the class proportions
    of ``y0`` and ``y1`` agree (always without ``y0``), and ``marginal_error`` is measured
    against these ``a`` and ``b`` (a ``y0`` of other proportions cannot give a uniform row
    marginal without crossing classes). Avoids the cross-class pairs that hurt conditional
    generation (torchcfm issue #117; C^2OT, arXiv 2503.10636).
    """

    def plan(self, x0, x1, y1=None, *extras, y0=None, generator=None):
        if y1 is None:
            raise TypeError("ClassConditionalOT needs the labels of x1: coupling(x0, x1, y1)")
        x0f, x1f = flat_batches(x0, x1, (y1, *extras), generator)
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
                check_points(x0f, x1f)  # non-finite points: counted over the whole batches
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


@dataclass(frozen=True)
class ConditionalCouplingResult(CouplingResult):
    r"""The pairs of :class:`ConditionalOT` (a
    :class:`~flowsolve.training.coupling_base.CouplingResult`) and how far apart their
    conditions are. ``cost`` is :math:`\langle \pi, C + \lambda D \rangle`, the cost the plan
    minimises, and ``point_cost`` its part :math:`\langle \pi, C \rangle` (the points alone).

    Attributes:
        crossing: the fraction of pairs whose labels differ,
            ``mean_k 1[y0[i0[k]] != y1[i1[k]]]`` (integer or bool labels); ``None`` for
            float conditions.
        condition_distance: the mean distance of the pairs' conditions: Euclidean,
            ``mean_k |y0[i0[k]] - y1[i1[k]]|``, for float conditions; the discrete metric
            ``1[y0 != y1]`` for labels (then equal to ``crossing``).
        point_cost: 0-d :math:`\langle \pi, C \rangle` without the condition term, in the
            dtype of ``cost``.
        cost_weight: the :math:`\lambda` the plan was solved with.
    """

    crossing: float | None = None
    condition_distance: float | None = None
    point_cost: Tensor | None = None
    cost_weight: float | None = None


def _is_label(y: Tensor) -> bool:
    return not (torch.is_floating_point(y) or torch.is_complex(y))


class ConditionalOT(OTCoupling):
    r"""Optimal transport of (point, condition) pairs: x0 with its condition y0 to x1 with
    its condition y1, at the cost

    .. math::
        C^\lambda_{ij} = c(x_{0,i}, x_{1,j}) + \lambda\, D(y_{0,i}, y_{1,j}),

    ``c`` the point cost (``cost``, squared Euclidean by default) and ``D`` the condition
    cost: :math:`|y_0 - y_1|^2` (squared Euclidean over the flattened condition) for float
    conditions ``(M,)`` or ``(M, *shape)``, the discrete metric :math:`1[y_0 \ne y_1]` for
    integer or bool class labels ``(M,)`` (unordered classes: half the squared distance of
    their one-hot codes). The plan is :class:`~flowsolve.training.ot_couplings.OTCoupling`'s
    on :math:`C^\lambda`, with the same arguments, checks, retries, fallbacks and draws
    (Sinkhorn's ``normalize`` divides :math:`C^\lambda` as a whole).

    Called as ``coupling(x0, x1, y1, *extras, y0=None, generator=g)``. Without ``y0`` the
    source carries no condition (noise; needs ``N == M``) and is given the batch's: ``y0``
    is ``y1`` in a random order drawn with ``generator`` (else in order, which is random
    for i.i.d. draws), so that (x0, y0) is a draw of noise times the conditions' law, the
    source of conditional OT flow matching (Chemseddine et al. 2024; Kerrigan et al. 2024).
    With ``y0`` ``(N, *shape)`` those conditions are used (labels with labels, floats with
    floats).

    Limits: :math:`\lambda = 0` is :class:`~flowsolve.training.ot_couplings.OTCoupling`
    (the same plan and pairs); as :math:`\lambda \to \infty` pairs of different conditions
    are priced out: with labels and a ``y0`` of the same class counts as ``y1``, exact OT
    then gives :class:`ClassConditionalOT`'s pairs (a permutation that crosses classes
    crosses at least twice, so :math:`\lambda > N (\max C - \min C) / 2` is enough; far
    less usually is); with distinct float conditions and no ``y0`` the limit pairs
    each x0 with the x1 whose condition it was given, an independent coupling. A finite
    :math:`\lambda` trades the two costs; :class:`ConditionalCouplingResult` measures it
    (``crossing``: the fraction of pairs that cross labels; ``condition_distance``).

    Args:
        cost_weight: :math:`\lambda \ge 0`, finite (the infinite limit for labels is
            :class:`ClassConditionalOT`).
        method, cost, reg, normalize, max_iter, tol, keep, fallback, domain: as
            :class:`~flowsolve.training.ot_couplings.OTCoupling`.

    Non-finite float conditions are refused (ValueError, counted per side), and so is a
    :math:`\lambda D` that overflows (reduce ``cost_weight`` or rescale the conditions).

    References: Chemseddine, Hagemann, Steidl & Wald, "Conditional Wasserstein distances
    with applications in Bayesian OT flow matching", 2024 (the cost :math:`c + \beta D`,
    :math:`\beta \to \infty`); Kerrigan, Migliorini & Smyth, "Dynamic conditional optimal
    transport through simulation-free flows", NeurIPS 2024.
    """

    def __init__(self, cost_weight: float, method: str = "exact", *,
                 cost: str | CostFn = "sqeuclidean", reg: float = 0.05,
                 normalize: str | None = "mean", max_iter: int | None = None,
                 tol: float = 1e-4, keep: str = "x1", fallback: str | None = "exact",
                 domain: str = "auto"):
        if isinstance(cost_weight, bool) or not (
                isinstance(cost_weight, (int, float)) and cost_weight >= 0
                and math.isfinite(cost_weight)):
            raise ValueError(f"cost_weight must be a finite number >= 0 (0: OTCoupling's "
                             f"pairs; the infinite limit with class labels is "
                             f"ClassConditionalOT); got {cost_weight!r}")
        super().__init__(method, cost=cost, reg=reg, normalize=normalize, max_iter=max_iter,
                         tol=tol, keep=keep, fallback=fallback, domain=domain)
        self.cost_weight = float(cost_weight)

    def plan(self, x0, x1, y1=None, *extras, y0=None, generator=None):
        if y1 is None:
            raise TypeError("ConditionalOT needs the conditions of x1: coupling(x0, x1, y1)")
        x0f, x1f = flat_batches(x0, x1, (y1, *extras), generator)
        n, m = x0f.shape[0], x1f.shape[0]
        labels = _is_label(y1)
        if labels and y1.dim() != 1:
            raise ValueError(f"integer or bool labels y1 must be shaped (M,) = ({m},); got "
                             f"{tuple(y1.shape)} (float conditions may have any shape)")
        if y0 is None:
            if n != m:
                raise ValueError(f"without y0 (a source without conditions), x0 and x1 need "
                                 f"one batch size; got N={n}, M={m}")
            y0 = y1 if generator is None else y1[torch.randperm(
                m, generator=generator, device=generator.device).to(y1.device)]
        elif not torch.is_tensor(y0) or y0.shape != (n, *y1.shape[1:]) or \
                _is_label(y0) != labels:
            kind = "integer or bool labels" if labels else "floating"
            raise ValueError(f"y0 must be a tensor of {kind} conditions shaped "
                             f"{(n, *y1.shape[1:])} (N and y1's condition shape); got "
                             f"{getattr(y0, 'dtype', type(y0).__name__)} "
                             f"{tuple(getattr(y0, 'shape', ()))}")
        y0 = y0.to(y1.device)
        c = self._cost(x0f, x1f)  # refuses non-finite points
        d = self._condition_cost(y0, y1, c)
        total = c + self.cost_weight * d if self.cost_weight else c
        if not bool(torch.isfinite(total).all()):
            raise ValueError(f"the conditional cost c + cost_weight * D overflowed: "
                             f"cost_weight={self.cost_weight:g} times condition costs up to "
                             f"{float(d.max()):.3g} exceed the range of the "
                             f"{str(c.dtype).removeprefix('torch.')} cost. Reduce cost_weight "
                             "or rescale the conditions")
        dtype = torch.promote_types(torch.promote_types(x0f.dtype, x1f.dtype), torch.float32)
        if self.method == "exact":
            res = self._exact(total, generator, dtype)
        else:
            res = self._sinkhorn(total, generator, dtype)
        i0, i1 = res.i0.to(y0.device), res.i1.to(y1.device)
        if labels:
            distance = float((y0[i0] != y1[i1]).to(torch.float64).mean())
        else:
            distance = float((y0[i0] - y1[i1]).reshape(i0.shape[0], -1).to(c.dtype)
                             .norm(dim=1).mean())
        point_cost = (res.plan * c.to(res.plan.device, res.plan.dtype)).sum().to(dtype)
        return ConditionalCouplingResult(
            **{f.name: getattr(res, f.name) for f in fields(CouplingResult)},
            crossing=distance if labels else None, condition_distance=distance,
            point_cost=point_cost.to(res.cost.device), cost_weight=self.cost_weight)

    @staticmethod
    def _condition_cost(y0: Tensor, y1: Tensor, c: Tensor) -> Tensor:
        """``D (N, M)`` in ``c``'s dtype and device: ``1[y0 != y1]`` for labels, else the
        squared Euclidean distance of the flattened conditions (non-finite ones refused)."""
        if _is_label(y1):
            return (y0[:, None] != y1[None, :]).to(c.device, c.dtype)
        z0, z1 = (y.detach().reshape(y.shape[0], -1).to(c.device, c.dtype) for y in (y0, y1))
        bad0, bad1 = (int((~torch.isfinite(z)).sum()) for z in (z0, z1))
        if bad0 or bad1:
            raise ValueError(f"the conditions must be finite; got {bad0} non-finite entries "
                             f"in y0 and {bad1} in y1")
        # the differences themselves, not |a|^2 + |b|^2 - 2 a.b, which cancels
        return torch.cdist(z0, z1, compute_mode="donot_use_mm_for_euclid_dist").square()
