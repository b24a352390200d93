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


# -- gradients in the sampling direction (create_graph, adjoint) ---------------------------
class _Scale(torch.nn.Module):
    """u_t(x) = a x with one learnable scalar ``a``: x_1 = e^a x_0, log p_1(x_1) = log p_0(x_0)
    - d a."""

    def __init__(self, a):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a, dtype=F64))
        self.calls = 0

    def forward(self, x, t):
        self.calls += 1
        return self.a * x


class _TanhMLP(torch.nn.Module):
    """u_t(x) = W_2 tanh(W_1 x + w t + b_1) + b_2 in float64 (a nonlinear, time-dependent
    field with a full Jacobian)."""

    def __init__(self, d=2, hidden=12, seed=5):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.nn.Parameter(torch.randn(hidden, d, generator=g, dtype=F64))
        self.w = torch.nn.Parameter(torch.randn(hidden, generator=g, dtype=F64))
        self.b1 = torch.nn.Parameter(0.5 * torch.randn(hidden, generator=g, dtype=F64))
        self.w2 = torch.nn.Parameter(torch.randn(d, hidden, generator=g, dtype=F64) / hidden ** 0.5)
        self.b2 = torch.nn.Parameter(0.5 * torch.randn(d, generator=g, dtype=F64))

    def forward(self, x, t):
        return torch.tanh(x @ self.w1.T + self.w * t + self.b1) @ self.w2.T + self.b2


def _reverse_kl(field, x0, s, **kwargs):
    """mean_i [log p_1(x_i) - log N(x_i; 0, s^2 I)] over the generated samples x_i."""
    res = sample_log_likelihood(field, x0, create_graph=True, **kwargs)
    return (res.log_prob - analytic.StandardNormal(x0.shape[1], s).log_prob(res.x)).mean(), res


