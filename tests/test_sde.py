"""SDE sampling, Langevin and Brownian motion on closed-form Gaussian mixtures (float64)."""

import math

import pytest
import torch
import torchsde
from _cases import gen, noise, slope, three_gaussians, w2

import flowsolve as fs
from flowsolve.sde.solve import (
    DIFFUSIONS,
    SDE_SOLVERS,
    GridBrownian,
    diffusion_schedule,
    langevin,
    sample_sde,
)

F64 = torch.float64
PATH = fs.AffineGaussianPath(fs.CondOTScheduler())
DATA = three_gaussians()
U = fs.analytic.marginal_velocity(DATA, PATH)
S = fs.analytic.marginal_score(DATA, PATH)
# torchsde's methods (SDE_SOLVERS also holds the samplers: test_stochastic_samplers.py)
TORCHSDE = sorted(n for n, i in SDE_SOLVERS.items() if i.library == "torchsde")
# per drift evaluation, per step, for additive noise (read from torchsde's step functions)
DRIFTS_PER_STEP = {"euler": 1, "euler_heun": 1, "milstein": 1, "heun": 2, "midpoint": 2,
                   "reversible_heun": 1, "srk": 3}


# -- distribution: the exact score keeps the marginals for every g -------------------------
N_W2 = 2000


@pytest.fixture(scope="module")
def w2_floor():
    """W2 between two fresh mixture samples of the same size (the Monte-Carlo floor)."""
    g = gen(10)
    return [w2(DATA.sample(N_W2, generator=g, dtype=F64), DATA.sample(N_W2, generator=g,
                                                                     dtype=F64))
            for _ in range(3)]


@pytest.mark.parametrize("diffusion", [0.0, 0.5, 1.0, "sigma_scaled", "forward"])
def test_sde_with_exact_score_reproduces_mixture(diffusion, w2_floor):
    g = gen(11)
    t0 = 1e-3 if diffusion == "forward" else 0.0  # the forward g_t is infinite at alpha_t = 0
    x0 = PATH.sample(noise(N_W2, g), DATA.sample(N_W2, generator=g, dtype=F64), t0).x_t
    res = sample_sde(U, x0, score=S, path=PATH, diffusion=diffusion, steps=200, t0=t0,
                     generator=g)
    dist = w2(res.x, DATA.sample(N_W2, generator=g, dtype=F64))
    floor = sum(w2_floor) / len(w2_floor)
    assert dist < 1.4 * floor, (dist, w2_floor)
    # first two moments within Monte-Carlo error (std of a mean over 2000: ~0.05)
    assert torch.allclose(res.x.mean(0), DATA.mean, atol=0.15)
    assert torch.allclose(torch.cov(res.x.T), DATA.covariance, atol=0.3)


def test_w2_check_has_power(w2_floor):
    """Dropping the score correction g^2/2 s (noise on the ODE) must fail the same check."""
    g = gen(12)
    res = sample_sde(U, noise(N_W2, g), score=lambda x, t: 0 * x, diffusion=1.0, steps=200,
                     generator=g)
    assert w2(res.x, DATA.sample(N_W2, generator=g, dtype=F64)) > 2 * max(w2_floor)


# -- orders -----------------------------------------------------------------------------------
def test_euler_maruyama_weak_order_one():
    """E|X_1|^2 against the exact mixture second moment, coupled over step sizes."""
    g = gen(13)
    exact = float(DATA.covariance.trace() + DATA.mean @ DATA.mean)
    x0 = noise(40_000, g)
    bm = GridBrownian(x0.shape, steps=32, generator=g, dtype=F64)
    steps = [4, 8, 16, 32]
    errs = [float((sample_sde(U, x0, score=S, diffusion=1.0, steps=n, bm=bm).x ** 2)
                  .sum(1).mean()) - exact for n in steps]
    order = slope([1 / n for n in steps], errs)
    assert 0.8 < order < 1.25, (order, errs)
    assert abs(errs[-1]) < 0.2  # Monte-Carlo std of the estimate is ~0.03


def test_euler_maruyama_strong_order_one_for_additive_noise():
    g = gen(14)
    x0 = noise(1000, g)
    bm = GridBrownian(x0.shape, steps=512, generator=g, dtype=F64)
    ref = sample_sde(U, x0, score=S, diffusion=1.0, steps=512, bm=bm).x
    steps = [8, 16, 32, 64]
    errs = [float((sample_sde(U, x0, score=S, diffusion=1.0, steps=n, bm=bm).x - ref)
                  .norm(dim=1).mean()) for n in steps]
    order = slope([1 / n for n in steps], errs)
    assert 0.85 < order < 1.2, (order, errs)


