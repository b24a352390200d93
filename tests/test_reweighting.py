"""Importance reweighting against an unnormalised target (flowsolve/likelihood/reweighting.py):
ESS, log Z and reweighted expectations against closed forms."""

import math

import pytest
import torch

import flowsolve as fs
from flowsolve.likelihood.generated import sample_log_likelihood
from flowsolve.likelihood.reweighting import reweight

F64 = torch.float64
TARGET = fs.GaussianMixture.ring(4, radius=2.0, std=0.5)
LOG_Z = 3.7  # the target is known up to this constant: log p*(x) = log p(x) + LOG_Z


def log_target(x):
    return TARGET.log_prob(x) + LOG_Z


def test_the_exact_flow_gives_ess_one_and_the_constant():
    """Samples of the exact velocity's flow with their log-density from the sampling solve:
    q = p, so every weight is Z, ESS = N to round-off, and log Z is recovered."""
    path = fs.AffineGaussianPath(fs.CondOTScheduler())
    u = fs.analytic.marginal_velocity(TARGET, path)
    x0 = torch.randn(256, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    gen = sample_log_likelihood(u, x0, rtol=1e-9, atol=1e-9)
    w = reweight(gen.log_prob, log_target(gen.x))
    assert w.ess_fraction == pytest.approx(1.0, abs=1e-12)
    assert w.log_z == pytest.approx(LOG_Z, abs=1e-6)
    assert w.log_z_stderr < 1e-6
    lo, hi = w.log_z_interval()
    assert lo <= LOG_Z + 1e-6 and hi >= LOG_Z - 1e-6


def test_a_wrong_model_loses_ess_and_its_error_bars_cover_the_closed_form():
    """q: the same ring with wider components (sampled and evaluated exactly). The ESS falls;
    the reweighted mean of ||x||^2 (closed form under p: r^2 + d s^2 = 4.5) and log Z lie
    within 4 standard errors, and the standard errors are what the spread of 20 independent
    repetitions shows (within a factor 2)."""
    q = fs.GaussianMixture.ring(4, radius=2.0, std=0.8)
    means, log_zs, ses, z_ses = [], [], [], []
    for seed in range(20):
        x = q.sample(4000, generator=torch.Generator().manual_seed(seed), dtype=F64)
        w = reweight(q.log_prob(x), log_target(x))
        mu, se = w.expectation(x.square().sum(1))
        means.append(float(mu))
        ses.append(float(se))
        log_zs.append(w.log_z)
        z_ses.append(w.log_z_stderr)
        assert 0.05 < w.ess_fraction < 0.9
        assert abs(float(mu) - 4.5) < 4 * float(se)
        assert abs(w.log_z - LOG_Z) < 4 * w.log_z_stderr
    spread = torch.tensor(means).std().item()
    assert 0.5 < spread / (sum(ses) / len(ses)) < 2.0
    spread_z = torch.tensor(log_zs).std().item()
    assert 0.5 < spread_z / (sum(z_ses) / len(z_ses)) < 2.0


def test_weights_and_ess_follow_their_formulas():
    log_q = torch.tensor([0.0, 0.0, 0.0, 0.0], dtype=F64)
    log_p = torch.log(torch.tensor([1.0, 1.0, 2.0, 4.0], dtype=F64)) + 1000.0  # no overflow
    w = reweight(log_q, log_p)
    assert torch.allclose(w.weights, torch.tensor([1, 1, 2, 4], dtype=F64) / 8)
    assert w.ess == pytest.approx(64 / 22)  # (sum w)^2 / sum w^2
    assert w.log_z == pytest.approx(1000.0 + math.log(2.0))
    mu, se = w.expectation(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 8.0]]))
    assert mu.tolist() == pytest.approx([0.25, 4.0])
    outside = reweight(log_q, torch.tensor([0.0, -math.inf, 0.0, 0.0], dtype=F64))
    assert outside.weights[1] == 0 and outside.ess == pytest.approx(3.0)


def test_bad_inputs_are_refused():
    ok = torch.zeros(3, dtype=F64)
    with pytest.raises(ValueError, match="log_model must be a non-empty floating tensor"):
        reweight(ok[:, None], ok)
    with pytest.raises(ValueError, match="both be"):
        reweight(ok, ok[:2])
    with pytest.raises(ValueError, match="log_model must be finite"):
        reweight(torch.tensor([0.0, math.nan, 0.0], dtype=F64), ok)
    with pytest.raises(ValueError, match="finite or -inf"):
        reweight(ok, torch.tensor([0.0, math.inf, 0.0], dtype=F64))
    with pytest.raises(ValueError, match="miss the target's support"):
        reweight(ok, torch.full((3,), -math.inf, dtype=F64))
    with pytest.raises(ValueError, match="values must be"):
        reweight(ok, ok).expectation(torch.zeros(2))
    with pytest.raises(ValueError, match="level"):
        reweight(ok, ok).log_z_interval(1.5)
