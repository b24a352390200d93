r"""The ODE systems handed to the solvers: ``dx/dt = u_t(x)`` for torchdiffeq and for scipy.

* :class:`ODESystem` is torchdiffeq's ``func(t, x)``. It counts field evaluations by
  wrapping the field (:class:`~flowsolve._core.counting.CountingField`, a Python int: no
  device work; its first output must have the state's shape and dtype), counts attempted /
  accepted / rejected steps through torchdiffeq's step callbacks, enforces a step budget,
  and records whether each evaluation was finite
  (:class:`~flowsolve._core.finite.FiniteRecord`: on an accelerator the record stays on the
  device and is read at a rejected step and once at the end, never per call). torchdiffeq
  integrates forwards (``t0 < t1``, noise to data) or backwards (``t0 > t1``, data to
  noise): it negates time internally and calls the system with the original ``t``, so the
  field always sees times in [0, 1].
* :class:`ScipySystem` is scipy's ``fun(t, y)`` on the flattened float64 state, with the
  sparsity of its Jacobian (samples evolve independently: block diagonal) for the implicit
  methods.

A solve that cannot finish raises :class:`~flowsolve._core.errors.IntegrationError` with a
``status`` (``"max_steps"``, ``"step_underflow"``, ``"failed"``) or
:class:`~flowsolve._core.errors.NonFiniteStateError` (``"non_finite"``), each naming the
solver and the time and saying what to change.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import sparse
from torch import Tensor, nn

from .._core.counting import CountingField
from .._core.errors import IntegrationError, NonFiniteStateError
from .._core.finite import FiniteRecord
from .._core.types import Field

__all__ = ["ODESystem", "ScipySystem"]


class ODESystem(nn.Module):
    r"""``dx/dt = u_t(x)`` as torchdiffeq's ``func(t, x)``, counting what the solver does.

    Args:
        field: the velocity ``(x, t) -> Tensor``, ``x`` ``(B, *event_shape)``; it receives a
            0-d ``t`` in ``x``'s dtype (torchdiffeq's adaptive solvers keep time in
            float64).
        solver: the solver's name, for messages.
        callbacks: torchdiffeq callbacks the solver supports (its ``valid_callbacks()``);
            only those are defined, so torchdiffeq never warns.
        max_steps: budget of attempted steps (accepted + rejected); exceeding it raises
            :class:`IntegrationError` with status ``"max_steps"``.
        span: ``(t_lo, t_hi)``: clamp the times the field sees to this interval. torchdiffeq's
            adaptive solvers probe the field once at ``t0 + h0`` to choose their first step
            (Hairer's ``h0 = 0.01 |x| / |u|`` is not bounded by the interval) and that probe
            may leave [0, 1]; the probe only sizes the first step, so clamping it is harmless
            (no step crosses ``t1`` when torchdiffeq is given ``step_t = [t1]``).

    Attributes:
        nfe: field evaluations (counted); attempted, accepted, rejected: steps.
    """

    def __init__(self, field: Field, solver: str, *, callbacks: frozenset[str] = frozenset(),
                 max_steps: int | None = None, span: tuple[float, float] | None = None):
        super().__init__()
        self.span = span
        self.counter = CountingField(field, like_input=True)
        if isinstance(field, nn.Module):
            self.model = field  # registered, so odeint_adjoint finds the parameters
        self.solver, self.max_steps = solver, max_steps
        self.attempted = self.accepted = self.rejected = 0
        self._last_t0: Tensor | None = None
        self._record: FiniteRecord | None = None
        if "callback_step" in callbacks:
            self.callback_step = self._on_step
        if "callback_accept_step" in callbacks:
            self.callback_accept_step = self._on_accept
        if "callback_reject_step" in callbacks:
            self.callback_reject_step = self._on_reject

    @property
    def nfe(self) -> int:
        return self.counter.nfe

    @property
    def t_last(self) -> float | None:
        """Start of the last step attempted (reads the device: for error messages)."""
        return None if self._last_t0 is None else float(self._last_t0)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        t = t.to(dtype=x.dtype)
        if self.span is not None:
            t = t.clamp(*self.span)
        u = self.counter(x, t)
        if self._record is None:
            self._record = FiniteRecord(u.device)
        if self._record.add(u, t):
            self.check_finite()
        return u

    def record_state(self, x: Tensor, t: float) -> None:
        """Add the state ``x`` at time ``t`` to the finiteness record (e.g. the final state)."""
        if self._record is None:
            self._record = FiniteRecord(x.device)
        self._record.add(x, t)

    def _on_step(self, t0: Tensor, y0: Tensor, dt: Tensor) -> None:
        self.attempted += 1
        self._last_t0 = t0
        if self.max_steps is not None and self.attempted > self.max_steps:
            self.check_finite()
            raise IntegrationError(
                "max_steps", self.solver, float(t0),
                f"the step budget max_steps={self.max_steps} was used up (accepted "
                f"{self.accepted}, rejected {self.rejected}, {self.nfe} evaluations)")

    def _on_accept(self, t0: Tensor, y0: Tensor, dt: Tensor) -> None:
        self.accepted += 1

    def _on_reject(self, t0: Tensor, y0: Tensor, dt: Tensor) -> None:
        self.rejected += 1
        self.check_finite()  # a non-finite stage is rejected forever: name it now

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteStateError` naming the first time an evaluation was not
        finite (one host synchronisation for all evaluations since the last check)."""
        if self._record is None:
            return
        first = self._record.first_bad()
        if first is not None:
            raise NonFiniteStateError(self.solver, float(first),
                                      "the field or the state became inf or NaN")
        self._record.clear()


class ScipySystem:
    r"""``dx/dt = u_t(x)`` as scipy's ``fun(t, y)``: ``y`` is the flattened state in float64,
    the field sees ``x`` reshaped to ``x0``'s shape, dtype and device. Evaluations are
    counted by wrapping the field and checked for inf / NaN on the host (where scipy
    needs them anyway) by the same :class:`~flowsolve._core.finite.FiniteRecord` as every solve."""

    def __init__(self, field: Field, x0: Tensor, solver: str):
        self.counter = CountingField(field, like_input=True)
        self.shape, self.dtype, self.device = x0.shape, x0.dtype, x0.device
        self.solver = solver
        self.finite = FiniteRecord(torch.device("cpu"))  # scipy reads every value anyway

    @property
    def nfe(self) -> int:
        return self.counter.nfe

    def __call__(self, t: float, y: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(np.ascontiguousarray(y)).reshape(self.shape)
        x = x.to(device=self.device, dtype=self.dtype)
        tt = torch.tensor(float(t), dtype=self.dtype, device=self.device)
        with torch.no_grad():
            u = self.counter(x, tt)
        f = u.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
        if self.finite.add(f, t):
            raise NonFiniteStateError(self.solver, float(t), "the field returned inf or NaN")
        return f.numpy()

    def integrate(self, solver_cls: type, x0: Tensor, t0: float, t1: float, *, rtol: float,
                  atol: float, max_steps: int, times: list[float], options: dict | None
                  ) -> tuple[Tensor, int, Tensor | None]:
        """Step scipy's ``OdeSolver`` class from ``t0`` to ``t1`` (either direction) under a
        budget of ``max_steps`` steps; returns ``(x(t1), steps taken, states at times)``
        with the states from the solver's dense output. Raises :class:`IntegrationError`
        on a failed step or an exhausted budget."""
        y0 = x0.detach().to(device="cpu", dtype=torch.float64).numpy().reshape(-1)
        kwargs = {**self.jacobian_options(solver_cls.__name__), **(options or {})}
        solver = solver_cls(self, t0, y0, t1, rtol=rtol, atol=atol, **kwargs)
        sign = 1.0 if t1 > t0 else -1.0
        pending, saved, taken = list(times), [], 0
        while pending and pending[0] == t0:
            saved.append(y0.copy())
            pending.pop(0)
        while solver.status == "running":
            if taken >= max_steps:
                raise IntegrationError("max_steps", self.solver, float(solver.t),
                                       f"the step budget max_steps={max_steps} was used up "
                                       f"({self.nfe} evaluations)")
            message = solver.step()
            taken += 1
            if solver.status == "failed":
                raise IntegrationError("failed", self.solver, float(solver.t), str(message))
            if pending and sign * (pending[0] - solver.t) <= 0:
                dense = solver.dense_output()
                while pending and sign * (pending[0] - solver.t) <= 0:
                    s = pending.pop(0)
                    saved.append(solver.y.copy() if s == solver.t else dense(s))
        like = dict(dtype=x0.dtype, device=x0.device)
        x = torch.as_tensor(solver.y.copy()).reshape(x0.shape).to(**like)
        traj = (torch.stack([torch.as_tensor(y).reshape(x0.shape) for y in saved]).to(**like)
                if saved else None)
        return x, taken, traj

    def jacobian_options(self, method: str) -> dict:
        """Jacobian structure for the implicit methods: samples do not interact, so the
        Jacobian is block diagonal with ``B`` blocks of ``D x D`` (``D`` = event size).
        Radau and BDF take it as ``jac_sparsity`` (finite differences then cost ``D``
        evaluations, not ``B D``); LSODA as the band ``lband = uband = D - 1``."""
        b = self.shape[0]
        d = int(np.prod(self.shape[1:], dtype=np.int64)) if len(self.shape) > 1 else 1
        if method in ("Radau", "BDF"):
            return {"jac_sparsity": sparse.kron(sparse.identity(b, format="csc"),
                                                np.ones((d, d)), format="csc")}
        if method == "LSODA":
            return {"lband": d - 1, "uband": d - 1}
        return {}
