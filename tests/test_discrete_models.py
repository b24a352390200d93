"""Discrete-time diffusion models (flowsolve/paths/discrete.py) and EDM preconditioning
(flowsolve/paths/preconditioning.py).

The scheduler is checked against its table and its own definition (piecewise-linear log
alpha), by finite differences and round trips; the samplers on it against the standard
implementations, diffusers' DDIMScheduler and DPMSolverMultistepScheduler driven with their
own tables and timesteps, and against the exact flow of a Gaussian mixture (every VP path
with the same log-SNR range has the same flow map, so the smooth cosine path's flow is the
reference); the preconditioning against EDM's Table 1 and the exact denoiser of Gaussian
data."""

import math

import pytest
import torch
from _cases import F64, noise, slope, three_gaussians

import flowsolve as fs
from flowsolve.ode.grids import time_grid
from flowsolve.ode.solve import sample
from flowsolve.paths.discrete import (
    BETA_SCHEDULES,
    DiscreteTimeModel,
    DiscreteVPScheduler,
    beta_table,
)
from flowsolve.paths.preconditioning import EDMPreconditioned, edm_coefficients

KINDS = list(BETA_SCHEDULES)
# diffusers' DPMSolverMultistepScheduler.set_timesteps calls np.array on a tensor (numpy 2)
QUIET = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
DATA = three_gaussians()


@pytest.fixture(scope="module")
def diffusers():
    """diffusers' schedulers (imported once: the import takes seconds)."""
    mod = pytest.importorskip("diffusers", reason="the reference implementation (dev extra)")
    return mod


def betas(kind: str) -> dict:
    """diffusers' schedule arguments of ``kind`` (its default beta_start / beta_end are
    DDPM's 1e-4 / 0.02 for every kind: Stable Diffusion's must be given)."""
    start, end = BETA_SCHEDULES[kind]
    return {"beta_schedule": kind} | ({} if start is None else
                                      {"beta_start": start, "beta_end": end})


