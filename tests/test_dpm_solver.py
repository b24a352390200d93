"""DDIM, DPM-Solver and DPM-Solver++ (flowsolve.ode.dpm_solver), in float64: exact on a point
mass, convergence orders against the closed-form flow of Gaussian data and against a tight
reference solve on a mixture, the local order of the multistep updates, the five model
parameterisations, infinite log-SNR ends (DDIM steps, history not used, never NaN), NFE
counted independently, trajectories and refused arguments."""

import math

import pytest
import torch
from _cases import F64, Counter, gen, noise, slope, three_gaussians

import flowsolve as fs
from flowsolve.ode.dpm_solver import SAMPLERS, stage_nodes
from flowsolve.ode.semilinear import SamplerLoop, nodes
from flowsolve.ode.solve import sample

NAMES = [s.name for s in SAMPLERS]
ORDER = {s.name: s.order for s in SAMPLERS}
STAGES = {"ddim": 0, "dpm_solver_2": 1, "dpm_solver_3": 2, "dpmpp_2s": 1, "dpmpp_2m": 0,
          "dpmpp_3m": 0}  # model calls inside a finite step besides the one at its start
SCHEDULERS = [fs.CondOTScheduler(), fs.CosineScheduler(), fs.LinearVPScheduler()]
PREDICTIONS = ["velocity", "score", "epsilon", "x1", "v"]
T0, T1 = 0.05, 0.95  # finite lambda at both ends on every scheduler
MIX = three_gaussians()


def test_the_module_registers_every_sampler_once_with_its_facts():
    assert NAMES == ["ddim", "dpm_solver_2", "dpm_solver_3", "dpmpp_2s", "dpmpp_2m", "dpmpp_3m"]
    assert ORDER == {"ddim": 1, "dpm_solver_2": 2, "dpm_solver_3": 3, "dpmpp_2s": 2,
                     "dpmpp_2m": 2, "dpmpp_3m": 3}
    assert [n for n in NAMES if fs.ode.backends.ODE_SOLVERS[n].multistep] == ["dpmpp_2m",
                                                                            "dpmpp_3m"]


# -- helpers -----------------------------------------------------------------------------------
def short_start_grid(scheduler, n: int, t0: float = T0, t1: float = T1) -> torch.Tensor:
    """``n + 1`` steps uniform in lambda but for a first step of ``q^2`` (``q = 1/n`` of the
    span): a multistep method's DDIM start then has a local error ``O(q^4)``, below its
    third-order global error (on a plain uniform grid the DDIM start's ``O(h^2)`` local
    error caps the global order of a 3-step method at 2)."""
    lo, hi = (float(v) for v in scheduler.log_snr(torch.tensor([t0, t1], dtype=F64)))
    q = 1.0 / n
    frac = torch.tensor([0.0, q * q, *(k * q for k in range(1, n + 1))], dtype=F64)
    t = scheduler.snr_inverse((lo + (hi - lo) * frac).exp())
    t[0], t[-1] = t0, t1
    return t


def grid_for(name, scheduler, n):
    """The grid of the order tests: uniform in lambda; for dpmpp_3m with a short first step."""
    if name == "dpmpp_3m":
        return {"grid": short_start_grid(scheduler, n)}
    return {"grid": "logsnr", "steps": n}


def gaussian_case(scheduler, seed=0, n=32):
    """N(m, c^2 I) data, an exact sample of p_{T0} and the exact solution at T1:
    ``x_t = alpha_t m + sqrt(alpha_t^2 c^2 + sigma_t^2) z`` with z fixed by the start."""
    m, c = torch.tensor([1.0, -0.5], dtype=F64), 0.3
    data = fs.Gaussian(m, torch.full((2,), c * c, dtype=F64))
    z = noise(n, seed)
    v = scheduler(torch.tensor([T0, T1], dtype=F64))
    x0, exact = (a * m + (a * a * c * c + s * s).sqrt() * z
                 for a, s in zip(v.alpha_t, v.sigma_t, strict=True))
    return data, x0, exact


def rms(x, y) -> float:
    """Root-mean-square difference (over points and coordinates)."""
    return (x - y).pow(2).mean().sqrt().item()



@pytest.fixture(scope="module")
def reference():
    """``reference(scheduler, t0, t1)``: the mixture's x0 (an exact sample of p_t0) and its
    tight dopri8 solution, computed once per case."""
    cache = {}

    def get(scheduler, t0=T0, t1=T1):
        key = (repr(scheduler), t0, t1)
        if key not in cache:
            path = fs.AffineGaussianPath(scheduler)
            g = gen(7)
            x0 = path.sample(noise(32, g), MIX.sample(32, generator=g, dtype=F64), t0).x_t
            u = fs.analytic.marginal_velocity(MIX, path)
            ref = sample(u, x0, "dopri8", rtol=1e-12, atol=1e-12, t0=t0, t1=t1).x
            cache[key] = (x0, ref)
        return cache[key]

    return get


