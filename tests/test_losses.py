"""Losses against closed forms: the marginal field of a Gaussian mixture minimises each
regression, the targets agree with the path's conversions, and a small MLP trained with
the CFM loss approaches the analytic marginal velocity."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

import flowsolve as fs
from flowsolve.paths.affine import PREDICTIONS
from flowsolve.training import losses
from flowsolve.training.losses import (
    DSM_WEIGHTINGS,
    REDUCTIONS,
    TIME_DISTRIBUTIONS,
    denoising_score_matching_loss,
    epsilon_loss,
    flow_matching_loss,
    label_dropout,
    regression_loss,
    sample_time,
)
from flowsolve.training.nets import MLP
from flowsolve.truth.analytic import Gaussian, marginal_score, marginal_velocity

F64 = torch.float64


def mixture() -> fs.GaussianMixture:
    """Three 2-D components, one with a full covariance."""
    means = torch.tensor([[-3.0, 0.0], [3.0, 1.0], [0.0, 3.0]])
    covs = torch.stack([
        torch.diag(torch.tensor([0.3, 0.3])),
        torch.tensor([[0.5, 0.2], [0.2, 0.3]]),
        torch.diag(torch.tensor([0.2, 0.6])),
    ])
    return fs.GaussianMixture(means, covs, torch.tensor([0.3, 0.3, 0.4]))


SCHEDULERS = {
    "condot": fs.CondOTScheduler(),
    "cosine": fs.CosineScheduler(),
    "poly2": fs.PolynomialScheduler(2.0),
    "linear_vp": fs.LinearVPScheduler(),
    "ve": fs.VEScheduler(0.05, 5.0),
}
# The linear-beta VP velocity target has sigma'_t ~ 1/sqrt(1 - t): its variance diverges
# (logarithmically) at t = 1, so a Monte Carlo test of the velocity regression leaves it out.
VELOCITY_SCHEDULERS = ["condot", "cosine", "poly2", "ve"]


def draw(n: int, gen: torch.Generator, t_range: tuple[float, float] = (0.0, 1.0)):
    x1 = mixture().sample(n, generator=gen, dtype=F64)
    x0 = torch.randn(x1.shape, generator=gen, dtype=F64)
    lo, hi = t_range
    t = lo + (hi - lo) * torch.rand(n, generator=gen, dtype=F64)
    return x0, x1, t


def some_field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """An arbitrary smooth field, used where any model will do."""
    tt = t if t.dim() == 0 else t[:, None]
    return torch.sin(1.3 * x + tt) - 0.4 * x.flip(1) * tt


PERTURBATIONS = {
    "constant": lambda x, t: torch.tensor([0.3, -0.2], dtype=x.dtype).expand_as(x),
    "x_dependent": lambda x, t: 0.25 * torch.sin(x.flip(1)) * (1 + t[:, None]),
}


def slope_along(loss_of, field, delta, zmax: float = 4.0):
    """Per-sample directional derivative of the loss at ``field`` along ``delta``.

    Each per-sample loss is quadratic in e along ``field + e delta``, so the central
    difference with e = 1 is its exact slope at e = 0. Returns (mean, standard error).
    """
    plus = loss_of(lambda x, t: field(x, t) + delta(x, t))
    minus = loss_of(lambda x, t: field(x, t) - delta(x, t))
    slope = (plus - minus) / 2
    return slope.mean().item(), slope.std().item() / math.sqrt(slope.numel())


# -- the marginal field minimises the regression --------------------------------------------
@pytest.mark.parametrize("name", VELOCITY_SCHEDULERS)
def test_cfm_loss_is_stationary_at_the_marginal_velocity(name, gen):
    path = fs.AffineGaussianPath(SCHEDULERS[name])
    x0, x1, t = draw(40_000, gen)
    u = marginal_velocity(mixture(), path)

    def loss_of(model):
        return flow_matching_loss(model, path, x0, x1, t, reduction="none")

    for delta in PERTURBATIONS.values():
        mean, se = slope_along(loss_of, u, delta)
        assert abs(mean) < 4 * se, (name, mean, se)
        # and it is a minimum: the loss rises by E[(1/D) ||delta||^2] > 0
        assert loss_of(lambda x, t, d=delta: u(x, t) + d(x, t)).mean() > loss_of(u).mean()

    # the test has power: the Gaussian approximation's (linear) velocity is not stationary
    wrong = marginal_velocity(Gaussian(mixture().mean, mixture().covariance), path)
    mean, se = slope_along(loss_of, wrong, lambda x, t: wrong(x, t) - u(x, t))
    assert mean > 20 * se, (name, mean, se)


@pytest.mark.parametrize("weighting", DSM_WEIGHTINGS + ("callable",))
@pytest.mark.parametrize("name", ["condot", "cosine", "linear_vp", "ve"])
def test_dsm_loss_is_stationary_at_the_marginal_score(name, weighting, gen):
    path = fs.AffineGaussianPath(SCHEDULERS[name])
    x0, x1, t = draw(40_000, gen, (0.05, 0.95))
    s = marginal_score(mixture(), path)
    w = (lambda t: 1 + t) if weighting == "callable" else weighting

    def loss_of(model):
        return denoising_score_matching_loss(
            model, path, x0, x1, t, weighting=w, reduction="none"
        )

    for delta in PERTURBATIONS.values():
        mean, se = slope_along(loss_of, s, delta)
        assert abs(mean) < 4 * se, (name, weighting, mean, se)
    wrong = marginal_score(Gaussian(mixture().mean, mixture().covariance), path)
    mean, se = slope_along(loss_of, wrong, lambda x, t: wrong(x, t) - s(x, t))
    assert mean > 20 * se, (name, weighting, mean, se)


# -- exact identities between parameterisations ------------------------------------------------
@pytest.mark.parametrize("prediction", PREDICTIONS + ("x0", "noise", "eps", "data"))
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_targets_agree_with_the_path_conversions(name, prediction, gen):
    """A model converted from a velocity model by ``path.convert`` (``to = A x + B u``) has
    residual ``B_t (u - dx_t)`` against its own target, so its loss is ``B_t^2`` times the
    CFM loss of the velocity model, sample by sample."""
    path = fs.AffineGaussianPath(SCHEDULERS[name])
    x0, x1, t = draw(256, gen, (0.05, 0.95))

    def converted(x, t):
        return path.convert(some_field(x, t), x, t, "velocity", prediction)

    got = regression_loss(converted, path, x0, x1, t, prediction=prediction, reduction="none")
    cfm = flow_matching_loss(some_field, path, x0, x1, t, reduction="none")
    _, b_t = path.conversion_coefficients(t, "velocity", prediction)
    torch.testing.assert_close(got, b_t**2 * cfm, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_epsilon_loss_equals_sigma_squared_dsm_of_the_converted_score(name, gen):
    path = fs.AffineGaussianPath(SCHEDULERS[name])
    x0, x1, t = draw(512, gen)
    t[:2] = torch.tensor([0.0, 1.0], dtype=F64)  # both ends, where sigma_t or alpha_t is 0

    def score(x, t):
        return some_field(x, t)

    def eps_model(x, t):
        return path.convert(score(x, t), x, t, "score", "epsilon")

    eps = epsilon_loss(eps_model, path, x0, x1, t, reduction="none")
    dsm = denoising_score_matching_loss(score, path, x0, x1, t, reduction="none")
    assert torch.isfinite(dsm).all()
    torch.testing.assert_close(eps, dsm, rtol=1e-14, atol=0)
    # the default weighting is sigma_t^2: DSM without weighting is eps-loss / sigma_t^2
    plain = denoising_score_matching_loss(score, path, x0, x1, t, weighting="none",
                                          reduction="none")
    sigma = path.scheduler.sigma(t)
    inner = sigma > 0  # t = 1 is a point mass for all but VE
    torch.testing.assert_close(plain[inner] * sigma[inner] ** 2, dsm[inner], rtol=1e-12, atol=0)


LIKELIHOOD_WEIGHTS = {  # g_t^2 in flow time, derived by hand for each schedule
    "linear_vp": lambda t: 0.1 + (1 - t) * (20.0 - 0.1),  # beta(s), s = 1 - t
    "cosine": lambda t: math.pi / torch.tan(math.pi * t / 2),
    "condot": lambda t: 2 * (1 - t) / t,
    "poly2": lambda t: 4 * (1 - t**2) / t,  # 2 sigma^2 (2/t + 2t/(1 - t^2))
    "ve": lambda t: 2 * (5.0 ** (1 - t) * 0.05**t) ** 2 * math.log(5.0 / 0.05),
}


@pytest.mark.parametrize("name", list(LIKELIHOOD_WEIGHTS))
def test_likelihood_weighting_is_the_squared_diffusion_coefficient(name, gen):
    path = fs.AffineGaussianPath(SCHEDULERS[name])
    x0, x1, t = draw(256, gen, (0.02, 0.98))
    got = denoising_score_matching_loss(some_field, path, x0, x1, t, weighting="likelihood",
                                        reduction="none")
    want = denoising_score_matching_loss(some_field, path, x0, x1, t,
                                         weighting=LIKELIHOOD_WEIGHTS[name], reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)


# -- reductions, event dims, time and model arguments -----------------------------------------
def test_per_sample_loss_is_the_mean_over_event_entries(gen):
    path = fs.AffineGaussianPath(fs.CondOTScheduler())
    x1 = torch.randn(4, 3, 5, generator=gen, dtype=F64)
    x0 = torch.zeros_like(x1)

    def zero(x, t):
        return torch.zeros_like(x)

    # CondOT target dx_t = x1 - x0 = x1: the loss of the zero field is (1/15) ||x1||^2
    per = flow_matching_loss(zero, path, x0, x1, 0.3, reduction="none")
    assert per.shape == (4,)
    torch.testing.assert_close(per * 15, x1.pow(2).sum((1, 2)), rtol=1e-14, atol=0)
    mean = flow_matching_loss(zero, path, x0, x1, 0.3)
    assert mean.shape == () and torch.equal(mean, per.mean())


@pytest.mark.parametrize(
    "loss", [flow_matching_loss, epsilon_loss, denoising_score_matching_loss, regression_loss]
)
def test_bad_reduction_raises_listing_the_accepted(loss, gen):
    path = fs.AffineGaussianPath(fs.CondOTScheduler())
    x = torch.randn(3, 2, generator=gen)
    with pytest.raises(ValueError, match="reduction='sum'.*mean, none"):
        loss(some_field, path, x, x, reduction="sum")
    assert REDUCTIONS == ("mean", "none")


def test_drawn_time_and_noise_come_from_the_generator_and_kwargs_reach_the_model():
    path = fs.AffineGaussianPath(fs.CosineScheduler())
    x1 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    seen = {}

    def model(x, t, y=None):
        seen.update(t=t, y=y)
        return some_field(x, t)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return flow_matching_loss(model, path, None, x1, generator=g, y="label")

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert seen["y"] == "label"
    assert seen["t"].shape == (64,) and bool(((seen["t"] >= 0) & (seen["t"] < 1)).all())
    assert seen["t"].unique().numel() == 64  # a time per sample


def test_zero_dim_time_reaches_the_model_and_matches_a_constant_vector(gen):
    path = fs.AffineGaussianPath(fs.CondOTScheduler())
    x0, x1, _ = draw(16, gen)
    one = flow_matching_loss(some_field, path, x0, x1, torch.tensor(0.4, dtype=F64),
                             reduction="none")
    vec = flow_matching_loss(some_field, path, x0, x1, torch.full((16,), 0.4, dtype=F64),
                             reduction="none")
    assert one.shape == (16,)
    torch.testing.assert_close(one, vec, rtol=1e-15, atol=0)


def test_input_errors_name_the_argument(gen):
    path = fs.AffineGaussianPath(fs.CondOTScheduler())
    x = torch.randn(4, 2, generator=gen)
    with pytest.raises(TypeError, match="model must be callable"):
        flow_matching_loss("net", path, x, x)
    with pytest.raises(TypeError, match="path must be an AffineGaussianPath"):
        flow_matching_loss(some_field, fs.CondOTScheduler(), x, x)
    with pytest.raises(ValueError, match="x0 and x1 must have the same shape"):
        flow_matching_loss(some_field, path, x[:3], x)
    with pytest.raises(ValueError, match="x1 must be a floating tensor"):
        flow_matching_loss(some_field, path, None, torch.ones(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shaped like x, \(4, 2\); got \(4,\)"):
        flow_matching_loss(lambda x, t: x[:, 0], path, x, x)
    with pytest.raises(ValueError, match="t must lie in"):
        flow_matching_loss(some_field, path, x, x, 1.5)
    with pytest.raises(ValueError, match="prediction='logits'.*velocity"):
        regression_loss(some_field, path, x, x, prediction="logits")
    with pytest.raises(TypeError, match="weighting must be None or a callable"):
        regression_loss(some_field, path, x, x, weighting="likelihood")
    with pytest.raises(ValueError, match="weighting='snr'.*sigma_squared, none, likelihood"):
        denoising_score_matching_loss(some_field, path, x, x, 0.5, weighting="snr")
    with pytest.raises(ValueError, match=r"weighting\(t\) must return .* shaped like t"):
        denoising_score_matching_loss(some_field, path, x, x, torch.full((4,), 0.5),
                                      weighting=lambda t: torch.ones(3))


# -- label dropout -------------------------------------------------------------------------------
def test_label_dropout_frequency_is_binomial():
    n, p, null = 50_000, 0.3, 10
    labels = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(5))
    out = label_dropout(labels, p, null, generator=torch.Generator().manual_seed(6))
    dropped = out == null
    sd = math.sqrt(n * p * (1 - p))
    assert abs(dropped.sum().item() - n * p) < 4 * sd
    assert torch.equal(out[~dropped], labels[~dropped])  # the others are untouched
    assert out.dtype == labels.dtype and out.shape == labels.shape
    again = label_dropout(labels, p, null, generator=torch.Generator().manual_seed(6))
    assert torch.equal(out, again)


def test_label_dropout_drops_whole_samples_of_multi_dimensional_labels():
    """(B, K) labels: one draw per sample replaces all K entries of it, the same draws as
    the 1-D labels of the same batch (GuidedField's unconditional half is all null too)."""
    n, k, p, null = 20_000, 3, 0.4, -1
    labels = torch.randint(0, 10, (n, k), generator=torch.Generator().manual_seed(7))
    out = label_dropout(labels, p, null, generator=torch.Generator().manual_seed(8))
    dropped = (out == null).all(1)
    assert torch.equal((out == null).any(1), dropped)  # never part of a sample
    assert torch.equal(out[~dropped], labels[~dropped])
    flat = label_dropout(labels[:, 0], p, null, generator=torch.Generator().manual_seed(8))
    assert torch.equal(flat == null, dropped)
    assert abs(dropped.sum().item() - n * p) < 4 * math.sqrt(n * p * (1 - p))
    with pytest.raises(ValueError, match=r"labels must be shaped \(B, ...\)"):
        label_dropout(torch.tensor(3), 0.5, 0)


def test_label_dropout_p_zero_and_one_are_exact(gen):
    labels = torch.randint(0, 5, (10_000,), generator=gen)
    assert torch.equal(label_dropout(labels, 0.0, 5, generator=gen), labels)
    assert bool((label_dropout(labels, 1.0, 5, generator=gen) == 5).all())
    assert bool((label_dropout(labels, 1, 5, generator=gen) == 5).all())


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_label_dropout_rejects_p_outside_unit_interval(p):
    with pytest.raises(ValueError, match="p must be a probability in"):
        label_dropout(torch.tensor([1, 2]), p, 3)


def test_label_dropout_type_errors():
    with pytest.raises(TypeError, match="labels must be a torch.Tensor"):
        label_dropout([1, 2], 0.5, 3)
    with pytest.raises(TypeError, match="p must be a number"):
        label_dropout(torch.tensor([1, 2]), "0.5", 3)
    with pytest.raises(TypeError, match="null_label must be an int"):
        label_dropout(torch.tensor([1, 2]), 0.5, 3.0)


# -- time sampling -------------------------------------------------------------------------------
def test_uniform_time_statistics():
    t = sample_time(20_000, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert t.shape == (20_000,) and t.dtype == F64
    assert bool(((t >= 0) & (t < 1)).all())
    assert stats.kstest(t.numpy(), "uniform").pvalue > 1e-3
    assert abs(t.mean().item() - 0.5) < 4 * math.sqrt(1 / 12 / t.numel())


def test_logit_normal_time_statistics():
    loc, scale = 0.5, 0.8
    t = sample_time(20_000, generator=torch.Generator().manual_seed(1), dtype=F64,
                    distribution="logit_normal", loc=loc, scale=scale)
    assert bool(((t > 0) & (t < 1)).all())
    z = torch.logit(t).numpy()
    assert stats.kstest(z, "norm", args=(loc, scale)).pvalue > 1e-3
    assert abs(z.mean() - loc) < 4 * scale / math.sqrt(z.size)


def test_sample_time_reproducible_and_dtype():
    a = sample_time(5, generator=torch.Generator().manual_seed(3))
    b = sample_time(5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.dtype == torch.get_default_dtype()
    assert sample_time(0).shape == (0,)


def test_sample_time_never_returns_an_endpoint_and_leaves_other_draws_unchanged(monkeypatch):
    """Force the draws that round to an endpoint: U[0, 1) gives exactly 0 (in float32 once
    in 2^24) and sigmoid gives exactly 0 or 1 far in the tails. They move to eps/2 and
    1 - eps/2, where the likelihood weighting is finite; the others are untouched."""
    f32 = torch.float32
    half_eps = torch.finfo(f32).eps / 2  # 2^-24: torch.rand's float32 grid step
    u = torch.tensor([0.0, half_eps, 0.3, 1 - half_eps], dtype=f32)
    z = torch.tensor([-200.0, -3.0, 0.0, 30.0], dtype=f32)  # sigmoid: 0, ., 0.5, 1 in float32
    assert torch.sigmoid(z)[0] == 0 and torch.sigmoid(z)[3] == 1
    forced = {torch.rand: u, torch.randn: z}
    monkeypatch.setattr(losses, "_draw", lambda fn, *args: forced[fn].clone())
    expected = torch.tensor([half_eps, half_eps, 0.3, 1 - half_eps], dtype=f32)
    assert torch.equal(sample_time(4, dtype=f32), expected)
    t = sample_time(4, dtype=f32, distribution="logit_normal")
    assert torch.equal(t, torch.tensor([half_eps, torch.sigmoid(z[1]), 0.5, 1 - half_eps]))
    assert bool(((t > 0) & (t < 1)).all())
    # a training step on a forced t = 0 draw: finite (was inf / nan)
    path = fs.AffineGaussianPath(fs.CondOTScheduler())
    x0, x1 = torch.zeros(4, 2), torch.ones(4, 2)
    loss = denoising_score_matching_loss(lambda x, t: x, path, x0, x1, weighting="likelihood",
                                         reduction="none")
    assert torch.isfinite(loss).all()
    # CondOT: weight 2 / (t (1 - t)) times (1/D)||sigma_t s + x0||^2 = ((1 - t) t)^2 for the
    # model s(x_t) = x_t = t (x0 = 0, x1 = 1)
    torch.testing.assert_close(loss, 2 * expected * (1 - expected), rtol=1e-5, atol=0)
    sqrt_path = fs.AffineGaussianPath(fs.PolynomialScheduler(0.5))  # alpha'_0 = inf
    assert torch.isfinite(flow_matching_loss(lambda x, t: x, sqrt_path, x0, x1)).all()


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
def test_sample_time_is_the_raw_draw_away_from_the_endpoints(dtype):
    """Bit-identical training trajectories: the times are the plain draws of the generator."""
    n = 100_000
    t = sample_time(n, generator=torch.Generator().manual_seed(4), dtype=dtype)
    raw = torch.rand(n, generator=torch.Generator().manual_seed(4), dtype=dtype)
    assert torch.equal(t, raw)
    kw = dict(distribution="logit_normal", loc=5.0, scale=3.0)
    t = sample_time(n, generator=torch.Generator().manual_seed(5), dtype=dtype, **kw)
    raw = torch.sigmoid(5.0 + 3.0 * torch.randn(n, generator=torch.Generator().manual_seed(5),
                                                dtype=dtype))
    assert bool(((t > 0) & (t < 1)).all())
    inside = raw < 1  # in float32 about 56 per 1e6 of these draws round to exactly 1
    assert torch.equal(t[inside], raw[inside])
    assert bool((t[~inside] == 1 - torch.finfo(dtype).eps / 2).all())
    if dtype == torch.float32:
        assert (~inside).sum() > 0  # the case exists


def test_sample_time_errors():
    with pytest.raises(ValueError, match="distribution='beta'.*uniform, logit_normal"):
        sample_time(3, distribution="beta")
    assert TIME_DISTRIBUTIONS == ("uniform", "logit_normal")
    with pytest.raises(ValueError, match="n must be a non-negative int"):
        sample_time(-1)
    with pytest.raises(ValueError, match="scale > 0"):
        sample_time(3, distribution="logit_normal", scale=0.0)


# -- foundation: a trained MLP approaches the analytic marginal velocity --------------------------
def relative_l2(field, reference, path, data, gen, times):
    """Per time: sqrt(E||field - reference||^2 / E||reference||^2) on fresh x_t of the path."""
    errs = []
    for t in times:
        x1 = data.sample(4000, generator=gen, dtype=F64)
        x0 = torch.randn(x1.shape, generator=gen, dtype=F64)
        x_t = path.sample(x0, x1, t).x_t
        ref = reference(x_t, t)
        err = (field(x_t, t) - ref).pow(2).sum(1).mean() / ref.pow(2).sum(1).mean()
        errs.append(err.sqrt().item())
    return errs


def _losses_of_a_batch():
    """Every public loss as f(model, x0, x1, reduction): those of losses.py on a CondOT
    path, and the bridge matching loss (which shares their input checks)."""
    from flowsolve.paths.bridges import GaussianBridge
    from flowsolve.training.losses import bridge_matching_loss

    path = fs.AffineGaussianPath(fs.CondOTScheduler())
    return {
        "regression_loss": lambda m, x0, x1, r: regression_loss(
            m, path, x0, x1, generator=torch.Generator().manual_seed(0), reduction=r),
        "regression_loss score": lambda m, x0, x1, r: regression_loss(
            m, path, x0, x1, prediction="score", reduction=r, t=0.5),
        "flow_matching_loss": lambda m, x0, x1, r: flow_matching_loss(
            m, path, x0, x1, reduction=r),
        "denoising_score_matching_loss": lambda m, x0, x1, r: denoising_score_matching_loss(
            m, path, x0, x1, reduction=r),
        "epsilon_loss": lambda m, x0, x1, r: epsilon_loss(m, path, x0, x1, reduction=r),
        "bridge_matching_loss": lambda m, x0, x1, r: bridge_matching_loss(
            m, GaussianBridge(0.1), x1 if x0 is None else x0, x1, reduction=r),
    }


@pytest.mark.parametrize("name", list(_losses_of_a_batch()))
def test_an_empty_batch_is_refused_by_every_loss(name):
    """A mean over zero samples is undefined: B = 0 (or samples of no entries) raises a
    ValueError saying so, with either reduction and before the model is called; a batch
    of one still gives a finite loss."""
    loss = _losses_of_a_batch()[name]
    calls = []

    def model(x, t):
        calls.append(x.shape)
        return torch.zeros_like(x)

    for x0 in (None, torch.zeros(0, 2, dtype=F64)):
        for reduction in REDUCTIONS:
            with pytest.raises(ValueError, match=r"has shape \(0, 2\): the batch is empty "
                                                 r"\(B = 0\)"):
                loss(model, x0, torch.zeros(0, 2, dtype=F64), reduction)
    with pytest.raises(ValueError, match=r"x0 has shape \(0, 3\): the batch is empty"):
        loss(model, torch.zeros(0, 3), torch.zeros(0, 3), "mean")
    with pytest.raises(ValueError, match=r"has shape \(4, 0\): its samples have no entries"):
        loss(model, torch.zeros(4, 0), torch.zeros(4, 0), "none")
    assert calls == []
    x0 = torch.ones(1, 2, dtype=F64)
    one = loss(model, x0, torch.full((1, 2), 2.0, dtype=F64), "none")
    assert one.shape == (1,) and torch.isfinite(one).all() and calls == [(1, 2)]
    assert loss(model, x0, torch.full((1, 2), 2.0, dtype=F64), "mean").shape == ()


def test_mlp_trained_with_cfm_approaches_the_marginal_velocity():
    data = mixture()
    path = fs.AffineGaussianPath(fs.CondOTScheduler())
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():  # the initialisation is the only global-RNG use; isolate it
        torch.manual_seed(0)
        net = MLP(2, hidden=128, depth=3, time_embedding_dim=32)
    steps = 600
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    lr = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        x1 = data.sample(512, generator=gen)
        loss = flow_matching_loss(net, path, None, x1, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        lr.step()

    u = marginal_velocity(data, path)
    gaussian = marginal_velocity(Gaussian(data.mean, data.covariance), path)
    times = torch.linspace(0.05, 0.95, 10, dtype=F64)

    @torch.no_grad()
    def trained(x, t):
        return net(x.float(), t.float()).double()

    mlp = relative_l2(trained, u, path, data, torch.Generator().manual_seed(1), times)
    base = relative_l2(gaussian, u, path, data, torch.Generator().manual_seed(1), times)
    mlp_mean, base_mean = sum(mlp) / len(mlp), sum(base) / len(base)
    print(f"relative L2 error vs the analytic marginal velocity, mean over t in [0.05, 0.95]: "
          f"MLP {mlp_mean:.4f}, Gaussian-approximation field {base_mean:.4f}, zero field 1")
    # baselines: the zero field has relative error 1; the best linear field in x (the exact
    # velocity of the Gaussian with the data's mean and covariance) about 0.29
    assert mlp_mean < 0.2
    assert mlp_mean < 0.5 * base_mean
