"""Log-density of generated samples (noise -> data, one solve) against closed forms
(float64): Gaussian-mixture densities, the data -> noise evaluation, NFE, Hutchinson, order."""

import math

import pytest
import torch
from _cases import random_mixture as mixture

import flowsolve as fs
from flowsolve import analytic
from flowsolve.likelihood.augmented import AugmentedSystem
from flowsolve.likelihood.cnf import log_likelihood
from flowsolve.likelihood.generated import GeneratedLikelihood, sample_log_likelihood
from flowsolve.ode.solve import sample

F64 = torch.float64
COND_OT, COSINE = fs.CondOTScheduler(), fs.CosineScheduler()


def _setup(gen, sched, d=2, b=6):
    data = mixture(gen, d)
    u = analytic.marginal_velocity(data, fs.AffineGaussianPath(sched))
    return data, u, torch.randn(b, d, generator=gen, dtype=F64)


@pytest.mark.parametrize("sched, settings", [
    (COND_OT, dict(solver="dopri5", rtol=1e-8, atol=1e-8)),
    (COSINE, dict(solver="dopri8", rtol=1e-9, atol=1e-9)),
], ids=["condot-dopri5", "cosine-dopri8"])
def test_log_prob_of_samples_is_mixture_density_and_matches_backward(gen, sched, settings):
    """log p1 at the generated x equals the mixture's exact log-density (measured: 3e-8
    dopri5 1e-8, 4e-10 dopri8 1e-9, from t = 0 on both paths), and the data -> noise
    evaluation of the same x with the same settings gives the same number and x0 back."""
    data, u, x0 = _setup(gen, sched)
    res = sample_log_likelihood(u, x0, **settings)
    assert isinstance(res, GeneratedLikelihood) and res.solver == settings["solver"]
    assert res.stderr is None and res.divergence == "exact (auto)" and res.x.shape == x0.shape
    exact = data.log_prob(res.x)
    torch.testing.assert_close(res.log_prob, exact, rtol=0, atol=1e-6)
    torch.testing.assert_close(res.log_prob, res.prior_log_prob + res.delta_log_prob,
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(res.prior_log_prob, analytic.StandardNormal(2).log_prob(x0))
    # the samples move (a map that left x0 in place would pass the density check vacuously)
    assert (res.x - x0).abs().max() > 0.5 and res.delta_log_prob.abs().max() > 0.1
    back = log_likelihood(u, res.x, **settings)
    torch.testing.assert_close(back.log_prob, res.log_prob, rtol=0, atol=1e-6)
    torch.testing.assert_close(back.x0, x0, rtol=0, atol=1e-6)


def test_one_solve_nfe_and_samples_equal_plain_sampling(gen):
    """The NFE is one solve's: the counted calls of the field, the front door's count for
    the augmented system, and (fixed step) the NFE of plain sampling, whose samples are the
    same to rounding."""
    data, u, x0 = _setup(gen, COND_OT)
    calls = []

    def counted(x, t):
        calls.append(1)
        return u(x, t)

    res = sample_log_likelihood(counted, x0, rtol=1e-6, atol=1e-6)
    assert res.nfe == len(calls) > 0
    system = AugmentedSystem(u, x0.shape, "auto", None, False, None)
    z0 = torch.cat([x0, x0.new_zeros(len(x0), 1)], 1)
    assert sample(system, z0, "dopri5", rtol=1e-6, atol=1e-6).nfe == res.nfe

    fixed = sample_log_likelihood(u, x0, solver="rk4", steps=8)
    plain = sample(u, x0, "rk4", steps=8)
    assert fixed.nfe == plain.nfe == 32
    torch.testing.assert_close(fixed.x, plain.x, rtol=0, atol=1e-12)


def test_hutchinson_within_standard_errors(gen):
    """32 Rademacher probes: within 4 standard errors of the exact log-density, the error
    being the probes' (the solve is tight); one probe: stderr NaN."""
    data, u, x0 = _setup(gen, COSINE, d=3, b=4)
    g = torch.Generator().manual_seed(0)
    res = sample_log_likelihood(u, x0, rtol=1e-7, atol=1e-7, divergence="hutchinson",
                                n_probes=32, generator=g)
    assert res.divergence == "hutchinson (rademacher, k=32)"
    exact = data.log_prob(res.x)
    assert bool((res.stderr > 1e-4).all()), res.stderr
    z = (res.log_prob - exact) / res.stderr
    assert bool((z.abs() < 4).all()), z
    one = sample_log_likelihood(u, x0, rtol=1e-6, atol=1e-6, divergence="hutchinson",
                                generator=g)
    assert bool(one.stderr.isnan().all())


def test_rk4_log_density_error_is_fourth_order(gen):
    """|log p1(x_N) - lp_N| for RK4 with N steps falls as N^-4 (measured 4.06-4.08)."""
    data, u, x0 = _setup(gen, COND_OT)
    steps = [8, 16, 32]
    errs = []
    for n in steps:
        res = sample_log_likelihood(u, x0, solver="rk4", steps=n)
        errs.append((res.log_prob - data.log_prob(res.x)).abs().max().item())
    order = -torch.linalg.lstsq(torch.tensor([[math.log(n), 1.0] for n in steps]),
                                torch.tensor(errs).log()[:, None]).solution[0].item()
    assert abs(order - 4) < 0.3, (errs, order)


def test_linear_field_with_prior_object():
    """u = a x from N(0, s^2 I): x1 = e^a x0, log p1(x1) = log N(x1; 0, (s e^a)^2 I)."""
    a, s = 0.7, 1.5
    x0 = torch.linspace(-2, 2, 12, dtype=F64).reshape(4, 3)
    prior = analytic.StandardNormal(3, s)
    res = sample_log_likelihood(lambda x, t: a * x, x0, prior=prior, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(res.x, math.exp(a) * x0)
    torch.testing.assert_close(res.log_prob, analytic.StandardNormal(3, s * math.exp(a))
                               .log_prob(res.x), rtol=0, atol=1e-9)
    torch.testing.assert_close(res.delta_log_prob, torch.full((4,), -3 * a, dtype=F64))


@pytest.mark.parametrize("solver", ["dpmpp_2m", "ddim", "edm_heun"])
def test_low_nfe_samplers_refused(solver):
    with pytest.raises(ValueError, match=r"low-NFE sampler.*not a field on the augmented "
                                         r"state.*Accepted: .*dopri5.*rk4"):
        sample_log_likelihood(lambda x, t: x, torch.zeros(2, 2, dtype=F64), solver=solver,
                              steps=4)


@pytest.mark.parametrize("x0, message", [
    (torch.zeros(3, dtype=F64), r"x0 must be a floating tensor shaped \(B, \*event_shape\).*"
                                r"got \(3,\)"),
    (torch.zeros(3, 2, dtype=torch.long), r"x0 must be a floating tensor"),
    ([[0.0, 1.0]], r"x0 must be a floating tensor.*got list"),
])
def test_bad_x0_refused(x0, message):
    with pytest.raises(ValueError, match=message):
        sample_log_likelihood(lambda x, t: x, x0)


def test_bad_solver_interval_and_divergence_refused():
    x0 = torch.zeros(2, 2, dtype=F64)
    with pytest.raises(ValueError, match=r"solver='nope' is not an ODE solver; accepted: .*dopri5"):
        sample_log_likelihood(lambda x, t: x, x0, solver="nope")
    with pytest.raises(ValueError, match=r"t_interval must satisfy 0 <= t_lo < t_hi <= 1"):
        sample_log_likelihood(lambda x, t: x, x0, t_interval=(0.5, 0.2))
    with pytest.raises(ValueError, match=r"divergence='bad'; accepted: exact, hutchinson"):
        sample_log_likelihood(lambda x, t: x, x0, divergence="bad")
