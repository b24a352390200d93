"""Affine Gaussian paths: samples and their time derivative, the conditional velocity, score
and density, and conversion between the parameterisations.

Every conversion is checked twice: as a round trip (a -> b -> a is the identity) and
against ground truth, the exact "predictions" of one known pair (x0, x1), for which the
posterior means are x0 and x1 themselves.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from _cases import SCHEDULER_CASES
from hypothesis import given
from hypothesis import strategies as st
from torch.testing import assert_close

from flowsolve.paths.affine import PREDICTIONS, AffineGaussianPath
from flowsolve.paths.schedules import (
    CondOTScheduler,
    CosineScheduler,
    LinearVPScheduler,
    PolynomialScheduler,
    VEScheduler,
)

F64 = torch.float64

SCHEDS = [s for s in SCHEDULER_CASES  # constant beta adds nothing to the path tests
          if not (isinstance(s, LinearVPScheduler) and s.beta_min == s.beta_max)]
each_path = pytest.mark.parametrize(
    "path", [AffineGaussianPath(s) for s in SCHEDS], ids=[repr(s) for s in SCHEDS]
)

ALIASES = {"x0": "epsilon", "noise": "epsilon", "eps": "epsilon", "data": "x1"}
NAMES = PREDICTIONS + tuple(ALIASES)
PAIRS = list(itertools.product(NAMES, NAMES))
EVENT_SHAPES = [(), (3,), (2, 3), (3, 4, 4)]  # (3, 4, 4): image-like x of shape (B, C, H, W)


def _randn(shape, gen):
    return torch.randn(shape, dtype=F64, generator=gen)


def _bcast(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return c.reshape(c.shape + (1,) * (x.dim() - c.dim()))


def _exact_predictions(path, x0, x1, t):
    """x_t and the exact value of each parameterisation for the single pair (x0, x1):
    given x_t the posterior is a point mass, so x1_hat = x1 and eps_hat = x0."""
    v = path.scheduler(t)
    a, s = _bcast(v.alpha_t, x1), _bcast(v.sigma_t, x1)
    da, ds = _bcast(v.d_alpha_t, x1), _bcast(v.d_sigma_t, x1)
    exact = {
        "velocity": da * x1 + ds * x0,
        "score": -x0 / s,
        "epsilon": x0,
        "x1": x1,
        "v": a * x0 - s * x1,
    }
    exact.update({alias: exact[name] for alias, name in ALIASES.items()})
    return a * x1 + s * x0, exact


def _close(actual, expected, tol, msg=""):
    """|actual - expected| <= tol * (1 + |expected|) elementwise (relative to unit data)."""
    err = ((actual - expected).abs() / (1 + expected.abs())).max().item() if actual.numel() else 0
    assert err <= tol, f"{msg}: max scaled error {err:.3g} > {tol:g}"


# ---------------------------------------------------------------------------------------
# Samples and conditional quantities
# ---------------------------------------------------------------------------------------

T_PER_SAMPLE = torch.tensor([1e-3, 0.1, 0.37, 0.5, 0.81, 0.999], dtype=F64)


@each_path
@pytest.mark.parametrize("event", [(3,), (2, 4, 4)])
def test_dx_t_is_the_time_derivative_of_x_t(path, event, gen):
    x0, x1 = _randn((6, *event), gen), _randn((6, *event), gen)
    # reverse-mode autograd in the per-sample t, one event coordinate at a time: x_t[i]
    # depends on t[i] only, so the gradient of sum_i x_t[i, j] in t is d x_t[i, j] / d t[i]
    t = T_PER_SAMPLE.clone().requires_grad_()
    x_t = path.sample(x0, x1, t).x_t.flatten(1)
    cols = [torch.autograd.grad(x_t[:, j].sum(), t, retain_graph=True)[0]
            for j in range(x_t.shape[1])]
    x_t, dxdt = x_t.detach().reshape(x0.shape), torch.stack(cols, 1).reshape(x0.shape)
    s = path.sample(x0, x1, T_PER_SAMPLE)
    assert_close(s.x_t, x_t, rtol=0, atol=0)
    assert_close(s.dx_t, dxdt, rtol=1e-10, atol=1e-10)
    assert s.t.shape == (6,) and s.x0 is x0 and s.x1 is x1


@each_path
def test_scalar_and_per_sample_time_agree(path, gen):
    x0, x1 = _randn((4, 3), gen), _randn((4, 3), gen)
    for t in (0.0, 0.3, 1.0):
        if not torch.isfinite(path.scheduler(torch.tensor(t, dtype=F64)).d_alpha_t):
            continue  # PolynomialScheduler(n < 1) at t = 0 raises: see the test below
        a = path.sample(x0, x1, t)
        b = path.sample(x0, x1, torch.full((4,), t, dtype=F64))
        c = path.sample(x0, x1, torch.full((4, 1), t, dtype=F64))
        assert_close(a.x_t, b.x_t, rtol=0, atol=0)
        assert_close(a.x_t, c.x_t, rtol=0, atol=0)


@each_path
@pytest.mark.parametrize("event", EVENT_SHAPES)
def test_conditional_score_is_the_gradient_of_the_conditional_log_prob(path, event, gen):
    t = torch.tensor([0.0, 0.2, 0.55, 0.97], dtype=F64)
    x1 = _randn((4, *event), gen)
    x = _randn((4, *event), gen).requires_grad_()
    log_p = path.conditional_log_prob(x, x1, t)
    assert log_p.shape == (4,)
    (grad,) = torch.autograd.grad(log_p.sum(), x)
    assert_close(path.conditional_score(x.detach(), x1, t), grad, rtol=1e-10, atol=1e-10)


@each_path
@pytest.mark.parametrize("event", EVENT_SHAPES)
def test_conditional_log_prob_is_the_normal_density(path, event, gen):
    t = torch.tensor([0.0, 0.2, 0.55, 0.97], dtype=F64)
    x1, x = _randn((4, *event), gen), _randn((4, *event), gen)
    v = path.scheduler(t)
    normal = torch.distributions.Normal(_bcast(v.alpha_t, x1) * x1, _bcast(v.sigma_t, x1))
    expected = normal.log_prob(x).reshape(4, -1).sum(1)
    assert_close(path.conditional_log_prob(x, x1, t), expected, rtol=1e-12, atol=1e-10)
    # a scalar t gives the same as a (B,) t filled with it
    assert_close(
        path.conditional_log_prob(x, x1, 0.3),
        path.conditional_log_prob(x, x1, torch.full((4,), 0.3, dtype=F64)),
        rtol=0,
        atol=0,
    )


@each_path
@pytest.mark.parametrize("event", [(3,), (2, 4, 4)])
def test_conditional_flow_through_x_t_has_velocity_dx_t(path, event, gen):
    """Given x1, the conditional flow psi_t(x0) = alpha_t x1 + sigma_t x0 passes through x_t,
    so the conditional velocity evaluated there is dx_t."""
    x0, x1 = _randn((6, *event), gen), _randn((6, *event), gen)
    t = T_PER_SAMPLE.clone()
    t[-1] = 1 - 1e-6  # close to t = 1, where sigma'_t of linear-beta VP blows up
    s = path.sample(x0, x1, t)
    u = path.conditional_velocity(s.x_t, x1, t)
    _close(u, s.dx_t, 1e-8, "conditional velocity at x_t")
    _close(path.conditional_score(s.x_t, x1, t), -x0 / _bcast(path.scheduler.sigma(t), x0), 1e-8,
           "conditional score at x_t")


@each_path
def test_conditional_quantities_at_t1(path, gen):
    x1, x = _randn((3, 2), gen), _randn((3, 2), gen)
    one = torch.tensor(1.0, dtype=F64)
    if path.scheduler.sigma(one) > 0:  # VE: sigma_1 = sigma_min > 0, all regular
        x0 = _randn((3, 2), gen)
        s = path.sample(x0, x1, 1.0)
        _close(path.conditional_velocity(s.x_t, x1, 1.0), s.dx_t, 1e-10, "VE velocity at t=1")
        return
    for method in (path.conditional_velocity, path.conditional_score,
                   path.conditional_log_prob):
        with pytest.raises(ValueError, match="singular where sigma_t = 0"):
            method(x, x1, torch.tensor([0.5, 1.0, 0.5], dtype=F64))


def test_velocity_where_alpha_prime_is_infinite_raises_and_is_exact_elsewhere(gen):
    """PolynomialScheduler(0.5): alpha'_0 = inf, so dx_t and the conditional velocity at
    t = 0 would be inf - inf = NaN; they raise naming t and the scheduler. For t > 0 they
    match the closed form alpha_t = sqrt t, sigma_t = 1 - sqrt t, alpha'_t = -sigma'_t =
    1 / (2 sqrt t)."""
    path = AffineGaussianPath(PolynomialScheduler(0.5))
    x0, x1, x = _randn((2, 3), gen), _randn((2, 3), gen), _randn((2, 3), gen)
    message = r"singular at t=0.0 for PolynomialScheduler\(n=0.5\): it needs alpha'_t"
    for t in (0.0, torch.tensor([0.5, 0.0], dtype=F64)):  # one bad entry is enough
        with pytest.raises(ValueError, match=message):
            path.conditional_velocity(x, x1, t)
        with pytest.raises(ValueError, match=message):
            path.sample(x0, x1, t)
    # the quantities that do not need alpha'_t stay finite at t = 0
    assert torch.isfinite(path.conditional_score(x, x1, 0.0)).all()
    assert torch.isfinite(path.conditional_log_prob(x, x1, 0.0)).all()
    for t in (1e-300, 1e-3, 0.25, 0.9):
        a, s, da = math.sqrt(t), 1 - math.sqrt(t), 0.5 / math.sqrt(t)
        _close(path.conditional_velocity(x, x1, t), da * x1 - da * (x - a * x1) / s, 1e-13,
               f"conditional velocity at t={t}")
        ps = path.sample(x0, x1, t)
        _close(ps.x_t, a * x1 + s * x0, 1e-15, f"x_t at t={t}")
        scale = 1 + abs(da)  # relative to the size of dx_t
        _close(ps.dx_t / scale, da * (x1 - x0) / scale, 1e-15, f"dx_t at t={t}")


# ---------------------------------------------------------------------------------------
# Conversions between parameterisations
# ---------------------------------------------------------------------------------------


@st.composite
def _conversion_cases(draw):
    batch = draw(st.integers(min_value=1, max_value=4))
    event = draw(st.sampled_from(EVENT_SHAPES))
    t_inner = st.floats(min_value=0.05, max_value=0.95)
    if draw(st.booleans()):
        t = torch.tensor(draw(st.lists(t_inner, min_size=batch, max_size=batch)), dtype=F64)
    else:
        t = draw(t_inner)
    seed = draw(st.integers(min_value=0, max_value=2**32 - 1))
    return batch, event, t, seed


@each_path
@given(case=_conversion_cases())
def test_every_conversion_round_trips(path, case):
    batch, event, t, seed = case
    gen = torch.Generator().manual_seed(seed)
    x, pred = _randn((batch, *event), gen), _randn((batch, *event), gen)
    for a, b in itertools.product(PREDICTIONS, PREDICTIONS):  # aliases: test below
        there = path.convert(pred, x, t, a, b)
        assert there.shape == pred.shape and there.dtype == F64
        back = path.convert(there, x, t, b, a)
        _close(back, pred, 1e-8, f"{a} -> {b} -> {a}")


@each_path
def test_aliases_convert_exactly_like_their_names(path, gen):
    t = torch.tensor([0.0, 0.3, 0.6, 1.0], dtype=F64)
    x, pred = _randn((4, 3), gen), _randn((4, 3), gen)
    name = {**{n: n for n in PREDICTIONS}, **ALIASES}
    for a, b in PAIRS:
        expected = path.convert(pred, x, t, name[a], name[b], check=False)
        assert_close(path.convert(pred, x, t, a, b, check=False), expected, rtol=0, atol=0,
                     equal_nan=True)


@each_path
@pytest.mark.parametrize("event", [(5,), (2, 3, 3)])
def test_conversions_match_ground_truth(path, event, gen):
    t = torch.linspace(0.05, 0.95, 7, dtype=F64)
    x0, x1 = _randn((7, *event), gen), _randn((7, *event), gen)
    x_t, exact = _exact_predictions(path, x0, x1, t)
    for a, b in PAIRS:
        _close(path.convert(exact[a], x_t, t, a, b), exact[b], 1e-9, f"{a} -> {b}")


def _must_raise(path, t_end: float, a: str, b: str) -> bool:
    """Whether converting a -> b at t_end has no finite formula, from the schedule alone:
    which posterior mean the source leaves undetermined, or which quantity is infinite."""
    a, b = ALIASES.get(a, a), ALIASES.get(b, b)
    if a == b:
        return False
    t = torch.tensor(t_end, dtype=F64)
    v = path.scheduler(t)
    alpha, sigma, d_alpha, d_sigma = (float(c) for c in (v.alpha_t, v.sigma_t, v.d_alpha_t,
                                                         v.d_sigma_t))
    sds = float(path.scheduler.sigma_d_sigma(t))
    d_t = d_alpha * sigma - alpha * d_sigma  # nan where alpha' is infinite
    return (
        # alpha_t = 0: x = sigma_t eps_hat; score and epsilon carry no x1_hat
        (alpha == 0 and a in ("score", "epsilon") and b in ("velocity", "x1", "v"))
        # sigma_t = 0: x = alpha_t x1_hat; x1 carries no eps_hat
        or (sigma == 0 and a == "x1")
        # sigma_t = 0: the score is infinite (a point mass), unless the velocity carries it
        # through sigma_t sigma'_t != 0 (linear-beta VP at t = 1)
        or (sigma == 0 and b == "score" and not (a == "velocity" and sds != 0))
        # sigma'_t infinite (linear-beta VP at t = 1): only the velocity and score carry the
        # finite sigma_t sigma'_t s_hat
        or (math.isinf(d_sigma) and b == "velocity" and a in ("epsilon", "x1", "v"))
        # alpha'_t infinite (PolynomialScheduler(n < 1) at t = 0): the velocity is infinite
        or (math.isinf(d_alpha) and "velocity" in (a, b))
        # D_t = 0 (PolynomialScheduler(n > 1) at t = 0): u = 0 whatever the means, 0 / 0
        or (d_t == 0 and a == "velocity")
    )


@each_path
@pytest.mark.parametrize("t_end", [0.0, 1.0])
def test_conversions_at_endpoints_raise_or_return_the_finite_limit(path, t_end, gen):
    """At t = 0 and t = 1 a conversion raises a ValueError naming t exactly where
    :func:`_must_raise` says so; every other one returns a finite value that (a) is the
    continuous limit from inside (0, 1) and (b) matches the ground truth wherever the
    source prediction is itself finite. Never inf or NaN."""
    x0, x1 = _randn((4, 3), gen), _randn((4, 3), gen)
    x, pred = _randn((4, 3), gen), _randn((4, 3), gen)
    near = t_end + (1e-13 if t_end == 0 else -1e-13)
    x_t, exact = _exact_predictions(path, x0, x1, torch.tensor(t_end, dtype=F64))
    raised = 0
    for a, b in PAIRS:
        if _must_raise(path, t_end, a, b):
            with pytest.raises(ValueError, match=rf"'{a}' to '{b}' is singular at t={t_end}"):
                path.convert(pred, x, t_end, a, b)
            raised += 1
            continue
        out = path.convert(pred, x, t_end, a, b)
        assert torch.isfinite(out).all(), (a, b)
        _close(out, path.convert(pred, x, near, a, b), 1e-5, f"{a} -> {b} limit at {t_end}")
        if torch.isfinite(exact[a]).all():
            _close(path.convert(exact[a], x_t, t_end, a, b), exact[b], 1e-9,
                   f"{a} -> {b} ground truth at {t_end}")
    # the canonical counts (aliases add more): none where alpha_t, sigma_t > 0 with finite
    # derivatives (VE; linear-beta VP at t = 0), 6 at alpha_t = 0 (+4 for D_t = 0, +6 for
    # alpha'_t infinite), 7 at sigma_t = 0 (linear-beta VP: 8)
    sched = path.scheduler
    counts = {
        (CondOTScheduler, 0.0): 6, (CosineScheduler, 0.0): 6, (LinearVPScheduler, 0.0): 0,
        (CondOTScheduler, 1.0): 7, (CosineScheduler, 1.0): 7, (LinearVPScheduler, 1.0): 8,
        (VEScheduler, 0.0): 0, (VEScheduler, 1.0): 0,
    }
    if isinstance(sched, PolynomialScheduler):
        want = 7 if t_end == 1 else 6 + (sched.n > 1) * 4 + (sched.n < 1) * 6
    else:
        want = counts[type(sched), t_end]
    assert sum(_must_raise(path, t_end, a, b) for a, b in itertools.product(
        PREDICTIONS, PREDICTIONS)) == want
    assert raised >= want


def test_documented_singular_conversions_raise(gen):
    path = AffineGaussianPath(CondOTScheduler())
    x, pred = _randn((2, 3), gen), _randn((2, 3), gen)
    cases = [
        ("epsilon", "x1", 0.0),  # alpha_0 = 0: x_0 carries no information on x1
        ("score", "x1", 0.0),
        ("epsilon", "velocity", 0.0),
        ("x1", "velocity", 1.0),  # sigma_1 = 0: x_1 = x1 carries no information on x0
        ("x1", "epsilon", 1.0),
        ("velocity", "score", 1.0),  # the score is infinite at a point mass
        ("epsilon", "score", 1.0),
    ]
    for a, b, t in cases:
        with pytest.raises(ValueError, match=rf"'{a}' to '{b}' is singular at t={t}"):
            path.convert(pred, x, t, a, b)
        # one bad entry in a per-sample t is enough
        with pytest.raises(ValueError, match=rf"singular at t={t}"):
            path.convert(pred, x, torch.tensor([0.5, t], dtype=F64), a, b)


def test_singular_conversion_advice_depends_on_the_source(gen):
    """From velocity, "use the velocity parameterisation" is no advice: it is singular
    where D_t = alpha'_t sigma_t - alpha_t sigma'_t = 0 (PolynomialScheduler(n > 1), t = 0)."""
    x, pred = _randn((2, 3), gen), _randn((2, 3), gen)
    poly = AffineGaussianPath(PolynomialScheduler(2))
    for b in ("x1", "epsilon", "score", "v"):
        with pytest.raises(ValueError, match=r"singular at t=0.0") as info:
            poly.convert(pred, x, 0.0, "velocity", b)
        assert "use the velocity parameterisation" not in str(info.value)
    with pytest.raises(ValueError, match="or use the velocity parameterisation"):
        poly.convert(pred, x, 0.0, "epsilon", "x1")


def test_finite_limits_at_the_endpoints(gen):
    cond_ot = AffineGaussianPath(CondOTScheduler())
    x, pred = _randn((3, 4), gen), _randn((3, 4), gen)
    # velocity <-> x1 for CondOT: x1 = x + (1 - t) u, u = (x1 - x) / (1 - t)
    assert_close(cond_ot.convert(pred, x, 0.0, "velocity", "x1"), x + pred, rtol=0, atol=0)
    assert_close(cond_ot.convert(pred, x, 1.0, "velocity", "x1"), x, rtol=0, atol=0)
    assert_close(cond_ot.convert(pred, x, 0.0, "x1", "velocity"), pred - x, rtol=0, atol=0)
    assert_close(cond_ot.convert(pred, x, 1.0, "data", "x1"), pred, rtol=0, atol=0)
    # score -> velocity at t = 1 is (alpha'_1 / alpha_1) x: the score term has weight
    # sigma_1^2 alpha'/alpha - sigma_1 sigma'_1 = 0
    for sched in (CondOTScheduler(), PolynomialScheduler(2), PolynomialScheduler(3.5),
                  CosineScheduler()):
        v = sched(torch.tensor(1.0, dtype=F64))
        out = AffineGaussianPath(sched).convert(pred, x, 1.0, "score", "velocity")
        assert_close(out, x / v.alpha_t * v.d_alpha_t, rtol=1e-15, atol=1e-15)
    # score -> epsilon at t = 0 (alpha_0 = 0 does not matter): eps = -sigma_0 s
    for sched in SCHEDS:
        out = AffineGaussianPath(sched).convert(pred, x, 0.0, "score", "epsilon")
        assert_close(out, -sched.sigma(torch.tensor(0.0, dtype=F64)) * pred, rtol=1e-15,
                     atol=0)
        back = AffineGaussianPath(sched).convert(out, x, 0.0, "noise", "score")
        assert_close(back, pred, rtol=1e-14, atol=1e-14)


def test_linear_vp_velocity_and_score_are_regular_at_t1(gen):
    """For linear-beta VP, sigma'_1 is infinite but sigma_1 sigma'_1 = -beta_min / 2 is not:
    u = alpha'_1 x + (beta_min / 2) s at t = 1, and x1_hat = x there."""
    b_min = 0.1
    path = AffineGaussianPath(LinearVPScheduler(b_min, 20.0))
    x, s = _randn((3, 4), gen), _randn((3, 4), gen)
    d_alpha = path.scheduler(torch.tensor(1.0, dtype=F64)).d_alpha_t
    u = path.convert(s, x, 1.0, "score", "velocity")
    assert_close(u, d_alpha * x + 0.5 * b_min * s, rtol=1e-14, atol=1e-14)
    assert_close(path.convert(u, x, 1.0, "velocity", "score"), s, rtol=1e-12, atol=1e-12)
    assert_close(path.convert(u, x, 1.0, "velocity", "x1"), x, rtol=1e-14, atol=1e-14)
    for singular in ("epsilon", "x1", "v"):  # eps_hat = 0 and x1_hat = x: no score in them
        with pytest.raises(ValueError, match="singular at t=1.0"):
            path.convert(s, x, 1.0, singular, "velocity")