TIGHT5 = dict(solver="dopri5", rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("settings", [
    TIGHT5, dict(TIGHT5, step_control="per_sample"), dict(solver="fast_rk4", steps=24),
    dict(solver="rk4", steps=24), dict(TIGHT5, adjoint=True),
    dict(solver="rk4", steps=24, adjoint=True),
], ids=["dopri5", "dopri5-per-sample", "fast_rk4", "rk4", "dopri5-adjoint", "rk4-adjoint"])
def test_reverse_kl_gradient_of_a_linear_flow_is_the_closed_form(gen, settings):
    """u = a x, x0 ~ N(0, I_d), target N(0, s^2 I). Per sample, log p_1(x_1) - log p*(x_1) =
    -|x0|^2/2 - d a + e^{2a}|x0|^2 / (2 s^2) + const, so through x_1 and log p_1 together
    d/da = -d + e^{2a}|x0|^2 / s^2 and d/dx0 = (e^{2a}/s^2 - 1) x0; alone, d log p_1 / da = -d
    exactly and d x_1 / da = x_1. The Monte-Carlo gradient is within 4 standard errors of
    d/da KL(N(0, e^{2a} I) || N(0, s^2 I)) = d (e^{2a}/s^2 - 1) (measured z = 0.84). The
    adjoint method evaluates the field in the backward pass, backpropagation does not.
    Measured |error| of the a-gradient: 0.7-2e-9 (dopri5 1e-10: shared, per-sample,
    adjoint), 1.2-1.6e-8 (RK4 and fast_rk4, 24 steps); of the x0-gradient 3e-12 to 3e-11."""
    d, b, a, s = 3, 64, 0.4, 1.3
    field = _Scale(a)
    x0 = torch.randn(b, d, generator=gen, dtype=F64).requires_grad_(True)
    loss, res = _reverse_kl(field, x0, s, **settings)
    assert res.x.requires_grad and res.log_prob.requires_grad
    forward_calls = field.calls
    g_a, g_x0 = torch.autograd.grad(loss, [field.a, x0], retain_graph=True)
    assert (field.calls > forward_calls) == settings.get("adjoint", False)
    sq = x0.detach().square().sum(1)
    per_sample = -d + math.exp(2 * a) * sq / s**2
    torch.testing.assert_close(g_a, per_sample.mean(), rtol=0, atol=5e-8)
    torch.testing.assert_close(g_x0, (math.exp(2 * a) / s**2 - 1) * x0.detach() / b,
                               rtol=0, atol=1e-9)
    closed = d * (math.exp(2 * a) / s**2 - 1)
    assert abs(g_a.item() - closed) < 4 * per_sample.std().item() / b**0.5
    (g_lp,) = torch.autograd.grad(res.log_prob.sum(), field.a, retain_graph=True)
    torch.testing.assert_close(g_lp, torch.tensor(-d * b, dtype=F64), rtol=0, atol=1e-7)
    w = torch.randn(b, d, generator=gen, dtype=F64)
    (g_x,) = torch.autograd.grad((res.x * w).sum(), field.a)
    torch.testing.assert_close(g_x, (res.x.detach() * w).sum(), rtol=0, atol=1e-7)


def test_gradients_of_a_nonlinear_flow_equal_finite_differences(gen):
    """A tanh MLP field, RK4 with 12 steps (a smooth map of x0 and the weights): autograd's
    gradient of the reverse-KL loss with respect to x0 (every entry) and along a random
    direction of the weights equals central differences (h = 1e-5; measured agreement
    2e-11 for x0, 9e-10 along the weights, gradients 2e-3 to 1.1); the values equal those
    of the detached default to rounding."""
    field, s, settings = _TanhMLP(), 1.5, dict(solver="rk4", steps=12)
    x0 = torch.randn(5, 2, generator=gen, dtype=F64).requires_grad_(True)
    loss, res = _reverse_kl(field, x0, s, **settings)
    plain = sample_log_likelihood(field, x0.detach(), **settings)
    assert not (plain.x.requires_grad or plain.log_prob.requires_grad)
    torch.testing.assert_close(res.log_prob.detach(), plain.log_prob, rtol=0, atol=1e-12)
    params = list(field.parameters())
    g_x0, *g_params = torch.autograd.grad(loss, [x0, *params])
    assert g_x0.abs().min() > 1e-3  # every entry matters

    h = 1e-5

    def loss_at(x, shift=0.0):
        with torch.no_grad():
            for p, v in zip(params, direction, strict=True):
                p.add_(shift * v)
        try:
            with torch.no_grad():
                res = sample_log_likelihood(field, x, **settings)
                return (res.log_prob - analytic.StandardNormal(2, s).log_prob(res.x)).mean()
        finally:
            with torch.no_grad():
                for p, v in zip(params, direction, strict=True):
                    p.sub_(shift * v)

    direction = [torch.randn(p.shape, generator=gen, dtype=F64) for p in params]
    fd_x0 = torch.zeros_like(g_x0)
    base = x0.detach()
    for i in range(base.shape[0]):
        for j in range(base.shape[1]):
            e = torch.zeros_like(base)
            e[i, j] = h
            fd_x0[i, j] = (loss_at(base + e) - loss_at(base - e)) / (2 * h)
    torch.testing.assert_close(g_x0, fd_x0, rtol=0, atol=1e-8)
    fd_dir = (loss_at(base, h) - loss_at(base, -h)) / (2 * h)
    along = sum((g * v).sum() for g, v in zip(g_params, direction, strict=True))
    assert abs(along.item()) > 0.1
    torch.testing.assert_close(along, fd_dir, rtol=0, atol=1e-7)


def test_hutchinson_gradient_is_unbiased(gen):
    """The weights' gradient of the reverse-KL loss of a tanh MLP with one Rademacher probe
    per sample, over 40 independent probe draws: its mean is within 4 standard errors of
    the exact-divergence gradient in all 74 components (measured max |z| 2.7), while one
    draw alone is off by more than 4 (measured 12: the estimator has spread; a gradient
    missing the divergence term is off by 351)."""
    field, s, settings = _TanhMLP(), 1.5, dict(solver="rk4", steps=6)
    x0 = torch.randn(16, 2, generator=gen, dtype=F64)
    params = list(field.parameters())

    def grad(**kwargs):
        loss, _ = _reverse_kl(field, x0, s, **settings, **kwargs)
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])

    exact = grad()
    draws = torch.stack([grad(divergence="hutchinson", generator=torch.Generator()
                              .manual_seed(100 + r)) for r in range(40)])
    se = draws.std(0) / draws.shape[0] ** 0.5
    z = (draws.mean(0) - exact) / se
    assert bool((se > 1e-4).all()), se
    assert z.abs().max() < 4, z
    assert ((draws[0] - exact) / se).abs().max() > 4


def test_gradient_option_refusals(gen):
    """create_graph with scipy's (detached) solvers, adjoint without create_graph, adjoint
    with a field that hides its parameters, adjoint with per-sample step control."""
    field = _Scale(0.3)
    x0 = torch.randn(3, 2, generator=gen, dtype=F64)
    with pytest.raises(ValueError, match=r"create_graph=True needs a differentiable solver; "
                                         r"'RK45' is scipy's.*Accepted: .*dopri5.*fast_rk4"):
        sample_log_likelihood(field, x0, solver="RK45", create_graph=True)
    with pytest.raises(ValueError, match=r"adjoint=True is for gradients: pass create_graph"):
        sample_log_likelihood(field, x0, solver="rk4", steps=2, adjoint=True)
    with pytest.raises(ValueError, match=r"adjoint=True needs field to be the nn.Module.*"
                                         r"got function"):
        sample_log_likelihood(lambda x, t: field(x, t), x0, solver="rk4", steps=2,
                              create_graph=True, adjoint=True)
    with pytest.raises(ValueError, match=r"step_control='per_sample' has no adjoint"):
        sample_log_likelihood(field, x0, create_graph=True, adjoint=True,
                              step_control="per_sample")
    # the default stays detached, even for a module field and an x0 that requires grad
    res = sample_log_likelihood(field, x0.requires_grad_(True), solver="rk4", steps=2)
    assert not (res.x.requires_grad or res.log_prob.requires_grad
                or res.prior_log_prob.requires_grad)
