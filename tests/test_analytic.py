"""Closed-form Gaussian-mixture ground truth, checked against independent computations."""

import math
import pickle

import pytest
import torch
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

import flowsolve as fs
from flowsolve import analytic

F64 = torch.float64

SCHEDULERS = [
    fs.CondOTScheduler(),
    fs.PolynomialScheduler(2.0),
    fs.CosineScheduler(),
    fs.LinearVPScheduler(),
    fs.VEScheduler(sigma_min=0.05, sigma_max=8.0),
]
IDS = [repr(s) for s in SCHEDULERS]


def random_mixture(gen, k=3, d=2, full=True):
    means = 2.0 * torch.randn(k, d, generator=gen, dtype=F64)
    if full:
        a = torch.randn(k, d, d, generator=gen, dtype=F64)
        covs = a @ a.transpose(1, 2) / d + 0.2 * torch.eye(d, dtype=F64)
    else:
        covs = 0.2 + torch.rand(k, d, generator=gen, dtype=F64)
    weights = 0.5 + torch.rand(k, generator=gen, dtype=F64)
    return fs.GaussianMixture(means, covs, weights)


def reference_p_t(mix, alpha, sigma):
    """log p_t built from torch.distributions: sum_k w_k N(alpha mu_k, alpha^2 S_k + sigma^2 I)."""
    eye = torch.eye(mix.dim, dtype=F64)
    comps = MultivariateNormal(alpha * mix.means, alpha**2 * mix.covariances + sigma**2 * eye)
    return MixtureSameFamily(Categorical(probs=mix.weights), comps)


def divergence_by_loop(field, x, t):
    out = field(x, t)
    return sum(
        torch.autograd.grad(out[:, i].sum(), x, create_graph=True)[0][:, i]
        for i in range(x.shape[1])
    )


@pytest.mark.parametrize("full", [True, False])
@pytest.mark.parametrize("sched", SCHEDULERS, ids=IDS)
def test_log_prob_matches_torch_distributions(sched, full, gen):
    mix = random_mixture(gen, full=full)
    path = fs.AffineGaussianPath(sched)
    x = 3 * torch.randn(64, 2, generator=gen, dtype=F64)
    for t in [0.0, 0.13, 0.5, 0.91, 1.0]:
        v = sched(torch.tensor(t, dtype=F64))
        expected = reference_p_t(mix, v.alpha_t, v.sigma_t).log_prob(x)
        got = analytic.marginal_log_prob(mix, path)(x, t)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-11)