def test_convert_check_false_skips_the_test(gen):
    path = AffineGaussianPath(CondOTScheduler())
    x, pred = _randn((2, 3), gen), _randn((2, 3), gen)
    out = path.convert(pred, x, 0.0, "epsilon", "x1", check=False)
    assert not torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------


def test_mismatched_shapes_raise_naming_them(gen):
    path = AffineGaussianPath(CondOTScheduler())
    a, b = _randn((4, 3), gen), _randn((4, 2), gen)
    with pytest.raises(ValueError, match=r"x0 \(4, 3\) and x1 \(4, 2\)"):
        path.sample(a, b, 0.5)
    for method in (path.conditional_velocity, path.conditional_score,
                   path.conditional_log_prob):
        with pytest.raises(ValueError, match=r"x \(4, 3\) and x1 \(4, 2\)"):
            method(a, b, 0.5)
    with pytest.raises(ValueError, match=r"prediction \(4, 2\) and x \(4, 3\)"):
        path.convert(b, a, 0.5, "velocity", "x1")


@pytest.mark.parametrize("t_shape", [(3,), (5,), (4, 2)])
def test_time_of_the_wrong_shape_raises_naming_shapes(t_shape, gen):
    path = AffineGaussianPath(CosineScheduler())
    x0, x1 = _randn((4, 3), gen), _randn((4, 3), gen)
    t = torch.full(t_shape, 0.5, dtype=F64)
    pattern = rf"\(B,\) = \(4,\).*\(4, 3\).*{re_shape(t_shape)}"
    with pytest.raises(ValueError, match=pattern):
        path.sample(x0, x1, t)
    with pytest.raises(ValueError, match=pattern):
        path.conditional_score(x0, x1, t)
    with pytest.raises(ValueError, match=pattern):
        path.convert(x0, x1, t, "x1", "epsilon")