@pytest.mark.slow
@pytest.mark.parametrize("solver", TORCHSDE)
def test_strong_order_matches_declared(solver):
    """Against noise built here from its definition, not by GridBrownian (whose law and
    aggregation tests/test_brownian.py checks): 1024 fine cells of h, dW_k = sqrt(h) z,
    U_k = h (dW_k / 2 + sqrt(h / 12) z'); the reference solves on the fine cells, a coarse
    step over cells a..b-1 gets their exact aggregates W = sum_k dW_k and
    U = int (W_s - W_ta) ds = sum_k [U_k + (t_b - t_{k+1}) dW_k]."""
    g = gen(15)
    x0 = noise(1000, g)
    fine = 1024
    h = 1 / fine
    z = torch.randn(2, fine, *x0.shape, generator=g, dtype=F64)
    d_w = h**0.5 * z[0]
    d_u = h * (d_w / 2 + (h / 12) ** 0.5 * z[1])

    def cell(t) -> int:
        k = round(float(t) * fine)
        assert abs(float(t) * fine - k) < 1e-6, t  # queries on the fine grid only
        return k

    class FinePath(torchsde.BaseBrownian):
        shape, dtype, device, levy_area_approximation = x0.shape, F64, x0.device, "space-time"

        def __call__(self, ta, tb=None, return_U=False, return_A=False):
            assert not return_A
            a, b = (0, cell(ta)) if tb is None else (cell(ta), cell(tb))
            w = d_w[a:b].sum(0)
            if not return_U:
                return w
            lag = h * torch.arange(b - a - 1, -1, -1, dtype=F64)[:, None, None]  # t_b - t_{k+1}
            return w, (d_u[a:b] + lag * d_w[a:b]).sum(0)

        def __repr__(self):
            return f"FinePath(cells={fine})"

    bm = FinePath()
    ref = sample_sde(U, x0, score=S, diffusion=1.0, steps=fine, bm=bm, solver=solver).x
    steps = [8, 16, 32, 64, 128]
    errs = [float((sample_sde(U, x0, score=S, diffusion=1.0, steps=n, bm=bm,
                              solver=solver).x - ref).norm(dim=1).mean()) for n in steps]
    declared = SDE_SOLVERS[solver].order
    assert slope([1 / n for n in steps], errs) > declared - 0.25, errs


# -- NFE and the registry -------------------------------------------------------------------
def test_registry_is_read_from_torchsde():
    assert set(TORCHSDE) == set(DRIFTS_PER_STEP)
    assert all(SDE_SOLVERS[n].kind == "sde" and SDE_SOLVERS[n].stochastic
               and not SDE_SOLVERS[n].adaptive and not SDE_SOLVERS[n].needs_path
               for n in TORCHSDE)
    assert SDE_SOLVERS["srk"].order == 1.5 and SDE_SOLVERS["euler"].order == 1.0
    with pytest.raises(ValueError, match="unknown SDE solver 'rk4'.*euler.*srk"):
        sample_sde(U, noise(2, gen(0)), score=S, solver="rk4")


@pytest.mark.parametrize("solver", TORCHSDE)
def test_nfe_reported_equals_calls_made(solver):
    calls = {"u": 0, "s": 0, "g": 0}

    def count(name, f):
        def wrapped(*args):
            calls[name] += 1
            return f(*args)
        return wrapped

    steps = 7
    res = sample_sde(count("u", U), noise(5, gen(1)), score=count("s", S),
                     diffusion=count("g", lambda t: 0.5 + 0 * t), solver=solver, steps=steps,
                     generator=gen(2))
    assert res.nfe == calls["u"] + calls["s"]
    assert calls["u"] == calls["s"] == res.nfe_drift
    assert res.nfe_diffusion == calls["g"] - 1 - res.nfe_drift  # 1: the endpoint check
    extra = 1 if solver == "reversible_heun" else 0  # its initial f_and_g at t0
    assert res.nfe_drift == DRIFTS_PER_STEP[solver] * steps + extra


