"""Schedulers: closed forms, time derivatives, SNR and its inverse, input checks.

Derivatives are checked against autograd, the linear-beta VP schedule against the score-SDE
mean coefficient written out here, and every closed-form SNR inverse against the base
class's bisection and against the forward map.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _cases import SCHEDULER_CASES
from hypothesis import given
from hypothesis import strategies as st
from torch.testing import assert_close

from flowsolve.paths.schedules import (
    SCHEDULERS,
    CondOTScheduler,
    CosineScheduler,
    LinearVPScheduler,
    PolynomialScheduler,
    Scheduler,
    VEScheduler,
    get_scheduler,
)

F64 = torch.float64

SCHEDS = SCHEDULER_CASES
each_scheduler = pytest.mark.parametrize("sched", SCHEDS, ids=[repr(s) for s in SCHEDS])

# Interior grid: the derivative of t^n at t = 0 (n <= 1) and of the linear-beta VP sigma_t
# at t = 1 are not finite, so the autograd comparison lives strictly inside (0, 1).
T_INNER = torch.linspace(0.0, 1.0, 1001, dtype=F64)[1:-1]


class _QuadraticSignal(Scheduler):
    """A scheduler the package does not ship: alpha_t = t (2 - t), sigma_t = 1 - t.

    rho(t) = t (2 - t) / (1 - t); solving r (1 - t) = 2 t - t^2 for t in [0, 1] gives
    rho^{-1}(r) = ((2 + r) - sqrt(4 + r^2)) / 2.
    """

    def _values(self, t):
        return t * (2 - t), 1 - t, 2 - 2 * t, -torch.ones_like(t)


def _quadratic_inverse(r: torch.Tensor) -> torch.Tensor:
    return ((2 + r) - torch.sqrt(4 + r * r)) / 2


def _autograd_dt(fn, t: torch.Tensor) -> torch.Tensor:
    """Elementwise d fn(t) / dt by reverse-mode autograd (fn acts elementwise)."""
    t = t.detach().clone().requires_grad_()
    out = fn(t)
    if not out.requires_grad:  # no graph back to t: constant in t (VE's alpha_t = 1)
        return torch.zeros_like(t)
    (grad,) = torch.autograd.grad(out.sum(), t)
    return grad


# ---------------------------------------------------------------------------------------
# Derivatives
# ---------------------------------------------------------------------------------------


@each_scheduler
def test_derivatives_equal_autograd(sched):
    v = sched(T_INNER)
    assert_close(v.d_alpha_t, _autograd_dt(sched.alpha, T_INNER), rtol=1e-10, atol=1e-10)
    assert_close(v.d_sigma_t, _autograd_dt(sched.sigma, T_INNER), rtol=1e-10, atol=1e-10)


@each_scheduler
def test_derivatives_at_endpoints_match_one_sided_differences(sched):
    """At t = 0 and t = 1, where autograd of t^n may give NaN, a second-order one-sided
    difference checks every derivative that is finite there."""
    h = 1e-5
    for t0, sign in ((0.0, 1.0), (1.0, -1.0)):
        pts = torch.tensor([t0, t0 + sign * h, t0 + 2 * sign * h], dtype=F64)
        v = sched(pts)
        for name, f in (("d_alpha_t", v.alpha_t), ("d_sigma_t", v.sigma_t)):
            exact = getattr(sched(torch.tensor(t0, dtype=F64)), name)
            if not torch.isfinite(exact):
                continue
            fd = sign * (-3 * f[0] + 4 * f[1] - f[2]) / (2 * h)
            assert_close(exact, fd, rtol=1e-6, atol=1e-6, msg=f"{name} at t={t0}")


def test_infinite_derivatives_are_where_documented():
    assert PolynomialScheduler(0.5)(torch.tensor(0.0, dtype=F64)).d_alpha_t == math.inf
    v = LinearVPScheduler()(torch.tensor(1.0, dtype=F64))
    assert v.d_sigma_t == -math.inf
    for sched in SCHEDS:
        if isinstance(sched, LinearVPScheduler):
            continue
        v = sched(torch.tensor(1.0, dtype=F64))
        assert torch.isfinite(v.d_alpha_t) and torch.isfinite(v.d_sigma_t), sched


@each_scheduler
def test_sigma_d_sigma_is_half_the_derivative_of_the_variance(sched):
    sds = sched.sigma_d_sigma(T_INNER)
    assert_close(sds, _autograd_dt(lambda t: 0.5 * sched.sigma(t) ** 2, T_INNER), rtol=1e-10,
                 atol=1e-10)
    v = sched(T_INNER)
    assert_close(sds, v.sigma_t * v.d_sigma_t, rtol=1e-12, atol=1e-12)
    # finite at both ends, also for linear-beta VP at t = 1 where d_sigma_t is infinite;
    # the one exception is t^n with n < 1 at t = 0, where sigma_t = 1 and d_sigma_t = -inf
    ends = sched.sigma_d_sigma(torch.tensor([0.0, 1.0], dtype=F64))
    if isinstance(sched, PolynomialScheduler) and sched.n < 1:
        assert ends[0] == -math.inf and torch.isfinite(ends[1])
    else:
        assert torch.isfinite(ends).all()


@pytest.mark.parametrize("b_min,b_max", [(0.1, 20.0), (0.5, 5.0), (1.0, 1.0)])
def test_linear_vp_sigma_d_sigma_at_t1_is_its_limit(b_min, b_max):
    sched = LinearVPScheduler(b_min, b_max)
    one = torch.tensor(1.0, dtype=F64)
    at_one = sched.sigma_d_sigma(one)
    assert torch.isfinite(at_one)
    assert at_one.item() == pytest.approx(-b_min / 2, rel=1e-15)
    # the product sigma * d_sigma is 0 * inf there; approaching t = 1 it tends to -b_min/2
    near = torch.tensor([1 - 1e-4, 1 - 1e-6, 1 - 1e-8], dtype=F64)
    v = sched(near)
    gap = (v.sigma_t * v.d_sigma_t + b_min / 2).abs()
    assert (gap[1:] < gap[:-1]).all()
    assert gap[-1] < 1e-6 * max(1.0, b_max)


# ---------------------------------------------------------------------------------------
# Closed-form values
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "sched",
    [CondOTScheduler(), CosineScheduler(), PolynomialScheduler(2), PolynomialScheduler(0.5)],
    ids=repr,
)
def test_endpoints_are_exactly_zero_and_one(sched, dtype):
    v = sched(torch.tensor([0.0, 1.0], dtype=dtype))
    assert v.alpha_t.dtype == dtype
    assert v.alpha_t.tolist() == [0.0, 1.0]
    assert v.sigma_t.tolist() == [1.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_vp_reaches_the_data_exactly(dtype):
    v = LinearVPScheduler()(torch.tensor(1.0, dtype=dtype))
    assert v.alpha_t.item() == 1.0 and v.sigma_t.item() == 0.0


@pytest.mark.parametrize("n", [0.5, 2.0, 7.3])
def test_polynomial_sigma_near_the_data_end_is_accurate(n):
    """sigma_t = 1 - t^n cancels as t -> 1 (relative error 1e-4 at t = 1 - 1e-12 for
    n = 0.5 when evaluated as 1 - t^n); checked against 50-digit arithmetic."""
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 50
    for gap in (1e-6, 1e-9, 1e-12):
        t = 1.0 - gap  # the float64 t itself is the input of the reference
        v = PolynomialScheduler(n)(torch.tensor(t, dtype=F64))
        tn = mp.mpf(t) ** mp.mpf(n)
        assert float(v.sigma_t) == pytest.approx(float(1 - tn), rel=1e-12, abs=0)
        assert float(v.alpha_t) == pytest.approx(float(tn), rel=1e-14, abs=0)
        assert float(v.d_alpha_t) == pytest.approx(float(n * tn / mp.mpf(t)), rel=1e-14, abs=0)
        assert float(v.d_sigma_t) == -float(v.d_alpha_t)
        log_snr = PolynomialScheduler(n).log_snr(torch.tensor(t, dtype=F64))
        assert float(log_snr) == pytest.approx(float(mp.log(tn / (1 - tn))), rel=1e-12, abs=0)
    one = PolynomialScheduler(n).sigma(torch.tensor(1.0, dtype=F64)).item()
    assert one == 0.0 and math.copysign(1.0, one) == 1.0  # +0: the SNR is +inf there


def test_polynomial_log_snr_is_finite_where_t_to_the_n_underflows():
    """For n = 120, t^n underflows for t < ~0.0027: log snr = n log t - log(1 - t^n) stays
    finite (and strictly increasing) on the grid the transfer checks."""
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 50
    n = 120.0
    sched = PolynomialScheduler(n)
    t = torch.linspace(0.0, 1.0, 2001, dtype=F64)
    log_snr = sched.log_snr(t)
    assert log_snr[0] == -math.inf and log_snr[-1] == math.inf
    assert torch.isfinite(log_snr[1:-1]).all()
    assert (log_snr[1:] > log_snr[:-1]).all()
    for i in (1, 2, 5, 100, 1000, 1990, 1999):
        tn = mp.mpf(t[i].item()) ** mp.mpf(n)
        exact = float(mp.log(tn) - mp.log(1 - tn))
        assert log_snr[i].item() == pytest.approx(exact, rel=1e-13, abs=0), t[i].item()
    # and snr_inverse of an snr that does not underflow gives t back
    inner = t[(t > 0.05) & (t < 1)]
    assert_close(sched.snr_inverse(sched.snr(inner)), inner, rtol=1e-13, atol=0)


def test_linear_vp_with_a_large_beta_max_has_a_finite_log_snr_and_inverse():
    """beta_max = 2000: T(t) > 709 near t = 0, where log(expm1(T)) and rho^-2 overflow;
    log snr = -log(expm1(T)) / 2 checked against 50-digit arithmetic."""
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 50
    b_min, b_max = 0.1, 2000.0
    sched = LinearVPScheduler(b_min, b_max)
    t = torch.linspace(0.0, 1.0, 2001, dtype=F64)[:-1]  # t < 1: log snr finite
    log_snr = sched.log_snr(t)
    assert torch.isfinite(log_snr).all() and (log_snr[1:] > log_snr[:-1]).all()
    assert_close(log_snr, torch.log(sched.snr(t)), rtol=1e-14, atol=0)
    for i in range(0, 2000, 37):
        s = 1 - mp.mpf(t[i].item())
        big_t = b_min * s + (mp.mpf(b_max) - b_min) * s * s / 2
        exact = float(-mp.log(mp.expm1(big_t)) / 2)
        assert log_snr[i].item() == pytest.approx(exact, rel=1e-13, abs=0), t[i].item()
    back = sched.snr_inverse(sched.snr(t))
    assert torch.isfinite(back).all()
    assert_close(back, t, rtol=0, atol=1e-14)
    # the defaults are unchanged
    assert LinearVPScheduler().log_snr(torch.tensor(0.0, dtype=F64)).item() == pytest.approx(
        -0.5 * math.log(math.expm1(0.1 + 0.5 * 19.9)), rel=1e-14)


@pytest.mark.parametrize("b_min,b_max", [(0.1, 20.0), (0.5, 5.0), (1.0, 1.0)])
def test_linear_vp_matches_the_score_sde_mean_coefficient(b_min, b_max):
    """Song et al. (2021), VP-SDE: mean coefficient exp(-s^2 (b_max - b_min)/4 - s b_min/2)
    at diffusion time s = 1 - t, std sqrt(1 - mean^2)."""
    t = torch.linspace(0.0, 1.0, 257, dtype=F64)
    s = 1 - t
    mean = torch.exp(-0.25 * s**2 * (b_max - b_min) - 0.5 * s * b_min)
    std = torch.sqrt(1 - mean**2)
    v = LinearVPScheduler(b_min, b_max)(t)
    assert_close(v.alpha_t, mean, rtol=1e-13, atol=0.0)
    assert_close(v.sigma_t, std, rtol=1e-10, atol=1e-15)
    # the drift of the VP-SDE is -beta(s) x / 2, i.e. d alpha / dt = +beta(s) alpha / 2
    beta = b_min + s * (b_max - b_min)
    assert_close(v.d_alpha_t, 0.5 * beta * mean, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("s_min,s_max", [(0.01, 50.0), (0.002, 80.0)])
def test_ve_endpoints_and_geometric_interpolation(s_min, s_max):
    sched = VEScheduler(s_min, s_max)
    assert sched.source_std == s_max
    t = torch.linspace(0.0, 1.0, 65, dtype=F64)
    v = sched(t)
    assert v.sigma_t[0].item() == s_max
    assert v.sigma_t[-1].item() == pytest.approx(s_min, rel=1e-14)
    assert (v.alpha_t == 1).all() and (v.d_alpha_t == 0).all()
    # geometric: sigma_t^2 = sigma_{t-h} sigma_{t+h}
    assert_close(v.sigma_t[1:-1] ** 2, v.sigma_t[:-2] * v.sigma_t[2:], rtol=1e-13, atol=0.0)


def test_cosine_is_variance_preserving():
    v = CosineScheduler()(torch.rand(1000, dtype=F64, generator=torch.Generator().manual_seed(0)))
    assert_close(v.alpha_t**2 + v.sigma_t**2, torch.ones_like(v.alpha_t), rtol=0, atol=1e-15)


# ---------------------------------------------------------------------------------------
# SNR and its inverse
# ---------------------------------------------------------------------------------------


@each_scheduler
def test_snr_is_strictly_increasing_and_log_snr_is_its_log(sched):
    t = torch.linspace(0.0, 1.0, 2001, dtype=F64)
    snr = sched.snr(t)
    assert (snr[1:] > snr[:-1]).all()
    assert_close(sched.log_snr(T_INNER), torch.log(sched.snr(T_INNER)), rtol=1e-12, atol=1e-13)
    # d log snr / dt = alpha'/alpha - sigma'/sigma > 0 in the interior
    v = sched(T_INNER)
    assert (v.d_alpha_t / v.alpha_t - v.d_sigma_t / v.sigma_t > 0).all()


@pytest.mark.parametrize(
    "sched,lo,hi",
    [
        (CondOTScheduler(), 0.0, math.inf),
        (CosineScheduler(), 0.0, math.inf),
        (LinearVPScheduler(), 1 / math.sqrt(math.expm1(0.1 + 0.5 * 19.9)), math.inf),
        (VEScheduler(0.01, 50.0), 1 / 50.0, 1 / 0.01),
    ],
    ids=repr,
)
def test_snr_range_endpoints(sched, lo, hi):
    ends = sched.snr(torch.tensor([0.0, 1.0], dtype=F64)).tolist()
    assert ends[0] == pytest.approx(lo, rel=1e-13)
    assert ends[1] == pytest.approx(hi, rel=1e-13)
    back = sched.snr_inverse(torch.tensor(ends, dtype=F64))
    assert_close(back, torch.tensor([0.0, 1.0], dtype=F64), rtol=0, atol=1e-14)


@each_scheduler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_snr_inverse_of_a_rounded_snr_stays_in_the_unit_interval(sched, dtype):
    """snr(t) computed in float32 (or float64) at and near the ends may fall a rounding
    error outside the float64 range: snr_inverse accepts it and returns t in [0, 1], so
    that the result can be fed back to the scheduler."""
    t = torch.linspace(0.0, 1.0, 10001, dtype=dtype)
    back = sched.snr_inverse(sched.snr(t))
    assert back.dtype == dtype
    assert (back >= 0).all() and (back <= 1).all()
    assert_close(back, t, rtol=0, atol=4e-7 if dtype == torch.float32 else 1e-14)
    sched(back)  # in range: does not raise


@each_scheduler
@given(t=st.floats(min_value=1e-6, max_value=1 - 1e-6))
def test_snr_inverse_inverts_snr(sched, t):
    tt = torch.tensor([t], dtype=F64)
    back = sched.snr_inverse(sched.snr(tt))
    assert back.dtype == F64
    assert_close(back, tt, rtol=1e-9, atol=0.0)


@each_scheduler
@given(u=st.floats(min_value=0.0, max_value=1.0))
def test_snr_of_snr_inverse_is_identity(sched, u):
    # a log-uniform point of the scheduler's SNR range, clipped to [e^-6, e^6] where the
    # round trip is well conditioned in float64
    lo, hi = sched.log_snr(torch.tensor([0.0, 1.0], dtype=F64)).clamp(-6.0, 6.0).tolist()
    r = torch.tensor([math.exp(lo + u * (hi - lo))], dtype=F64)
    assert_close(sched.snr(sched.snr_inverse(r)), r, rtol=1e-9, atol=0.0)


@each_scheduler
def test_closed_form_snr_inverse_agrees_with_bisection(sched):
    t = torch.linspace(0.0, 1.0, 513, dtype=F64)
    r = sched.snr(t)
    closed = sched.snr_inverse(r)
    numeric = Scheduler._snr_inverse_numeric(sched, r)
    assert_close(closed, numeric, rtol=0, atol=1e-10)
    assert_close(numeric, t, rtol=0, atol=1e-10)


def test_user_scheduler_with_only_values_gets_an_snr_inverse():
    sched = _QuadraticSignal()
    t = T_INNER[::7]
    assert_close(sched(t).d_alpha_t, _autograd_dt(sched.alpha, t), rtol=1e-12, atol=1e-12)
    r = sched.snr(t)
    assert_close(sched.snr_inverse(r), _quadratic_inverse(r), rtol=0, atol=1e-12)
    assert_close(sched.snr_inverse(r), t, rtol=0, atol=1e-12)
    # the ends of its range: snr = 0 at t = 0, inf at t = 1
    ends = sched.snr_inverse(torch.tensor([0.0, math.inf], dtype=F64))
    assert_close(ends, torch.tensor([0.0, 1.0], dtype=F64), rtol=0, atol=2.0**-60)
    # float32 in, float32 out
    assert sched.snr_inverse(torch.tensor([1.0])).dtype == torch.float32
    with pytest.raises(ValueError, match="outside the range"):
        sched.snr_inverse(torch.tensor([-1.0], dtype=F64))


@pytest.mark.parametrize(
    "sched,bad",
    [
        (VEScheduler(0.01, 50.0), 1e-3),  # below 1/sigma_max
        (VEScheduler(0.01, 50.0), 1e3),  # above 1/sigma_min
        (LinearVPScheduler(), 1e-4),  # below snr(0)
        (CondOTScheduler(), -1.0),
        (CosineScheduler(), math.nan),
        (PolynomialScheduler(2), -0.5),
    ],
    ids=repr,
)
def test_snr_outside_range_raises(sched, bad):
    r = torch.tensor([1.0, bad], dtype=F64)
    with pytest.raises(ValueError, match=r"snr=.* is outside the range"):
        sched.snr_inverse(r)
    with pytest.raises(ValueError, match="outside the range"):
        Scheduler._snr_inverse_numeric(sched, r)


# ---------------------------------------------------------------------------------------
# Input checks and the registry
# ---------------------------------------------------------------------------------------


@each_scheduler
@pytest.mark.parametrize("bad", [-0.1, 1.5, math.nan])
def test_time_outside_unit_interval_raises(sched, bad):
    ts = [bad, torch.tensor([0.5, bad], dtype=F64)]
    for t in ts:
        for method in (sched, sched.alpha, sched.sigma, sched.sigma_d_sigma, sched.snr,
                       sched.log_snr):
            with pytest.raises(ValueError, match=r"\bt must lie in \[0, 1\]") as info:
                method(t)
            assert ("nan" in str(info.value)) if math.isnan(bad) else (str(bad) in str(info.value))


@pytest.mark.parametrize(
    "factory",
    [
        lambda: PolynomialScheduler(0),
        lambda: PolynomialScheduler(-1.0),
        lambda: PolynomialScheduler(math.nan),
        lambda: PolynomialScheduler(math.inf),
        lambda: LinearVPScheduler(0.0, 20.0),
        lambda: LinearVPScheduler(-0.1, 20.0),
        lambda: LinearVPScheduler(5.0, 1.0),
        lambda: LinearVPScheduler(0.1, math.inf),
        lambda: LinearVPScheduler(math.nan, 20.0),
        lambda: VEScheduler(0.0, 50.0),
        lambda: VEScheduler(50.0, 0.01),
        lambda: VEScheduler(1.0, 1.0),
        lambda: VEScheduler(0.01, math.inf),
        lambda: VEScheduler(math.nan, 1.0),
    ],
)
def test_bad_constructor_arguments_raise(factory):
    with pytest.raises(ValueError, match="got"):
        factory()


@pytest.mark.parametrize(
    "factory, name",
    [
        (lambda: PolynomialScheduler("2"), "n"),
        (lambda: PolynomialScheduler(True), "n"),
        (lambda: LinearVPScheduler("0.1", 20), "beta_min"),
        (lambda: LinearVPScheduler(0.1, None), "beta_max"),
        (lambda: LinearVPScheduler(True, 20), "beta_min"),
        (lambda: VEScheduler("0.01", 50), "sigma_min"),
        (lambda: VEScheduler(0.01, False), "sigma_max"),
    ],
)
def test_constructor_arguments_of_the_wrong_type_raise_type_error(factory, name):
    with pytest.raises(TypeError, match=rf"{name} must be a real number \(int or float\); got"):
        factory()


def test_numpy_scalars_are_numbers():
    assert PolynomialScheduler(np.int64(3)).n == 3.0
    assert VEScheduler(np.float32(0.5), np.int64(5)).sigma_max == 5.0


def test_reprs_hold_the_exact_parameters():
    """A training resume compares the path by its repr: parameters that differ in the 7th
    significant digit must give different reprs (``:g`` printed both as 2), and the repr
    must rebuild the scheduler exactly, with plain floats (no numpy, no addresses)."""
    import flowsolve.paths.schedules as schedules

    pairs = [(PolynomialScheduler(2.0), PolynomialScheduler(2.000001)),
             (LinearVPScheduler(0.1, 20.0), LinearVPScheduler(0.1, 20.00001)),
             (VEScheduler(0.01, 50.0), VEScheduler(0.0100000001, 50.0))]
    for a, b in pairs:
        assert repr(a) != repr(b)
        for s in (a, b):
            rebuilt = eval(repr(s), vars(schedules))  # noqa: S307 - our own repr
            assert type(rebuilt) is type(s) and vars(rebuilt) == vars(s)
            assert repr(s) == repr(eval(repr(s), vars(schedules)))  # noqa: S307
    assert repr(PolynomialScheduler(2.000001)) == "PolynomialScheduler(n=2.000001)"
    assert repr(VEScheduler(np.float32(0.5), np.int64(5))) == \
        "VEScheduler(sigma_min=0.5, sigma_max=5.0)"
    assert repr(LinearVPScheduler()) == "LinearVPScheduler(beta_min=0.1, beta_max=20.0)"


def test_get_scheduler_by_name():
    assert isinstance(get_scheduler("condot"), CondOTScheduler)
    assert isinstance(get_scheduler("cosine"), CosineScheduler)
    poly = get_scheduler("polynomial", n=3)
    assert isinstance(poly, PolynomialScheduler) and poly.n == 3.0
    vp = get_scheduler("linear_vp", beta_min=0.5, beta_max=5.0)
    assert (vp.beta_min, vp.beta_max) == (0.5, 5.0)
    ve = get_scheduler("ve", sigma_min=0.002, sigma_max=80.0)
    assert ve.source_std == 80.0
    for name, cls in SCHEDULERS.items():
        assert type(get_scheduler(name)) is cls


def test_get_scheduler_unknown_name_lists_accepted():
    with pytest.raises(ValueError, match="'rectified'") as info:
        get_scheduler("rectified")
    for name in SCHEDULERS:
        assert name in str(info.value)


def test_ve_extreme_range_stays_finite_and_exact_at_the_ends():
    """sigma_min / sigma_max underflows for (1e-300, 1e300): the schedule is computed from the
    logs, so sigma_1 = sigma_min, the log-SNR is finite and linear, no math domain error."""
    sched = VEScheduler(1e-300, 1e300)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    v = sched(t)
    assert v.sigma_t[0].item() == pytest.approx(1e300, rel=1e-13)
    assert v.sigma_t[1].item() == pytest.approx(1.0, rel=1e-13)
    assert v.sigma_t[2].item() == pytest.approx(1e-300, rel=1e-12)
    log_rate = math.log(1e-300) - math.log(1e300)
    assert_close(v.d_sigma_t, log_rate * v.sigma_t, rtol=1e-13, atol=0.0)
    assert_close(sched.log_snr(t), -(math.log(1e300) + log_rate * t), rtol=1e-13, atol=0.0)
