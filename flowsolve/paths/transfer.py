r"""Scheduler transfer: sample a model trained on one scheduler under another, no retraining.

Two affine paths with the same source ``x0 ~ N(0, I)`` and the same data ``x1`` are a
rescaling and a change of clock of each other. With ``rho = alpha / sigma`` the SNR, the
target path at time r equals the source path at time ``t_r = rho^{-1}(rho_bar(r))``, scaled
by ``s_r = sigma_bar_r / sigma_{t_r} = alpha_bar_r / alpha_{t_r}``:
``X_bar_r = s_r X_{t_r}``. Differentiating in r gives the transferred velocity

    u_bar_r(x) = (s'_r / s_r) x + s_r t'_r u_{t_r}(x / s_r)

(Lipman et al. 2024, "Flow Matching Guide and Code", on scheduler change; the
SNR as the invariant clock is Kingma et al. 2021, "Variational Diffusion Models"). The SNR
here is ``alpha / sigma``, as in the Guide; Kingma et al. define it as ``alpha^2 / sigma^2``,
its square (a monotone function of it, so both pair up the same times).

flowsolve evaluates it as ``u_bar_r(x) = A_r x + B_r u_{t_r}(x / s_r)`` with coefficients
that need neither ``s'`` nor ``t'``. Decoding the source velocity into the posterior means
``x1_hat, eps_hat`` (shared by both paths at matching times) and re-encoding them with the
target's derivatives gives, with ``D_t = alpha'_t sigma_t - alpha_t sigma'_t`` (> 0 when
the SNR increases):

    B_r = (alpha_bar'_r sigma_t - sigma_bar'_r alpha_t) / D_t,
    A_r = (sigma_bar'_r alpha'_t - alpha_bar'_r sigma'_t) / (D_t s_r),

evaluated at ``t = t_r``, and ``s_r = (alpha_bar_r + sigma_bar_r) / (alpha_t + sigma_t)``,
which never divides by zero. Where ``sigma'_t`` is infinite (linear-beta VP as the source,
at t = 1) numerator and denominator are multiplied by ``sigma_t`` and use
``sigma_t sigma'_t``. The coefficients are finite on all of [0, 1] except where the source
velocity does not determine the posterior means (``D_t = 0``: PolynomialScheduler(n > 1)
as the source at t = 0, where they are 0 / 0; ``D_t`` infinite: PolynomialScheduler(n < 1)
as the source at t = 0, where ``alpha'_0 = inf``) and where the target's derivatives are
infinite (linear-beta VP as the target, at r = 1, and PolynomialScheduler(n < 1) as the
target at r = 0); there a call raises rather than return inf or NaN, even where the
transfer has a finite limit (e.g. PolynomialScheduler(2) to itself, the identity, at
r = 0), which is not evaluated.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .._core.checks import as_time, first_singular_time, per_sample
from .._core.types import restrict_rows
from .schedules import Scheduler

__all__ = ["TransferredField", "transfer"]


class TransferredField:
    """The field ``(x, r) -> u_bar_r(x)`` of a scheduler transfer; build it with
    :func:`transfer`.

    Attributes:
        valid_interval: ``(r_lo, r_hi)``, the target times whose SNR the source reaches;
            all of [0, 1] unless the two schedulers' SNR ranges differ (e.g. linear-beta VP,
            whose alpha_0 > 0, as the source of a CondOT target).
    """

    def __init__(
        self,
        field: Callable[[Tensor, Tensor], Tensor],
        source: Scheduler,
        target: Scheduler,
        *,
        check: bool = True,
    ):
        self.field, self.source, self.target, self.check = field, source, target, check
        self.valid_interval = _valid_interval(source, target)

    def __repr__(self) -> str:
        return f"transfer({self.field!r}, source={self.source!r}, target={self.target!r})"

    def rows(self, index: Tensor) -> TransferredField:
        """The transferred field of the samples ``index`` (see
        :func:`~flowsolve._core.types.restrict_rows`)."""
        return TransferredField(restrict_rows(self.field, index), self.source, self.target,
                                check=self.check)

    def time_map(self, r: Tensor) -> tuple[Tensor, Tensor]:
        """``(t_r, s_r)``: the source time and the scale matching target time r."""
        r = torch.as_tensor(r)
        self._check_interval(r)
        t_r = self.source.snr_inverse(self.target.snr(r)).clamp(0.0, 1.0)
        tv, rv = self.source(t_r), self.target(r)
        return t_r, (rv.alpha_t + rv.sigma_t) / (tv.alpha_t + tv.sigma_t)

    def coefficients(self, r: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(t_r, s_r, A_r, B_r)`` with ``u_bar_r(x) = A_r x + B_r u_{t_r}(x / s_r)``."""
        t_r, s_r = self.time_map(r)
        tv, rv = self.source(t_r), self.target(r)
        a_t, d_a_t = tv.alpha_t, tv.d_alpha_t
        # multiply through by sigma_t where sigma'_t is infinite, using sigma_t sigma'_t
        inf = torch.isinf(tv.d_sigma_t)
        n = torch.where(inf, tv.sigma_t, torch.ones_like(tv.sigma_t))
        n_sig = torch.where(inf, tv.sigma_t**2, tv.sigma_t)  # n * sigma_t
        n_dsig = torch.where(inf, self.source.sigma_d_sigma(t_r), tv.d_sigma_t)  # n * sigma'_t
        d_t = d_a_t * n_sig - a_t * n_dsig  # n * D_t
        b_r = (rv.d_alpha_t * n_sig - rv.d_sigma_t * a_t * n) / d_t
        a_r = (rv.d_sigma_t * d_a_t * n - rv.d_alpha_t * n_dsig) / (d_t * s_r)
        return t_r, s_r, a_r, b_r

    def __call__(self, x: Tensor, r: Tensor | float) -> Tensor:
        r = as_time(r, x, "r")
        t_r, s_r, a_r, b_r = self.coefficients(r)
        if (self.check and r.device.type == "cpu"
                and (where := first_singular_time(r, a_r, b_r)) is not None):
            raise ValueError(
                f"the transfer from {self.source!r} to {self.target!r} is singular at "
                f"r={where!r} ({self._singular_cause(where)}); integrate over a smaller "
                "interval [eps, 1 - eps]"
            )
        s = per_sample(s_r, x)
        return per_sample(a_r, x) * x + per_sample(b_r, x) * self.field(x / s, t_r)

    def _singular_cause(self, r: float) -> str:
        """Why the coefficients are not finite at ``r`` (for the error message only)."""
        rr = torch.tensor(r, dtype=torch.float64)
        rv = self.target(rr)
        if not bool(torch.isfinite(rv.d_alpha_t) & torch.isfinite(rv.d_sigma_t)):
            return "the target scheduler's derivatives are infinite there"
        t_r = self.source.snr_inverse(self.target.snr(rr)).clamp(0.0, 1.0)
        return (f"the source velocity does not determine the posterior means at its time "
                f"t={t_r.item():.6g}, where D_t = alpha'_t sigma_t - alpha_t sigma'_t is 0 or "
                "not finite; this holds whether or not the transfer has a finite limit there")

    def _check_interval(self, r: Tensor) -> None:
        lo, hi = self.valid_interval
        if r.device.type == "cpu" and (lo > 0 or hi < 1):
            bad = (r < lo * (1 - 1e-12)) | (r > hi)
            if bool(bad.any()):
                raise ValueError(
                    f"r={r[bad].flatten()[0].item()!r} is outside [{lo:.6g}, {hi:.6g}], the "
                    f"target times of {self.target!r} whose SNR {self.source!r} reaches"
                )


