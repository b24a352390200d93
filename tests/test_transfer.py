"""Scheduler transfer against closed forms: the transferred marginal velocity of one path is
the marginal velocity of the other, and the transferred flow lands on the same x1."""

import pytest
import torch
from torchdiffeq import odeint

import flowsolve as fs
from flowsolve import analytic

F64 = torch.float64


@pytest.fixture
def mixture(gen):
    means = torch.tensor([[-2.0, 0.5], [2.0, -0.5], [0.0, 2.5]], dtype=F64)
    a = torch.randn(3, 2, 2, generator=gen, dtype=F64)
    covs = a @ a.transpose(1, 2) / 2 + 0.1 * torch.eye(2, dtype=F64)
    return fs.GaussianMixture(means, covs, torch.tensor([0.3, 0.5, 0.2], dtype=F64))


def velocity(data, sched):
    return analytic.marginal_velocity(data, fs.AffineGaussianPath(sched))


PAIRS = [
    (fs.CondOTScheduler(), fs.CosineScheduler()),
    (fs.CondOTScheduler(), fs.LinearVPScheduler()),
    (fs.CondOTScheduler(), fs.PolynomialScheduler(2.0)),
    (fs.CondOTScheduler(), fs.PolynomialScheduler(3.0)),
    (fs.CosineScheduler(), fs.CondOTScheduler()),
    (fs.LinearVPScheduler(), fs.CondOTScheduler()),
    (fs.PolynomialScheduler(2.0), fs.CondOTScheduler()),
    (fs.LinearVPScheduler(), fs.CosineScheduler()),
    (fs.VEScheduler(0.02, 5.0), fs.VEScheduler(0.1, 5.0)),
    # extreme SNR ranges: log snr near -500 at t = 0 (T > 709, where expm1(T) overflows) and
    # t^120 underflowing near t = 0
    (fs.CondOTScheduler(), fs.LinearVPScheduler(0.1, 2000.0)),
    (fs.LinearVPScheduler(0.1, 2000.0), fs.CosineScheduler()),
    (fs.CondOTScheduler(), fs.PolynomialScheduler(120.0)),
]
IDS = [f"{a!r}->{b!r}" for a, b in PAIRS]


@pytest.mark.parametrize("source, target", PAIRS, ids=IDS)
def test_transfer_of_marginal_velocity_is_target_marginal_velocity(source, target, mixture, gen):
    v = fs.transfer(velocity(mixture, source), source=source, target=target)
    exact = velocity(mixture, target)
    lo, hi = v.valid_interval
    x = 2 * torch.randn(64, 2, generator=gen, dtype=F64)
    r = lo + (hi - lo) * torch.rand(64, generator=gen, dtype=F64)
    torch.testing.assert_close(v(x, r), exact(x, r), rtol=1e-8, atol=1e-8)
    # the closed ends of the interval, by their limits, where the transfer is regular there
    ends = [e for e in (lo, hi)
            if not (isinstance(target, fs.LinearVPScheduler) and e == 1.0)
            and not (isinstance(source, fs.PolynomialScheduler) and e == 0.0)]
    for end in ends:
        torch.testing.assert_close(v(x, end), exact(x, end), rtol=1e-8, atol=1e-8)


def test_valid_interval_of_a_source_that_never_reaches_zero_snr(mixture):
    v = fs.transfer(velocity(mixture, fs.LinearVPScheduler()), source=fs.LinearVPScheduler(),
                    target=fs.CondOTScheduler())
    lo, hi = v.valid_interval
    alpha0 = float(fs.LinearVPScheduler().alpha(0.0))
    assert hi == 1.0 and 0 < lo < 2 * alpha0
    with pytest.raises(ValueError, match="outside"):
        v(torch.zeros(2, 2, dtype=F64), lo / 2)


def test_coefficients_match_the_derivative_formula(mixture):
    """A_r = s'_r / s_r and B_r = s_r t'_r, with s' and t' by autograd of the time map."""
    v = fs.transfer(velocity(mixture, fs.CondOTScheduler()), source=fs.CondOTScheduler(),
                    target=fs.LinearVPScheduler())
    r = torch.linspace(0.05, 0.95, 19, dtype=F64, requires_grad=True)
    t_r, s_r, a_r, b_r = v.coefficients(r)
    (dt,) = torch.autograd.grad(t_r.sum(), r, retain_graph=True)
    (ds,) = torch.autograd.grad(s_r.sum(), r)
    torch.testing.assert_close(a_r, ds / s_r, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b_r, s_r * dt, rtol=1e-10, atol=1e-12)


