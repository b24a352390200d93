r"""What every coupling shares: the :class:`Coupling` interface, :class:`CouplingResult`, the
errors, the two couplings that solve nothing (independent, paired), and the checks of the
points and of the cost matrix.

A coupling is a data-pipeline step: it needs no model, so it can run in DataLoader workers
(e.g. in a ``collate_fn``) and overlap the CPU solve of exact OT with the training step.
Every coupling is a small picklable object with two calls:

* ``x0c, x1c, *extras_c = coupling(x0, x1, *extras, generator=g)`` -- the paired batches.
  Per-sample tensors in ``extras`` (labels, conditions, weights; first dim ``M``) belong to
  ``x1`` and travel with their sample.
* ``res = coupling.plan(x0, x1, *extras, generator=g)`` -- a :class:`CouplingResult`: the
  index pairs ``(i0, i1)``, the plan, its cost and the solver's status. Use
  ``res.take0(y0)`` for per-sample tensors that belong to ``x0``.

The couplings that solve a transport problem live in
:mod:`flowsolve.training.ot_couplings` (exact and entropic OT),
:mod:`flowsolve.training.relaxed_couplings` (unbalanced and partial OT) and
:mod:`flowsolve.training.conditional_couplings` (OT within classes or under a condition
cost); :mod:`flowsolve.training.couplings` names them all.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._core.checks import check_generator

__all__ = ["COSTS", "Coupling", "CouplingError", "CouplingResult", "CouplingWarning",
           "CostFn", "IndependentCoupling", "PairedCoupling", "check_choice", "check_points",
           "check_positive", "cost_matrix", "dtype_name", "flat_batches"]

CostFn = Callable[[Tensor, Tensor], Tensor]

#: cost name -> ``c(x0, x1)`` on flattened batches ``(N, D), (M, D) -> (N, M)``.
COSTS: dict[str, CostFn] = {
    "sqeuclidean": lambda a, b: torch.cdist(a, b).square(),
    "euclidean": lambda a, b: torch.cdist(a, b),
}


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
            (:class:`~flowsolve.training.conditional_couplings.ClassConditionalOT` with
            ``y0``: ``a_i = (M_c / M) / N_c``).
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


def flat_batches(x0: Tensor, x1: Tensor, extras: tuple,
                 generator=None) -> tuple[Tensor, Tensor]:
    """``x0`` ``(N, *event_shape)`` and ``x1`` ``(M, *event_shape)`` detached and flattened to
    ``(N, D)`` and ``(M, D)`` (``(B,)``: B scalar samples, ``D = 1``), after checking them,
    the per-sample ``extras`` of x1 (first dim M) and the generator."""
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


def check_points(x0f: Tensor, x1f: Tensor) -> None:
    """Refuse non-finite points, counted per side (reads two counts: call it on failure)."""
    n0, n1 = (int((~torch.isfinite(x)).sum()) for x in (x0f, x1f))
    if n0 or n1:
        def entries(k: int) -> str:
            return f"{k} non-finite {'entry' if k == 1 else 'entries'}"
        got = (f"{entries(n0)} in x0 and {n1} in x1" if n0 and n1 else
               f"{entries(n0 or n1)} in {'x0' if n0 else 'x1'} (none in {'x1' if n0 else 'x0'})")
        raise ValueError(f"x0 and x1 must be finite; got {got}")


def cost_matrix(cost: str | CostFn, x0f: Tensor, x1f: Tensor) -> Tensor:
    """The cost matrix ``C_ij = c(x0_i, x1_j)`` ``(N, M)`` of flattened batches, in float64
    (MPS, which has none: float32). A named cost (:data:`COSTS`) is computed in float64: in
    float32, ``torch.cdist``'s matmul route (``|a|^2 + |b|^2 - 2 a.b``) cancels away from
    the origin: batches offset by 300 (N = 256, d = 2) were paired 1.3% above the optimum,
    with a reported cost below it. A callable cost gets the inputs at their own dtype
    (promoted to at least float32), since it may hold a model of that dtype (a learned
    feature map: float64 inputs to a float32 ``nn.Module`` fail), and is called without
    autograd (a coupling needs no gradients); its result is converted to float64 for the
    solve. A matrix with a non-finite entry is refused (ValueError) saying why: non-finite
    points (counted in x0 and in x1), else an overflow of finite points (a named cost),
    else a callable cost's own non-finite result."""
    solve = torch.float32 if x0f.device.type == "mps" else torch.float64
    if isinstance(cost, str):
        c = COSTS[cost](x0f.to(solve), x1f.to(solve))
    else:
        given = torch.promote_types(torch.promote_types(x0f.dtype, x1f.dtype), torch.float32)
        with torch.no_grad():
            c = cost(x0f.to(given), x1f.to(given))
        if not torch.is_tensor(c):
            raise TypeError(f"cost must return a tensor (N, M); got {type(c).__name__}")
    if c.shape != (x0f.shape[0], x1f.shape[0]):
        raise ValueError(f"cost must return ({x0f.shape[0]}, {x1f.shape[0]}); got "
                         f"{tuple(c.shape)}")
    if not bool(torch.isfinite(c).all()):  # one sync; Sinkhorn's own checks sync too
        _refuse_non_finite(cost, c, x0f, x1f)
    return c.to(solve)