# -- 1. a point mass: D(x, t) = m -------------------------------------------------------------
@pytest.mark.parametrize("scheduler", SCHEDULERS, ids=repr)
@pytest.mark.parametrize("name", NAMES)
def test_a_point_mass_is_reached_exactly_in_any_number_of_steps(name, scheduler):
    # the flow of a point mass m is x_t = alpha_t m + sigma_t z: DDIM is exact on it (D = m,
    # eps = z along it), and every correction vanishes; the last step to sigma = 0 gives m
    path = fs.AffineGaussianPath(scheduler)
    m = torch.tensor([0.7, -1.3], dtype=F64)
    z = noise(8, 3)
    v0 = scheduler(torch.tensor(0.0, dtype=F64))
    x0 = v0.alpha_t * m + v0.sigma_t * z  # z itself where alpha_0 = 0
    for steps, grid in [(1, "uniform"), (2, "logsnr"), (7, "uniform"), (16, "logsnr")]:
        res = sample(lambda x, t: m.expand_as(x), x0, name, steps=steps, grid=grid, path=path,
                     prediction="x1")
        assert torch.equal(res.x, m.expand_as(x0)), (steps, grid)
    # and exactly on the way: every state of an 8-step uniform solve
    grid = torch.linspace(0, 1, 9, dtype=F64)
    res = sample(lambda x, t: m.expand_as(x), x0, name, grid=grid, path=path, prediction="x1",
                 times=grid[1:-1])
    v = scheduler(grid[1:-1])
    exact = v.alpha_t[:, None, None] * m + v.sigma_t[:, None, None] * z
    assert (res.trajectory - exact).abs().max() < 1e-14


# -- 2. Gaussian data: the closed-form probability flow -------------------------------------
STEPS_GAUSSIAN = {"ddim": (16, 32, 64), "dpm_solver_2": (16, 32, 64),
                  "dpm_solver_3": (16, 32, 64), "dpmpp_2s": (16, 32, 64),
                  "dpmpp_2m": (128, 256, 512), "dpmpp_3m": (128, 256, 512)}


@pytest.mark.parametrize("scheduler", SCHEDULERS, ids=repr)
@pytest.mark.parametrize("name", NAMES)
def test_order_on_the_closed_form_flow_of_gaussian_data(name, scheduler):
    path = fs.AffineGaussianPath(scheduler)
    data, x0, exact = gaussian_case(scheduler)
    u = fs.analytic.marginal_velocity(data, path)
    steps = STEPS_GAUSSIAN[name]
    errs = [rms(sample(u, x0, name, path=path, t0=T0, t1=T1, **grid_for(name, scheduler, n)).x,
                exact) for n in steps]
    order = slope([1 / n for n in steps], errs)
    assert abs(order - ORDER[name]) < 0.3, (order, errs)


# -- 3. a Gaussian mixture against a tight reference -------------------------------------------
STEPS_MIXTURE = {**STEPS_GAUSSIAN, "dpmpp_2m": (32, 64, 128)}
# each sampler on one scheduler by default (each scheduler twice); all 18 cases are slow
DEFAULT = {("ddim", "CondOTScheduler()"), ("dpmpp_3m", "CondOTScheduler()"),
           ("dpm_solver_2", "CosineScheduler()"), ("dpmpp_2m", "CosineScheduler()"),
           ("dpm_solver_3", "LinearVPScheduler(beta_min=0.1, beta_max=20.0)"),
           ("dpmpp_2s", "LinearVPScheduler(beta_min=0.1, beta_max=20.0)")}
MIXTURE_CASES = [pytest.param(n, s, id=f"{n}-{s!r}",
                              marks=() if (n, repr(s)) in DEFAULT else pytest.mark.slow)
                 for n in NAMES for s in SCHEDULERS]


@pytest.mark.parametrize("name, scheduler", MIXTURE_CASES)
def test_order_on_a_mixture_against_a_tight_reference(name, scheduler, reference):
    path = fs.AffineGaussianPath(scheduler)
    u = fs.analytic.marginal_velocity(MIX, path)
    x0, ref = reference(scheduler)
    steps = STEPS_MIXTURE[name]
    errs = [rms(sample(u, x0, name, path=path, t0=T0, t1=T1, **grid_for(name, scheduler, n)).x,
                ref) for n in steps]
    order = slope([1 / n for n in steps], errs)
    assert abs(order - ORDER[name]) < 0.3, (order, errs)