def test_transfer_to_itself_is_the_identity(mixture, gen):
    sched = fs.CosineScheduler()
    u = velocity(mixture, sched)
    v = fs.transfer(u, source=sched, target=sched)
    x = torch.randn(10, 2, generator=gen, dtype=F64)
    r = torch.rand(10, generator=gen, dtype=F64)
    torch.testing.assert_close(v(x, r), u(x, r), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("target", [fs.CosineScheduler(), fs.PolynomialScheduler(2.0)],
                         ids=repr)
def test_transferred_flow_lands_on_the_same_x1(target, mixture, gen):
    source = fs.CondOTScheduler()
    u = velocity(mixture, source)
    v = fs.transfer(u, source=source, target=target)
    x0 = torch.randn(32, 2, generator=gen, dtype=F64)
    grid = torch.tensor([0.0, 1.0], dtype=F64)
    # step_t: land a step on t = 1 exactly (dopri5 otherwise steps past it and interpolates)
    tight = dict(method="dopri5", rtol=1e-11, atol=1e-11, options=dict(step_t=grid))
    x1 = odeint(lambda t, x: u(x, t), x0, grid, **tight)[-1]
    x1_bar = odeint(lambda t, x: v(x, t), x0, grid, **tight)[-1]
    torch.testing.assert_close(x1_bar, x1, rtol=1e-7, atol=1e-7)


def test_per_sample_and_scalar_time_agree(mixture, gen):
    v = fs.transfer(velocity(mixture, fs.CondOTScheduler()), source=fs.CondOTScheduler(),
                    target=fs.CosineScheduler())
    x = torch.randn(5, 2, generator=gen, dtype=F64)
    r = torch.linspace(0, 1, 5, dtype=F64)
    rows = torch.cat([v(x[i : i + 1], r[i]) for i in range(5)])
    torch.testing.assert_close(v(x, r), rows, rtol=0, atol=1e-14)


def test_bad_input_raises(mixture):
    u = velocity(mixture, fs.CondOTScheduler())
    with pytest.raises(ValueError, match="share the source distribution"):
        fs.transfer(u, source=fs.CondOTScheduler(), target=fs.VEScheduler())

    class Bump(fs.Scheduler):  # SNR rises then falls: not monotone
        def _values(self, t):
            a = torch.sin(torch.pi * t) * 0.5 + 0.01
            return a, 1 - a, torch.pi * 0.5 * torch.cos(torch.pi * t), -0.5 * torch.pi * torch.cos(
                torch.pi * t)

    with pytest.raises(ValueError, match="strictly increasing SNR"):
        fs.transfer(u, source=fs.CondOTScheduler(), target=Bump())
    with pytest.raises(TypeError, match="Scheduler"):
        fs.transfer(u, source="condot", target=fs.CosineScheduler())
    v = fs.transfer(u, source=fs.CondOTScheduler(), target=fs.LinearVPScheduler())
    with pytest.raises(ValueError, match="singular at r=1"):
        v(torch.zeros(2, 2, dtype=F64), 1.0)


def test_singular_points_raise_with_their_cause(mixture):
    """Where the formula is 0 / 0 (D_t = 0) the call raises even if the transfer has a
    finite limit: PolynomialScheduler(2) to itself is the identity, whose limit at r = 0 is
    the source velocity, but D_0 = alpha'_0 sigma_0 - alpha_0 sigma'_0 = 0 there."""
    poly = fs.PolynomialScheduler(2.0)
    u = velocity(mixture, poly)
    v = fs.transfer(u, source=poly, target=poly)
    x = torch.randn(2, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(v(x, 1e-3), u(x, 1e-3), rtol=1e-12, atol=1e-12)
    _, _, a_0, b_0 = v.coefficients(torch.tensor(0.0, dtype=F64))
    assert a_0.isnan() and b_0.isnan()  # 0 / 0: the limit (0, 1) is not evaluated
    with pytest.raises(ValueError, match=r"singular at r=0.0 \(the source velocity does not "
                                         r"determine the posterior means .* D_t"):
        v(x, 0.0)
    w = fs.transfer(u, source=poly, target=fs.LinearVPScheduler())
    with pytest.raises(ValueError, match="singular at r=1.0 .*target scheduler's derivatives "
                                         "are infinite"):
        w(x, 1.0)