@pytest.mark.parametrize("sched", SCHEDULERS, ids=IDS)
def test_score_is_gradient_of_log_prob(sched, gen):
    mix = random_mixture(gen, k=4, d=3)
    path = fs.AffineGaussianPath(sched)
    x = 2 * torch.randn(100, 3, generator=gen, dtype=F64).requires_grad_(True)
    t = torch.rand(100, generator=gen, dtype=F64)
    t[:3] = torch.tensor([0.0, 1.0, 0.5], dtype=F64)
    logp = analytic.marginal_log_prob(mix, path)(x, t)
    (grad,) = torch.autograd.grad(logp.sum(), x)
    score = analytic.marginal_score(mix, path)(x, t)
    torch.testing.assert_close(score, grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("d", [2, 5])
@pytest.mark.parametrize("sched", SCHEDULERS, ids=IDS)
def test_velocity_satisfies_continuity_equation(sched, d, gen):
    """d/dt log p_t + div u_t + u_t . grad log p_t = 0 at many (x, t), including t = 0, 1."""
    mix = random_mixture(gen, k=3, d=d)
    path = fs.AffineGaussianPath(sched)
    log_p, u = analytic.marginal_log_prob(mix, path), analytic.marginal_velocity(mix, path)
    n = 200
    x = 2 * torch.randn(n, d, generator=gen, dtype=F64).requires_grad_(True)
    t = torch.rand(n, generator=gen, dtype=F64)
    t[:2] = torch.tensor([0.0, 1.0], dtype=F64)
    t.requires_grad_(True)
    lp = log_p(x, t)
    dlp_dx, dlp_dt = torch.autograd.grad(lp.sum(), (x, t), create_graph=True)
    residual = dlp_dt + divergence_by_loop(u, x, t) + (u(x, t) * dlp_dx).sum(1)
    assert residual.abs().max().item() < 1e-6
    assert torch.isfinite(residual).all()


@pytest.mark.parametrize("sched", SCHEDULERS, ids=IDS)
def test_marginals_obey_the_parameterisation_conversions(sched, gen):
    """Conversions are linear, so they map the marginal score to the marginal velocity and
    the posterior mean: an independent check of both code paths (interior t)."""
    mix = random_mixture(gen, k=3, d=2)
    path = fs.AffineGaussianPath(sched)
    x = 2 * torch.randn(50, 2, generator=gen, dtype=F64)
    t = 0.02 + 0.96 * torch.rand(50, generator=gen, dtype=F64)
    score = analytic.marginal_score(mix, path)(x, t)
    velocity = analytic.marginal_velocity(mix, path)(x, t)
    x1_hat = analytic.posterior_mean(mix, path)(x, t)
    torch.testing.assert_close(path.convert(score, x, t, "score", "velocity"), velocity,
                               rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(path.convert(score, x, t, "score", "x1"), x1_hat,
                               rtol=1e-9, atol=1e-9)


def test_gaussian_posterior_mean_matches_linear_regression(gen):
    """For one Gaussian, E[x1 | x_t] = mu + alpha S (alpha^2 S + sigma^2 I)^{-1} (x - alpha mu),
    here computed with a linear solve rather than the eigendecomposition."""
    a = torch.randn(3, 3, generator=gen, dtype=F64)
    cov = a @ a.T + 0.3 * torch.eye(3, dtype=F64)
    mu = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    data = fs.Gaussian(mu, cov)
    path = fs.AffineGaussianPath(fs.CosineScheduler())
    x = torch.randn(10, 3, generator=gen, dtype=F64)
    t = torch.tensor(0.37, dtype=F64)
    al, si = path.scheduler(t).alpha_t, path.scheduler(t).sigma_t
    c = al**2 * cov + si**2 * torch.eye(3, dtype=F64)
    expected = mu + (al * cov @ torch.linalg.solve(c, (x - al * mu).T)).T
    torch.testing.assert_close(analytic.posterior_mean(data, path)(x, t), expected)


@pytest.mark.parametrize("sched", SCHEDULERS, ids=IDS)
def test_endpoints_are_source_and_data(sched, gen):
    mix = random_mixture(gen, d=2)
    path = fs.AffineGaussianPath(sched)
    x = 3 * torch.randn(40, 2, generator=gen, dtype=F64)
    log_p = analytic.marginal_log_prob(mix, path)
    v0, v1 = sched(torch.tensor(0.0, dtype=F64)), sched(torch.tensor(1.0, dtype=F64))
    if v0.alpha_t == 0:  # exact source
        source = analytic.source_distribution(path, 2)
        torch.testing.assert_close(log_p(x, 0.0), source.log_prob(x), rtol=1e-13, atol=1e-13)
    else:  # VE and linear VP keep a trace of the data at t = 0: the residual is alpha_0
        assert v0.alpha_t < 0.01 or sched.source_std == v0.sigma_t
    if v1.sigma_t == 0:  # exact data
        torch.testing.assert_close(log_p(x, 1.0), mix.log_prob(x), rtol=1e-13, atol=1e-13)
    else:  # VE: the data blurred by sigma_min
        expected = reference_p_t(mix, v1.alpha_t, v1.sigma_t).log_prob(x)
        torch.testing.assert_close(log_p(x, 1.0), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("sched", SCHEDULERS, ids=IDS)
def test_fields_are_finite_on_the_closed_interval(sched, dtype, gen):
    mix = random_mixture(gen, d=2)
    path = fs.AffineGaussianPath(sched)
    x = 5 * torch.randn(32, 2, generator=gen, dtype=dtype)
    for make in (analytic.marginal_velocity, analytic.marginal_score, analytic.marginal_log_prob,
                 analytic.posterior_mean):
        field = make(mix, path)
        for t in (0.0, 1.0):
            out = field(x, torch.tensor(t, dtype=dtype))
            assert out.dtype == dtype and torch.isfinite(out).all(), (make.__name__, t)


def test_float32_agrees_with_float64(gen):
    mix = random_mixture(gen, d=2)
    path = fs.AffineGaussianPath(fs.CondOTScheduler())
    u = analytic.marginal_velocity(mix, path)
    x = torch.randn(100, 2, generator=gen, dtype=F64)
    t = torch.rand(100, generator=gen, dtype=F64)
    torch.testing.assert_close(u(x.float(), t.float()).double(), u(x, t), rtol=1e-4, atol=1e-4)


def test_per_sample_time_equals_scalar_time_rowwise(gen):
    mix = random_mixture(gen, d=2)
    u = analytic.marginal_velocity(mix, fs.AffineGaussianPath(fs.CosineScheduler()))
    x = torch.randn(6, 2, generator=gen, dtype=F64)
    t = torch.linspace(0, 1, 6, dtype=F64)
    batched = u(x, t)
    rows = torch.cat([u(x[i : i + 1], t[i]) for i in range(6)])
    torch.testing.assert_close(batched, rows, rtol=0, atol=1e-14)


def test_image_shaped_input(gen):
    mix = random_mixture(gen, k=2, d=4, full=False)
    u = analytic.marginal_velocity(mix, fs.AffineGaussianPath(fs.CondOTScheduler()))
    x = torch.randn(5, 1, 2, 2, generator=gen, dtype=F64)
    out = u(x, 0.3)
    assert out.shape == x.shape
    torch.testing.assert_close(out.reshape(5, 4), u(x.reshape(5, 4), 0.3))


def test_sampling_matches_moments_and_density(gen):
    mix = random_mixture(gen, k=3, d=2)
    n = 200_000
    x = mix.sample(n, generator=gen, dtype=F64)
    # each moment within 5 standard errors of the closed form
    se_mean = (torch.diagonal(mix.covariance) / n).sqrt()
    assert ((x.mean(0) - mix.mean).abs() < 5 * se_mean).all()
    cov = torch.cov(x.T)
    assert torch.allclose(cov, mix.covariance, rtol=0.02, atol=0.02)
    # reproducible from the generator alone
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(mix.sample(10, generator=g1), mix.sample(10, generator=g2))


def test_gaussian_log_prob_and_standard_normal():
    cov = torch.tensor([[2.0, 0.3], [0.3, 0.5]], dtype=F64)
    mean = torch.tensor([1.0, -1.0], dtype=F64)
    x = torch.tensor([[0.0, 0.0], [1.0, 2.0]], dtype=F64)
    expected = MultivariateNormal(mean, cov).log_prob(x)
    torch.testing.assert_close(fs.Gaussian(mean, cov).log_prob(x), expected)
    sn = fs.StandardNormal(2, std=3.0)
    torch.testing.assert_close(
        sn.log_prob(x), -0.5 * (x**2).sum(1) / 9 - 2 * math.log(3.0) - math.log(2 * math.pi)
    )
    assert fs.analytic.source_distribution(fs.VEScheduler(0.01, 7.0), 2).eigvals.max() == 49.0


def test_ring_mixture_geometry():
    ring = fs.GaussianMixture.ring(n_components=8, radius=4.0, std=0.5)
    torch.testing.assert_close(ring.means.norm(dim=1), torch.full((8,), 4.0, dtype=F64))
    torch.testing.assert_close(ring.mean, torch.zeros(2, dtype=F64), atol=1e-12, rtol=0)
    # covariance of a ring: (r^2 / 2 + std^2) I
    torch.testing.assert_close(ring.covariance, (8.0 + 0.25) * torch.eye(2, dtype=F64))


@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.zeros(3), torch.ones(3, 1)), "means must be shaped"),
        ((torch.zeros(2, 2), torch.ones(3, 2)), "covariances must be"),
        ((torch.zeros(2, 2), -torch.ones(2, 2)), "positive definite"),
        ((torch.zeros(2, 2), torch.ones(2, 2), torch.tensor([1.0, -1.0])), "weights"),
        ((torch.zeros(1, 2), torch.tensor([[[1.0, 2.0], [0.0, 1.0]]])), "symmetric"),
        # non-finite parameters would give log_prob nan / -inf: refused, naming the argument
        ((torch.tensor([[0.0, math.nan]]), torch.ones(1, 2)),
         r"means must be finite; got nan at index \(0, 1\)"),
        ((torch.zeros(1, 2), torch.tensor([[math.inf, 1.0]])),
         r"covariances must be finite; got inf at index \(0, 0\)"),
        ((torch.zeros(1, 2), torch.tensor([[[1.0, math.nan], [math.nan, 1.0]]])),
         "covariances must be finite"),
        ((torch.zeros(2, 2), torch.ones(2, 2), torch.tensor([1.0, math.inf])),
         r"weights must be finite; got inf at index \(1,\)"),
    ],
)
def test_bad_mixtures_raise(args, message):
    with pytest.raises(ValueError, match=message):
        fs.GaussianMixture(*args)


