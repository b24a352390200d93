"""The failures a solve can end in, shared by the ODE and SDE front doors.

:class:`IntegrationError` carries a named ``status`` (``"max_steps"``, ``"step_underflow"``,
``"failed"``, ``"non_finite"``), the solver and the time, and its message says what to
change; :class:`NonFiniteStateError` (status ``"non_finite"``) is also a
``FloatingPointError``.
"""

from __future__ import annotations

__all__ = ["IntegrationError", "NonFiniteStateError"]

_ADVICE = {
    "max_steps": "raise max_steps, loosen rtol/atol, or look for a singularity of the field "
                 "near that time (restrict the interval to [eps, 1 - eps])",
    "step_underflow": "the step size underflowed: the field is probably singular or "
                      "non-smooth near that time; restrict the interval or loosen rtol/atol",
    "failed": "see the solver's message; try another solver or looser tolerances",
    "non_finite": "check the model near that time, restrict the interval (t0 = eps or "
                  "t1 = 1 - eps), or use more steps / tighter tolerances",
}


class IntegrationError(RuntimeError):
    """A solve that could not finish. ``status`` names why (``"max_steps"``,
    ``"step_underflow"``, ``"failed"``, ``"non_finite"``); ``solver`` and ``t`` say where."""

    def __init__(self, status: str, solver: str, t: float | None, detail: str):
        self.status, self.solver, self.t = status, solver, t
        where = "" if t is None else f" at t={t:.10g}"
        super().__init__(f"solver {solver!r} stopped{where} ({status}): {detail}; "
                         f"{_ADVICE[status]}")


class NonFiniteStateError(IntegrationError, FloatingPointError):
    """The field or the state became inf or NaN during a solve (status ``"non_finite"``)."""

    def __init__(self, solver: str, t: float | None, detail: str = "the field or the state "
                 "became non-finite (inf or NaN)"):
        super().__init__("non_finite", solver, t, detail)