# -- noise: reproducibility, shared paths, the Brownian object ---------------------------------
def test_same_generator_seed_gives_identical_samples():
    x0 = noise(64, gen(3))
    a = sample_sde(U, x0, score=S, diffusion=1.0, steps=20, generator=gen(4)).x
    b = sample_sde(U, x0, score=S, diffusion=1.0, steps=20, generator=gen(4)).x
    c = sample_sde(U, x0, score=S, diffusion=1.0, steps=20, generator=gen(5)).x
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_two_solvers_on_the_same_path_agree_as_dt_shrinks():
    x0 = noise(200, gen(6))
    bm = GridBrownian(x0.shape, steps=256, generator=gen(7), dtype=F64)
    gaps = []
    for n in (16, 256):
        a = sample_sde(U, x0, score=S, diffusion=1.0, steps=n, bm=bm, solver="euler").x
        b = sample_sde(U, x0, score=S, diffusion=1.0, steps=n, bm=bm, solver="heun").x
        gaps.append(float((a - b).norm(dim=1).mean()))
    assert gaps[1] < gaps[0] / 8 and gaps[1] < 0.01, gaps


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_grid_brownian_increments(dtype):
    bm = GridBrownian((4000, 3), steps=100, generator=gen(8), dtype=dtype, levy_area="space-time")
    grid = torch.linspace(0, 1, 101, dtype=dtype)
    cells = torch.stack([bm(grid[k], grid[k + 1]) for k in range(100)])
    assert cells.dtype == dtype and cells.shape == (100, 4000, 3)
    total = bm(grid[0], grid[100])
    assert torch.allclose(cells.sum(0), total, atol=1e-5 if dtype == torch.float32 else 1e-12)
    assert abs(float(cells.double().var()) - 0.01) < 0.0005  # Var dW = h
    w, u = bm(grid[10], grid[30], return_U=True)  # U = h (W/2 + H), Var = h^3 / 3
    assert abs(float((u - 0.1 * w).double().var()) - 0.2**3 / 12) < 0.1 * 0.2**3 / 12
    with pytest.raises(ValueError, match="grid points"):
        bm(0.0, 0.005)


def test_float32_solve_takes_exactly_the_grid():
    """No tiny extra last step in float32 (torchsde's repeated addition adds one)."""
    x0 = noise(256, gen(9)).float()
    res = sample_sde(U, x0, score=S, diffusion=1.0, steps=100, generator=gen(9))
    assert res.x.dtype == torch.float32 and torch.isfinite(res.x).all()
    assert res.nfe_drift == 100


def test_user_brownian_objects():
    x0 = noise(8, gen(16))
    bi = torchsde.BrownianInterval(0.0, 1.0, size=(8, 2), dtype=F64, entropy=1, dt=0.1)
    res = sample_sde(U, x0, score=S, steps=10, bm=bi)
    assert torch.isfinite(res.x).all()
    with pytest.raises(ValueError, match="shape"):
        sample_sde(U, x0, score=S, steps=10, bm=GridBrownian((4, 2), steps=10, generator=gen(0)))
    with pytest.raises(ValueError, match="Levy area"):
        sample_sde(U, x0, score=S, steps=10, solver="srk", bm=GridBrownian(
            (8, 2), steps=10, generator=gen(0), dtype=F64))
    # a grid motion must contain the solve's grid: 3 steps on a 4-cell motion would read
    # rounded increments on an accelerator (variances 1/4, 1/2, 1/4 instead of 1/3 each)
    for steps, bm_steps, t in [(3, 4, (0.0, 1.0)), (10, 10, (0.0, 0.5)), (4, 8, (0.0, 1.5))]:
        with pytest.raises(ValueError, match="does not lie on its grid"):
            sample_sde(U, x0, score=S, steps=steps, bm=GridBrownian(
                (8, 2), steps=bm_steps, t0=t[0], t1=t[1], generator=gen(0), dtype=F64))
    fine = GridBrownian((8, 2), steps=40, generator=gen(0), dtype=F64)  # a multiple: accepted
    coarse = sample_sde(U, x0, score=S, diffusion=1.0, steps=10, bm=fine).x
    assert torch.isfinite(coarse).all()


def test_image_shaped_state():
    data = fs.Gaussian(torch.full((48,), 0.5), torch.full((48,), 0.25))
    x0 = torch.randn(4000, 3, 4, 4, generator=gen(17), dtype=F64)
    res = sample_sde(fs.analytic.marginal_velocity(data, PATH), x0, path=PATH,
                     diffusion="sigma_scaled", steps=50, generator=gen(18), solver="srk")
    assert res.x.shape == x0.shape
    assert abs(float(res.x.mean()) - 0.5) < 0.01 and abs(float(res.x.var()) - 0.25) < 0.02