def mlp_model(T: int, seed: int = 0, d: int = 2, width: int = 16):
    """A small fixed random MLP ``(x, timesteps) -> Tensor`` on the integer scale, with a
    sinusoidal embedding of the timestep (float64)."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(d + 8, width, generator=g, dtype=F64) / math.sqrt(d + 8)
    w2 = torch.randn(width, d, generator=g, dtype=F64) / math.sqrt(width)
    freqs = torch.exp(torch.linspace(0, math.log(T), 4, dtype=F64)) * (math.pi / T)

    def model(x, steps):
        steps = torch.as_tensor(steps, dtype=F64).reshape(-1).expand(x.shape[0])
        angle = steps[:, None] * freqs
        h = torch.tanh(torch.cat([x, torch.sin(angle), torch.cos(angle)], 1) @ w1)
        return h @ w2 + 0.5 * x

    return model


def exact_model(sched: DiscreteVPScheduler, prediction: str = "epsilon"):
    """The exact epsilon (or v) prediction of the mixture as an integer-timestep model:
    ``eps = -sigma_t score``, ``v = alpha_t eps - sigma_t E[x1 | x_t]`` at ``t = 1 - (n+1)/T``."""
    path = fs.AffineGaussianPath(sched)
    score, mean = fs.analytic.marginal_score(DATA, path), fs.analytic.posterior_mean(DATA, path)

    def model(x, steps):
        t = sched.time_of(torch.as_tensor(steps).to(F64)).reshape(-1).expand(x.shape[0])
        v = sched(t)
        eps = -v.sigma_t[:, None] * score(x, t)
        if prediction == "epsilon":
            return eps
        return v.alpha_t[:, None] * eps - v.sigma_t[:, None] * mean(x, t)

    return model


def run_flowsolve(model, sched, prediction, solver, grid, x):
    field = DiscreteTimeModel(model, sched, prediction)
    sol = sample(field, x, solver, grid=grid, t0=grid[0], t1=grid[-1], path=field.path,
                 prediction=field.prediction)
    assert sol.nfe == len(grid) - 1
    return sol.x


def grid_of(sched, timesteps, final_t: float) -> list[float]:
    """flowsolve's grid of diffusers' timesteps: ``t = 1 - (n + 1) / T``, then the time the
    last step goes to."""
    return sched.time_of(torch.as_tensor(timesteps)).tolist() + [final_t]


# -- the scheduler -----------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_the_table_is_reproduced_at_the_integer_timesteps(kind):
    sched = DiscreteVPScheduler.from_betas(kind)
    abar = sched.alphas_cumprod
    n = torch.arange(sched.T)
    t = sched.time_of(n)
    assert t[-1] == 0.0 and sched.T == 1000
    v = sched(t)
    assert torch.allclose(v.alpha_t ** 2, abar, rtol=1e-12, atol=0)
    assert torch.allclose(v.sigma_t ** 2, 1 - abar, rtol=1e-12, atol=0)
    assert torch.allclose(sched.log_snr(t), 0.5 * torch.log(abar / (1 - abar)), atol=1e-12)
    end = sched(torch.tensor(1.0, dtype=F64))
    assert (end.alpha_t.item(), end.sigma_t.item()) == (1.0, 0.0)
    # the timesteps a model is called with at those times are the integers
    assert torch.allclose(sched.timestep_of(t), n.to(F64), atol=1e-12, rtol=0)


def test_log_alpha_is_piecewise_linear_between_the_knots_and_to_zero_at_t_1():
    sched = DiscreteVPScheduler([0.99, 0.8, 0.5, 0.3, 0.05])
    half = 0.5 * torch.log(sched.alphas_cumprod)  # log alpha at t_n = 1 - (n + 1) / 5
    knots = torch.cat([half.flip(0), torch.zeros(1, dtype=F64)])  # at t = j / 5
    w = torch.tensor([0.0, 0.25, 0.5, 0.9], dtype=F64)
    for j in range(5):
        t = (j + w) / 5
        want = (1 - w) * knots[j] + w * knots[j + 1]
        assert torch.allclose(torch.log(sched.alpha(t)), want, atol=1e-14, rtol=0)


def test_the_standard_tables_are_diffusers_tables(diffusers):
    """float64 here, float32 in diffusers: equal to float32 rounding (rtol 2e-5 after 1000
    products; measured 3.6e-7 linear, 9.3e-7 scaled_linear, 1.3e-5 cosine)."""
    for kind in KINDS:
        ref = diffusers.DDIMScheduler(**betas(kind)).alphas_cumprod.to(F64)
        mine = DiscreteVPScheduler.from_betas(kind).alphas_cumprod
        assert torch.allclose(mine, ref, rtol=2e-5, atol=0), kind


def test_the_cosine_table_telescopes_to_its_alpha_bar_function():
    """abar_n = f((n+1)/T) / f(0) wherever beta_n was not capped at 0.999."""
    sched = DiscreteVPScheduler.from_betas("squaredcos_cap_v2")
    s = torch.arange(1, 1001, dtype=F64) / 1000
    f = (torch.cos((s + 0.008) / 1.008 * math.pi / 2) / math.cos(0.008 / 1.008 * math.pi / 2)) ** 2
    capped = beta_table("squaredcos_cap_v2") >= 0.999
    assert 0 < int(capped.sum()) < 5 and bool(capped[-1])
    ok = ~capped.cumsum(0).bool()
    assert torch.allclose(sched.alphas_cumprod[ok], f[ok], rtol=1e-12, atol=0)
    linear = beta_table("linear")
    scaled = beta_table("scaled_linear", T=10)
    assert (linear[0].item(), linear[-1].item()) == (1e-4, 0.02)
    assert scaled[0].item() == pytest.approx(0.00085, rel=1e-14)
    assert scaled[-1].item() == pytest.approx(0.012, rel=1e-14)
    assert torch.allclose(scaled.sqrt().diff(), scaled.sqrt().diff()[0].expand(9), rtol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_the_derivatives_match_finite_differences_off_the_knots(kind):
    sched = DiscreteVPScheduler.from_betas(kind)
    T = sched.T
    g = torch.Generator().manual_seed(3)
    j = torch.randint(0, T, (200,), generator=g).to(F64)
    t = (j + 0.1 + 0.8 * torch.rand(200, generator=g, dtype=F64)) / T
    h = 1e-4 / T  # within the segment: the interpolation is smooth there
    v, plus, minus = sched(t), sched(t + h), sched(t - h)
    fd_alpha = (plus.alpha_t - minus.alpha_t) / (2 * h)
    fd_sigma = (plus.sigma_t - minus.sigma_t) / (2 * h)
    assert torch.allclose(v.d_alpha_t, fd_alpha, rtol=1e-7, atol=1e-9)
    assert torch.allclose(v.d_sigma_t, fd_sigma, rtol=1e-7, atol=1e-9)
    fd_var = (sched.sigma_squared(t + h) - sched.sigma_squared(t - h)) / (2 * h)
    assert torch.allclose(sched.sigma_d_sigma(t), 0.5 * fd_var, rtol=1e-7, atol=1e-9)
    fd_lam = (sched.log_snr(t + h) - sched.log_snr(t - h)) / (2 * h)
    lam_dot = v.d_alpha_t / v.alpha_t - v.d_sigma_t / v.sigma_t
    assert torch.allclose(lam_dot, fd_lam, rtol=1e-7)


def test_at_a_knot_the_derivative_is_the_one_of_the_segment_toward_the_data():
    sched = DiscreteVPScheduler.from_betas("linear", T=50)
    knots = sched.time_of(torch.arange(49, 0, -1))  # t = 0 .. 1 - 2/T
    h = 1e-6
    right = (sched.alpha(knots + h) - sched.alpha(knots)) / h
    left = (sched.alpha(knots[1:]) - sched.alpha(knots[1:] - h)) / h
    d = sched(knots).d_alpha_t
    assert torch.allclose(d, right, rtol=1e-5)
    assert not torch.allclose(d[1:], left, rtol=1e-3)  # the slope does jump there
    # at t = 1: the last segment's, where d sigma is infinite and sigma sigma' finite
    one = torch.tensor([1.0], dtype=F64)
    last = (sched.alpha(one) - sched.alpha(one - h)) / h
    assert torch.allclose(sched(one).d_alpha_t, last, rtol=1e-5)
    assert sched(one).d_sigma_t.item() == -math.inf
    var_slope = (sched.sigma_squared(one) - sched.sigma_squared(one - h)) / h
    assert torch.allclose(sched.sigma_d_sigma(one), 0.5 * var_slope, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_snr_inverse_round_trips_exactly(kind):
    sched = DiscreteVPScheduler.from_betas(kind)
    g = torch.Generator().manual_seed(4)
    knots = sched.time_of(torch.arange(1000))
    t = torch.cat([knots, torch.rand(500, generator=g, dtype=F64),
                   torch.tensor([0.0, 0.9995, 1.0], dtype=F64)])
    back = sched.snr_inverse(sched.snr(t))
    assert (back - t).abs().max().item() < 1e-12
    # the other way round up to lambda = 8 (1 - t = 1e-7: beyond it t is too close to 1 for
    # float64 to resolve lambda)
    lam = torch.linspace(sched.log_snr(torch.tensor(0.0, dtype=F64)).item(), 8, 300,
                         dtype=F64)
    assert torch.allclose(sched.log_snr(sched.snr_inverse(lam.exp())), lam, atol=1e-8)
    # the base class's bisection agrees
    snr = sched.snr(torch.rand(50, generator=g, dtype=F64) * 0.999)
    assert torch.allclose(sched.snr_inverse(snr), fs.Scheduler.snr_inverse(sched, snr),
                          atol=1e-14)


def test_float32_evaluation_agrees_with_float64():
    sched = DiscreteVPScheduler.from_betas("scaled_linear")
    t = torch.linspace(0, 1, 1001, dtype=F64)
    v64, v32 = sched(t), sched(t.float())
    assert v32.alpha_t.dtype == torch.float32
    assert torch.allclose(v32.alpha_t.double(), v64.alpha_t, atol=1e-6)
    assert torch.allclose(v32.sigma_t.double(), v64.sigma_t, atol=1e-6)
    assert sched.snr_inverse(sched.snr(t.float())).dtype == torch.float32


@pytest.mark.parametrize("table, message", [
    ([[0.9, 0.5]], "1-d"),
    ([], "1-d"),
    ([0.9, float("nan")], r"alphas_cumprod\[1\] = nan"),
    ([0.9, 0.0], "zero terminal SNR"),
    ([1.5, 0.5], r"alphas_cumprod\[0\] = 1.5"),
    ([0.9, 0.5, 0.5], r"alphas_cumprod\[1\] = 0.5 <= alphas_cumprod\[2\]"),
    ([0.5, 0.9], "strictly decreasing"),
    ([1.0], "no noise"),
])
def test_bad_tables_are_refused_saying_what_is_accepted(table, message):
    with pytest.raises(ValueError, match=message) as err:
        DiscreteVPScheduler(table)
    assert "strictly decreasing" in str(err.value)


def test_bad_beta_schedules_are_refused():
    with pytest.raises(ValueError, match="accepted: linear, scaled_linear, squaredcos_cap_v2"):
        DiscreteVPScheduler.from_betas("cosine")
    with pytest.raises(ValueError, match="no beta_start"):
        DiscreteVPScheduler.from_betas("squaredcos_cap_v2", beta_start=0.1)
    with pytest.raises(ValueError, match="0 < beta_start <= beta_end < 1"):
        DiscreteVPScheduler.from_betas("linear", beta_start=0.02, beta_end=0.01)
    with pytest.raises(ValueError, match="positive int"):
        DiscreteVPScheduler.from_betas("linear", T=0)
    with pytest.raises(TypeError, match="beta_end must be a finite real"):
        DiscreteVPScheduler.from_betas("linear", beta_end="0.02")
    sched = DiscreteVPScheduler.from_betas("linear", T=10)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        sched(torch.tensor([1.5]))
    with pytest.raises(ValueError, match="outside the range"):
        sched.snr_inverse(torch.tensor([1e-6], dtype=F64))


def test_reprs_identify_the_table():
    made = DiscreteVPScheduler.from_betas("linear", T=100, beta_end=0.03)
    assert repr(made) == "DiscreteVPScheduler.from_betas('linear', T=100, beta_end=0.03)"
    again = eval(repr(made), {"DiscreteVPScheduler": DiscreteVPScheduler})
    assert torch.equal(again.alphas_cumprod, made.alphas_cumprod)
    a = DiscreteVPScheduler(made.alphas_cumprod)
    b = DiscreteVPScheduler(made.alphas_cumprod * (1 - 1e-15 * torch.arange(100, dtype=F64)))
    assert "T=100" in repr(a) and repr(a) != repr(b)


# -- the path, the conversions and the samplers on it --------------------------------------

@pytest.mark.parametrize("kind", ["linear", "squaredcos_cap_v2"])
def test_the_path_converts_models_and_its_velocity_is_the_cosine_paths_reparameterised(kind):
    """Every VP path with the same lambda is the same ODE in lambda, so
    ``u_disc(x, t) = u_cos(x, t') lambda'_disc(t) / lambda'_cos(t')`` with
    ``lambda_cos(t') = lambda_disc(t)`` and ``lambda'_cos = pi / sin(pi t')``; lambda'_disc by
    finite differences."""
    sched = DiscreteVPScheduler.from_betas(kind)
    path, cos = fs.AffineGaussianPath(sched), fs.AffineGaussianPath(fs.CosineScheduler())
    g = torch.Generator().manual_seed(5)
    t = (torch.randint(0, 999, (64,), generator=g) + 0.5).to(F64) / 1000
    x = noise(64, g)
    u = fs.analytic.marginal_velocity(DATA, path)(x, t)
    t_cos = cos.scheduler.snr_inverse(sched.snr(t))
    h = 1e-5 / 1000
    lam_dot = (sched.log_snr(t + h) - sched.log_snr(t - h)) / (2 * h)
    u_cos = fs.analytic.marginal_velocity(DATA, cos)(x, t_cos)
    ratio = (lam_dot * torch.sin(math.pi * t_cos) / math.pi)[:, None]
    assert torch.allclose(u, u_cos * ratio, rtol=1e-6, atol=1e-8)
    # the conversions of every kind give that velocity back
    eps = exact_model(sched)(x, sched.timestep_of(t))
    v_pred = exact_model(sched, "v")(x, sched.timestep_of(t))
    assert torch.allclose(path.convert(eps, x, t, "epsilon", "velocity"), u, atol=1e-9)
    assert torch.allclose(path.convert(v_pred, x, t, "v", "velocity"), u, atol=1e-9)
    d = path.convert(eps, x, t, "epsilon", "x1")
    assert torch.allclose(d, fs.analytic.posterior_mean(DATA, path)(x, t), atol=1e-10)


@pytest.mark.parametrize("kind", ["linear", "squaredcos_cap_v2"])
def test_ddim_and_dpmpp_2m_converge_at_their_orders_to_the_exact_flow(kind):
    """On the discrete path from t = 0 to 0.999 (both lambda finite), logsnr grid; reference:
    the flow of the cosine path between the same log-SNRs (dopri5, rtol 1e-10). Measured
    slopes (16..128 steps): ddim 1.19 / 1.18, dpmpp_2m 1.79 / 1.91 (linear / cosine table;
    128 steps: 3.3e-3 / 7.0e-3). And the samplers see only lambda: on the cosine path at the
    same lambdas they give the same samples (measured 1e-14)."""
    sched = DiscreteVPScheduler.from_betas(kind)
    cos = fs.AffineGaussianPath(fs.CosineScheduler())
    x = noise(64, 0)
    t1 = 0.999
    ta, tb = cos.scheduler.snr_inverse(sched.snr(torch.tensor([0.0, t1], dtype=F64))).tolist()
    ref = sample(fs.analytic.marginal_velocity(DATA, cos), x, "dopri5", t0=ta, t1=tb,
                 rtol=1e-10, atol=1e-10).x
    eps = DiscreteTimeModel(exact_model(sched), sched, "epsilon")
    steps = [16, 32, 64, 128]
    for solver, order in (("ddim", 1.0), ("dpmpp_2m", 2.0)):
        errs = [(sample(eps, x, solver, steps=n, t1=t1, grid="logsnr", path=eps.path,
                        prediction="epsilon").x - ref).abs().max().item() for n in steps]
        assert slope([1 / n for n in steps], errs) == pytest.approx(order, abs=0.45), errs
        grid = time_grid("logsnr", 16, t1=t1, path=eps.path)
        grid_cos = cos.scheduler.snr_inverse(sched.snr(torch.tensor(grid, dtype=F64))).tolist()
        eps_cos = fs.convert_field(fs.analytic.marginal_score(DATA, cos), cos, "score", "epsilon")
        same = sample(eps_cos, x, solver, grid=grid_cos, t0=grid_cos[0], t1=grid_cos[-1],
                      path=cos, prediction="epsilon").x
        ours = sample(eps, x, solver, grid=grid, t1=t1, path=eps.path, prediction="epsilon").x
        assert (ours - same).abs().max().item() < 1e-12
    assert errs[-1] < 1e-2


@pytest.mark.parametrize("kind", KINDS)
def test_ddim_gives_diffusers_samples(diffusers, kind):
    """diffusers' DDIMScheduler (eta = 0, clip_sample off: its default clamps the data
    prediction to [-1, 1]; "leading" spacing 900, 800, .., 0 and the final step to alpha = 1,
    set_alpha_to_one) against flowsolve's ddim on the grid of those timesteps.
    Max |difference|: ~1e-6 with diffusers' float32 table arithmetic, ~1e-14 in float64."""
    ref = diffusers.DDIMScheduler(**betas(kind), clip_sample=False)
    ref.set_timesteps(10)
    assert ref.timesteps.tolist() == list(range(900, -1, -100))
    sched = DiscreteVPScheduler(ref.alphas_cumprod)  # the float32 values, kept in float64
    model, x = exact_model(sched), noise(64, 1)
    grid = grid_of(sched, ref.timesteps, 1.0)
    ours = run_flowsolve(model, sched, "epsilon", "ddim", grid, x)
    for f64 in (False, True):
        if f64:
            ref.alphas_cumprod = ref.alphas_cumprod.to(F64)
            ref.final_alpha_cumprod = ref.final_alpha_cumprod.to(F64)
        y = x.clone()
        for n in ref.timesteps:
            y = ref.step(model(y, n), n, y).prev_sample
        assert (ours - y).abs().max().item() < (1e-12 if f64 else 1e-5)
    assert ours.abs().max() < 10


@QUIET
@pytest.mark.parametrize("kind", KINDS)
def test_dpmpp_2m_gives_diffusers_samples(diffusers, kind):
    """diffusers' DPMSolverMultistepScheduler (dpmsolver++, order 2, midpoint, "linspace"
    timesteps 999, 899, .., 100, final step to sigma = 0, which is first order there as in
    flowsolve; first step first order) against flowsolve's dpmpp_2m on those timesteps.

    diffusers keeps its table and sigmas in float32 and its step() rounds the state to
    float32. As shipped: 1e-5 (measured ~1e-6), but on the cosine table, whose alpha at
    timestep 999 is 5e-5, the float32 sigma there costs ~1e-3 in the first data prediction.
    Table and sigmas in float64: 1e-5 through step() (measured ~1e-6); its own update
    formulas driven in float64 (step() without the cast): 1e-12 (measured ~1e-15)."""
    ref = diffusers.DPMSolverMultistepScheduler(**betas(kind), algorithm_type="dpmsolver++",
                                                solver_order=2, final_sigmas_type="zero")
    ref.set_timesteps(10)
    assert ref.timesteps[0].item() == 999 and len(ref.timesteps) == 10
    sched = DiscreteVPScheduler(ref.alphas_cumprod)
    model, x = exact_model(sched), noise(64, 2)
    grid = grid_of(sched, ref.timesteps, 1.0)
    ours = run_flowsolve(model, sched, "epsilon", "dpmpp_2m", grid, x)
    assert ours.abs().max() < 10

    def through_step():
        y = x.clone()
        for n in ref.timesteps:
            y = ref.step(model(y, n), n, y).prev_sample
        ref.set_timesteps(10)
        return y

    shipped = (ours - through_step()).abs().max().item()
    assert shipped < (5e-3 if kind == "squaredcos_cap_v2" else 1e-5)
    ac = ref.alphas_cumprod.to(F64)[ref.timesteps]
    sigmas = torch.cat([((1 - ac) / ac).sqrt(), torch.zeros(1, dtype=F64)])
    ref.sigmas = sigmas
    assert (ours - through_step()).abs().max().item() < 1e-5
    ref.sigmas = sigmas
    y, outputs, last = x.clone(), [], len(ref.timesteps) - 1
    for i, n in enumerate(ref.timesteps):
        ref._step_index = i
        outputs.append(ref.convert_model_output(model(y, n), sample=y))
        if i in (0, last):
            y = ref.dpm_solver_first_order_update(outputs[-1], sample=y)
        else:
            y = ref.multistep_dpm_solver_second_order_update(outputs[-2:], sample=y)
    # float64 rounding of x - sigma eps, divided by alpha_0 = 5e-5 on the cosine table
    assert (ours - y).abs().max().item() < (1e-10 if kind == "squaredcos_cap_v2" else 1e-12)


@QUIET
@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m"])
def test_a_v_prediction_network_on_other_timesteps_gives_diffusers_samples(diffusers, solver):
    """A random MLP predicting v, 20 steps ("trailing" spacing for DDIM, with
    set_alpha_to_one=False: the last step goes to alpha-bar_0, t = 1 - 1/T)."""
    kind = "scaled_linear"
    if solver == "ddim":
        ref = diffusers.DDIMScheduler(**betas(kind), clip_sample=False,
                                      prediction_type="v_prediction", set_alpha_to_one=False,
                                      timestep_spacing="trailing")
    else:
        ref = diffusers.DPMSolverMultistepScheduler(**betas(kind),
                                                    prediction_type="v_prediction")
    ref.set_timesteps(20)
    sched = DiscreteVPScheduler(ref.alphas_cumprod)
    final = 1 - 1 / sched.T if solver == "ddim" else 1.0
    if solver == "ddim":
        assert ref.timesteps[-1].item() == 49 and ref.timesteps[0].item() == 999
    model, x = mlp_model(sched.T), noise(32, 3)
    ours = run_flowsolve(model, sched, "v_prediction", solver,
                         grid_of(sched, ref.timesteps, final), x)
    y = x.clone()
    for n in ref.timesteps:
        y = ref.step(model(y, n), n, y).prev_sample
    assert (ours - y).abs().max().item() < 1e-5
    assert 0.1 < ours.abs().max() < 10


def test_the_model_is_called_on_its_timestep_scale():
    sched = DiscreteVPScheduler.from_betas("linear", T=20)
    seen = []

    def model(x, steps):
        seen.append(steps)
        return torch.zeros_like(x)

    f = DiscreteTimeModel(model, sched, "epsilon")
    x = torch.zeros(3, 2, dtype=F64)
    f(x, torch.tensor(0.5, dtype=F64))
    f(x, torch.tensor([0.0, 0.95, 1.0], dtype=F64))
    assert seen[0].shape == (3,) and seen[0].dtype == F64 and seen[0].tolist() == [9.0] * 3
    assert torch.allclose(seen[1], torch.tensor([19.0, 0.0, -1.0], dtype=F64), atol=1e-13)
    assert (f.prediction, DiscreteTimeModel(model, sched, "sample").prediction) == ("epsilon", "x1")
    with pytest.raises(ValueError, match="predicts 'epsilon', 'v'"):
        DiscreteTimeModel(model, sched, "velocity")
    with pytest.raises(ValueError, match="not a parameterisation"):
        DiscreteTimeModel(model, sched, "flow")
    with pytest.raises(TypeError, match="DiscreteVPScheduler"):
        DiscreteTimeModel(model, fs.LinearVPScheduler(), "epsilon")
    bad = DiscreteTimeModel(lambda x, n: x[:, :1], sched, "epsilon")
    with pytest.raises(ValueError, match=r"shaped like x \(3, 2\); got \(3, 1\)"):
        bad(x, 0.5)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        f(x, 1.5)


# -- EDM preconditioning -------------------------------------------------------------------

def test_edm_coefficients_are_table_1_and_give_unit_variances():
    r = torch.tensor([0.002, 0.1, 0.5, 1.0, 7.0, 80.0], dtype=F64)
    for sd in (0.5, 1.3):
        c = edm_coefficients(r, sd)
        assert torch.allclose(c.c_skip, sd**2 / (r**2 + sd**2), rtol=1e-15)
        assert torch.allclose(c.c_out, r * sd / (sd**2 + r**2).sqrt(), rtol=1e-15)
        assert torch.allclose(c.c_in, 1 / (sd**2 + r**2).sqrt(), rtol=1e-15)
        assert torch.allclose(c.c_noise, 0.25 * r.log(), rtol=1e-15)
        # EDM's design (Appendix B.6), for x1 ~ N(0, sd^2), y = x1 + r n: the network's input
        # c_in y and its target (x1 - c_skip y) / c_out have unit variance
        assert torch.allclose(c.c_in**2 * (sd**2 + r**2), torch.ones_like(r), rtol=1e-14)
        target_var = ((1 - c.c_skip) ** 2 * sd**2 + c.c_skip**2 * r**2) / c.c_out**2
        assert torch.allclose(target_var, torch.ones_like(r), rtol=1e-13)
    with pytest.raises(ValueError, match="sigma_data must be a finite number > 0"):
        edm_coefficients(r, 0.0)
    with pytest.raises(ValueError, match="noise level r must be >= 0"):
        edm_coefficients(torch.tensor([-1.0]))


def gaussian_denoiser(mean: torch.Tensor, var: torch.Tensor):
    """EDM's ideal denoiser of ``N(mean, diag(var))`` data: ``D(y; r) = (var y + r^2 mean) /
    (var + r^2)``."""
    return lambda y, r: (var * y + r[:, None] ** 2 * mean) / (var + r[:, None] ** 2)


def exact_network(denoise, sd: float):
    """The raw network whose preconditioned output is ``denoise``, from the paper's formulas:
    ``r = exp(4 c_noise)``, ``y = x_in sqrt(r^2 + sd^2)``, ``F = (D(y; r) - c_skip y) / c_out``."""
    def network(x_in, c_noise):
        r = torch.exp(4 * c_noise)
        norm = torch.sqrt(r**2 + sd**2)[:, None]
        y = x_in * norm
        c_skip, c_out = sd**2 / norm**2, r[:, None] * sd / norm
        return (denoise(y, r) - c_skip * y) / c_out
    return network


@pytest.mark.parametrize("scheduler", [fs.VEScheduler(0.002, 80.0), fs.CondOTScheduler(),
                                       DiscreteVPScheduler.from_betas("linear")], ids=repr)
def test_the_preconditioned_exact_network_is_the_posterior_mean(scheduler):
    """F built from the exact denoiser of a Gaussian (EDM's VE quantities) gives back
    E[x1 | x_t] on any path (through y = x / alpha_t, r = sigma_t / alpha_t); F = 0 is the
    denoiser of N(0, sd^2 I)."""
    path = fs.AffineGaussianPath(scheduler)
    mean, var = torch.tensor([1.0, -2.0], dtype=F64), torch.tensor([0.3, 2.0], dtype=F64)
    data = fs.Gaussian(mean, var)
    sd = 0.7
    g = torch.Generator().manual_seed(6)
    t = 0.02 + 0.96 * torch.rand(50, generator=g, dtype=F64)
    x = 3 * noise(50, g)
    d = EDMPreconditioned(exact_network(gaussian_denoiser(mean, var), sd), path, sd)
    assert torch.allclose(d(x, t), fs.analytic.posterior_mean(data, path)(x, t),
                          rtol=1e-11, atol=1e-11)
    zero = EDMPreconditioned(lambda y, c: torch.zeros_like(y), path, sd)
    centred = fs.Gaussian(torch.zeros(2, dtype=F64), torch.full((2,), sd**2, dtype=F64))
    assert torch.allclose(zero(x, t), fs.analytic.posterior_mean(centred, path)(x, t),
                          rtol=1e-12, atol=1e-13)
    # one time for the batch, as the samplers call it
    t0 = torch.tensor(0.4, dtype=F64)
    assert torch.allclose(d(x, t0), fs.analytic.posterior_mean(data, path)(x, t0), atol=1e-11)


def test_the_training_target_and_loss_weight():
    """D with F = target(x, x1, t) is x1; lambda |D - x1|^2 = |F - F*|^2; the target has unit
    variance for x1 ~ N(0, sd^2) (its coefficients of x1 and of the noise, read back)."""
    path = fs.AffineGaussianPath(fs.CosineScheduler())
    sd = 0.5
    g = torch.Generator().manual_seed(7)
    t = 0.05 + 0.9 * torch.rand(40, generator=g, dtype=F64)
    x1, x0 = noise(40, g), noise(40, g)
    x = path.sample(x0, x1, t).x_t
    pre = EDMPreconditioned(lambda y, c: torch.zeros_like(y), path, sd)
    target = pre.target(x, x1, t)
    recovered = EDMPreconditioned(lambda y, c: target, path, sd)
    assert torch.allclose(recovered(x, t), x1, atol=1e-12)
    f = noise(40, g)
    d = EDMPreconditioned(lambda y, c: f, path, sd)(x, t)
    weight = pre.loss_weight(t)
    assert torch.allclose(weight * ((d - x1) ** 2).sum(1), ((f - target) ** 2).sum(1),
                          rtol=1e-12)
    v = path.scheduler(t)
    ones = torch.ones(40, 2, dtype=F64)
    a1 = pre.target(v.alpha_t[:, None] * ones, ones, t)  # x1 = 1, noise = 0
    a0 = pre.target(v.sigma_t[:, None] * ones, 0 * ones, t)  # x1 = 0, noise = 1
    assert torch.allclose(a1**2 * sd**2 + a0**2, ones, rtol=1e-12)


def test_a_preconditioned_network_samples_as_an_x1_model():
    path = fs.AffineGaussianPath(fs.VEScheduler(0.002, 80.0))
    mean, var = torch.tensor([1.0, -2.0], dtype=F64), torch.tensor([0.3, 2.0], dtype=F64)
    d = EDMPreconditioned(exact_network(gaussian_denoiser(mean, var), 0.5), path, 0.5)
    x = 80 * noise(32, 8)
    got = sample(d, x, "dpmpp_2m", steps=12, grid="edm", path=path, prediction="x1").x
    want = sample(fs.analytic.posterior_mean(fs.Gaussian(mean, var), path), x, "dpmpp_2m",
                  steps=12, grid="edm", path=path, prediction="x1").x
    assert torch.allclose(got, want, atol=1e-10)
    with pytest.raises(ValueError, match="shaped like x"):
        EDMPreconditioned(lambda y, c: c, path)(x, 0.5)
    with pytest.raises(TypeError, match="sigma_data"):
        EDMPreconditioned(lambda y, c: y, path, sigma_data=None)