def test_bad_points_and_times_raise(gen):
    mix = random_mixture(gen, d=2)
    u = analytic.marginal_velocity(mix, fs.AffineGaussianPath(fs.CondOTScheduler()))
    with pytest.raises(ValueError, match=r"x must be shaped \(B, 2\)"):
        u(torch.zeros(4, 3, dtype=F64), 0.5)
    with pytest.raises(ValueError, match="t must lie in"):
        u(torch.zeros(4, 2, dtype=F64), 1.5)
    with pytest.raises(ValueError, match=r"shaped \(B,\)"):
        u(torch.zeros(4, 2, dtype=F64), torch.zeros(3, dtype=F64))
    with pytest.raises(TypeError, match="AffineGaussianPath"):
        analytic.marginal_velocity(mix, fs.CondOTScheduler())


def test_velocity_where_alpha_prime_is_infinite_raises_and_is_exact_elsewhere(gen):
    """PolynomialScheduler(0.5) has alpha'_0 = inf: the marginal velocity at t = 0 raises
    (it was NaN); for t > 0 it is the closed form of one diagonal Gaussian N(mu, diag(l)),
    u_t(x) = alpha' mu + (alpha' alpha l + sigma sigma') / (alpha^2 l + sigma^2)
    (x - alpha mu), with alpha = sqrt t, sigma = 1 - sqrt t, alpha' = -sigma' = 1/(2 sqrt t)."""
    mu, lam = torch.tensor([1.5, -0.5], dtype=F64), torch.tensor([0.3, 2.0], dtype=F64)
    data = fs.Gaussian(mu, lam)
    path = fs.AffineGaussianPath(fs.PolynomialScheduler(0.5))
    u = analytic.marginal_velocity(data, path)
    x = 2 * torch.randn(5, 2, generator=gen, dtype=F64)
    message = r"marginal velocity is singular at t=0.0 for PolynomialScheduler\(n=0.5\)"
    for t in (0.0, torch.tensor([0.3, 0.0, 0.3, 0.3, 0.3], dtype=F64)):
        with pytest.raises(ValueError, match=message):
            u(x, t)
    for make in (analytic.marginal_score, analytic.marginal_log_prob, analytic.posterior_mean):
        assert torch.isfinite(make(data, path)(x, 0.0)).all()  # these need no alpha'_t
    for t in (1e-300, 1e-6, 0.2, 0.7, 1.0):
        a, s, da = math.sqrt(t), 1 - math.sqrt(t), 0.5 / math.sqrt(t)
        expected = da * mu + (da * a * lam - s * da) / (a * a * lam + s * s) * (x - a * mu)
        torch.testing.assert_close(u(x, t), expected, rtol=1e-13, atol=1e-13 * da)


