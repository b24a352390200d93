r"""Adaptive Runge-Kutta with one step size per sample: solves whose answer for a sample does
not depend on the rest of its batch.

torchdiffeq's adaptive solvers control one step size for the whole batch through the RMS
norm of the whole state, so a point's solution (and its log-likelihood) depends on the
points that share its batch, and the stiffest point sets the step for all. Here every
sample ``i`` has its own time ``t_i`` and step ``h_i``. Its error ratio is taken over its
own entries ``j`` only,

    r_i = sqrt(mean_j (e_ij / (atol + rtol max(|y_ij|, |y'_ij|)))^2),

with ``e`` the embedded error estimate of the step ``y -> y'``; the step is accepted when
``r_i <= 1`` and the next one is ``h_i min(ifactor, max(safety r_i^(-1/q), dfactor))``
(``dfactor`` only after a rejection, ``ifactor`` when ``r_i = 0``, ``q`` the method's
order). These are torchdiffeq's rules, and its initial step (Hairer, Norsett & Wanner,
"Solving ODEs I", II.4), applied row by row: a sample takes the steps torchdiffeq takes
when it solves that sample alone. The tableaus are torchdiffeq's too (read from its
classes by :mod:`flowsolve.ode.backends`); every one of them is FSAL (first same as last).

The samples step in lockstep, one batched field call per stage, each with its own
``(t_i, h_i)``: the field receives a ``(b,)`` time. A sample that reaches ``t1`` leaves the
batch (the live rows are compacted), so later calls evaluate only the samples still
running, and ``nfe_per_sample`` counts the calls each sample took part in. A field that
holds per-sample data (labels, Hutchinson probes) follows the compaction through
``rows(index)`` (:func:`~flowsolve._core.types.restrict_rows`).

Why not torchode, which also steps per sample in PyTorch: it keeps finished samples in the
batch (every call evaluates all ``B`` rows until the last one finishes: 25-52 % more
sample-evaluations than this loop on the same systems, and level or up to 24 % slower), its
solver cannot be scripted around an autograd divergence, and it would add torchode,
torchtyping and a pinned typeguard < 3 (``benchmarks/bench_per_sample.py``,
``docs/benchmarks.md``).

The loop reads the device once per attempted step (one small tensor of flags: which rows
finished or reached an output time, the budget, the finiteness of the step, a step that no
longer moves t): per-sample control is not synchronisation-free.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .._core.counting import ARGUMENT_ORDER, check_like
from .._core.errors import IntegrationError, NonFiniteStateError
from .._core.types import Field, restrict_rows

__all__ = ["EmbeddedTableau", "PerSampleResult", "PerSampleLoop", "STEP_CONTROLS"]

PER_SAMPLE_TIME = (
    "step_control='per_sample' calls the field with a (B,) time, one per sample: a field "
    "written for a 0-d time must broadcast it over the batch (e.g. t.reshape(-1, 1) * x, not "
    "t * x), as flowsolve's fields do")

STEP_CONTROLS = ("shared", "per_sample")
"""Values of ``step_control=``: one step size for the batch (the library's), or one per
sample (:class:`PerSampleLoop`)."""


@dataclass(frozen=True)
class EmbeddedTableau:
    r"""An explicit Runge-Kutta pair in FSAL form: stages ``k_i = u(y + h sum_{j<i} a_ij k_j,
    t + c_i h)``, solution ``y' = y + h sum_i b_i k_i`` (equal to the last stage's argument,
    ``c_s = 1``, ``b_s = 0``: the last stage is ``u(y', t + h)``, the next step's first) and
    error estimate ``e = h sum_i e_i k_i``.

    ``order`` is the exponent of the step-size controller (torchdiffeq's class attribute).
    ValueError if the tableau is not FSAL or its rows do not sum to ``c``.
    """

    name: str
    order: int
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    e: tuple[float, ...]

    def __post_init__(self):
        s = len(self.c)
        shapes_ok = (len(self.a) == s and len(self.b) == s and len(self.e) == s
                     and all(len(r) == i for i, r in enumerate(self.a)))
        if not shapes_ok:
            raise ValueError(f"tableau {self.name!r}: need s entries in c, b, e and row i of a "
                             f"with i entries; got c={self.c}, a={self.a}")
        fsal = (self.c[0] == 0 and self.c[-1] == 1 and self.b[-1] == 0
                and tuple(self.a[-1]) == tuple(self.b[:-1]))
        if not fsal:
            raise ValueError(f"tableau {self.name!r} is not FSAL (c_s = 1, b_s = 0, last row of "
                             "a = b): per-sample stepping reuses the last stage")
        for i, row in enumerate(self.a):
            if abs(sum(row) - self.c[i]) > 1e-12:
                raise ValueError(f"tableau {self.name!r}: row {i} of a sums to {sum(row)!r}, "
                                 f"not c[{i}] = {self.c[i]!r}")

    @property
    def stages(self) -> int:
        return len(self.c)


@dataclass(frozen=True, eq=False)
class PerSampleResult:
    """What :class:`PerSampleLoop` returns for a batch of ``B`` samples.

    Attributes:
        x: the states at ``t1``, ``(B, *event_shape)``.
        trajectory: the states at the output times, ``(T, B, *event_shape)``, or None.
        calls: batched field calls (each on the samples still running).
        nfe_per_sample: ``(B,)`` int64 (CPU): the calls each sample took part in.
        accepted, rejected: ``(B,)`` int64 (CPU): each sample's accepted and rejected steps.
    """

    x: Tensor
    trajectory: Tensor | None
    calls: int
    nfe_per_sample: Tensor
    accepted: Tensor
    rejected: Tensor


def _rms(v: Tensor) -> Tensor:
    """Row-wise RMS norm in float64, ``(b,)``."""
    return v.abs().pow(2).mean(1).to(torch.float64).sqrt()


def _combine(coefficients: Sequence[float], ks: list[Tensor]) -> Tensor:
    acc = None
    for c, k in zip(coefficients, ks, strict=False):
        if c != 0.0:
            acc = k * c if acc is None else torch.add(acc, k, alpha=c)
    return torch.zeros_like(ks[0]) if acc is None else acc


class PerSampleLoop:
    """One adaptive solve with a step size per sample (see the module's docstring).

    Args:
        tableau: the embedded pair.
        solver: its registered name (for messages).
        rtol, atol: tolerances, per sample.
        max_steps: budget of attempted steps per sample (IntegrationError ``"max_steps"``
            naming the sample).
        safety, ifactor, dfactor: the controller's constants (torchdiffeq's defaults).
        first_step: the first step of every sample (None: the initial-step rule per sample).
        max_step: the largest step.
    """

    def __init__(self, tableau: EmbeddedTableau, solver: str, *, rtol: float, atol: float,
                 max_steps: int, safety: float = 0.9, ifactor: float = 10.0,
                 dfactor: float = 0.2, first_step: float | None = None,
                 max_step: float = math.inf):
        self.tableau, self.solver = tableau, solver
        self.rtol, self.atol, self.max_steps = float(rtol), float(atol), int(max_steps)
        self.safety, self.ifactor, self.dfactor = float(safety), float(ifactor), float(dfactor)
        self.first_step = None if first_step is None else float(first_step)
        self.max_step = float(max_step)

    # -- one batched evaluation of the live rows ---------------------------------------------
    def _call(self, y: Tensor, s: Tensor) -> Tensor:
        """``d u(y, d s)`` for the live rows (time run forwards as ``s = d t``)."""
        x = y.reshape(y.shape[0], *self._event)
        t = (s * self._d).to(y.dtype)
        try:
            u = self._field(x, t)
            check_like(u, x)
        except (TypeError, ValueError, RuntimeError, IndexError) as err:
            if self.calls == 0:
                err.add_note(ARGUMENT_ORDER)
            err.add_note(PER_SAMPLE_TIME)
            raise
        self.calls += 1
        self._nfe += 1
        if self._unverified and x.shape[0] > 1 and bool((t != t[0]).any()):
            self._verify_first_row(x, t, u)
        u = u.reshape(y.shape)
        return u if self._d > 0 else -u

    def _verify_first_row(self, x: Tensor, t: Tensor, u: Tensor) -> None:
        """The first row of a call with distinct times, evaluated alone with a 0-d time, must
        agree: a field written for one time (``t * x`` with ``x`` ``(b, d)``) broadcasts a
        ``(b,)`` time over the wrong axis when ``b`` equals the last dim, silently. One extra
        single-row call (in ``calls``, not in any sample's NFE) whenever the batch of live
        rows changes."""
        with torch.no_grad():
            alone = restrict_rows(self._base, self._index[:1])(x[:1], t[0])
        self.calls += 1
        self._unverified = False
        want = u[:1].detach()
        scale = float(want.abs().max()) + float(alone.abs().max())
        if not torch.allclose(alone.to(want.dtype), want, rtol=1e-4, atol=1e-4 * scale + 1e-30):
            raise ValueError(
                f"the field gives sample {int(self._index[0])} another value when called with "
                f"a ({x.shape[0]},) time, one per sample, than with its own 0-d time "
                f"(largest difference {float((alone - want).abs().max()):.3g}). "
                + PER_SAMPLE_TIME)

    def _initial_step(self, y: Tensor, f0: Tensor, s: Tensor) -> Tensor:
        """Hairer-Norsett-Wanner's starting step, row by row (torchdiffeq's rule; one call)."""
        scale = self.atol + y.abs() * self.rtol
        d0, d1 = _rms(y / scale), _rms(f0 / scale)
        h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
        f1 = self._call(y + h0.to(y.dtype)[:, None] * f0, s + h0)
        d2 = _rms((f1 - f0) / scale) / h0
        tiny = (d1 <= 1e-15) & (d2 <= 1e-15)
        h1 = torch.where(tiny, torch.clamp(h0 * 1e-3, min=1e-6),
                         (0.01 / torch.maximum(d1, d2)) ** (1.0 / self.tableau.order))
        return torch.minimum(100 * h0, h1)

    def _fail(self, status: str, rows: Tensor, s: Tensor, detail: str) -> None:
        i = int(rows.nonzero()[0, 0])
        where = f"sample {int(self._index[i])} of {self._batch}"
        count = int(rows.sum())
        others = f" ({count} samples)" if count > 1 else ""
        t = float(s[i]) * self._d
        if status == "non_finite":
            raise NonFiniteStateError(self.solver, t, f"{where}{others}: {detail}")
        raise IntegrationError(status, self.solver, t, f"{where}{others}: {detail}")

    def __call__(self, field: Field, x0: Tensor, t0: float, t1: float,
                 out_times: Sequence[float] = ()) -> PerSampleResult:
        """Integrate every sample of ``x0`` from ``t0`` to ``t1``, keeping ``out_times``."""
        tab = self.tableau
        b_all = x0.shape[0]
        self._batch, self._event, self._d = b_all, x0.shape[1:], 1.0 if t1 > t0 else -1.0
        self._base, self.calls, self._unverified = field, 0, True
        d = self._d
        targets = [d * t for t in out_times if t != t0]
        if not targets or targets[-1] != d * t1:
            targets.append(d * t1)
        target_of = torch.tensor(targets, dtype=torch.float64, device=x0.device)
        keep_out = {k: i for i, t in enumerate(out_times) if t != t0
                    for k in [targets.index(d * t)]}
        saved: dict[int, list[tuple[Tensor, Tensor]]] = {i: [] for i in range(len(out_times))}
        if out_times and out_times[0] == t0:
            saved[0].append((torch.arange(b_all, device=x0.device), x0.flatten(1)))

        # the live rows; every array below is indexed like them
        self._index = torch.arange(b_all, device=x0.device)
        self._field = field
        self._nfe = torch.zeros(b_all, dtype=torch.int64, device=x0.device)
        y = x0.flatten(1)
        s = torch.full((b_all,), d * t0, dtype=torch.float64, device=x0.device)
        ptr = torch.zeros(b_all, dtype=torch.int64, device=x0.device)
        accepted = torch.zeros_like(ptr)
        rejected = torch.zeros_like(ptr)
        f0 = self._call(y, s)
        with torch.no_grad():
            h = (torch.full_like(s, self.first_step) if self.first_step is not None
                 else self._initial_step(y.detach(), f0.detach(), s))
        finals: list[tuple[Tensor, ...]] = []
        while y.shape[0]:
            h = h.clamp(max=self.max_step)
            target = target_of[ptr]
            s_new = s + h
            land = s_new > target
            s_new = torch.where(land, target, s_new)
            h = torch.where(land, target - s, h)
            stuck = s_new <= s  # the step no longer moves t (read with the other flags)
            hy = h.to(y.dtype)[:, None]
            ks = [f0]
            for i in range(1, tab.stages):
                y_i = y + hy * _combine(tab.a[i], ks)
                s_i = s_new if tab.c[i] == 1 else s + tab.c[i] * h
                ks.append(self._call(y_i, s_i))
            y_new = y_i
            err = hy * _combine(tab.e, ks)
            with torch.no_grad():
                tol = self.atol + self.rtol * torch.maximum(y.abs(), y_new.abs())
                ratio = _rms(err.detach() / tol)
                bad = ~torch.isfinite(ratio)
                accept = ratio <= 1
                exponent = -1.0 / tab.order
                shrink = torch.where(ratio < 1, torch.ones_like(ratio),
                                     torch.full_like(ratio, self.dfactor))
                factor = torch.clamp(torch.maximum(self.safety * ratio.pow(exponent), shrink),
                                     max=self.ifactor)
                factor = torch.where(ratio == 0, torch.full_like(ratio, self.ifactor), factor)
                h_next = h * factor
            s_old, h_old = s, h
            a2 = accept[:, None]
            y = torch.where(a2, y_new, y)
            f0 = torch.where(a2, ks[-1], f0)
            s = torch.where(accept, s_new, s)
            accepted = accepted + accept
            rejected = rejected + ~accept
            over = accepted + rejected > self.max_steps
            reached = accept & (s_new >= target)
            ptr = ptr + reached
            h = h_next
            done = ptr == len(targets)
            # the one host read of the step
            flags = torch.stack([stuck.any(), bad.any(), over.any(), done.any(),
                                 reached.any()]).tolist()
            if flags[0]:
                self._fail("step_underflow", stuck, s_old,
                           f"its step h={float(h_old[stuck][0]):.3g} no longer moves t")
            if flags[1]:
                self._fail("non_finite", bad, s_old, "the field or the state became "
                           "non-finite (inf or NaN) in a step from there")
            if flags[2]:
                self._fail("max_steps", over, s, f"the step budget max_steps={self.max_steps} "
                           "(attempted steps per sample) was used up")
            if keep_out and flags[4]:
                for k, i in keep_out.items():
                    rows = reached & (ptr == k + 1)
                    if bool(rows.any()):
                        saved[i].append((self._index[rows], y[rows]))
            if flags[3]:
                finals.append((self._index[done], y[done], self._nfe[done], accepted[done],
                               rejected[done]))
                live = ~done
                y, f0, s, h, ptr = y[live], f0[live], s[live], h[live], ptr[live]
                accepted, rejected = accepted[live], rejected[live]
                self._index, self._nfe = self._index[live], self._nfe[live]
                if y.shape[0]:
                    self._field = restrict_rows(self._base, self._index)
                    self._unverified = True
        index = torch.cat([f[0] for f in finals])
        order = torch.argsort(index)

        def gather(j: int) -> Tensor:
            return torch.cat([f[j] for f in finals])[order]

        x = gather(1).reshape(x0.shape)
        traj = None
        if out_times:
            states = []
            for i in range(len(out_times)):
                idx = torch.cat([p[0] for p in saved[i]])
                states.append(torch.cat([p[1] for p in saved[i]])[torch.argsort(idx)])
            traj = torch.stack(states).reshape(len(out_times), *x0.shape)
        return PerSampleResult(x, traj, self.calls, gather(2).cpu(), gather(3).cpu(),
                               gather(4).cpu())
