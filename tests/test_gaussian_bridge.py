"""Closed-form entropic OT and Schrodinger bridge between Gaussians
(flowsolve/truth/gaussian_bridge.py), checked against POT's Sinkhorn, the optimality
conditions of the plan, the Fokker-Planck equation of the bridge's SDE, flowsolve's own SDE
and ODE solvers, the sigma -> 0 limit (Monge map, McCann interpolation, Bures-Wasserstein
cost, POT's closed forms) and flowsolve's entropic minibatch coupling."""

import math

import numpy as np
import ot
import pytest
import torch

import flowsolve as fs
from flowsolve.paths.bridges import GaussianBridge
from flowsolve.truth.gaussian_bridge import GaussianSchrodingerBridge

F64 = torch.float64

# non-commuting covariances (S0 S1 != S1 S0), so that C = Cov(X0, X1) is not symmetric
CASES = {
    "d2": (torch.tensor([0.5, -1.0], dtype=F64),
           torch.tensor([[1.0, 0.6], [0.6, 0.8]], dtype=F64),
           torch.tensor([2.0, 1.0], dtype=F64),
           torch.tensor([[0.5, -0.3], [-0.3, 1.5]], dtype=F64)),
    "d3": (torch.tensor([0.0, 1.0, -0.5], dtype=F64),
           torch.tensor([[1.0, 0.3, 0.2], [0.3, 0.7, -0.1], [0.2, -0.1, 0.5]], dtype=F64),
           torch.tensor([1.0, 0.0, 0.5], dtype=F64),
           torch.tensor([[0.6, -0.2, 0.0], [-0.2, 1.2, 0.4], [0.0, 0.4, 0.9]], dtype=F64)),
}


def bridge(case: str, sigma: float) -> GaussianSchrodingerBridge:
    return GaussianSchrodingerBridge(*CASES[case], sigma)