def test_mixture_parameters_are_copied_once_per_dtype_and_device():
    """A field evaluation makes no host-to-device copy after the first (CUDA-graph capture
    forbids them, and each would synchronise a GPU)."""
    mix = fs.GaussianMixture.ring(n_components=5, radius=3.0)
    u = fs.analytic.marginal_velocity(mix, fs.AffineGaussianPath(fs.CosineScheduler()))
    x64 = torch.randn(7, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert mix._copies == {}
    u(x64, 0.3)  # the field fills the cache itself
    cached = mix._copies[(torch.float64, x64.device)]
    u(x64, 0.7)
    assert len(mix._copies) == 1 and mix._copies[(torch.float64, x64.device)] is cached
    torch.testing.assert_close(u(x64.float(), 0.3).double(), u(x64, 0.3), rtol=1e-5,
                               atol=1e-5)
    assert set(mix._copies) == {(torch.float64, x64.device), (torch.float32, x64.device)}
    assert pickle.loads(pickle.dumps(mix))._copies == {}


def test_a_cache_filled_under_inference_mode_still_serves_autograd():
    cov = torch.tensor([[[1.0, 0.3], [0.3, 0.5]], [[0.4, -0.1], [-0.1, 0.9]]])
    mix = fs.GaussianMixture(torch.tensor([[-1.0, 0.0], [1.5, 0.5]]), cov)
    u = fs.analytic.marginal_velocity(mix, fs.AffineGaussianPath(fs.CondOTScheduler()))
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        u(x, 0.5)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(u(xg, 0.5).sum(), xg)  # saves the cached eigenvectors
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("n", [0, -1, 2.5, True])
def test_ring_refuses_a_count_that_is_not_a_positive_int(n):
    with pytest.raises(ValueError, match="n_components must be an int >= 1"):
        fs.GaussianMixture.ring(n_components=n)


def test_standard_normal_keeps_its_std_in_float64():
    """Its variances were built in float32: std = 0.7 was off by ~1e-7 nats in float64."""
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = torch.distributions.Normal(0.0, torch.tensor(0.7, dtype=torch.float64))
    got = fs.StandardNormal(3, 0.7).log_prob(x)
    torch.testing.assert_close(got, exact.log_prob(x).sum(-1), rtol=0, atol=1e-13)