# -- one model, converted on the path; endpoints ----------------------------------------------
@pytest.mark.parametrize("diffusion", [0.7, "sigma_scaled"])
def test_velocity_only_and_score_only_match_both_models(diffusion):
    t0 = 0.05  # the score -> velocity conversion is singular at alpha_t = 0 (t = 0)
    x0 = PATH.sample(noise(100, gen(19)), DATA.sample(100, generator=gen(19), dtype=F64), t0).x_t
    t1 = 1.0 if diffusion == "sigma_scaled" else 0.98
    kw = dict(path=PATH, diffusion=diffusion, steps=40, t0=t0, t1=t1, solver="heun")
    both = sample_sde(U, x0, score=S, generator=gen(20), **kw)
    vel = sample_sde(U, x0, generator=gen(20), **kw)
    sco = sample_sde(None, x0, score=S, generator=gen(20), **kw)
    assert torch.allclose(vel.x, both.x, atol=1e-9) and torch.allclose(sco.x, both.x, atol=1e-9)
    assert vel.nfe == both.nfe_drift == sco.nfe


def test_probability_flow_from_velocity_only_runs_to_t1():
    x0 = noise(50, gen(29))
    vel = sample_sde(U, x0, path=PATH, diffusion=0.0, steps=20, solver="heun")
    both = sample_sde(U, x0, score=S, diffusion=0.0, steps=20, solver="heun")
    assert torch.allclose(vel.x, both.x, atol=1e-12)


def test_endpoint_singularities_are_named():
    x0 = noise(4, gen(21))
    with pytest.raises(ValueError, match=r"singular at t=1\.0.*t1=1-eps"):
        sample_sde(U, x0, path=PATH, diffusion=1.0)  # velocity only: g^2/(2 sigma) at sigma=0
    with pytest.raises(ValueError, match=r"singular at t=0\.0"):
        sample_sde(None, x0, score=S, path=PATH, diffusion=1.0)  # alpha'/alpha at alpha=0
    with pytest.raises(ValueError, match=r"singular at t=0\.0"):
        sample_sde(U, x0, score=S, path=PATH, diffusion="forward")
    with pytest.raises(ValueError, match="path=AffineGaussianPath"):
        sample_sde(U, x0, diffusion=1.0)


def test_forward_diffusion_is_singular_at_sigma_zero_for_linear_vp():
    """'forward' makes g^2/(2 sigma) = sigma alpha'/alpha - sigma' finite at sigma = 0 only
    where sigma' is: CondOT (= 1 at t = 1) but not linear VP (sigma = sqrt(1 - alpha^2),
    sigma'_1 = -inf, g_1 = sqrt(beta_min) > 0); the message must not promise otherwise."""
    vp = fs.AffineGaussianPath(fs.LinearVPScheduler(0.1, 20.0))
    t = torch.tensor([1.0], dtype=F64)
    g = diffusion_schedule("forward", path=vp)
    assert torch.allclose(g(t), torch.tensor([0.1], dtype=F64).sqrt(), rtol=1e-12)
    assert torch.isinf(g.half_g2_over_sigma(t)).all()
    assert torch.allclose(diffusion_schedule("forward", path=PATH).half_g2_over_sigma(t),
                          torch.ones(1, dtype=F64), rtol=1e-12)
    with pytest.raises(ValueError, match=r"singular at t=1\.0.*'forward' only where sigma'_t "
                                         r"is finite \(CondOT, cosine; not linear VP\)"):
        sample_sde(fs.analytic.marginal_velocity(DATA, vp), noise(4, gen(26)), path=vp,
                   diffusion="forward")


def test_forward_diffusion_closed_forms():
    t = torch.tensor([0.1, 0.5, 0.9, 1.0], dtype=F64)
    vp = fs.AffineGaussianPath(fs.LinearVPScheduler(0.1, 20.0))
    g = diffusion_schedule("forward", path=vp)
    assert torch.allclose(g(t) ** 2, 0.1 + (1 - t) * 19.9, rtol=1e-12)  # g^2 = beta(1 - t)
    g = diffusion_schedule("forward", path=PATH, scale=2.0)
    assert torch.allclose(g(t) ** 2, 4 * 2 * (1 - t) / t, rtol=1e-12)
    assert torch.allclose(g.half_g2_over_sigma(t), 4 * (1 - t) / t + 4, rtol=1e-12)
    assert torch.equal(diffusion_schedule("sigma_scaled", path=PATH, scale=3.0)(t), 3 * (1 - t))


