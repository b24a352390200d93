r"""Affine Gaussian probability paths ``x_t = alpha_t x1 + sigma_t x0``, ``x0 ~ N(0, I)``.

A path turns a scheduler into the quantities a model is trained on and sampled with:
samples ``x_t`` with their conditional velocity, the conditional velocity and score given
``x1``, and conversion between the five ways a network can parameterise its output.

Parameterisations (all are functions of ``(x, t)`` shaped like ``x``), each a linear
combination of the posterior means ``x1_hat = E[x1 | x_t = x]`` and ``eps_hat = E[x0 | x_t = x]``,
which are tied by ``x = alpha_t x1_hat + sigma_t eps_hat``:

=============  ======================================  ===================================
name           value                                   aliases
=============  ======================================  ===================================
``velocity``   ``u = alpha'_t x1_hat + sigma'_t eps_hat``
``score``      ``s = grad log p_t = -eps_hat / sigma_t``
``epsilon``    ``eps_hat`` (the source sample)           ``x0``, ``noise``
``x1``         ``x1_hat`` (the data sample)              ``data`` (diffusion's "x0-prediction")
``v``          ``alpha_t eps_hat - sigma_t x1_hat``        (Salimans & Ho 2022)
=============  ======================================  ===================================

Beware the name clash: in flowsolve ``x0`` is the *noise*; diffusion papers' "x0-prediction"
predicts the *data*, which is ``x1`` here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._core.checks import (
    as_time,
    check_finite_coefficients,
    check_same_shape,
    first_singular_time,
    per_sample,
)
from .schedules import Scheduler, ScheduleValues

__all__ = ["PathSample", "AffineGaussianPath", "PREDICTIONS"]

PREDICTIONS = ("velocity", "score", "epsilon", "x1", "v")
"""The five parameterisations (aliases: ``x0``, ``noise``, ``eps`` for ``epsilon``; ``data``
for ``x1``)."""
_ALIASES = {"x0": "epsilon", "noise": "epsilon", "eps": "epsilon", "data": "x1"}


def canonical_prediction(kind: str, arg: str) -> str:
    name = _ALIASES.get(kind, kind)
    if name not in PREDICTIONS:
        accepted = ", ".join(PREDICTIONS + tuple(_ALIASES))
        raise ValueError(f"{arg}={kind!r} is not a parameterisation; accepted: {accepted}")
    return name


def homogeneous_coefficients(kind: str, v: ScheduleValues) -> tuple[Tensor, Tensor, Tensor]:
    """(n, p1, p2) with ``n * prediction = p1 * x1_hat + p2 * eps_hat``."""
    one, zero = torch.ones_like(v.alpha_t), torch.zeros_like(v.alpha_t)
    if kind == "velocity":
        return one, v.d_alpha_t, v.d_sigma_t
    if kind == "score":
        return v.sigma_t, zero, -one
    if kind == "epsilon":
        return one, zero, one
    if kind == "x1":
        return one, one, zero
    return one, -v.sigma_t, v.alpha_t  # v-prediction


def _score_basis(kind: str, v: ScheduleValues, sigma_d_sigma: Tensor) -> tuple[Tensor, Tensor]:
    """(P1, P2) with ``prediction = P1 * x1_hat + P2 * s_hat`` where ``s_hat = -eps_hat / sigma_t``
    (so ``x = alpha_t x1_hat - sigma_t^2 s_hat``); the velocity's ``P2 = -sigma_t sigma'_t`` is
    finite where sigma'_t is not."""
    one, zero = torch.ones_like(v.alpha_t), torch.zeros_like(v.alpha_t)
    if kind == "velocity":
        return v.d_alpha_t, -sigma_d_sigma
    if kind == "score":
        return zero, one
    if kind == "epsilon":
        return zero, -v.sigma_t
    if kind == "x1":
        return one, zero
    return -v.sigma_t, -v.alpha_t * v.sigma_t  # v-prediction


@dataclass(frozen=True)
class PathSample:
    """A draw from the path: ``x_t = alpha_t x1 + sigma_t x0`` and its conditional velocity
    ``dx_t = alpha'_t x1 + sigma'_t x0`` (the flow-matching regression target)."""

    t: Tensor
    x0: Tensor
    x1: Tensor
    x_t: Tensor
    dx_t: Tensor


