r"""Schedulers of affine Gaussian probability paths.

An affine path is ``x_t = alpha_t * x1 + sigma_t * x0`` with ``x0 ~ N(0, I)`` the source
(noise) sample and ``x1`` the data sample; time runs from t = 0 (source) to t = 1 (data).
A scheduler gives ``alpha_t`` (multiplies data), ``sigma_t`` (multiplies noise), their time
derivatives, the signal-to-noise ratio ``snr(t) = alpha_t / sigma_t`` (increasing in t) and
its inverse.

Every scheduler evaluates elementwise on a tensor ``t`` of any shape; ``t`` outside [0, 1]
is a ValueError (checked on CPU tensors, where it costs no device synchronisation).
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from .._core.checks import check_unit_interval

__all__ = [
    "ScheduleValues",
    "Scheduler",
    "CondOTScheduler",
    "PolynomialScheduler",
    "CosineScheduler",
    "LinearVPScheduler",
    "VEScheduler",
    "SCHEDULERS",
    "get_scheduler",
]


@dataclass(frozen=True)
class ScheduleValues:
    """``alpha_t``, ``sigma_t`` and their time derivatives at one ``t`` (same shape as t)."""

    alpha_t: Tensor
    sigma_t: Tensor
    d_alpha_t: Tensor
    d_sigma_t: Tensor


def _check_numbers(cls: str, **values: object) -> None:
    """TypeError unless every value is a real number (int, float, numpy scalar; not bool)."""
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"{cls}: {name} must be a real number (int or float); got "
                            f"{type(v).__name__} {v!r}")


def _as_float_tensor(t: Tensor | float) -> Tensor:
    t = torch.as_tensor(t)
    return t if t.is_floating_point() else t.to(torch.get_default_dtype())


class Scheduler(ABC):
    """Base class: subclasses implement :meth:`_values` (and, where one exists, a closed-form
    :meth:`snr_inverse`).

    Attributes:
        source_std: standard deviation of the Gaussian the flow starts from,
            ``p_0 = N(0, source_std^2 I)`` (exact when ``alpha_0 = 0``; for VE and linear-beta
            VP it is the usual approximation, since ``alpha_0 > 0`` there).
    """

    source_std: float = 1.0

    @abstractmethod
    def _values(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(alpha_t, sigma_t, d_alpha_t, d_sigma_t) with no input checks."""

    def __call__(self, t: Tensor | float) -> ScheduleValues:
        """Evaluate the scheduler at ``t`` in [0, 1]."""
        t = _as_float_tensor(t)
        check_unit_interval(t)
        return ScheduleValues(*self._values(t))

    def alpha(self, t: Tensor | float) -> Tensor:
        return self(t).alpha_t

    def sigma(self, t: Tensor | float) -> Tensor:
        return self(t).sigma_t

    def sigma_squared(self, t: Tensor | float) -> Tensor:
        """``sigma_t^2``, written so that its autograd derivative in t is finite wherever
        ``d(sigma_t^2)/dt`` is (the linear-beta VP schedule at t = 1)."""
        return self(t).sigma_t ** 2

    def sigma_d_sigma(self, t: Tensor | float) -> Tensor:
        """``sigma_t * d sigma_t / dt = (1/2) d(sigma_t^2)/dt``: finite even where
        ``d_sigma_t`` is not (the linear-beta VP schedule at t = 1)."""
        v = self(t)
        return v.sigma_t * v.d_sigma_t

    def snr(self, t: Tensor | float) -> Tensor:
        """Signal-to-noise ratio ``rho(t) = alpha_t / sigma_t`` (``inf`` where sigma_t = 0)."""
        v = self(t)
        return v.alpha_t / v.sigma_t

    def log_snr(self, t: Tensor | float) -> Tensor:
        """``log rho(t) = log alpha_t - log sigma_t`` (``-inf`` / ``inf`` at the ends)."""
        v = self(t)
        return torch.log(v.alpha_t) - torch.log(v.sigma_t)

    def snr_inverse(self, snr: Tensor | float) -> Tensor:
        """``t = rho^{-1}(snr)``. Default: bisection on ``log_snr`` in float64 (64 halvings,
        to machine precision, no host synchronisation). Subclasses with a closed form
        override it."""
        return self._snr_inverse_numeric(snr)

    def _snr_inverse_numeric(self, snr: Tensor | float) -> Tensor:
        snr = _as_float_tensor(snr)
        target = torch.log(snr.to(torch.float64))
        self._check_snr_range(target, snr.dtype)
        lo = torch.zeros_like(target)
        hi = torch.ones_like(target)
        for _ in range(64):
            mid = 0.5 * (lo + hi)
            below = self.log_snr(mid) < target
            lo = torch.where(below, mid, lo)
            hi = torch.where(below, hi, mid)
        return (0.5 * (lo + hi)).to(snr.dtype)

    def _check_snr_range(self, log_snr: Tensor, dtype: torch.dtype = torch.float64) -> None:
        if log_snr.device.type != "cpu" or log_snr.numel() == 0:
            return
        ends = self.log_snr(torch.tensor([0.0, 1.0], dtype=torch.float64))
        # an snr computed in ``dtype`` at t = 0 or 1 may miss the float64 end by rounding
        rel = max(1e-12, 16 * torch.finfo(dtype).eps)
        slack = rel * (1 + ends.abs().nan_to_num(posinf=0.0, neginf=0.0))
        bad = (log_snr < ends[0] - slack[0]) | (log_snr > ends[1] + slack[1]) | log_snr.isnan()
        if bool(bad.any()):
            value = log_snr[bad].exp().flatten()[0].item()
            lo, hi = ends.exp().tolist()
            raise ValueError(
                f"snr={value!r} is outside the range of {self!r}: [{lo:.6g}, {hi:.6g}]"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class CondOTScheduler(Scheduler):
    r"""Conditional optimal transport (rectified flow): ``alpha_t = t``, ``sigma_t = 1 - t``.

    ``rho(t) = t / (1 - t)``, ``rho^{-1}(r) = r / (1 + r)``. Lipman et al. (2023).
    """

    def _values(self, t):
        one = torch.ones_like(t)
        return t, 1 - t, one, -one

    def snr_inverse(self, snr):
        snr = _as_float_tensor(snr)
        self._check_snr_range(torch.log(snr.to(torch.float64)), snr.dtype)
        return 1 / (1 + 1 / snr)


class PolynomialScheduler(Scheduler):
    r"""``alpha_t = t^n``, ``sigma_t = 1 - t^n`` (n > 0; n = 1 is CondOT).

    ``d alpha_t = n t^{n-1}`` is infinite at t = 0 when n < 1. ``sigma_t`` is evaluated as
    ``-expm1(n log t)`` where ``t^n > 1/2`` (accurate as t -> 1) and ``log rho`` as
    ``n log t - log(-expm1(n log t))`` (finite for large n, where ``t^n`` underflows near
    t = 0).
    ``rho^{-1}(r) = (r / (1 + r))^{1/n}``.
    """

    def __init__(self, n: float = 2.0):
        _check_numbers("PolynomialScheduler", n=n)
        if not (math.isfinite(n) and n > 0):
            raise ValueError(f"PolynomialScheduler: n must be a finite number > 0; got {n!r}")
        self.n = float(n)

    def _values(self, t):
        tn1 = torch.pow(t, self.n - 1)
        tn = torch.pow(t, self.n)  # not tn1 * t: that is inf * 0 at t = 0 when n < 1
        # sigma_t = 1 - t^n, as -expm1(n log t) where t^n > 1/2 (no cancellation as t -> 1;
        # +0, not -0, at t = 1). Elsewhere 1 - t^n is exact to rounding and keeps a finite
        # autograd derivative at t = 0 (n >= 1), which log t would turn into 0 * inf = NaN;
        # the log branch sees t = 1 there for the same reason.
        near_one = tn > 0.5
        log_t = torch.log(torch.where(near_one, t, torch.ones_like(t)))
        sigma = torch.where(near_one, 0.0 - torch.expm1(self.n * log_t), 1 - tn)
        return tn, sigma, self.n * tn1, -self.n * tn1

    def log_snr(self, t):
        """``n log t - log(1 - t^n)``, finite for 0 < t < 1 even where ``t^n`` underflows
        (large n near t = 0); ``-inf`` / ``inf`` at t = 0 / 1."""
        t = _as_float_tensor(t)
        check_unit_interval(t)
        y = self.n * torch.log(t)
        return y - torch.log(0.0 - torch.expm1(y))

    def snr_inverse(self, snr):
        snr = _as_float_tensor(snr)
        self._check_snr_range(torch.log(snr.to(torch.float64)), snr.dtype)
        return torch.pow(1 / (1 + 1 / snr), 1 / self.n)

    def __repr__(self):
        return f"PolynomialScheduler(n={self.n!r})"


class CosineScheduler(Scheduler):
    r"""Cosine / trigonometric VP: ``alpha_t = sin(pi t / 2)``, ``sigma_t = cos(pi t / 2)``.

    ``sigma_t`` is evaluated as ``sin(pi (1 - t) / 2)`` so that it is exactly 0 at t = 1
    in every dtype. ``rho(t) = tan(pi t / 2)``, ``rho^{-1}(r) = (2 / pi) atan(r)``.
    """

    def _values(self, t):
        h = math.pi / 2
        a, s = torch.sin(h * t), torch.sin(h * (1 - t))
        return a, s, h * s, -h * a

    def snr_inverse(self, snr):
        snr = _as_float_tensor(snr)
        self._check_snr_range(torch.log(snr.to(torch.float64)), snr.dtype)
        return torch.atan(snr) * (2 / math.pi)


class LinearVPScheduler(Scheduler):
    r"""The linear-beta variance-preserving schedule of DDPM / score-SDE, in flow time.

    With diffusion time ``s = 1 - t``, ``beta(s) = beta_min + s (beta_max - beta_min)`` and
    ``T(t) = int_0^s beta = beta_min s + (beta_max - beta_min) s^2 / 2``:
    ``alpha_t = exp(-T/2)``, ``sigma_t = sqrt(1 - exp(-T))``,
    ``d alpha_t = beta(s) alpha_t / 2``, ``d sigma_t = -beta(s) exp(-T) / (2 sigma_t)``
    (infinite at t = 1; use :meth:`sigma_d_sigma`, which is finite).
    ``rho^2 = 1 / expm1(T)``, so ``log rho = -(T + log(-expm1(-T))) / 2`` (finite for any
    beta_max; ``-log(expm1(T)) / 2`` would overflow for T > 709) and ``rho^{-1}`` solves a
    quadratic in s: ``T = log(1 + rho^{-2})`` (evaluated as ``logaddexp(0, -2 log rho)``),
    ``s = 2 T / (beta_min + sqrt(beta_min^2 + 2 (beta_max - beta_min) T))``.
    Song et al. (2021), Ho et al. (2020).
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        _check_numbers("LinearVPScheduler", beta_min=beta_min, beta_max=beta_max)
        if not (0 < beta_min <= beta_max and math.isfinite(beta_max)):
            raise ValueError(
                "LinearVPScheduler needs 0 < beta_min <= beta_max < inf; got "
                f"beta_min={beta_min!r}, beta_max={beta_max!r}"
            )
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def _integral(self, t):
        s = 1 - t
        beta = self.beta_min + s * (self.beta_max - self.beta_min)
        big_t = self.beta_min * s + 0.5 * (self.beta_max - self.beta_min) * s * s
        return big_t, beta

    def _values(self, t):
        big_t, beta = self._integral(t)
        alpha = torch.exp(-0.5 * big_t)
        sigma = torch.sqrt(-torch.expm1(-big_t))
        return alpha, sigma, 0.5 * beta * alpha, -0.5 * beta * torch.exp(-big_t) / sigma

    def sigma_squared(self, t):
        t = _as_float_tensor(t)
        check_unit_interval(t)
        return -torch.expm1(-self._integral(t)[0])

    def sigma_d_sigma(self, t):
        t = _as_float_tensor(t)
        check_unit_interval(t)
        big_t, beta = self._integral(t)
        return -0.5 * beta * torch.exp(-big_t)

    def log_snr(self, t):
        t = _as_float_tensor(t)
        check_unit_interval(t)
        big_t, _ = self._integral(t)
        # -log(expm1(T)) / 2 written so that it does not overflow for T > 709 (large beta_max)
        return -0.5 * (big_t + torch.log(-torch.expm1(-big_t)))

    def snr_inverse(self, snr):
        snr = _as_float_tensor(snr)
        self._check_snr_range(torch.log(snr.to(torch.float64)), snr.dtype)
        # T = log(1 + rho^-2), without overflow of rho^-2 for a tiny rho (large beta_max)
        big_t = torch.logaddexp(torch.zeros_like(snr), -2 * torch.log(snr))
        b, db = self.beta_min, self.beta_max - self.beta_min
        s = 2 * big_t / (b + torch.sqrt(b * b + 2 * db * big_t))
        return (1 - s).clamp(0, 1)  # an snr within rounding of the range stays in [0, 1]

    def __repr__(self):
        return f"LinearVPScheduler(beta_min={self.beta_min!r}, beta_max={self.beta_max!r})"


class VEScheduler(Scheduler):
    r"""Variance-exploding: ``alpha_t = 1``, ``sigma_t = sigma_max^{1-t} sigma_min^t``.

    The source is ``N(0, sigma_max^2 I)`` (``source_std = sigma_max``).
    ``d sigma_t = sigma_t log(sigma_min / sigma_max)``; ``rho = 1 / sigma_t``, so
    ``rho^{-1}(r) = (log sigma_max + log r) / (log sigma_max - log sigma_min)``.
    Song & Ermon (2019), Song et al. (2021).
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        _check_numbers("VEScheduler", sigma_min=sigma_min, sigma_max=sigma_max)
        if not (0 < sigma_min < sigma_max and math.isfinite(sigma_max)):
            raise ValueError(
                "VEScheduler needs 0 < sigma_min < sigma_max < inf; got "
                f"sigma_min={sigma_min!r}, sigma_max={sigma_max!r}"
            )
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.source_std = self.sigma_max

    def _values(self, t):
        # logs apart: sigma_min / sigma_max underflows for extreme ranges (1e-300, 1e300),
        # where exp(rate t) does too; sigma_max * exp(rate t) keeps sigma_0 = sigma_max exact
        rate = math.log(self.sigma_min) - math.log(self.sigma_max)
        if rate > -700.0:
            sigma = self.sigma_max * torch.exp(rate * t)
        else:
            sigma = torch.exp(math.log(self.sigma_max) + rate * t)
        return torch.ones_like(t), sigma, torch.zeros_like(t), rate * sigma

    def log_snr(self, t):
        t = _as_float_tensor(t)
        check_unit_interval(t)
        log_max = math.log(self.sigma_max)
        return -(log_max + (math.log(self.sigma_min) - log_max) * t)

    def snr_inverse(self, snr):
        snr = _as_float_tensor(snr)
        self._check_snr_range(torch.log(snr.to(torch.float64)), snr.dtype)
        log_max = math.log(self.sigma_max)
        t = (log_max + torch.log(snr)) / (log_max - math.log(self.sigma_min))
        return t.clamp(0, 1)  # an snr within rounding of the range stays in [0, 1]

    def __repr__(self):
        return f"VEScheduler(sigma_min={self.sigma_min!r}, sigma_max={self.sigma_max!r})"


SCHEDULERS: dict[str, type[Scheduler]] = {
    "condot": CondOTScheduler,
    "polynomial": PolynomialScheduler,
    "cosine": CosineScheduler,
    "linear_vp": LinearVPScheduler,
    "ve": VEScheduler,
}
"""Scheduler name -> class, for :func:`get_scheduler`, configuration files and the CLI."""


def get_scheduler(name: str, **kwargs) -> Scheduler:
    """Build a scheduler by registry name (``condot``, ``polynomial``, ``cosine``,
    ``linear_vp``, ``ve``); keyword arguments go to its constructor."""
    try:
        cls = SCHEDULERS[name]
    except KeyError:
        raise ValueError(
            f"unknown scheduler {name!r}; accepted: {', '.join(sorted(SCHEDULERS))}"
        ) from None
    return cls(**kwargs)