def test_non_finite_state_names_time_and_solver():
    def bad(x, t):
        return U(x, t) + torch.where(t > 0.5, math.nan, 0.0)

    # the ODE front door's error: NonFiniteStateError (a FloatingPointError), status named
    with pytest.raises(fs.NonFiniteStateError,
                       match=r"'heun' stopped at t=0\.5 \(non_finite\).*step 6 of 10"):
        sample_sde(bad, noise(4, gen(22)), score=S, steps=10, solver="heun", generator=gen(0))


@pytest.mark.parametrize("model", ["velocity", "score", "langevin"])
@pytest.mark.parametrize("bad", ["(B, 1)", "(D,)", "float32"])
def test_a_model_of_the_wrong_shape_or_dtype_is_refused(model, bad):
    """A (B, 1) or (D,) output used to be broadcast into the drift silently, and a float32
    one mixed into a float64 state: every SDE entry point refuses them at the first call,
    naming x's and the output's shape and dtype."""
    exact = {"velocity": U, "score": S, "langevin": S}[model]
    wrong = {"(B, 1)": lambda x, t: exact(x, t)[:, :1],
             "(D,)": lambda x, t: exact(x, t).sum(0),
             "float32": lambda x, t: exact(x, t).float()}[bad]
    returned = {"(B, 1)": r"\(4, 1\) torch.float64", "(D,)": r"\(2,\) torch.float64",
                "float32": r"\(4, 2\) torch.float32"}[bad]
    x0 = noise(4, gen(24))
    with pytest.raises(ValueError, match=r"x is \(4, 2\) torch.float64, the field returned "
                                         + returned):
        if model == "velocity":
            sample_sde(wrong, x0, score=S, steps=4, t1=0.99, generator=gen(0))
        elif model == "score":
            sample_sde(U, x0, score=wrong, steps=4, t1=0.99, generator=gen(0))
        else:
            langevin(wrong, x0, dt=0.01, steps=4, generator=gen(0))


def test_input_errors_name_the_argument():
    x0 = noise(4, gen(23))
    with pytest.raises(ValueError, match="unknown diffusion 'loud'.*sigma_scaled"):
        sample_sde(U, x0, score=S, diffusion="loud")
    with pytest.raises(ValueError, match="diffusion must be a finite number >= 0; got -1"):
        sample_sde(U, x0, score=S, diffusion=-1.0)
    with pytest.raises(TypeError, match="diffusion must be"):
        sample_sde(U, x0, score=S, diffusion=[1.0])
    with pytest.raises(ValueError, match="steps must be a positive int; got 0"):
        sample_sde(U, x0, score=S, steps=0)
    with pytest.raises(ValueError, match="0 <= t0 < t1 <= 1.*t0=0.5"):
        sample_sde(U, x0, score=S, t0=0.5, t1=0.5)
    with pytest.raises(ValueError, match="times must be points of the grid.*0.33"):
        sample_sde(U, x0, score=S, steps=10, times=[0.33])
    with pytest.raises(ValueError, match="x0 must be"):
        sample_sde(U, torch.zeros(4), score=S)
    assert set(DIFFUSIONS) == {"constant", "sigma_scaled", "forward"}


def test_trajectory_at_requested_times():
    x0 = noise(16, gen(24))
    res = sample_sde(U, x0, score=S, steps=20, times=[0.0, 0.25, 1.0], generator=gen(25))
    assert res.trajectory.shape == (3, 16, 2)
    assert torch.equal(res.trajectory[0], x0) and torch.equal(res.trajectory[-1], res.x)
    assert res.times.tolist() == [0.0, 0.25, 1.0]