@pytest.mark.parametrize("name, local_order", [("ddim", 2), ("dpmpp_2m", 3), ("dpmpp_3m", 4)])
def test_local_order_of_the_multistep_updates(name, local_order):
    # D(x, t) = sin(lambda_t) whatever x: the history is exact, the update is a quadrature of
    # x_t / sigma_t = x_s / sigma_s + int e^lambda sin(lambda) dlambda, and the last step's
    # own error is the difference of two solves that share the steps before it. The
    # reference code's 3M (half the second difference) has local order 3 here.
    scheduler = fs.CosineScheduler()
    path = fs.AffineGaussianPath(scheduler)

    def model(x, t):
        return torch.sin(scheduler.log_snr(t)) * torch.ones_like(x)

    def antiderivative(lam):
        return math.exp(lam) * (math.sin(lam) - math.cos(lam)) / 2

    x0 = torch.tensor([[0.7]], dtype=F64)
    hs, errs = [0.1, 0.05, 0.025, 0.0125], []
    for h in hs:
        # unequal history steps (r_0 = 0.6, r_1 = 1.3): every ratio of the update matters
        lam = torch.tensor([0.3 - 1.9 * h, 0.3 - 0.6 * h, 0.3, 0.3 + h], dtype=F64)
        grid = scheduler.snr_inverse(lam.exp()).tolist()
        g = nodes(scheduler, grid)
        runs = []
        for end in (3, 4):
            loop = SamplerLoop(SAMPLERS[NAMES.index(name)], model, path, "x1", grid[:end], x0)
            runs.append(loop(x0)[0].item())
        s, t = g[2], g[3]
        exact = t.sigma * (runs[0] / s.sigma + antiderivative(t.lam) - antiderivative(s.lam))
        errs.append(abs(runs[1] - exact))
    order = slope(hs, errs)
    assert abs(order - local_order) < 0.3, (order, errs)


def test_stage_times_lie_at_the_planned_log_snr():
    for scheduler in SCHEDULERS:
        grid = nodes(scheduler, [0.0, 0.02, 0.3, 0.6, 0.9, 1.0])
        plan = stage_nodes(grid, scheduler, (1 / 3, 2 / 3))
        assert len(plan) == 5 and plan[-1] is None  # sigma = 0 at t = 1 on all three
        assert (plan[0] is None) == (scheduler.log_snr(torch.tensor(0.0)) == -math.inf)
        for i, stages in enumerate(plan):
            s, t = grid[i], grid[i + 1]
            if not (math.isfinite(s.lam) and math.isfinite(t.lam)):
                assert stages is None
                continue
            for r, u in zip((1 / 3, 2 / 3), stages, strict=True):
                assert abs(u.lam - (s.lam + r * (t.lam - s.lam))) < 1e-12
                assert s.t < u.t < t.t


# -- 4. parameterisations, infinite ends, NFE ---------------------------------------------------
@pytest.mark.parametrize("scheduler", SCHEDULERS, ids=repr)
@pytest.mark.parametrize("name", NAMES)
def test_every_parameterisation_gives_the_same_samples(name, scheduler, reference):
    path = fs.AffineGaussianPath(scheduler)
    u = fs.analytic.marginal_velocity(MIX, path)
    x0, _ = reference(scheduler)
    out = {kind: sample(fs.convert_field(u, path, "velocity", kind), x0, name, steps=6,
                        grid="logsnr", path=path, prediction=kind, t0=T0, t1=T1).x
           for kind in PREDICTIONS}
    for kind in PREDICTIONS[1:]:
        assert (out[kind] - out["velocity"]).abs().max() < 1e-10, kind


# error bounds at 48 steps on [0, 1], twice the largest measured on the three schedulers
BOUND_01 = {"ddim": 0.5, "dpm_solver_2": 0.02, "dpm_solver_3": 0.002, "dpmpp_2s": 0.05,
            "dpmpp_2m": 0.04, "dpmpp_3m": 0.03}


@pytest.mark.parametrize("name", NAMES)
def test_on_zero_one_the_infinite_ends_give_finite_samples_and_the_counted_nfe(name,
                                                                              reference):
    finals = []
    for scheduler in SCHEDULERS:
        path = fs.AffineGaussianPath(scheduler)
        u = fs.analytic.marginal_velocity(MIX, path)
        x0, ref = reference(scheduler, 0.0, 1.0)
        errs = []
        for steps in (12, 48):
            counter = Counter(u)
            res = sample(counter, x0, name, steps=steps, grid="logsnr", path=path)
            assert torch.isfinite(res.x).all()
            lam = scheduler.log_snr(res.grid.to(F64))
            finite = int(torch.isfinite(lam[1:] - lam[:-1]).sum())
            assert res.nfe == counter.calls == steps + STAGES[name] * finite
            errs.append((res.x - ref).abs().max().item())
        assert errs[1] < min(errs[0], BOUND_01[name]), errs
        finals.append(res.x)
    # the samplers see a scheduler only through lambda and the posterior means: CondOT and
    # cosine put the same logsnr grid on [0, 1] and start from the same x0 = noise
    assert (finals[0] - finals[1]).abs().max() < 1e-10