class AffineGaussianPath:
    r"""The Gaussian path ``p_t(x | x1) = N(x; alpha_t x1, sigma_t^2 I)`` of a scheduler.

    Shapes: ``x``, ``x0``, ``x1`` are ``(B, *event_shape)``; ``t`` is a number, a 0-d tensor
    or a ``(B,)`` tensor in [0, 1]. Per-sample outputs are ``(B,)``.

    Example:
        >>> import torch, flowsolve as fs
        >>> path = fs.AffineGaussianPath(fs.CondOTScheduler())
        >>> s = path.sample(torch.zeros(2, 3), torch.ones(2, 3), torch.tensor([0.25, 0.5]))
        >>> s.x_t[:, 0].tolist(), s.dx_t[0, 0].item()
        ([0.25, 0.5], 1.0)
    """

    def __init__(self, scheduler: Scheduler):
        if not isinstance(scheduler, Scheduler):
            raise TypeError(
                f"AffineGaussianPath needs a flowsolve Scheduler; got {type(scheduler).__name__}"
            )
        self.scheduler = scheduler

    def __repr__(self) -> str:
        return f"AffineGaussianPath({self.scheduler!r})"

    @property
    def source_std(self) -> float:
        """Standard deviation of the source ``p_0 ~ N(0, source_std^2 I)``."""
        return self.scheduler.source_std

    def _schedule(self, x: Tensor, t: Tensor | float) -> tuple[Tensor, ScheduleValues]:
        t = as_time(t, x)
        return t, self.scheduler(t)

    def sample(self, x0: Tensor, x1: Tensor, t: Tensor | float) -> PathSample:
        """``x_t = alpha_t x1 + sigma_t x0`` and ``dx_t = alpha'_t x1 + sigma'_t x0``.

        For the linear-beta VP scheduler ``sigma'_t`` (so ``dx_t``) is infinite at t = 1.
        Where ``alpha'_t`` is not finite (PolynomialScheduler(n < 1) at t = 0, where
        ``dx_t`` would be inf - inf = NaN) it raises ValueError naming t (checked on CPU
        tensors, where it costs no device synchronisation).
        """
        check_same_shape(x0, x1, "x0", "x1")
        t, v = self._schedule(x1, t)
        check_finite_coefficients(t, "the conditional velocity dx_t", self.scheduler,
                                  **{"alpha'_t": v.d_alpha_t})
        a, s = per_sample(v.alpha_t, x1), per_sample(v.sigma_t, x1)
        da, ds = per_sample(v.d_alpha_t, x1), per_sample(v.d_sigma_t, x1)
        return PathSample(t=t, x0=x0, x1=x1, x_t=a * x1 + s * x0, dx_t=da * x1 + ds * x0)

    def _check_noise(self, v: ScheduleValues, what: str) -> None:
        s = v.sigma_t
        if s.device.type == "cpu" and bool((s == 0).any()):
            raise ValueError(
                f"the conditional {what} is singular where sigma_t = 0 (t = 1 for this "
                f"scheduler, {self.scheduler!r}): p_t(x | x1) is a point mass there"
            )

    def conditional_velocity(self, x: Tensor, x1: Tensor, t: Tensor | float) -> Tensor:
        r"""``u_t(x | x1) = alpha'_t x1 + sigma'_t (x - alpha_t x1) / sigma_t``.

        Evaluated as ``alpha'_t x1 + (sigma_t sigma'_t) (x - alpha_t x1) / sigma_t^2``, finite
        wherever sigma_t > 0 and ``alpha'_t`` and ``sigma_t sigma'_t`` are finite; raises
        ValueError where sigma_t = 0 and where ``alpha'_t`` is infinite
        (PolynomialScheduler(n < 1) at t = 0). Both are checked on CPU tensors only.
        """
        check_same_shape(x, x1, "x", "x1")
        t, v = self._schedule(x, t)
        self._check_noise(v, "velocity")
        s_ds = self.scheduler.sigma_d_sigma(t)
        check_finite_coefficients(t, "the conditional velocity", self.scheduler,
                                  **{"alpha'_t": v.d_alpha_t, "sigma_t sigma'_t": s_ds})
        a, s = per_sample(v.alpha_t, x), per_sample(v.sigma_t, x)
        s_ds = per_sample(s_ds, x)
        return per_sample(v.d_alpha_t, x) * x1 + s_ds * (x - a * x1) / (s * s)

    def conditional_score(self, x: Tensor, x1: Tensor, t: Tensor | float) -> Tensor:
        r"""``grad_x log p_t(x | x1) = -(x - alpha_t x1) / sigma_t^2``; raises where sigma_t = 0."""
        check_same_shape(x, x1, "x", "x1")
        _, v = self._schedule(x, t)
        self._check_noise(v, "score")
        a, s = per_sample(v.alpha_t, x), per_sample(v.sigma_t, x)
        return -(x - a * x1) / (s * s)

    def conditional_log_prob(self, x: Tensor, x1: Tensor, t: Tensor | float) -> Tensor:
        r"""``log N(x; alpha_t x1, sigma_t^2 I)`` summed over the event dims: shape ``(B,)``."""
        check_same_shape(x, x1, "x", "x1")
        _, v = self._schedule(x, t)
        self._check_noise(v, "density")
        a, s = per_sample(v.alpha_t, x), per_sample(v.sigma_t, x)
        z = ((x - a * x1) / s).reshape(x.shape[0], x.shape[1:].numel())  # event () too
        d = z.shape[1]
        log_s = torch.log(v.sigma_t).expand(x.shape[0])
        return -0.5 * (z * z).sum(1) - d * log_s - 0.5 * d * torch.log(2 * x.new_tensor(torch.pi))

    def conversion_coefficients(
        self, t: Tensor, from_kind: str, to_kind: str
    ) -> tuple[Tensor, Tensor]:
        r"""Coefficients ``(A_t, B_t)`` with ``to = A_t x + B_t from`` (shaped like ``t``).

        Writing each kind as ``n * pred = p1 x1_hat + p2 eps_hat`` (table in the module doc;
        ``n = sigma_t`` for the score, 1 otherwise) and ``D_p = alpha_t p2 - sigma_t p1``:

        ``A_t = (q1 p2 - q2 p1) / (D_p n_q)``,  ``B_t = n_p D_q / (D_p n_q)``.

        For example velocity from score: ``u = (alpha'/alpha) x + (sigma^2 alpha'/alpha -
        sigma' sigma) s``. Score and epsilon are proportional, ``eps = -sigma_t s``, and are
        converted directly (finite at alpha_t = 0). Other conversions are singular where
        ``D_p n_q = 0``: from ``epsilon``/``score`` where alpha_t = 0, from ``x1`` where
        sigma_t = 0, from ``velocity`` where ``D_t = alpha'_t sigma_t - alpha_t sigma'_t = 0``
        (``D_p = -D_t``; PolynomialScheduler(n > 1) at t = 0, where ``u = 0`` whatever the
        posterior means: the formula is 0 / 0 there even where a finite limit exists), to
        ``score`` where sigma_t = 0 (unless sigma_t sigma'_t != 0, below); and to or from
        ``velocity`` where ``alpha'_t`` is infinite (PolynomialScheduler(n < 1) at t = 0).

        Where sigma'_t is infinite but ``sigma_t sigma'_t`` is finite (linear-beta VP at t = 1)
        a conversion involving ``velocity`` is redone in the basis ``(x1_hat, s_hat)``, with
        ``x = alpha_t x1_hat - sigma_t^2 s_hat`` and ``D_p = alpha_t P2 + sigma_t^2 P1``:
        ``A_t = (Q1 P2 - Q2 P1) / D_p``, ``B_t = (sigma_t^2 Q1 + alpha_t Q2) / D_p``. That gives
        the finite limits velocity <-> score and velocity -> anything there; to velocity
        from ``epsilon``, ``x1`` or ``v`` stays singular (they carry no score at t = 1).
        """
        src = canonical_prediction(from_kind, "from_kind")
        dst = canonical_prediction(to_kind, "to_kind")
        v = self.scheduler(t)
        if src == dst:
            return torch.zeros_like(v.alpha_t), torch.ones_like(v.alpha_t)
        if {src, dst} == {"score", "epsilon"}:
            factor = -v.sigma_t if src == "score" else -1 / v.sigma_t
            return torch.zeros_like(v.alpha_t), factor
        n_p, p1, p2 = homogeneous_coefficients(src, v)
        n_q, q1, q2 = homogeneous_coefficients(dst, v)
        d_p = v.alpha_t * p2 - v.sigma_t * p1
        d_q = v.alpha_t * q2 - v.sigma_t * q1
        den = d_p * n_q
        a_t, b_t = (q1 * p2 - q2 * p1) / den, n_p * d_q / den
        if "velocity" in (src, dst):
            sds = self.scheduler.sigma_d_sigma(t)
            (p1, p2), (q1, q2) = _score_basis(src, v, sds), _score_basis(dst, v, sds)
            s2 = v.sigma_t * v.sigma_t
            d_p = v.alpha_t * p2 + s2 * p1
            ok = torch.isfinite(a_t) & torch.isfinite(b_t)
            a_t = torch.where(ok, a_t, (q1 * p2 - q2 * p1) / d_p)
            b_t = torch.where(ok, b_t, (s2 * q1 + v.alpha_t * q2) / d_p)
        return a_t, b_t

    def convert(
        self,
        prediction: Tensor,
        x: Tensor,
        t: Tensor | float,
        from_kind: str,
        to_kind: str,
        *,
        check: bool = True,
    ) -> Tensor:
        """Convert a model output from one parameterisation to another at ``(x, t)``.

        ``to = A_t x + B_t prediction`` with the coefficients of
        :meth:`conversion_coefficients`. Where the conversion is singular (see there) it
        raises ValueError naming t, rather than return inf or NaN; ``check=False`` skips
        that test (it synchronises with the device), e.g. inside a solver loop whose time
        interval was checked once.
        """
        check_same_shape(prediction, x, "prediction", "x")
        t = as_time(t, x)
        a_t, b_t = self.conversion_coefficients(t, from_kind, to_kind)
        if check and (where := first_singular_time(t, a_t, b_t)) is not None:
            advice = ("" if canonical_prediction(from_kind, "from_kind") == "velocity" else
                      " or use the velocity parameterisation, which is regular on [0, 1]")
            raise ValueError(
                f"converting {from_kind!r} to {to_kind!r} is singular at t={where!r} "
                f"for {self.scheduler!r}; restrict t to an interval [eps, 1 - eps]{advice}"
            )
        return per_sample(a_t, x) * x + per_sample(b_t, x) * prediction