def re_shape(shape):
    return r"\(" + r",\s?".join(str(s) for s in shape) + (r",\)" if len(shape) == 1 else r"\)")


@pytest.mark.parametrize("bad", [-0.1, 1.5, math.nan])
def test_time_outside_unit_interval_raises(bad, gen):
    path = AffineGaussianPath(CondOTScheduler())
    x0, x1 = _randn((2, 3), gen), _randn((2, 3), gen)
    for call in (
        lambda t: path.sample(x0, x1, t),
        lambda t: path.conditional_velocity(x0, x1, t),
        lambda t: path.conditional_log_prob(x0, x1, t),
        lambda t: path.convert(x0, x1, t, "velocity", "x1"),
    ):
        for t in (bad, torch.tensor([0.5, bad], dtype=F64)):
            with pytest.raises(ValueError, match=r"\bt must lie in \[0, 1\]"):
                call(t)


def test_unknown_parameterisation_lists_accepted(gen):
    path = AffineGaussianPath(CondOTScheduler())
    x = _randn((2, 3), gen)
    for args in (("velocity", "x_start"), ("x_start", "velocity")):
        with pytest.raises(ValueError, match="'x_start' is not a parameterisation") as info:
            path.convert(x, x, 0.5, *args)
        for name in NAMES:
            assert name in str(info.value)
    with pytest.raises(ValueError, match="accepted"):
        path.conversion_coefficients(torch.tensor(0.5), "flow", "score")


def test_path_needs_a_scheduler():
    with pytest.raises(TypeError, match="Scheduler"):
        AffineGaussianPath("condot")