def gaussian(m: torch.Tensor, s: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    return m + torch.randn(n, m.shape[0], generator=gen, dtype=F64) @ torch.linalg.cholesky(s).T


def whitened(m: torch.Tensor, s: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """n points whose sample mean and covariance (divisor n) are exactly m and s: the
    sampling error of the start is removed, that of the dynamics' noise remains."""
    z = torch.randn(n, m.shape[0], generator=gen, dtype=F64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(z.T @ z / n)).T
    return m + z @ torch.linalg.cholesky(s).T


def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c = x - x.mean(0)
    return x.mean(0), c.T @ c / x.shape[0]


def test_cases_do_not_commute():
    for case in CASES:
        _, s0, _, s1 = CASES[case]
        assert (s0 @ s1 - s1 @ s0).abs().max() > 0.1
        c = bridge(case, 0.7).cross_covariance
        assert (c - c.T).abs().max() > 0.1  # a transposed C would be seen by the POT test


# -- 1. against POT's Sinkhorn ------------------------------------------------------------
@pytest.mark.parametrize("case,sigma", [("d2", 0.7), ("d2", 1.0), ("d3", 0.7)])
def test_plan_matches_pot_sinkhorn_on_samples(case, sigma):
    """POT's log-domain Sinkhorn with reg = 2 sigma^2 on the raw squared cost between n = 2000
    draws of each Gaussian. Tolerances from 40 repetitions (seeds 0-39; the kernel-domain
    solver, whose plans equal the log domain's to 2e-15 on these problems):

    * against the population closed form, the centred cross-covariance sum_ij P_ij x0_i
      x1_j^T has per-entry sd <= 0.028 (largest error 0.078) and the cost sd 0.17 (d = 2),
      0.09 (d = 3): tolerances 0.12 and 0.9;
    * against the closed form at the samples' own means and covariances (the plug-in,
      which removes the first-order sampling error of the moments): per-entry sd <= 0.0009,
      largest error 0.0024; cost: bias <= 0.005, sd <= 0.0017, largest 0.0083; entropic
      objective <P, M> + reg KL(P | a b^T): largest 0.0037. Tolerances 0.006, 0.02, 0.01.

    A factor-2 slip in the regularisation (reg = sigma^2) moves C by 0.10-0.16 here."""
    m0, s0, m1, s1 = CASES[case]
    sb = bridge(case, sigma)
    n = 2000
    gen = torch.Generator().manual_seed(7)
    x0, x1 = gaussian(m0, s0, n, gen), gaussian(m1, s1, n, gen)
    cost = torch.cdist(x0, x1) ** 2
    a = torch.full((n,), 1.0 / n, dtype=F64)
    plan, log = ot.sinkhorn(a, a, cost, sb.reg, method="sinkhorn_log", numItermax=5000,
                            stopThr=1e-9, log=True)
    assert (plan.sum(1) - a).abs().sum() + (plan.sum(0) - a).abs().sum() < 1e-7
    c0, c1 = x0 - x0.mean(0), x1 - x1.mean(0)
    cross = c0.T @ plan @ c1
    transport = float((plan * cost).sum())
    objective = transport + sb.reg * float((plan * torch.log(plan * n * n)).sum())

    assert (cross - sb.cross_covariance).abs().max() < 0.12
    assert abs(transport - sb.transport_cost()) < 0.9

    fit = GaussianSchrodingerBridge(*moments(x0), *moments(x1), sigma)
    assert (cross - fit.cross_covariance).abs().max() < 0.006
    assert abs(transport - fit.transport_cost()) < 0.02
    assert abs(objective - fit.entropic_cost()) < 0.01


# -- the plan's own optimality --------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("sigma", [0.3, 1.0, 2.5])
def test_plan_is_the_schrodinger_optimum(case, sigma, gen):
    """The joint density is exp(phi(x0) + psi(x1) - |x0 - x1|^2 / reg) times Lebesgue: the
    joint precision's off-diagonal block is -I / sigma^2 (the characterisation of the
    entropic optimum); the marginals are S0 and S1; among Gaussian plans of these
    marginals no perturbation of C lowers cost + reg KL (computed from the joint
    log-determinant, not the conditional's)."""
    m0, s0, m1, s1 = CASES[case]
    sb = bridge(case, sigma)
    d = sb.dim
    joint = sb.joint_covariance
    prec = torch.linalg.inv(joint)
    torch.testing.assert_close(prec[:d, d:] * sigma**2, -torch.eye(d, dtype=F64),
                               rtol=0, atol=1e-10)
    torch.testing.assert_close(joint[:d, :d], s0, rtol=0, atol=0)
    torch.testing.assert_close(joint[d:, d:], s1, rtol=0, atol=0)
    torch.testing.assert_close(sb.joint_mean, torch.cat([m0, m1]), rtol=0, atol=0)

    def objective(c: torch.Tensor) -> float:
        full = torch.cat([torch.cat([s0, c], 1), torch.cat([c.T, s1], 1)], 0)
        kl = 0.5 * float(torch.logdet(s0) + torch.logdet(s1) - torch.logdet(full))
        w2 = float(((m0 - m1) ** 2).sum() + torch.trace(s0) + torch.trace(s1) - 2 * torch.trace(c))
        return w2 + sb.reg * kl

    best = objective(sb.cross_covariance)
    assert best == pytest.approx(sb.entropic_cost(), rel=1e-12)
    for _ in range(20):
        e = 1e-3 * torch.randn(d, d, generator=gen, dtype=F64)
        assert objective(sb.cross_covariance + e) > best
    # and the sampler draws that plan (n = 200 000: entry sd <= 0.004)
    x0, x1 = sb.sample_plan(200_000, generator=gen, dtype=F64)
    mean, cov = moments(torch.cat([x0, x1], 1))
    assert (mean - sb.joint_mean).abs().max() < 0.02
    assert (cov - joint).abs().max() < 0.03


# -- 2. Fokker-Planck -----------------------------------------------------------------------
def linear_part(field, x: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, A) of an affine field f(x) = a + A x at time t, read off d + 1 evaluations."""
    d = x.shape[0]
    pts = torch.cat([x[None], x + torch.eye(d, dtype=F64)], 0)
    f = field(pts, t)
    jac = (f[1:] - f[0]).T
    return f[0] - jac @ x, jac


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("sigma", [0.0, 0.5, 1.2])
def test_marginals_solve_the_fokker_planck_equation(case, sigma):
    """With f_t(x) = a_t + A_t x: d m_t/dt = f_t(m_t) and d Sigma_t/dt = A_t Sigma_t +
    Sigma_t A_t^T + sigma^2 I (central differences, h = 1e-5: error ~1e-10); the PF-ODE
    velocity's linear part B_t gives d Sigma_t/dt = B_t Sigma_t + Sigma_t B_t^T; the drift
    is a gradient field (A_t symmetric: sigma^2 grad log of the forward potential), which
    the marginals alone would not fix."""
    sb = bridge(case, sigma)
    h = 1e-5
    for t in (0.05, 0.3, 0.5, 0.77, 0.95):
        m, cov = sb.marginal(t)
        (mp, cp), (mm, cm) = sb.marginal(t + h), sb.marginal(t - h)
        dm, dcov = (mp - mm) / (2 * h), (cp - cm) / (2 * h)
        a, big_a = linear_part(sb.drift, m, t)
        torch.testing.assert_close(a + big_a @ m, dm, rtol=0, atol=1e-8)
        lyap = big_a @ cov + cov @ big_a.T + sigma**2 * torch.eye(sb.dim, dtype=F64)
        torch.testing.assert_close(lyap, dcov, rtol=0, atol=1e-8)
        torch.testing.assert_close(big_a, big_a.T, rtol=0, atol=1e-12)
        b, big_b = linear_part(sb.velocity, m, t)
        torch.testing.assert_close(b + big_b @ m, dm, rtol=0, atol=1e-8)
        torch.testing.assert_close(big_b @ cov + cov @ big_b.T, dcov, rtol=0, atol=1e-8)


@pytest.mark.parametrize("sigma", [0.0, 0.8])
def test_fields_endpoints_and_density(sigma, gen):
    """At t = 0 the drift is E[X1 | X0 = x] - x = m1 + K (x - m0) - x (the plan's
    regression); the ends of the marginals are the two Gaussians; log_prob equals
    fs.Gaussian's density of the marginal, and its gradient is the score; velocity =
    drift - sigma^2/2 score; a (B,) t equals a 0-d t row by row."""
    m0, s0, m1, s1 = CASES["d3"]
    sb = bridge("d3", sigma)
    x = torch.randn(64, 3, generator=gen, dtype=F64)
    expected = m1 + (x - m0) @ sb.conditional_gain - x
    torch.testing.assert_close(sb.drift(x, 0.0), expected, rtol=0, atol=1e-12)
    for t, (m, s) in ((0.0, (m0, s0)), (1.0, (m1, s1))):
        got_m, got_s = sb.marginal(t)
        torch.testing.assert_close(got_m, m, rtol=0, atol=1e-14)
        torch.testing.assert_close(got_s, s, rtol=0, atol=1e-14)
    ts = torch.rand(64, generator=gen, dtype=F64)
    ts[:2] = torch.tensor([0.0, 1.0])
    xr = x.clone().requires_grad_(True)
    lp = sb.log_prob(xr, ts)
    (grad,) = torch.autograd.grad(lp.sum(), xr)
    torch.testing.assert_close(grad, sb.score(x, ts), rtol=0, atol=1e-10)
    torch.testing.assert_close(sb.velocity(x, ts),
                               sb.drift(x, ts) - sigma**2 / 2 * sb.score(x, ts),
                               rtol=0, atol=1e-12)
    for i in (0, 1, 5, 40):
        m, s = sb.marginal(float(ts[i]))
        ref = fs.Gaussian(m, s).log_prob(x[i:i + 1])
        torch.testing.assert_close(lp[i:i + 1].detach(), ref, rtol=0, atol=1e-10)
        for field in (sb.drift, sb.score, sb.velocity, sb.log_prob):
            torch.testing.assert_close(field(x, ts)[i], field(x[i:i + 1], ts[i])[0],
                                       rtol=0, atol=1e-12)
    assert sb.drift(x.float(), 0.5).dtype == torch.float32
    ms, ss = sb.marginal(ts[:5])
    assert ms.shape == (5, 3) and ss.shape == (5, 3, 3)


def test_sb_cfm_regression_learns_the_velocity(gen):
    """SB-CFM's path (GaussianBridge(sigma, "brownian")) on pairs of the plan: x_t has the
    marginal's moments, and the least-squares affine regression of the conditional velocity
    dx_t on x_t is the closed-form velocity (n = 400 000; over three seeds the largest
    errors were 0.0015 (mean), 0.0027 (covariance), 0.0021 (coefficients); tolerance
    0.01)."""
    sigma, t = 0.8, 0.35
    sb = bridge("d2", sigma)
    x0, x1 = sb.sample_plan(400_000, generator=gen, dtype=F64)
    s = GaussianBridge(sigma, "brownian").sample(x0, x1, t, generator=gen)
    m, cov = sb.marginal(t)
    got_m, got_cov = moments(s.x_t)
    assert (got_m - m).abs().max() < 0.01 and (got_cov - cov).abs().max() < 0.01
    design = torch.cat([torch.ones(len(s.x_t), 1, dtype=F64), s.x_t - m], 1)
    coef = torch.linalg.lstsq(design, s.dx_t).solution  # (1 + d, d)
    b, big_b = linear_part(sb.velocity, m, t)
    assert (coef[0] - (b + big_b @ m)).abs().max() < 0.01
    assert (coef[1:].T - big_b).abs().max() < 0.01


# -- 3. flowsolve's own solvers -------------------------------------------------------------
def test_sde_solve_reproduces_the_marginals_and_the_plan(gen):
    """fs.sample_sde with the velocity, the score and diffusion = sigma integrates
    dX = f_t(X) dt + sigma dW (its drift is v + sigma^2/2 s = f). From a whitened N(m0, S0)
    sample (n = 40 000, Euler-Maruyama, 100 steps), the mean and covariance at t = 0.5 and 1
    and the cross-covariance Cov(X_0, X_1) of the paths match the closed form. Over six
    seeds (0-4 and the test's) the largest errors were 0.0081 (means), 0.0117 (covariances)
    and 0.0066 (C); 400 steps gave errors of the same size (largest 0.016), so Euler's bias
    is below the noise. Tolerances 0.02, 0.03, 0.02."""
    sigma = 0.8
    m0, s0, _, _ = CASES["d2"]
    sb = bridge("d2", sigma)
    x0 = whitened(m0, s0, 40_000, gen)
    res = fs.sample_sde(sb.velocity, x0, score=sb.score, diffusion=sigma, solver="euler",
                        steps=100, times=[0.5, 1.0], generator=gen)
    for k, t in enumerate((0.5, 1.0)):
        m, cov = sb.marginal(t)
        got_m, got_cov = moments(res.trajectory[k])
        assert (got_m - m).abs().max() < 0.02
        assert (got_cov - cov).abs().max() < 0.03
    x1 = res.trajectory[1]
    cross = (x0 - x0.mean(0)).T @ (x1 - x1.mean(0)) / len(x0)
    assert (cross - sb.cross_covariance).abs().max() < 0.02


@pytest.mark.parametrize("sigma", [0.0, 0.8])
def test_ode_solves_give_the_exact_flow_maps(sigma, gen):
    """Deterministic checks with dopri5 (rtol = atol = 1e-10), no sampling error:

    * the drift's ODE dx/dt = f_t(x) carries the mean of the SDE started at x, so it lands
      on E[X1 | X0 = x] = m1 + K (x - m0);
    * the PF-ODE velocity's flow is affine, x -> m1 + Phi (x - m0), with Phi S0 Phi^T = S1
      (it pushes N(m0, S0) to N(m1, S1)); at sigma = 0 Phi is the Monge map T."""
    m0, s0, m1, s1 = CASES["d3"]
    sb = bridge("d3", sigma)
    x = m0 + torch.cat([torch.zeros(1, 3, dtype=F64), torch.eye(3, dtype=F64),
                        torch.randn(5, 3, generator=gen, dtype=F64)], 0)
    kw = dict(rtol=1e-10, atol=1e-10)
    ends = fs.sample(sb.drift, x, "dopri5", **kw).x
    torch.testing.assert_close(ends, m1 + (x - m0) @ sb.conditional_gain, rtol=0, atol=1e-8)
    flow = fs.sample(sb.velocity, x, "dopri5", **kw).x
    torch.testing.assert_close(flow[0], m1, rtol=0, atol=1e-8)
    phi = (flow[1:4] - flow[0]).T
    torch.testing.assert_close(flow[4:], m1 + (x[4:] - m0) @ phi.T, rtol=0, atol=1e-8)
    torch.testing.assert_close(phi @ s0 @ phi.T, s1, rtol=0, atol=1e-8)
    if sigma == 0:
        torch.testing.assert_close(phi, sb.monge_map(), rtol=0, atol=1e-8)


# -- 4. sigma -> 0 --------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_zero_noise_is_the_monge_map_and_mccann_interpolation(case, gen):
    """sigma = 0: T S0 T = S1 with T symmetric positive definite and equal to POT's
    ot.gaussian.bures_wasserstein_mapping; the plan is (X0, m1 + T (X0 - m0)); the cost is
    POT's Bures-Wasserstein W2^2; marginal(t) is McCann's interpolation N(m_t, W_t S0 W_t),
    W_t = (1 - t) I + t T, and the velocity is the displacement's (T - I) W_t^{-1} (x - m_t)
    + m1 - m0, all to 1e-12."""
    m0, s0, m1, s1 = CASES[case]
    sb = bridge(case, 0.0)
    t_map = sb.monge_map()
    d = sb.dim
    eye = torch.eye(d, dtype=F64)
    torch.testing.assert_close(t_map @ s0 @ t_map, s1, rtol=0, atol=1e-12)
    assert torch.linalg.eigvalsh(t_map).min() > 0
    pot_a, pot_b = ot.gaussian.bures_wasserstein_mapping(m0.numpy(), m1.numpy(), s0.numpy(),
                                                         s1.numpy())
    np.testing.assert_allclose(t_map.numpy(), pot_a, rtol=0, atol=1e-10)
    np.testing.assert_allclose((m1 - t_map @ m0).numpy(), np.ravel(pot_b), rtol=0, atol=1e-10)
    torch.testing.assert_close(sb.cross_covariance, s0 @ t_map, rtol=0, atol=1e-12)
    x0, x1 = sb.sample_plan(100, generator=gen, dtype=F64)
    torch.testing.assert_close(x1, m1 + (x0 - m0) @ t_map, rtol=0, atol=1e-12)
    w2 = ot.gaussian.bures_wasserstein_distance(m0.numpy(), m1.numpy(), s0.numpy(),
                                                s1.numpy()) ** 2
    assert sb.transport_cost() == pytest.approx(float(w2), rel=1e-12)
    assert sb.entropic_cost() == sb.transport_cost() and sb.mutual_information() == math.inf
    x = torch.randn(16, d, generator=gen, dtype=F64)
    for t in (0.0, 0.2, 0.5, 0.9, 1.0):
        w = (1 - t) * eye + t * t_map
        m, cov = sb.marginal(t)
        torch.testing.assert_close(m, (1 - t) * m0 + t * m1, rtol=0, atol=1e-12)
        torch.testing.assert_close(cov, w @ s0 @ w, rtol=0, atol=1e-12)
        expected = m1 - m0 + (x - m) @ torch.linalg.solve(w, t_map - eye).T
        torch.testing.assert_close(sb.velocity(x, t), expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(sb.drift(x, t), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_small_noise_tends_to_the_unregularised_plan(case):
    """C(sigma) = S0 T - sigma^2/2 I + O(sigma^4) and E|X0 - X1|^2 = W2^2 + d sigma^2 +
    O(sigma^4) (D = 2 M^{1/2} + sigma^4/4 M^{-1/2} + ..., M = S0^{1/2} S1 S0^{1/2}): the
    remainders shrink by 1e4 per decade of sigma; the marginals tend to McCann's at rate
    sigma^4 too (C's -sigma^2/2 I cancels the bridge's own noise t (1 - t) sigma^2 I); the
    entropic objective tends to W2^2 (its KL term like sigma^2 log sigma)."""
    m0, s0, m1, s1 = CASES[case]
    ot_plan = bridge(case, 0.0)
    w2, d = ot_plan.transport_cost(), ot_plan.dim
    eye = torch.eye(d, dtype=F64)
    limit_c = s0 @ ot_plan.monge_map()
    rem_c, rem_cost, gaps = [], [], []
    for sigma in (1e-1, 1e-2):
        sb = bridge(case, sigma)
        rem_c.append(float((sb.cross_covariance - (limit_c - sigma**2 / 2 * eye)).abs().max()))
        rem_cost.append(abs(sb.transport_cost() - (w2 + d * sigma**2)))
        gaps.append(float((sb.marginal(0.4)[1] - ot_plan.marginal(0.4)[1]).abs().max()))
        assert rem_c[-1] < 5 * sigma**4 and rem_cost[-1] < 5 * sigma**4
        # reg KL = 2 sigma^2 KL, KL = -d log sigma + O(1)
        gap = sb.entropic_cost() - w2
        assert 0 < gap < sigma**2 * (2 * d * abs(math.log(sigma)) + 10)
    assert rem_c[0] / rem_c[1] > 5e3
    assert gaps[0] / gaps[1] == pytest.approx(1e4, rel=0.05)
    assert bridge(case, 1e-6).transport_cost() == pytest.approx(w2, abs=1e-10)


# -- 5. flowsolve's own entropic coupling ---------------------------------------------------
def test_ot_coupling_draws_the_closed_form_plan(gen):
    """fs.OTCoupling("sinkhorn", reg=2 sigma^2, normalize=None), SB-CFM's pairing, on 8
    batches of 1024 draws of each Gaussian: the drawn pairs' cross-covariance (8192 pairs)
    matches C within 4.5 sampling sd per entry, sd = sqrt((S0_ii S1_jj + C_ij^2) / N) (the
    sd of a sample cross-covariance of jointly Gaussian pairs; over five seeds the largest
    error was 1.6 sd); the minibatch plans' bias was below 0.003 at N = 2000
    (test_plan_matches_pot_sinkhorn_on_samples)."""
    sigma = 0.7
    m0, s0, m1, s1 = CASES["d2"]
    sb = bridge("d2", sigma)
    coupling = fs.OTCoupling("sinkhorn", reg=2 * sigma**2, normalize=None, fallback=None)
    pairs0, pairs1 = [], []
    for _ in range(8):
        x0c, x1c = coupling(gaussian(m0, s0, 1024, gen), gaussian(m1, s1, 1024, gen),
                            generator=gen)
        pairs0.append(x0c), pairs1.append(x1c)
    x0, x1 = torch.cat(pairs0), torch.cat(pairs1)
    cross = (x0 - x0.mean(0)).T @ (x1 - x1.mean(0)) / len(x0)
    c = sb.cross_covariance
    sd = torch.sqrt((torch.outer(s0.diagonal(), s1.diagonal()) + c**2) / len(x0))
    assert ((cross - c).abs() / sd).max() < 4.5
    # the independent coupling's zero cross-covariance is far outside
    assert (c.abs() / sd).max() > 20


# -- 6. bad input ---------------------------------------------------------------------------
GOOD = CASES["d2"]


@pytest.mark.parametrize("args,message", [
    ((GOOD[0], GOOD[1], GOOD[2], torch.tensor([[1.0, 2.0], [2.0, 1.0]]), 0.5),
     "S1 must be positive definite"),
    ((GOOD[0], torch.tensor([[1.0, 0.5], [0.0, 1.0]]), GOOD[2], GOOD[3], 0.5),
     "S0 must be symmetric"),
    ((GOOD[0], torch.eye(3), GOOD[2], GOOD[3], 0.5), r"S0 must be \(2, 2\)"),
    ((GOOD[0], GOOD[1], torch.zeros(3), GOOD[3], 0.5), "m0 and m1 must both be shaped"),
    ((torch.zeros(2, 1), GOOD[1], GOOD[2], GOOD[3], 0.5), "m0 and m1 must both be shaped"),
    ((GOOD[0], GOOD[1], torch.tensor([0.0, math.nan]), GOOD[3], 0.5), "m1 must be finite"),
    ((GOOD[0], GOOD[1], GOOD[2], GOOD[3], -0.1), "sigma must be a finite number >= 0"),
    ((GOOD[0], GOOD[1], GOOD[2], GOOD[3], math.inf), "sigma must be a finite number >= 0"),
    ((GOOD[0], GOOD[1], GOOD[2], GOOD[3], True), "sigma must be a finite number >= 0"),
])
def test_bad_parameters_raise(args, message):
    with pytest.raises(ValueError, match=message):
        GaussianSchrodingerBridge(*args)


def test_bad_points_and_times_raise(gen):
    sb = bridge("d2", 0.5)
    x = torch.randn(4, 2, generator=gen, dtype=F64)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        sb.drift(x, 1.5)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        sb.marginal(-0.1)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        sb.marginal(torch.tensor([0.5, 1.2]))
    with pytest.raises(ValueError, match=r"x must be shaped \(B, 2\)"):
        sb.score(torch.randn(4, 3, generator=gen, dtype=F64), 0.5)
    with pytest.raises(ValueError, match=r"t must be a scalar or shaped \(B,\)"):
        sb.velocity(x, torch.rand(3, generator=gen))
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        sb.sample_plan(0, generator=gen)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        sb.sample_plan(5, generator=3)
