"""The semi-linear core of the low-NFE samplers (flowsolve/ode/semilinear.py): nodes, the
model read as its posterior means, the DDIM step and its limits at the infinite ends."""

import math

import pytest
import torch

import flowsolve as fs
from flowsolve.ode.semilinear import Denoiser, Posterior, ddim_step, infinite_step, nodes
from flowsolve.ode.solve import sample
from flowsolve.paths.fields import ConvertedField

F64 = torch.float64
DATA = fs.GaussianMixture.ring(4, radius=2.0, std=0.5)
SCHEDULERS = [fs.CondOTScheduler(), fs.CosineScheduler(), fs.LinearVPScheduler()]


def noise(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 2, dtype=F64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("scheduler", SCHEDULERS, ids=repr)
def test_nodes_hold_alpha_sigma_and_the_log_snr(scheduler):
    times = [0.0, 0.3, 0.7, 1.0]
    got = nodes(scheduler, times)
    v = scheduler(torch.tensor(times, dtype=F64))
    for n, t, a, s in zip(got, times, v.alpha_t.tolist(), v.sigma_t.tolist(), strict=True):
        assert (n.t, n.alpha, n.sigma) == (t, a, s)
        if 0 < a and 0 < s:
            assert n.lam == pytest.approx(math.log(a / s), rel=1e-15, abs=1e-15)
        assert n.r == (math.inf if a == 0 else s / a)
    assert got[-1].lam == math.inf
    assert infinite_step(got[2], got[3]) and not infinite_step(got[1], got[2])


@pytest.mark.parametrize("scheduler", SCHEDULERS, ids=repr)
@pytest.mark.parametrize("kind", ["velocity", "score", "epsilon", "x1", "v"])
def test_the_denoiser_gives_the_exact_posterior_means_from_any_model(scheduler, kind):
    """D = E[x1 | x_t] (the closed form of the mixture) and eps = (x - alpha D) / sigma,
    from a model of each kind (the exact model converted on the path)."""
    path = fs.AffineGaussianPath(scheduler)
    u = fs.analytic.marginal_velocity(DATA, path)
    model = ConvertedField(u, path, "velocity", kind) if kind != "velocity" else u
    times = [0.2, 0.5, 0.9]
    den = Denoiser(model, path, kind, times, torch.zeros(1, dtype=F64))
    x = noise(32, 1)
    d_true = fs.analytic.posterior_mean(DATA, path)
    for t in times:
        post = den(x, t)
        tt = torch.tensor(t, dtype=F64)
        v = scheduler(tt)
        assert torch.allclose(post.D, d_true(x, tt), atol=1e-10)
        assert torch.allclose(post.eps, (x - v.alpha_t * post.D) / v.sigma_t, atol=1e-9)
    assert den.nfe == len(times)


def test_an_epsilon_model_where_alpha_is_zero_is_refused_with_the_way_out():
    path = fs.AffineGaussianPath(fs.CondOTScheduler())
    eps = ConvertedField(fs.analytic.marginal_velocity(DATA, path), path, "velocity",
                            "epsilon", interval=(0.01, 1.0))
    with pytest.raises(ValueError, match=r"'epsilon' model gives no data prediction .* "
                                         r"t=0.0 .*start at t0 > 0.0"):
        Denoiser(eps, path, "epsilon", [0.0, 0.5], torch.zeros(1, dtype=F64), "ddim")
    with pytest.raises(ValueError, match="start at t0"):
        sample(eps, noise(4, 0), "ddim", steps=4, path=path, prediction="epsilon")
    x = sample(eps, noise(4, 0), "ddim", steps=4, path=path, prediction="epsilon", t0=0.01)
    assert torch.isfinite(x.x).all()


@pytest.mark.parametrize("scheduler", SCHEDULERS, ids=repr)
def test_the_ddim_step_equals_both_exponential_forms_and_their_limits(scheduler):
    """x_t = alpha_t D + sigma_t eps equals (sigma_t/sigma_s) x - alpha_t (e^-h - 1) D and
    (alpha_t/alpha_s) x - sigma_t (e^h - 1) eps between finite lambdas; at t = 1 it is
    alpha_1 D (sigma = 0) and from t = 0 it is finite."""
    gen = torch.Generator().manual_seed(3)
    d = torch.randn(5, 2, dtype=F64, generator=gen)
    e = torch.randn(5, 2, dtype=F64, generator=gen)
    s, t, end, start = nodes(scheduler, [0.3, 0.6, 1.0, 0.0])
    x = s.alpha * d + s.sigma * e
    h = t.lam - s.lam
    got = ddim_step(t, Posterior(d, e))
    assert torch.allclose(got, t.sigma / s.sigma * x - t.alpha * math.expm1(-h) * d,
                          atol=1e-13)
    assert torch.allclose(got, t.alpha / s.alpha * x - t.sigma * math.expm1(h) * e,
                          atol=1e-13)
    assert torch.equal(ddim_step(end, Posterior(d, e)), d * end.alpha)
    assert torch.isfinite(ddim_step(s, Posterior(d, e))).all()
    assert start.lam == -math.inf or scheduler.__class__.__name__ == "LinearVPScheduler"


def test_ddim_on_a_single_point_lands_on_it_in_one_step():
    """Data = one point m: D(x, t) = m for every x, so x_1 = alpha_1 m = m from any x0."""
    m = torch.tensor([1.5, -0.5], dtype=F64)
    for scheduler in SCHEDULERS:
        path = fs.AffineGaussianPath(scheduler)
        x1_model = lambda x, t: m.expand_as(x).clone()  # noqa: E731
        for steps in (1, 3):
            res = sample(x1_model, noise(8, 2), "ddim", steps=steps, path=path,
                         prediction="x1")
            assert torch.allclose(res.x, m.expand(8, 2), atol=1e-14), scheduler


def test_a_non_finite_state_names_the_step():
    path = fs.AffineGaussianPath(fs.CosineScheduler())

    def blows_up(x, t):
        return x * (math.inf if float(t) > 0.5 else 1.0)

    with pytest.raises(FloatingPointError, match=r"non-finite in step \d of 4"):
        sample(blows_up, noise(4, 0), "dpmpp_2m", steps=4, path=path, prediction="x1")


def test_samplers_refuse_backward_solves_options_and_a_missing_path():
    path = fs.AffineGaussianPath(fs.CondOTScheduler())
    u = fs.analytic.marginal_velocity(DATA, path)
    with pytest.raises(ValueError, match=r"'ddim' steps in the path's log-SNR: pass path="):
        sample(u, noise(4, 0), "ddim", steps=4)
    with pytest.raises(ValueError, match=r"noise to data \(t0 < t1\).*'rk4'"):
        sample(u, noise(4, 0), "ddim", steps=4, path=path, t0=1.0, t1=0.0)
    with pytest.raises(ValueError, match="takes no options"):
        sample(u, noise(4, 0), "ddim", steps=4, path=path, options={"eta": 1})
    with pytest.raises(ValueError, match="cuda_graph=True needs a fast_"):
        sample(u, noise(4, 0), "ddim", steps=4, path=path, cuda_graph=True)
    with pytest.raises(ValueError, match="prediction='velocities' is not a parameterisation"):
        sample(u, noise(4, 0), "ddim", steps=4, path=path, prediction="velocities")


@pytest.mark.parametrize("kind", ["score", "epsilon", "x1", "v"])
def test_prediction_converts_a_model_for_every_other_solver(kind):
    """prediction= with a Runge-Kutta or adaptive solver integrates the converted velocity:
    the same numbers as converting by hand."""
    path = fs.AffineGaussianPath(fs.CosineScheduler())
    u = fs.analytic.marginal_velocity(DATA, path)
    model = ConvertedField(u, path, "velocity", kind)
    x0 = noise(16, 4)
    for solver, kw in (("rk4", {"steps": 8}), ("dopri5", {})):
        a = sample(model, x0, solver, t0=0.05, t1=0.95, path=path, prediction=kind, **kw)
        b = sample(u, x0, solver, t0=0.05, t1=0.95, **kw)
        assert torch.allclose(a.x, b.x, atol=1e-8), (solver, kind)
    with pytest.raises(ValueError, match="converted to a velocity on the path: pass path="):
        sample(model, x0, "rk4", steps=4, prediction=kind)


@pytest.mark.parametrize("grid", ["uniform", "logsnr", 3.0])
def test_ddim_on_the_condot_path_is_euler(grid):
    """On x_t = t x1 + (1 - t) x0 the velocity is u = D - eps, so Euler's step
    x_s + (t - s)(D_s - eps_s) with x_s = s D_s + (1 - s) eps_s is t D_s + (1 - t) eps_s:
    DDIM's. Not so on the cosine path (the folklore holds for CondOT only)."""
    path = fs.AffineGaussianPath(fs.CondOTScheduler())
    u = fs.analytic.marginal_velocity(DATA, path)
    x0 = noise(64, 5)
    a = sample(u, x0, "ddim", steps=7, path=path, grid=grid).x
    b = sample(u, x0, "euler", steps=7, path=path, grid=grid).x
    assert torch.allclose(a, b, atol=1e-12, rtol=0)
    cos = fs.AffineGaussianPath(fs.CosineScheduler())
    u = fs.analytic.marginal_velocity(DATA, cos)
    a = sample(u, x0, "ddim", steps=7, path=cos, grid=grid).x
    b = sample(u, x0, "euler", steps=7, path=cos, grid=grid).x
    assert (a - b).abs().max() > 1e-2


def _all_samplers():
    from flowsolve.ode.samplers import SAMPLERS as ODE
    from flowsolve.sde.samplers import SAMPLERS as SDE

    return [*ODE.values(), *SDE]


@pytest.mark.parametrize("sampler", _all_samplers(), ids=lambda s: s.name)
@pytest.mark.parametrize("grid", ["uniform", "logsnr"])
def test_the_sampler_loop_never_reads_the_device(sampler, grid, monkeypatch):
    """What makes the loop sync-free on an accelerator, checked on the CPU: with the
    finiteness record kept lazily (as on a GPU), no tensor is read to the host while the
    loop runs (item, bool, float, int, tolist, numpy all raise), for every sampler."""
    import functools

    import flowsolve.ode.semilinear as semilinear
    from flowsolve._core.finite import FiniteRecord
    from flowsolve.ode.grids import time_grid
    from flowsolve.ode.semilinear import SamplerLoop

    path = fs.AffineGaussianPath(fs.CosineScheduler())
    times = time_grid(grid, 8, path=path)
    loop = SamplerLoop(sampler, lambda x, t: x * t - 0.5, path, "x1", times,
                       torch.zeros(1, dtype=F64), record=[4])
    monkeypatch.setattr(semilinear, "FiniteRecord", functools.partial(FiniteRecord, eager=False))

    def host_read(*args, **kwargs):
        raise AssertionError("the sampler loop read a tensor to the host")

    gen = torch.Generator().manual_seed(0)
    x0 = noise(16, 7)
    with monkeypatch.context() as m:
        for name in ("item", "__bool__", "__float__", "__int__", "tolist", "numpy"):
            m.setattr(torch.Tensor, name, host_read)
        x, saved, finite = loop(x0, lambda i, x: torch.randn(x.shape, dtype=x.dtype,
                                                             generator=gen))
    assert finite.first_bad() is None and len(saved) == 1
    assert torch.isfinite(x).all()
