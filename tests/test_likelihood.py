"""Exact CNF log-likelihoods against closed forms (float64, tight tolerances)."""

import math
import re

import pytest
import torch
from _cases import random_mixture as mixture

import flowsolve as fs
from flowsolve import analytic
from flowsolve._core.files import save_checked
from flowsolve.likelihood.cnf import log_likelihood, score_log_likelihood
from flowsolve.likelihood.dataset_likelihood import (
    DatasetLikelihood,
    dataset_bits_per_dim,
    dataset_log_likelihood,
    field_fingerprint,
)

F64 = torch.float64
TIGHT = dict(solver="dopri5", rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("d", [2, 10])
@pytest.mark.parametrize("sched", [fs.CondOTScheduler(), fs.CosineScheduler()], ids=repr)
def test_exact_likelihood_of_analytic_field_is_mixture_density(sched, d, gen):
    data = mixture(gen, d)
    u = analytic.marginal_velocity(data, fs.AffineGaussianPath(sched))
    x = data.sample(6, generator=gen, dtype=F64)
    x[0] = 0.5 * (data.means[0] + data.means[1])  # a point between modes
    res = log_likelihood(u, x, **TIGHT)
    torch.testing.assert_close(res.log_prob, data.log_prob(x), rtol=0, atol=1e-4)
    assert res.stderr is None and res.nfe > 0 and res.divergence.startswith("exact")


def test_gaussian_with_full_covariance_fixed_step_converges(gen):
    """Everything linear: the RK4 error falls at least as fast as h^4 towards
    log N(x; mu, Sigma) (here faster: about h^5.5, the leading error term nearly cancels)."""
    a = torch.randn(3, 3, generator=gen, dtype=F64)
    data = fs.Gaussian(torch.tensor([1.0, -1.0, 0.5], dtype=F64), a @ a.T + 0.5 * torch.eye(3))
    u = analytic.marginal_velocity(data, fs.AffineGaussianPath(fs.CondOTScheduler()))
    x = data.sample(5, generator=gen, dtype=F64)
    exact = data.log_prob(x)
    steps = [16, 32, 64]
    errs = [(log_likelihood(u, x, solver="rk4", steps=n).log_prob - exact).abs().max().item()
            for n in steps]
    assert errs[-1] < 1e-7
    order = -torch.linalg.lstsq(torch.tensor([[math.log(n), 1.0] for n in steps]),
                                torch.tensor(errs).log()[:, None]).solution[0].item()
    assert order > 3.7, (errs, order)


def test_linear_field_closed_form():
    """u = a x: x_0 = e^{-a} x and log p_1(x) = log p_0(e^{-a} x) - d a."""
    a, d = 0.7, 4
    x = torch.linspace(-1, 1, 12, dtype=F64).reshape(3, d)
    res = log_likelihood(lambda x, t: a * x, x, **TIGHT)
    expected = analytic.StandardNormal(d).log_prob(math.exp(-a) * x) - d * a
    torch.testing.assert_close(res.log_prob, expected, rtol=0, atol=1e-9)
    torch.testing.assert_close(res.x0, math.exp(-a) * x, rtol=0, atol=1e-9)


def test_hutchinson_is_unbiased_with_honest_error_bars(gen):
    data = mixture(gen, 4)
    u = analytic.marginal_velocity(data, fs.AffineGaussianPath(fs.CondOTScheduler()))
    x = data.sample(4, generator=gen, dtype=F64)
    exact = data.log_prob(x)
    res = log_likelihood(u, x, solver="rk4", steps=24, divergence="hutchinson", n_probes=64,
                         generator=gen)
    ref = log_likelihood(u, x, solver="rk4", steps=24).log_prob  # same discretisation
    assert ((res.log_prob - ref).abs() < 4 * res.stderr).all()
    assert (res.stderr > 0).all() and (res.log_prob - exact).abs().max() < 0.5
    assert res.divergence == "hutchinson (rademacher, k=64)"


def test_hutchinson_stderr_is_calibrated(gen):
    """The reported stderr is neither over- nor understated: 800 independent probe sets at
    each of 6 points (replicas in one batch draw their own probes), k = 4 probes each. The
    spread of log_prob across replicas, Var, must match the mean reported stderr^2 (the
    pooled ratio has a relative standard error of about 0.03 here; tolerance 0.15; an
    overstatement by sqrt(k / (k - 1)) would give 0.75, a missing 1/sqrt(k) 0.25)."""
    data = mixture(gen, 4)
    u = analytic.marginal_velocity(data, fs.AffineGaussianPath(fs.CondOTScheduler()))
    points, reps = 6, 800
    x = data.sample(points, generator=gen, dtype=F64).repeat_interleave(reps, 0)
    res = log_likelihood(u, x, solver="rk4", steps=8, divergence="hutchinson", n_probes=4,
                         generator=gen)
    empirical = res.log_prob.view(points, reps).var(1)
    reported = res.stderr.view(points, reps).square().mean(1)
    assert 0.85 < (empirical.sum() / reported.sum()).item() < 1.15
    assert ((empirical / reported > 0.75) & (empirical / reported < 1.33)).all()


def test_gradients_reach_the_parameters():
    """d/da of log p_1(x) for u = a x is -x.x e^{-2a} + ... : compare with finite differences."""
    a = torch.tensor(0.3, dtype=F64, requires_grad=True)
    x = torch.tensor([[0.5, -1.0], [1.5, 0.2]], dtype=F64)

    def ll(a_val):
        return log_likelihood(lambda x, t: a_val * x, x, solver="rk4", steps=20,
                              create_graph=True).log_prob.sum()

    (grad,) = torch.autograd.grad(ll(a), a)
    h = 1e-5
    fd = (ll(torch.tensor(0.3 + h, dtype=F64)) - ll(torch.tensor(0.3 - h, dtype=F64))) / (2 * h)
    torch.testing.assert_close(grad, fd.detach(), rtol=1e-6, atol=1e-8)


def test_score_model_likelihood_through_probability_flow(gen):
    data = mixture(gen, 2)
    path = fs.AffineGaussianPath(fs.LinearVPScheduler())
    s = analytic.marginal_score(data, path)
    x = data.sample(4, generator=gen, dtype=F64)
    res = score_log_likelihood(s, x, path, t_interval=(0.0, 1.0), **TIGHT)
    # VP's alpha_0 > 0: the prior N(0, I) at t=0 is itself an approximation of p_0
    exact_p0 = analytic.marginal_log_prob(data, path)(res.x0, 0.0)
    torch.testing.assert_close(res.log_prob - res.prior_log_prob + exact_p0, data.log_prob(x),
                               rtol=0, atol=1e-4)


def test_transferred_field_gives_the_same_likelihood(gen):
    data = mixture(gen, 2)
    u = analytic.marginal_velocity(data, fs.AffineGaussianPath(fs.CondOTScheduler()))
    v = fs.transfer(u, source=fs.CondOTScheduler(), target=fs.CosineScheduler())
    x = data.sample(4, generator=gen, dtype=F64)
    torch.testing.assert_close(log_likelihood(v, x, **TIGHT).log_prob,
                               log_likelihood(u, x, **TIGHT).log_prob, rtol=0, atol=1e-6)


def test_dataset_evaluation_matches_single_batches(gen, tmp_path):
    data = mixture(gen, 2)
    u = analytic.marginal_velocity(data, fs.AffineGaussianPath(fs.CondOTScheduler()))
    x = data.sample(10, generator=gen, dtype=F64)
    out = dataset_log_likelihood(u, x, batch_size=4, progress=False, solver="rk4", steps=16,
                                 checkpoint=tmp_path / "ck.pt")
    single = log_likelihood(u, x, solver="rk4", steps=16).log_prob
    torch.testing.assert_close(out["log_prob"], single)


def _bpd_by_hand(field, k, batches, seed, draws, iw, **ll_kwargs):
    """Per-sample bits/dim with every batch's draws taken by hand from a generator seeded
    seed + offset: for each draw the noise u (the batch's shape), then the probes of that
    draw's solve; log p_z = log p_1(y) + D log(2 / 256), bound = mean (or log-mean-exp)."""
    dim = k[0].numel()
    out = []
    for offset, size in batches:
        kb = k[offset:offset + size].to(F64)
        g = torch.Generator().manual_seed(seed + offset)
        log_pz = []
        for _ in range(draws):
            y = -1 + 2 * (kb + torch.rand(kb.shape, generator=g, dtype=F64)) / 256
            lp = log_likelihood(field, y, generator=g, **ll_kwargs).log_prob
            log_pz.append(lp + dim * math.log(2 / 256))
        log_pz = torch.stack(log_pz)
        bound = torch.logsumexp(log_pz, 0) - math.log(draws) if iw else log_pz.mean(0)
        out.append(-bound / (dim * math.log(2)))
    return torch.cat(out)


@pytest.mark.parametrize("draws, iw", [(1, False), (3, False), (3, True)])
def test_bits_per_dim_of_a_known_gaussian(draws, iw):
    """u = 0 with prior N(0, s^2 I): log p_1 = log N(y; 0, s^2 I) on the dequantised points
    y = -1 + 2 (k + u) / 256, so per draw log p_z = log N(y) + D log(2 / 256) and
    bpd = -bound / (D ln 2), bound the mean (or log-mean-exp) over the draws; the noise of
    the batch starting at sample i comes from a generator seeded 7 + i (batches of 3 of 7
    samples: offsets 0, 3, 6). The data set's value is the mean over all 7 samples and its
    stderr the sample std of all 7 over sqrt(7)."""
    s, dim, n = 0.5, 4, 7
    k = torch.randint(0, 256, (n, dim), generator=torch.Generator().manual_seed(5))
    res = dataset_bits_per_dim(lambda x, t: torch.zeros_like(x), k, draws=draws,
                               importance_weighted=iw, solver="euler", steps=1,
                               prior=fs.StandardNormal(dim, std=s), batch_size=3, seed=7,
                               progress=False)
    bounds = []
    for offset in (0, 3, 6):  # the same draws, in the same order, batch by batch
        g = torch.Generator().manual_seed(7 + offset)
        kb = k[offset:offset + 3].to(F64)
        ys = [-1 + 2 * (kb + torch.rand(kb.shape, generator=g, dtype=F64)) / 256
              for _ in range(draws)]
        lp = torch.stack([-0.5 * (y / s).square().sum(1) - dim * math.log(s)
                          - 0.5 * dim * math.log(2 * math.pi) for y in ys])
        log_pz = lp + dim * math.log(2 / 256)
        bounds.append(torch.logsumexp(log_pz, 0) - math.log(draws) if iw else log_pz.mean(0))
    bound = torch.cat(bounds)
    bpd = -bound / (dim * math.log(2))
    torch.testing.assert_close(res.bpd, bpd, rtol=0, atol=1e-12)
    torch.testing.assert_close(res.nll_nats, -bound, rtol=0, atol=1e-12)
    assert res.draws == draws and res.bpd.dtype == F64
    assert res.estimator == ("uniform dequantisation, importance-weighted K=3" if iw else
                             f"uniform dequantisation, mean of K=1 (over {draws} draws)")
    mean = bpd.sum() / n
    stderr = ((bpd - mean).square().sum() / (n - 1)).sqrt() / math.sqrt(n)
    torch.testing.assert_close(res.mean_bpd, mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(res.mean_bpd_stderr, stderr, rtol=0, atol=1e-12)


def _wavy(z, t):
    """A nonlinear field on any event shape: Hutchinson's estimate of its divergence is
    random, so the probes' generator shows in the result."""
    return torch.tanh(z) * (1.0 + t) - 0.3 * z.roll(1, dims=-1)


HUTCH = dict(divergence="hutchinson", n_probes=2, probe="gaussian", solver="rk4", steps=4)


def test_dataset_bits_per_dim_is_per_batch_with_seeded_noise_and_probes():
    """Image-shaped data (7, 2, 3) in batches of 3, Hutchinson with Gaussian probes and two
    draws: each batch equals bits/dim computed by hand with one generator seeded
    seed + offset for its noise and probes (in float64, to 1e-12)."""
    k = torch.randint(0, 256, (7, 2, 3), generator=torch.Generator().manual_seed(9))
    res = dataset_bits_per_dim(_wavy, k, draws=2, batch_size=3, seed=11, progress=False,
                               **HUTCH)
    expected = _bpd_by_hand(_wavy, k, [(0, 3), (3, 3), (6, 1)], 11, 2, False, **HUTCH)
    assert res.bpd.shape == (7,)
    torch.testing.assert_close(res.bpd, expected, rtol=0, atol=1e-12)
    # the probes matter: other probes give another value (so the comparison above pins them)
    other = _bpd_by_hand(_wavy, k, [(0, 3), (3, 3), (6, 1)], 12, 2, False, **HUTCH)
    assert (res.bpd - other).abs().min() > 1e-6


def test_dataset_bits_per_dim_resumes_bit_for_bit(tmp_path):
    """Interrupted in its last batch and resumed from the checkpoint, the run equals an
    uninterrupted one bit for bit, and the resumed call evaluates only the missing batch."""
    k = torch.randint(0, 256, (7, 3), generator=torch.Generator().manual_seed(4))
    kw = dict(draws=2, batch_size=3, seed=3, progress=False, **HUTCH)
    whole = dataset_bits_per_dim(_wavy, k, **kw)
    ckpt = tmp_path / "bpd.pt"
    seen = []

    def flaky(z, t):
        seen.append(z.shape[0])
        if z.shape[0] == 1 and len(seen) < 1000:
            raise RuntimeError("interrupted")
        return _wavy(z, t)

    with pytest.raises(RuntimeError, match="interrupted"):
        dataset_bits_per_dim(flaky, k, checkpoint=ckpt, **kw)
    assert torch.load(ckpt, weights_only=True)["next"] == 6
    seen[:] = [0] * 1000  # the next attempt at the last batch succeeds
    resumed = dataset_bits_per_dim(flaky, k, checkpoint=ckpt, **kw)
    assert set(seen[1000:]) == {1}  # batches 0 and 3 were not recomputed
    assert torch.equal(resumed.bpd, whole.bpd) and torch.equal(resumed.nll_nats, whole.nll_nats)
    assert not ckpt.exists()


def test_mean_bpd_stderr_needs_two_samples():
    one = fs.BitsPerDim(bpd=torch.tensor([3.0], dtype=F64), nll_nats=torch.tensor([1.0]),
                        estimator="e", draws=1)
    assert one.mean_bpd.item() == 3.0 and math.isnan(one.mean_bpd_stderr.item())


def test_bad_arguments_raise():
    x = torch.zeros(2, 2, dtype=F64)
    with pytest.raises(ValueError, match="divergence="):
        log_likelihood(lambda x, t: x, x, divergence="exactly")
    with pytest.raises(ValueError, match="t_interval"):
        log_likelihood(lambda x, t: x, x, t_interval=(0.5, 0.2))
    with pytest.raises(ValueError, match="x must be"):
        log_likelihood(lambda x, t: x, torch.zeros(3, dtype=F64))
    with pytest.raises(TypeError, match="prior"):
        log_likelihood(lambda x, t: x, x, prior=3, solver="euler", steps=2)
    with pytest.raises(TypeError, match="takes seed=, not generator="):
        dataset_log_likelihood(lambda x, t: x, x, progress=False, solver="euler", steps=2,
                               generator=torch.Generator())
    k = torch.zeros(2, 2, dtype=torch.long)
    with pytest.raises(TypeError, match="dataset_bits_per_dim takes seed=, not generator="):
        dataset_bits_per_dim(lambda x, t: x, k, progress=False, solver="euler", steps=2,
                             generator=torch.Generator())
    with pytest.raises(ValueError, match="draws must be"):
        dataset_bits_per_dim(lambda x, t: x, k, draws=0, progress=False, solver="euler",
                             steps=2)


@pytest.mark.parametrize("prior, got", [
    (torch.distributions.Normal(torch.zeros(2, dtype=F64), 1.0), r"\(2, 2\)"),  # per element
    (lambda z: fs.StandardNormal(2).log_prob(z)[:, None], r"\(2, 1\)"),
], ids=["Normal", "(B, 1)"])
def test_prior_must_return_one_log_density_per_sample(prior, got):
    x = torch.zeros(2, 2, dtype=F64)
    with pytest.raises(ValueError, match=r"prior log_prob must return \(2,\).*got " + got
                       + r".*Independent\(Normal"):
        log_likelihood(lambda x, t: 0 * x, x, prior=prior, solver="euler", steps=1)
    ok = torch.distributions.Independent(torch.distributions.Normal(
        torch.zeros(2, dtype=F64), 0.5 * torch.ones(2, dtype=F64)), 1)
    res = log_likelihood(lambda x, t: 0 * x, x, prior=ok, solver="euler", steps=1)
    torch.testing.assert_close(res.log_prob, fs.StandardNormal(2, std=0.5).log_prob(x))


def test_create_graph_with_a_scipy_solver_is_refused():
    """scipy's solvers return detached results: a silently gradient-free log-likelihood."""
    a = torch.tensor(0.3, dtype=F64, requires_grad=True)
    x = torch.ones(2, 2, dtype=F64)
    with pytest.raises(ValueError, match=r"create_graph=True.*'RK45' is scipy's.*dopri5.*fast_rk4"):
        log_likelihood(lambda x, t: a * x, x, solver="RK45", create_graph=True)
    res = log_likelihood(lambda x, t: a * x, x, solver="fast_rk4", steps=4, create_graph=True)
    assert res.log_prob.requires_grad


def _ll_worker(rank, world, init_file, x, out_dir):
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        data = fs.Gaussian(torch.zeros(2, dtype=F64), torch.tensor([1.0, 0.25], dtype=F64))
        u = analytic.marginal_velocity(data, fs.AffineGaussianPath(fs.CondOTScheduler()))
        # the result indexes like the dict of earlier versions, and dict() of it is one
        out = dict(dataset_log_likelihood(u, x, batch_size=3, progress=False, solver="rk4",
                                          steps=8))
        k = ((x.clamp(-0.999, 0.999) + 1) * 128).floor().long()
        bpd = dataset_bits_per_dim(u, k, draws=2, batch_size=3, seed=5, progress=False, **HUTCH)
        out.update(bpd=bpd.bpd, nll_nats=bpd.nll_nats)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_dataset_likelihood_sharded_over_two_gloo_ranks(tmp_path, gen):
    """log-likelihoods and bits/dim of 9 samples over two ranks: rank 0 holds [0, 5) in
    batches at 0 and 3, rank 1 [5, 9) at 5 and 8, each drawing from seed + offset; every
    rank returns the whole in data-set order."""
    import torch.multiprocessing as mp

    x = torch.randn(9, 2, generator=gen, dtype=F64)
    mp.spawn(_ll_worker, args=(2, str(tmp_path / "init"), x, str(tmp_path)), nprocs=2)
    data = fs.Gaussian(torch.zeros(2, dtype=F64), torch.tensor([1.0, 0.25], dtype=F64))
    u = analytic.marginal_velocity(data, fs.AffineGaussianPath(fs.CondOTScheduler()))
    single = log_likelihood(u, x, solver="rk4", steps=8).log_prob
    k = ((x.clamp(-0.999, 0.999) + 1) * 128).floor().long()
    bpd = _bpd_by_hand(u, k, [(0, 3), (3, 2), (5, 3), (8, 1)], 5, 2, False, **HUTCH)
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(out["log_prob"], single)
        torch.testing.assert_close(out["bpd"], bpd, rtol=0, atol=1e-12)
        torch.testing.assert_close(out["nll_nats"], bpd * 2 * math.log(2), rtol=0, atol=1e-11)


class _LinearField(torch.nn.Module):
    """u_t(x) = A x + b t, parameters A (d, d) and b (d,)."""

    def __init__(self, d):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.a = torch.nn.Parameter(0.3 * torch.randn(d, d, generator=g, dtype=F64))
        self.b = torch.nn.Parameter(torch.randn(d, generator=g, dtype=F64))

    def forward(self, x, t):
        return x @ self.a.T + self.b * t


@pytest.mark.parametrize("solver, opts", [("rk4", dict(steps=16)),
                                          ("dopri5", dict(rtol=1e-10, atol=1e-10))])
def test_adjoint_gradients_equal_backpropagation(solver, opts):
    """log p_1(x) of a linear flow: the adjoint method's parameter gradient equals direct
    backpropagation through the solver (and tr A gives d/dA of the divergence term)."""
    field = _LinearField(3)
    x = torch.tensor([[0.5, -1.0, 0.2], [1.5, 0.2, -0.3]], dtype=F64)
    grads = []
    for adjoint in (False, True):
        field.zero_grad()
        ll = log_likelihood(field, x, solver=solver, create_graph=True, adjoint=adjoint, **opts)
        ll.log_prob.sum().backward()
        grads.append(torch.cat([field.a.grad.flatten(), field.b.grad]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="create_graph"):
        log_likelihood(field, x, solver="rk4", steps=2, adjoint=True)
    with pytest.raises(ValueError, match="nn.Module"):
        log_likelihood(lambda z, t: field(z, t), x, solver="rk4", steps=2, create_graph=True,
                       adjoint=True)


@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_image_shaped_input_closed_form(divergence, gen):
    """u = a x on (B, 1, 8, 8): log p_1(x) = log p_0(e^{-a} x) - 64 a; Rademacher probes are
    exact for a Jacobian a I, so both divergences must hit the closed form."""
    a = 0.4
    x = torch.randn(3, 1, 8, 8, generator=gen, dtype=F64)
    res = log_likelihood(lambda z, t: a * z, x, solver="rk4", steps=20, divergence=divergence,
                         n_probes=4, generator=gen)
    expected = analytic.StandardNormal(64).log_prob(math.exp(-a) * x.flatten(1)) - 64 * a
    torch.testing.assert_close(res.log_prob, expected, rtol=0, atol=1e-6)
    assert res.x0.shape == x.shape


# -- the VE default prior ------------------------------------------------------------------
def test_score_likelihood_on_a_ve_path_matches_the_mixture_density(gen):
    """VE (sigma_max = 50): the default prior is N(0, 50^2 I) at t = 0, an approximation of
    the exact p_0 = data * N(0, 50^2 I) that is good to a few hundredths of a nat here,
    against log 50 = 3.9 nats per sample (2-D) for a prior that subtracts log(std) once
    instead of d times. With the exact p_0 in its place the solve itself is exact (1e-4)."""
    data = mixture(gen, 2)
    path = fs.AffineGaussianPath(fs.VEScheduler())
    score = analytic.marginal_score(data, path)
    x = data.sample(3, generator=gen, dtype=F64)
    res = score_log_likelihood(score, x, path, t_interval=(0.0, 1.0), solver="rk4", steps=64)
    exact = analytic.marginal_log_prob(data, path)  # p_1 = data * N(0, sigma_min^2 I)
    exact_p0 = exact(res.x0, 0.0)
    torch.testing.assert_close(res.log_prob - res.prior_log_prob + exact_p0, exact(x, 1.0),
                               rtol=0, atol=1e-4)
    torch.testing.assert_close(res.log_prob, exact(x, 1.0), rtol=0, atol=0.05)
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=F64), torch.tensor(50.0, dtype=F64))
    torch.testing.assert_close(res.prior_log_prob, normal.log_prob(res.x0).sum(-1), rtol=0,
                               atol=1e-12)


@pytest.mark.parametrize("shape", [(4, 2), (3, 2, 3)], ids=["d=2", "d=6 image"])
@pytest.mark.parametrize("sched", [fs.VEScheduler(), fs.VEScheduler(0.05, 7.0)], ids=repr)
def test_default_score_prior_is_the_normal_of_the_source_std(sched, shape, gen):
    """A zero score on VE is a zero velocity: x0 = x and log p = log N(x; 0, std^2 I), the
    sum over all d entries of torch's Normal(0, std) log-density (std = sigma_max != 1)."""
    path = fs.AffineGaussianPath(sched)
    x = 30 * torch.randn(shape, generator=gen, dtype=F64)
    res = score_log_likelihood(lambda z, t: torch.zeros_like(z), x, path, solver="euler",
                               steps=1)
    std = torch.tensor(sched.sigma_max, dtype=F64)
    expected = torch.distributions.Normal(torch.zeros((), dtype=F64), std).log_prob(x)
    torch.testing.assert_close(res.log_prob, expected.flatten(1).sum(-1), rtol=0, atol=1e-10)
    torch.testing.assert_close(fs.StandardNormal(math.prod(shape[1:]), std=sched.sigma_max)
                               .log_prob(x.flatten(1)), res.log_prob, rtol=0, atol=1e-10)


# -- the prior is checked like the field ---------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_prior_returning_non_finite_values_is_refused(bad):
    x = torch.zeros(3, 2, dtype=F64)

    def prior(z):  # finite for samples 0 and 2, `bad` for sample 1
        out = fs.StandardNormal(2).log_prob(z)
        out[1] = bad
        return out

    with pytest.raises(ValueError, match=rf"prior log_prob returned {bad!r} for sample 1 \(1 of "
                       r"3 non-finite\) from prior=.*test_a_prior_returning_non_finite_values"
                       r".*prior.*x0 = \[0.0, 0.0\]"):
        log_likelihood(lambda z, t: 0 * z, x, prior=prior, solver="euler", steps=1)
    nan_dist = torch.distributions.Independent(torch.distributions.Normal(
        torch.zeros(2, dtype=F64), torch.ones(2, dtype=F64)), 1)
    nan_dist.base_dist.loc = torch.full((2,), float("nan"), dtype=F64)  # a broken prior object
    with pytest.raises(ValueError, match=r"returned nan for sample 0.*prior=.*Independent"):
        log_likelihood(lambda z, t: 0 * z, x, prior=nan_dist, solver="euler", steps=1)


# -- the data set's result -----------------------------------------------------------------
def test_dataset_log_likelihood_has_a_mean_with_its_standard_error():
    """u = 0 and prior N(0, s^2 I): log p_1(x) = log N(x; 0, s^2 I) exactly. The result's
    mean is the plain mean over the N samples and its standard error the sample standard
    deviation (n - 1) over sqrt(N); the dict keys of earlier versions still index it."""
    s, n = 0.75, 7  # s^2 exact in float32, the dtype StandardNormal builds its variances in
    x = torch.linspace(-2, 2, 2 * n, dtype=F64).reshape(n, 2)
    res = dataset_log_likelihood(lambda z, t: torch.zeros_like(z), x, batch_size=3,
                                 prior=fs.StandardNormal(2, std=s), solver="euler", steps=1,
                                 progress=False)
    exact = -0.5 * (x / s).square().sum(1) - 2 * math.log(s) - math.log(2 * math.pi)
    assert isinstance(res, DatasetLikelihood) and res.divergence == "exact (auto)"
    torch.testing.assert_close(res.log_prob, exact, rtol=0, atol=1e-12)
    mean = exact.sum() / n
    stderr = ((exact - mean).square().sum() / (n - 1)).sqrt() / math.sqrt(n)
    torch.testing.assert_close(res.mean_log_prob, mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(res.mean_log_prob_stderr, stderr, rtol=0, atol=1e-12)
    # the dict of earlier versions: res["log_prob"], keys(), dict(res), "stderr" in res
    assert res["log_prob"] is res.log_prob and res["nfe"] is res.nfe
    assert list(res.keys()) == ["log_prob", "nfe"] and set(dict(res)) == {"log_prob", "nfe"}
    assert "stderr" not in res and res.stderr is None and res.get("stderr") is None
    with pytest.raises(KeyError, match="stderr"):
        res["stderr"]
    hutch = dataset_log_likelihood(lambda z, t: torch.zeros_like(z), x[:1], batch_size=3,
                                   divergence="hutchinson", n_probes=2, solver="euler",
                                   steps=1, progress=False)
    assert "stderr" in hutch and hutch["stderr"] is hutch.stderr and hutch.stderr.shape == (1,)
    assert hutch.divergence == "hutchinson (rademacher, k=2)"
    assert math.isnan(hutch.mean_log_prob_stderr.item())  # one sample: no spread


def test_an_empty_data_set_is_refused():
    zero = lambda z, t: torch.zeros_like(z)  # noqa: E731
    with pytest.raises(ValueError, match=r"data is empty \(len 0\).*log-likelihood"):
        dataset_log_likelihood(zero, torch.empty(0, 2, dtype=F64), solver="euler", steps=1,
                               progress=False)
    with pytest.raises(ValueError, match=r"data is empty \(len 0\).*bits/dim"):
        dataset_bits_per_dim(zero, torch.empty(0, 2, dtype=torch.long), solver="euler",
                             steps=1, progress=False)


# -- resuming a data-set evaluation --------------------------------------------------------
class _Stop(Exception):
    pass


class _StopsAt:
    """``x`` as a data set of samples that stops (``_Stop``) at sample ``stop``: the
    evaluation is interrupted there, leaving a checkpoint of the batches before it."""

    def __init__(self, x, stop):
        self.x, self.stop = x, stop

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if i >= self.stop:
            raise _Stop
        return self.x[i]


RESUME = dict(solver="rk4", steps=2, divergence="hutchinson", n_probes=2, probe="rademacher",
              seed=5, batch_size=4, progress=False)


def _other_weights():
    field = _LinearField(3)
    with torch.no_grad():
        field.a[0, 0] += 1e-9
    return field


@pytest.mark.parametrize("change, message", [
    (dict(solver="dopri5", steps=None), r"with solver='rk4' \(this call: 'dopri5'\)"),
    (dict(steps=3), r"with steps=2 \(this call: 3\)"),
    (dict(rtol=1e-7), r"with rtol=None \(this call: 1e-07\)"),
    (dict(atol=1e-7), r"with atol=None \(this call: 1e-07\)"),
    (dict(divergence="exact"), r"with divergence='hutchinson' \(this call: 'exact'\).*"
                               r"with n_probes=2 \(this call: \(not recorded\)\)"),
    (dict(n_probes=3), r"with n_probes=2 \(this call: 3\)"),
    (dict(probe="gaussian"), r"with probe='rademacher' \(this call: 'gaussian'\)"),
    (dict(seed=6), r"with seed=5 \(this call: 6\)"),
    (dict(t_interval=(0.0, 0.5)), r"with t_interval=\(0.0, 1.0\) \(this call: \(0.0, 0.5\)\)"),
    (dict(prior=fs.StandardNormal(3, std=2.0)),
     r"with prior='N\(0, I\)' \(this call: 'StandardNormal\(K=1, d=3"),
    (dict(field=_other_weights()), r"with field weights='sha256:\w+' \(this call: 'sha256:"),
    (dict(field=lambda z, t: 0.3 * z), r"with field='test_likelihood._LinearField' \(this call: "
                                        r"'.*<lambda>'\)"),
    (dict(batch_size=5), r"for 10 samples in batches of 4 \(this call: 10 samples in batches "
                         r"of 5\)"),
    (dict(data="other"), r"for other data: the 4 samples already evaluated \(\[0, 4\)\)"),
    (dict(data="float32"), r"for other data"),
    (dict(solver="euler", seed=9), r"with seed=5 \(this call: 9\); with solver='rk4' "
                                   r"\(this call: 'euler'\)"),
], ids=["solver", "steps", "rtol", "atol", "divergence", "n_probes", "probe", "seed",
        "t_interval", "prior", "weights", "plain callable", "batch_size", "data", "dtype",
        "every difference"])
def test_resuming_with_anything_that_changes_the_numbers_is_refused(tmp_path, change, message):
    """Interrupted after its first batch (samples [0, 4)), the evaluation resumes only with
    the same model, settings and data: each change is refused by name, with what to do."""
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    ckpt = tmp_path / "ll.pt"
    with pytest.raises(_Stop):
        dataset_log_likelihood(_LinearField(3), _StopsAt(x, 4), checkpoint=ckpt, **RESUME)
    kwargs = {**RESUME, **change}
    field = kwargs.pop("field", _LinearField(3))
    data = kwargs.pop("data", "same")
    data = {"same": x, "other": torch.cat([x[:3], x[3:] + 1e-12]), "float32": x.float()}[data]
    with pytest.raises(ValueError, match=rf"checkpoint {re.escape(str(ckpt))} was written "
                       rf"{message}.*resume with the same data and settings.*or remove .*ll.pt"):
        dataset_log_likelihood(field, data, checkpoint=ckpt, **kwargs)
    assert ckpt.exists()  # left for a resume with the right settings


def test_resuming_with_the_same_settings_continues_bit_for_bit(tmp_path):
    """The same model (another instance, equal weights), settings and data resume; what only
    changes memory or gradients (chunk_size) may change; the result equals an uninterrupted
    run bit for bit."""
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    whole = dataset_log_likelihood(_LinearField(3), x, **RESUME)
    ckpt = tmp_path / "ll.pt"
    with pytest.raises(_Stop):
        dataset_log_likelihood(_LinearField(3), _StopsAt(x, 8), checkpoint=ckpt, **RESUME)
    assert torch.load(ckpt, weights_only=True)["next"] == 8
    resumed = dataset_log_likelihood(_LinearField(3), x.clone(), checkpoint=ckpt,
                                     chunk_size=2, **RESUME)
    assert torch.equal(resumed.log_prob, whole.log_prob)
    assert torch.equal(resumed.stderr, whole.stderr) and not ckpt.exists()


def test_a_checkpoint_from_before_the_fingerprint_still_resumes(tmp_path):
    """A file written by the previous version (number of samples, batch size, the slice and
    the results, checksummed) resumes with a warning, and its saved results are used: the
    saved first batch is marked (+100) to show that it was not recomputed."""
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    whole = dataset_log_likelihood(_LinearField(3), x, **RESUME)
    marked = whole.log_prob[:4] + 100
    legacy = {"next": 4, "results": {"log_prob": [marked], "nfe": [whole.nfe[:4]],
                                     "stderr": [whole.stderr[:4]]},
              "n": 10, "batch_size": 4, "start": 0, "end": 10, "world_size": 1}
    ckpt = tmp_path / "ll.pt"
    save_checked(legacy, ckpt)
    with pytest.warns(UserWarning, match=r"written before flowsolve recorded.*only the number "
                      r"of samples and the batch size were checked"):
        resumed = dataset_log_likelihood(_LinearField(3), x, checkpoint=ckpt, **RESUME)
    torch.testing.assert_close(resumed.log_prob, torch.cat([marked, whole.log_prob[4:]]),
                               rtol=0, atol=0)
    assert not ckpt.exists()


def test_bits_per_dim_checkpoint_records_the_dequantisation(tmp_path):
    k = torch.randint(0, 256, (7, 3), generator=torch.Generator().manual_seed(4))
    kw = dict(draws=2, batch_size=3, seed=3, progress=False, **HUTCH)
    ckpt = tmp_path / "bpd.pt"
    with pytest.raises(_Stop):
        dataset_bits_per_dim(_wavy, _StopsAt(k, 3), checkpoint=ckpt, **kw)
    for change, message in [(dict(draws=3), "with draws=2 \\(this call: 3\\)"),
                            (dict(n_bins=128), "with n_bins=256 \\(this call: 128\\)"),
                            (dict(importance_weighted=True), "with importance_weighted=False"),
                            (dict(low=0.0), "with low=-1.0 \\(this call: 0.0\\)"),
                            (dict(dtype=torch.float32), "with dtype='torch.float64'"),
                            (dict(steps=5), "with steps=4 \\(this call: 5\\)")]:
        with pytest.raises(ValueError, match=message):
            dataset_bits_per_dim(_wavy, k, checkpoint=ckpt, **{**kw, **change})
    whole = dataset_bits_per_dim(_wavy, k, **kw)
    assert torch.equal(dataset_bits_per_dim(_wavy, k, checkpoint=ckpt, **kw).bpd, whole.bpd)


def test_a_plain_callable_records_its_name_and_what_it_holds():
    """What a checkpoint records of a field that is not an nn.Module: its qualified name,
    the weights of a module it closes over, the tensors and numbers it holds; not the lists
    it appends to (logs, counters)."""
    net = _LinearField(3)
    log = []

    def closure(z, t):
        log.append(t)
        return net(z, t)

    before = field_fingerprint(closure)
    assert before["field"].endswith("test_a_plain_callable_records_its_name_and_what_it_holds"
                                    ".<locals>.closure")
    closure(torch.zeros(1, 3, dtype=F64), 0.5)  # the log grows: nothing recorded changes
    assert field_fingerprint(closure) == before
    with torch.no_grad():
        net.b[0] += 1e-12
    after = field_fingerprint(closure)
    assert after["field weights"] != before["field weights"]
    assert after["field settings"] == before["field settings"]
    scale = 0.3
    scaled = lambda z, t: scale * z  # noqa: E731
    record = field_fingerprint(scaled)
    assert record["field weights"] is None  # no tensor to hash: name and numbers only
    scale = 0.4
    assert field_fingerprint(scaled)["field settings"] != record["field settings"]
    assert field_fingerprint(_wavy)["field"] == "test_likelihood._wavy"