def _valid_interval(source: Scheduler, target: Scheduler) -> tuple[float, float]:
    grid = torch.linspace(0, 1, 2001, dtype=torch.float64)
    for name, sched in (("source", source), ("target", target)):
        log_snr = sched.log_snr(grid)
        if not bool((log_snr[1:] > log_snr[:-1]).all()):
            raise ValueError(
                f"the {name} scheduler {sched!r} must have a strictly increasing SNR "
                "alpha_t / sigma_t on [0, 1] for a transfer"
            )
    src = source.log_snr(torch.tensor([0.0, 1.0], dtype=torch.float64))
    tgt = target.log_snr(torch.tensor([0.0, 1.0], dtype=torch.float64))
    lo = 0.0 if tgt[0] >= src[0] else float(target.snr_inverse(src[0].exp()))
    hi = 1.0 if tgt[1] <= src[1] else float(target.snr_inverse(src[1].exp()))
    return lo, hi


def transfer(
    field: Callable[[Tensor, Tensor], Tensor],
    *,
    source: Scheduler,
    target: Scheduler,
    check: bool = True,
) -> TransferredField:
    r"""Re-express a velocity field trained on the ``source`` scheduler in the time of the
    ``target`` scheduler: ``u_bar_r(x) = (s'_r / s_r) x + s_r t'_r u_{t_r}(x / s_r)``.

    From the same ``x0`` the transferred flow lands on the same ``x1`` (exactly, for exact
    solves). Both schedulers need a strictly increasing SNR and the same source
    distribution (``source_std``); otherwise ValueError. ``r`` may be a scalar or a
    ``(B,)`` tensor. ``check=False`` skips the finite-coefficient test (it synchronises
    with the device on CPU only anyway).

    Example:
        >>> import torch, flowsolve as fs
        >>> data = fs.GaussianMixture.ring(4)
        >>> condot, cosine = fs.CondOTScheduler(), fs.CosineScheduler()
        >>> u = fs.analytic.marginal_velocity(data, fs.AffineGaussianPath(condot))
        >>> v = fs.transfer(u, source=condot, target=cosine)
        >>> exact = fs.analytic.marginal_velocity(data, fs.AffineGaussianPath(cosine))
        >>> x = torch.randn(3, 2, dtype=torch.float64)
        >>> bool(torch.allclose(v(x, 0.3), exact(x, 0.3)))
        True
    """
    for name, sched in (("source", source), ("target", target)):
        if not isinstance(sched, Scheduler):
            raise TypeError(f"{name} must be a flowsolve Scheduler; got {type(sched).__name__}")
    if abs(source.source_std - target.source_std) > 1e-12 * max(1.0, source.source_std):
        raise ValueError(
            f"source and target must share the source distribution; {source!r} starts from "
            f"N(0, {source.source_std:g}^2 I) and {target!r} from "
            f"N(0, {target.source_std:g}^2 I)"
        )
    if not callable(field):
        raise TypeError(f"field must be callable (x, t) -> Tensor; got {type(field).__name__}")
    return TransferredField(field, source, target, check=check)