def _refuse_non_finite(cost: str | CostFn, c: Tensor, x0f: Tensor, x1f: Tensor) -> None:
    """Say why the cost matrix ``c`` is not finite: non-finite points (counted per side),
    else an overflow of finite points (a named cost) or a callable cost's own result."""
    check_points(x0f, x1f)
    n, m = c.shape
    k = int((~torch.isfinite(c)).sum())
    big = max(float(x0f.abs().max()), float(x1f.abs().max()))
    if isinstance(cost, str):
        what = "squared distances" if cost == "sqeuclidean" else \
            "squared differences (inside the distance)"
        raise ValueError(
            f"the cost matrix overflowed: x0 and x1 are finite (largest magnitude "
            f"{big:.3g}), but {k} of the {n}x{m} {cost!r} costs are not: the {what} "
            f"of points this far apart exceed the range of {dtype_name(c.dtype)} (largest "
            f"{torch.finfo(c.dtype).max:.3g}). Rescale the data (e.g. standardise x0 and "
            "x1, or divide both by a common scale) before coupling")
    raise ValueError(
        f"cost returned {k} non-finite entries (of {n}x{m}) on finite x0 and x1 (largest "
        f"magnitude {big:.3g}; returned as {dtype_name(c.dtype)}): the cost function overflowed "
        "or failed there. Rescale the data or fix the cost function")


def dtype_name(dtype: torch.dtype) -> str:
    """``"float64"`` for ``torch.float64``."""
    return str(dtype).removeprefix("torch.")


def check_choice(name: str, value, accepted: tuple) -> None:
    """ValueError naming ``name``, the value and the accepted ones if ``value`` is not one."""
    if value not in accepted:
        raise ValueError(f"{name} must be one of {accepted}; got {value!r}")


def check_positive(name: str, value) -> float:
    """``float(value)``; ValueError naming ``name`` unless it is a positive finite number."""
    if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite number; got {value!r}")
    return float(value)


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

    def _warn_once(self, key: str, message: str) -> None:
        """A :class:`CouplingWarning`, issued once per coupling object and ``key``."""
        warned = self.__dict__.setdefault("_warned", set())
        if key not in warned:
            warned.add(key)
            warnings.warn(message, CouplingWarning, stacklevel=2)


class IndependentCoupling(Coupling):
    """``pi = mu0 x mu1``: x1[j] with x0[j] (the batches are independent draws). With a
    ``generator``, x0 is shuffled first, so the pairing is independent even when x0's
    order carries information. Needs ``N >= M``; the first M (shuffled) x0 are used."""

    def plan(self, x0, x1, *extras, generator=None):
        flat_batches(x0, x1, extras, generator)
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
        flat_batches(x0, x1, extras, generator)
        if x0.shape[0] != x1.shape[0]:
            raise ValueError(f"PairedCoupling needs x0 and x1 of one batch size; got "
                             f"{x0.shape[0]} and {x1.shape[0]}")
        idx = torch.arange(x1.shape[0], device=x1.device)
        return CouplingResult(idx, idx, method="paired", kept="x1")