def test_float32_times_name_their_grid_points():
    """0.1 in float32 is 0.10000000149, 1.5e-9 off the grid: float32 times record the same
    states (and report the same grid times) as float64 ones, as in the ODE front door."""
    x0 = noise(8, gen(40))
    f64 = torch.linspace(0, 1, 11, dtype=F64)
    for times in (torch.linspace(0, 1, 11, dtype=torch.float32), f64.tolist()[::2]):
        res = sample_sde(U, x0, score=S, steps=10, times=times, generator=gen(41))
        ref = sample_sde(U, x0, score=S, steps=10, times=f64, generator=gen(41))
        keep = [round(float(t) * 10) for t in times]
        assert torch.equal(res.x, ref.x)
        assert torch.equal(res.times, ref.times[keep])  # the grid's own values
        assert torch.equal(res.trajectory, ref.trajectory[keep])
    assert torch.equal(ref.trajectory[0], x0) and torch.equal(ref.trajectory[-1], ref.x)
    # Langevin: the grid of its own time span, linspace(0, 2, 21) for dt=0.1, 20 steps
    a = langevin(S, x0, dt=0.1, steps=20, generator=gen(42),
                 times=torch.linspace(0, 2, 21, dtype=torch.float32)[[3, 7, 20]])
    b = langevin(S, x0, dt=0.1, steps=20, generator=gen(42), times=[0.3, 0.7, 2.0])
    assert torch.equal(a.trajectory, b.trajectory) and torch.equal(a.times, b.times)
    assert torch.equal(a.trajectory[-1], a.x)
    with pytest.raises(ValueError, match=r"points of the grid linspace\(0.0, 2.0, 21\)"):
        langevin(S, x0, dt=0.1, steps=20, generator=gen(42), times=[0.25])


def test_repeated_or_decreasing_times_are_refused():
    """Rather than recorded twice or out of order (as the ODE front door refuses them)."""
    x0 = noise(8, gen(40))
    for times, problem in (([0.5, 0.5], r"got \[0.5, 0.5\] \(not strictly monotone\)"),
                           ([0.5, 0.2], r"got \[0.5, 0.2\] \(not strictly monotone\)"),
                           ([0.2, 1.5], r"got \[0.2, 1.5\] \(outside the interval\)"),
                           ([0.5, 0.5000001], r"times 0.5 and 0.5000001 both name the grid "
                                              r"point 0.5 \(index 5\)")):
        with pytest.raises(ValueError, match=problem):
            sample_sde(U, x0, score=S, steps=10, times=times, generator=gen(41))
    for times in ([0.7, 0.3], [0.7, 0.7]):
        with pytest.raises(ValueError, match="not strictly monotone"):
            langevin(S, x0, dt=0.1, steps=20, generator=gen(42), times=times)


# -- Langevin ---------------------------------------------------------------------------------
def test_langevin_keeps_the_mixture(w2_floor):
    g = gen(26)
    x0 = DATA.sample(N_W2, generator=g, dtype=F64)
    res = langevin(S, x0, diffusion=math.sqrt(2), dt=0.01, steps=200, generator=g)
    assert res.nfe == 200 and res.nfe_drift == 200
    assert w2(res.x, DATA.sample(N_W2, generator=g, dtype=F64)) < 1.4 * sum(w2_floor) / 3
    assert torch.allclose(torch.cov(res.x.T), DATA.covariance, atol=0.3)
    # power: the score of p_{0.5} is the wrong target and moves the samples off the mixture
    off = langevin(S, x0, diffusion=math.sqrt(2), dt=0.01, steps=200, score_t=0.5, generator=g)
    assert w2(off.x, DATA.sample(N_W2, generator=g, dtype=F64)) > 2 * max(w2_floor)


def test_langevin_time_span_and_errors():
    x0 = noise(8, gen(27))
    a = langevin(S, x0, dt=0.05, steps=20, generator=gen(28), times=[1.0])
    b = langevin(S, x0, t_span=(0.0, 1.0), steps=20, generator=gen(28))
    assert torch.equal(a.x, b.x) and torch.equal(a.trajectory[0], a.x)
    with pytest.raises(ValueError, match="exactly one of dt or t_span"):
        langevin(S, x0, steps=20)
    with pytest.raises(ValueError, match="Langevin takes a number or a callable"):
        langevin(S, x0, dt=0.1, diffusion="forward")


@pytest.mark.parametrize("g", [lambda t: torch.ones(3, dtype=t.dtype),
                               lambda t: torch.ones(8, 2, dtype=t.dtype)], ids=["(3,)", "(B, D)"])
def test_a_diffusion_coefficient_of_another_shape_is_refused(g):
    """g_t of shape (3,) or (B, D) was broadcast into torchsde's noise (a raw expand error,
    or a silently state-dependent noise)."""
    x0 = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"must return a number or a tensor shaped like t .*"
                                         r"returned shape \((3,|8, 2)\)"):
        sample_sde(U, x0, score=S, diffusion=g, steps=4, t1=0.9)