@pytest.mark.parametrize("scheduler", SCHEDULERS, ids=repr)
def test_infinite_ends_are_ddim_steps_and_their_history_is_not_used(scheduler):
    path = fs.AffineGaussianPath(scheduler)
    u = fs.analytic.marginal_velocity(MIX, path)
    x0 = noise(16, 5)

    def run(name, grid, **kw):
        return sample(u, x0, name, grid=grid, path=path, t0=grid[0], t1=grid[-1], **kw)

    # from t = 0 (lambda = -inf on CondOT and cosine; finite on linear VP) to 1 in two steps
    two = [0.0, 0.4, 1.0]
    infinite_start = not math.isfinite(float(scheduler.log_snr(torch.tensor(0.0))))
    for name in NAMES:
        res = run(name, two)
        if infinite_start or STAGES[name] == 0:  # every step is DDIM
            assert torch.equal(res.x, run("ddim", two).x), name
            assert res.nfe == 2
    if infinite_start:
        # the second step's only history is at lambda = -inf: DDIM; the third is 2M
        assert torch.equal(run("dpmpp_2m", two[:2] + [0.6]).x, run("ddim", two[:2] + [0.6]).x)
        four = [0.0, 0.2, 0.4, 0.6]
        assert torch.equal(run("dpmpp_3m", four).x, run("dpmpp_2m", four).x)
        assert not torch.equal(run("dpmpp_2m", four).x, run("ddim", four).x)
    # the last step, to sigma = 0, is DDIM: x_1 = D(x_s, s), the posterior mean
    times = [0.1, 0.3, 0.5, 1.0]
    post = fs.analytic.posterior_mean(MIX, path)
    for name in NAMES:
        res = run(name, times, times=[0.5, 1.0])
        assert (res.x - post(res.trajectory[0], torch.tensor(0.5, dtype=F64))).abs().max() \
            < 1e-12, name


@pytest.mark.parametrize("name", NAMES)
def test_never_nan_where_lambda_is_finite_but_extreme(name):
    # lambda ~ -690 at t = 1e-300 on CondOT (e^{-lambda} ~ 1e300); on linear VP the first
    # three times share one lambda in float64 (steps of length 0)
    for scheduler in SCHEDULERS:
        path = fs.AffineGaussianPath(scheduler)
        u = fs.analytic.marginal_velocity(MIX, path)
        x0 = noise(16, 6)
        for times in ([1e-300, 0.5, 1.0], [1e-300, 1e-200, 1e-100, 0.5, 0.9]):
            res = sample(u, x0, name, grid=times, path=path, t0=times[0], t1=times[-1])
            assert torch.isfinite(res.x).all(), (scheduler, times)


# -- 5. trajectories and refused arguments ----------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_the_trajectory_at_grid_points_is_the_state_of_the_shorter_solve(name):
    path = fs.AffineGaussianPath(fs.CosineScheduler())
    u = fs.analytic.marginal_velocity(MIX, path)
    x0 = noise(16, 8)
    grid = torch.tensor([0.0, 0.1, 0.25, 0.4, 0.6, 0.8, 0.95, 1.0], dtype=F64)
    res = sample(u, x0, name, grid=grid, path=path, times=grid[[2, 5, 7]])
    assert res.trajectory.shape == (3, *x0.shape)
    for k, end in enumerate((2, 5)):
        short = sample(u, x0, name, grid=grid[:end + 1], path=path, t1=float(grid[end]))
        assert torch.equal(res.trajectory[k], short.x)
    assert torch.equal(res.trajectory[-1], res.x)
    assert torch.equal(res.times, grid[[2, 5, 7]])


def test_a_bad_prediction_and_a_missing_path_are_refused():
    path = fs.AffineGaussianPath(fs.CondOTScheduler())
    u = fs.analytic.marginal_velocity(MIX, path)
    x0 = noise(4, 9)
    with pytest.raises(ValueError, match=r"prediction='eps_hat' is not a parameterisation; "
                                         r"accepted: velocity, score, epsilon, x1, v"):
        sample(u, x0, "dpm_solver_3", steps=4, path=path, prediction="eps_hat")
    with pytest.raises(ValueError, match=r"solver 'dpmpp_3m' steps in the path's log-SNR: "
                                         r"pass path="):
        sample(u, x0, "dpmpp_3m", steps=4)
    with pytest.raises(ValueError, match=r"a 'epsilon' model gives no data prediction .* "
                                         r"t=0\.0"):  # alpha_0 = 0: eps carries no data
        sample(u, x0, "dpmpp_2s", steps=4, path=path, prediction="epsilon")
