"""Time grids of the fixed-step solvers (flowsolve.ode.grids): each grid's defining property
checked exactly in float64, the validation, that the default is today's linspace grid bit for
bit, that the grid reaches every fixed-step back end (and the adjoint's backward pass), and
the measured effect of the grid on a closed-form mixture."""

import math

import pytest
import torch
from _cases import noise
from torch import nn
from torchdiffeq import odeint

import flowsolve as fs
from flowsolve.ode.fixed_step import TABLEAUS, FixedStepLoop
from flowsolve.ode.grids import (
    GRIDS,
    EDMGrid,
    GivenGrid,
    LogSNRGrid,
    ShiftGrid,
    UniformGrid,
    as_grid,
    time_grid,
)
from flowsolve.ode.solve import ODE_SOLVERS, sample

F64 = torch.float64
SCHEDULERS = {
    "cosine": fs.CosineScheduler(),
    "linear_vp": fs.LinearVPScheduler(),
    "condot": fs.CondOTScheduler(),
    "polynomial2": fs.PolynomialScheduler(2.0),
    "ve": fs.VEScheduler(),
}
INFINITE_ENDS = {"cosine": (True, True), "linear_vp": (False, True), "condot": (True, True),
                 "polynomial2": (True, True), "ve": (False, False)}
# the Runge-Kutta and Adams solvers (the low-NFE samplers: tests/test_samplers.py)
FIXED = [n for n in ODE_SOLVERS.names(adaptive=False) if not ODE_SOLVERS[n].needs_path]
COSINE = fs.AffineGaussianPath(fs.CosineScheduler())
RING = fs.GaussianMixture.ring(8, radius=4.0, std=0.5)


def log_snr(scheduler, times) -> list[float]:
    return scheduler.log_snr(torch.tensor(times, dtype=F64)).tolist()


def rms(a, b) -> float:
    return float((a - b).norm(dim=1).pow(2).mean().sqrt())


class Recorder:
    """A field dx/dt = 1 that records the times it is called at."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, x, t):
        self.times.append(float(t))
        return torch.ones_like(x)


# -- the uniform grid: today's grid, bit for bit -----------------------------------------------
@pytest.mark.parametrize("t0, t1", [(0.0, 1.0), (1.0, 0.0), (0.1, 0.7)])
def test_uniform_grid_is_torch_linspace(t0, t1):
    for steps in (1, 3, 10, 37):
        expected = torch.linspace(t0, t1, steps + 1, dtype=F64).tolist()
        assert time_grid("uniform", steps, t0=t0, t1=t1) == expected
        assert time_grid(UniformGrid(), steps, t0=t0, t1=t1) == expected


@pytest.mark.parametrize("solver", ["euler", "heun2", "rk4", "fast_heun2", "fast_rk4"])
@pytest.mark.parametrize("t0, t1", [(0.0, 1.0), (1.0, 0.3)])
def test_default_and_uniform_grid_give_the_linspace_solve_bit_for_bit(solver, t0, t1):
    """sample() with no grid and with grid="uniform" equals a solve written without
    flowsolve's grid code: torchdiffeq's odeint or the fast loop on linspace(t0, t1, 9)."""
    path = fs.AffineGaussianPath(fs.CondOTScheduler())
    u = fs.analytic.marginal_velocity(RING, path)
    x = noise(16, 1)
    linspace = torch.linspace(t0, t1, 9, dtype=F64)
    times = linspace[::4].tolist()
    if solver.startswith("fast_"):
        loop = FixedStepLoop(TABLEAUS[solver[5:]], linspace.tolist(), x, [0, 4, 8])
        x1, saved, _ = loop(u, x)
        traj = torch.stack(saved)
    else:
        traj = odeint(lambda t, y: u(y, t), x, torch.tensor(times, dtype=F64), method=solver,
                      options={"grid_constructor": lambda f, y0, t: linspace})
        x1 = traj[-1]
    for kwargs in ({}, {"grid": "uniform"}, {"grid": UniformGrid(), "path": path}):
        res = sample(u, x, solver, steps=8, t0=t0, t1=t1, times=times, **kwargs)
        assert torch.equal(res.x, x1) and torch.equal(res.trajectory, traj), kwargs
        assert res.grid.tolist() == linspace.tolist()


# -- uniform in log-SNR ------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("t0, t1", [(0.0, 1.0), (1.0, 0.0), (0.05, 0.9)])
def test_logsnr_grid_has_equal_log_snr_steps(name, t0, t1):
    """lambda(t_i) = lambda_a + i (lambda_b - lambda_a) / (M - 1) to 1e-12, with lambda_a,
    lambda_b those of t0, t1, or -log 80 / -log 0.002 where lambda is infinite (alpha = 0 at
    t = 0, sigma = 0 at t = 1): that end stays a grid point, one step beyond."""
    sched = SCHEDULERS[name]
    steps = 9
    grid = time_grid("logsnr", steps, t0=t0, t1=t1, path=fs.AffineGaussianPath(sched))
    assert len(grid) == steps + 1 and grid[0] == t0 and grid[-1] == t1
    fwd = grid if t0 < t1 else grid[::-1]
    lam = log_snr(sched, fwd)
    inf_lo, inf_hi = lam[0] == -math.inf, lam[-1] == math.inf
    spaced = lam[inf_lo:len(lam) - inf_hi]
    lam_a = -math.log(80.0) if inf_lo else lam[0]
    lam_b = -math.log(0.002) if inf_hi else lam[-1]
    m = len(spaced)
    assert m == steps + 1 - inf_lo - inf_hi
    expected = [lam_a + i * (lam_b - lam_a) / (m - 1) for i in range(m)]
    assert max(abs(a - b) for a, b in zip(spaced, expected, strict=True)) < 1e-12
    # which ends are infinite is the path's: CondOT/cosine/polynomial both, VP the data end
    ends = INFINITE_ENDS[name] if {t0, t1} == {0.0, 1.0} else (False, False)
    assert (inf_lo, inf_hi) == ends


def test_logsnr_grid_with_its_own_bounds_and_few_steps():
    """sigma_min / sigma_max replace the infinite ends; with two infinite ends and one spaced
    point, that point is the middle of the bounds in lambda; with one step the grid is
    [t0, t1]."""
    sched = fs.CondOTScheduler()
    grid = time_grid(LogSNRGrid(sigma_min=0.01, sigma_max=10.0), 4, path=sched)
    assert log_snr(sched, grid[1:-1]) == pytest.approx(
        [-math.log(10), math.log(10) / 2, math.log(100)], abs=1e-12)
    mid = time_grid("logsnr", 2, path=sched)
    assert log_snr(sched, mid[1:2])[0] == pytest.approx((math.log(500) - math.log(80)) / 2,
                                                        abs=1e-12)
    assert time_grid("logsnr", 1, path=sched) == [0.0, 1.0]
    vp = fs.LinearVPScheduler()  # one infinite end: the one spaced point is t0 itself
    assert time_grid("logsnr", 1, path=vp) == [0.0, 1.0]
    two = time_grid("logsnr", 2, path=vp)
    assert two[0] == 0.0 and two[2] == 1.0
    assert log_snr(vp, two[1:2])[0] == pytest.approx(math.log(500), abs=1e-12)


# -- EDM ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("rho", [7.0, 3.0])
def test_edm_grid_is_rho_spaced_in_sigma_over_alpha(name, rho):
    """r_i = sigma/alpha at the grid's times: r_i^(1/rho) equally spaced from r(t0) (80
    where alpha_0 = 0) to r(t1) (0.002 where sigma_1 = 0), to 1e-12 relative; the infinite
    end stays a grid point; the backward grid is the same times reversed."""
    sched = SCHEDULERS[name]
    path = fs.AffineGaussianPath(sched)
    steps = 8
    spec = EDMGrid(rho=rho) if rho != 7.0 else "edm"
    grid = time_grid(spec, steps, path=path)
    assert grid[0] == 0.0 and grid[-1] == 1.0
    r = [math.exp(-lam) for lam in log_snr(sched, grid)]
    inf_lo, zero_hi = r[0] == math.inf, r[-1] == 0.0
    spaced = r[inf_lo:len(r) - zero_hi]
    r_a = 80.0 if inf_lo else r[0]
    r_b = 0.002 if zero_hi else r[-1]
    m = len(spaced)
    v_a, v_b = r_a ** (1 / rho), r_b ** (1 / rho)
    expected = [(v_a + i / (m - 1) * (v_b - v_a)) ** rho for i in range(m)]
    assert max(abs(a / b - 1) for a, b in zip(spaced, expected, strict=True)) < 1e-12
    assert time_grid(spec, steps, t0=1.0, t1=0.0, path=path) == grid[::-1]


def test_edm_grid_from_an_interior_t0_is_not_clipped():
    """A finite end is used as it is: from t0 = 1e-3 on CondOT sigma/alpha starts at 999,
    above EDM's sigma_max = 80."""
    sched = fs.CondOTScheduler()
    grid = time_grid("edm", 6, t0=1e-3, t1=1.0, path=sched)
    r = [math.exp(-lam) for lam in log_snr(sched, grid[:-1])]
    assert r[0] == pytest.approx(999.0, rel=1e-12)
    assert r[-1] == pytest.approx(0.002, rel=1e-12)
    v = [x ** (1 / 7) for x in r]
    steps = [b - a for a, b in zip(v[:-1], v[1:], strict=True)]
    assert max(steps) - min(steps) < 1e-12 * abs(steps[0])


# -- the rectified-flow shift ------------------------------------------------------------------
@pytest.mark.parametrize("s", [3.0, 0.5, 1.7])
def test_shift_grid_is_the_shift_formula(s):
    """On [0, 1]: sigma' = s sigma / (1 + (s - 1) sigma) at sigma = 1 - i/N, t = 1 - sigma',
    to 1e-15; on a sub-interval and backwards the pre-images u = f_{1/s}(t) are uniform."""
    n = 10
    grid = time_grid(ShiftGrid(s), n)
    for i, t in enumerate(grid):
        sigma = 1 - i / n
        assert abs((1 - t) - s * sigma / (1 + (s - 1) * sigma)) < 1e-15
    assert time_grid(s, n) == grid  # a number is the shift
    for t0, t1 in ((0.2, 0.9), (0.9, 0.1)):
        sub = time_grid(s, n, t0=t0, t1=t1)
        assert sub[0] == t0 and sub[-1] == t1
        u = [t / (1 + (1 / s - 1) * (1 - t)) for t in sub]  # f_{1/s} = f_s^{-1}
        du = [b - a for a, b in zip(u[:-1], u[1:], strict=True)]
        assert max(du) - min(du) < 1e-14


def test_shift_one_is_the_uniform_grid_bit_for_bit():
    for t0, t1 in ((0.0, 1.0), (1.0, 0.0), (0.3, 0.8)):
        for steps in (1, 7, 50):
            assert time_grid(1.0, steps, t0=t0, t1=t1) == time_grid("uniform", steps, t0=t0,
                                                                      t1=t1)
    assert time_grid(ShiftGrid(3.0), 4) == pytest.approx([0.0, 0.1, 0.25, 0.5, 1.0], abs=1e-16)


# -- given times -------------------------------------------------------------------------------
def test_given_times_are_used_exactly():
    times = [0.0, 0.1, 0.35, 0.36, 0.9, 1.0]
    for given in (times, tuple(times), torch.tensor(times, dtype=F64)):
        assert time_grid(given) == times
        assert time_grid(given, 5) == times
    back = time_grid(times[::-1], t0=1.0, t1=0.0)
    assert back == times[::-1]
    rec = Recorder()
    res = sample(rec, torch.zeros(2, 1, dtype=F64), "euler", grid=torch.tensor(times, dtype=F64))
    assert rec.times == times[:-1] and res.steps == 5
    assert res.grid.tolist() == times and res.x.flatten().tolist() == [1.0, 1.0]
    # float32 times: an end within float32 rounding is that end
    f32 = torch.linspace(0.0, 0.3, 4, dtype=torch.float32)
    assert float(f32[-1]) > 0.3
    assert time_grid(f32, t1=0.3)[-1] == 0.3


# -- validation --------------------------------------------------------------------------------
@pytest.mark.parametrize("call, error, match", [
    (lambda: time_grid("cubic", 4), ValueError, 'unknown grid .*accepted: "uniform", "logsnr"'),
    (lambda: time_grid("shift", 4), ValueError, r"needs its factor s: grid=ShiftGrid\(s\)"),
    (lambda: time_grid(0.0, 4), ValueError, "shift must be a finite number > 0"),
    (lambda: time_grid(math.nan, 4), ValueError, "shift must be a finite number > 0"),
    (lambda: time_grid(True, 4), TypeError, "grid must be one of"),
    (lambda: time_grid({"edm": 7}, 4), TypeError, "grid must be one of"),
    (lambda: EDMGrid(rho=0), ValueError, "rho must be a finite number > 0"),
    (lambda: LogSNRGrid(sigma_min=1.0, sigma_max=1.0), ValueError, "sigma_min < sigma_max"),
    (lambda: time_grid("logsnr", 4), ValueError, "pass path="),
    (lambda: time_grid("edm", 4, path="cosine"), TypeError, "AffineGaussianPath or a Sched"),
    (lambda: time_grid("uniform"), ValueError, "needs steps=N"),
    (lambda: time_grid("uniform", 0), ValueError, "steps must be a positive int"),
    (lambda: time_grid("uniform", 4, t0=0.5, t1=0.5), ValueError, "distinct"),
    (lambda: time_grid([0.0, math.nan, 1.0]), ValueError, r"\(not finite\)"),
    (lambda: time_grid([0.0, 0.5, 0.5, 1.0]), ValueError, r"\(not strictly monotone"),
    (lambda: time_grid([0.0, 0.7, 0.5, 1.0]), ValueError, r"\(not strictly monotone"),
    (lambda: time_grid([0.0, 0.5, 1.5]), ValueError, r"\(outside \[0, 1\]\)"),
    (lambda: time_grid([0.5]), ValueError, "fewer than two times"),
    (lambda: time_grid(torch.zeros(2, 2)), ValueError, "must be 1-d"),
    (lambda: time_grid([0.1, 0.5, 1.0]), ValueError, "must start at t0=0.0 and end at t1=1.0"),
    (lambda: time_grid([1.0, 0.5, 0.0]), ValueError, "must start at t0=0.0"),
    (lambda: time_grid([0.0, 0.5, 1.0], 3), ValueError, "disagrees with the 3 grid times"),
    (lambda: time_grid(torch.tensor([0.0, 1.0 + 1e-7], dtype=F64)), ValueError,
     "outside"),
    (lambda: time_grid("logsnr", 4, t1=0.01, path=fs.CondOTScheduler()), ValueError,
     "spacing starts at sigma_max=80.0, beyond the other end"),
])
def test_grids_are_validated(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("kwargs, match", [
    ({"solver": "dopri5", "grid": "logsnr", "path": COSINE}, "adaptive and chooses its own"),
    ({"solver": "RK45", "grid": [0.0, 1.0]}, "adaptive and chooses its own"),
    ({"solver": "dopri5", "path": COSINE}, "path= shapes the grid of a fixed-step solver"),
    ({"solver": "rk4", "steps": 4, "grid": "edm"}, "pass path="),
    ({"solver": "fast_rk4", "grid": "edm", "path": COSINE}, "fixed-step: give steps"),
    ({"solver": "rk4", "steps": 4, "grid": "edm", "path": COSINE, "times": [0.5]},
     r"points of the grid \[0.0, 0.0079.*\(5 times\)"),
    ({"solver": "heun2", "steps": 3, "grid": [0.0, 0.5, 1.0]}, "disagrees"),
    ({"solver": "heun2", "t0": 0.2, "grid": [0.0, 0.5, 1.0]}, "must start at t0=0.2"),
])
def test_sample_checks_its_grid_arguments(kwargs, match):
    u = fs.analytic.marginal_velocity(RING, COSINE)
    with pytest.raises(ValueError, match=match):
        sample(u, noise(4, 0), **kwargs)


# -- the grid reaches every fixed-step back end ------------------------------------------------
@pytest.mark.parametrize("solver", FIXED)
@pytest.mark.parametrize("t0, t1", [(0.0, 1.0), (1.0, 0.0)])
def test_the_grid_reaches_every_fixed_step_solver(solver, t0, t1):
    """The field is called at every grid point but the last (to one ulp: torchdiffeq nudges
    a stage at a cell's end by one ulp), never outside the grid, and an explicit
    Runge-Kutta method at exactly its stage times t_n + c_i h_n; Euler at grid[:-1] exactly."""
    grid = time_grid("edm", 6, t0=t0, t1=t1, path=COSINE)
    rec = Recorder()
    res = sample(rec, torch.zeros(3, 2, dtype=F64), solver, steps=6, t0=t0, t1=t1,
                 grid="edm", path=COSINE)
    assert res.grid.tolist() == grid and res.steps == 6
    assert res.x.flatten().tolist() == pytest.approx([t1 - t0] * 6, abs=1e-14)
    for g in grid[:-1]:
        assert min(abs(g - t) for t in rec.times) <= 1.2e-16, (g, rec.times)
    assert all(0.0 <= t <= 1.0 for t in rec.times)
    method = solver.removeprefix("fast_")
    if method in TABLEAUS:
        stages = [t for cell in TABLEAUS[method].stage_times(grid) for t in cell]
        assert rec.times == pytest.approx(stages, abs=1.2e-16, rel=0)
    if method == "euler":
        assert rec.times == grid[:-1]


@pytest.mark.parametrize("t0, t1", [(0.0, 1.0), (1.0, 0.0)])
def test_the_adjoint_backward_pass_runs_on_the_grid_reversed(t0, t1):
    """Euler's backward pass evaluates the field at the reversed grid but its last point: the
    forward grid, not equal steps."""

    class Linear(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.tensor([[0.3, -1.0], [0.8, 0.1]], dtype=F64))
            self.times: list[float] = []

        def forward(self, x, t):
            self.times.append(float(t.detach()))
            return (x @ self.a.T) * torch.cos(4 * t)

    field = Linear()
    res = sample(field, noise(4, 2), "euler", steps=5, t0=t0, t1=t1, grid="edm", path=COSINE,
                 adjoint=True)
    grid = res.grid.tolist()
    assert field.times == grid[:-1]
    field.times.clear()
    res.x.sum().backward()
    assert field.times == grid[::-1][:-1]


def test_times_on_a_non_uniform_grid():
    """``times`` are points of the grid in use: the trajectory there is the solve's state
    (a solve stopped at that point gives the same numbers)."""
    u = fs.analytic.marginal_velocity(RING, COSINE)
    x = noise(8, 3)
    grid = time_grid("logsnr", 8, path=COSINE)
    for solver in ("heun2", "fast_heun2"):
        res = sample(u, x, solver, steps=8, grid="logsnr", path=COSINE, times=grid[2::3])
        assert res.times.tolist() == grid[2::3]
        part = sample(u, x, solver, grid=grid[:6], t1=grid[5])
        assert torch.equal(res.trajectory[1], part.x)
    with pytest.raises(ValueError, match=r"times 0.5 and 0.5000001 both name the grid point"):
        sample(u, x, "rk4", grid=[0.0, 0.5, 1.0], times=[0.5, 0.5000001])
    # a time names a point within 1e-3 of the smaller cell beside it: float32 rounding of
    # a grid point does, 2e-5 beyond grid[1] (cells 0.008 and 0.057 wide on each side) not
    edm = time_grid("edm", 5, path=COSINE)
    near = torch.tensor(edm[1:3], dtype=torch.float32)
    res = sample(u, x, "fast_heun2", steps=5, grid="edm", path=COSINE, times=near)
    assert res.times.tolist() == edm[1:3]  # the grid points themselves
    with pytest.raises(ValueError, match="points of the grid"):
        sample(u, x, "fast_heun2", steps=5, grid="edm", path=COSINE, times=[edm[1] + 2e-5])


def test_registry_names_every_grid():
    assert sorted(GRIDS) == ["edm", "logsnr", "shift", "uniform"]
    assert isinstance(as_grid([0.0, 1.0]), GivenGrid)
    assert as_grid("edm") == EDMGrid() and as_grid(2.5) == ShiftGrid(2.5)
    assert as_grid(EDMGrid(rho=5.0)).rho == 5.0


# -- what a grid buys: measured ----------------------------------------------------------------
def _errors(data, path, solver, steps, grids):
    u = fs.analytic.marginal_velocity(data, path)
    x = noise(256, 0)
    ref = sample(u, x, "dopri5", rtol=1e-10, atol=1e-10).x
    return {str(g): rms(sample(u, x, solver, steps=steps, grid=g, path=path).x, ref)
            for g in grids}


def test_at_ten_nfe_the_uniform_grid_wins_on_the_ring_mixture():
    """heun2 with 5 steps (10 NFE) on the cosine path, 8-Gaussian ring (radius 4, std 0.5),
    RMS endpoint error against dopri5 at 1e-10. Measured: uniform 0.127, EDM 0.516, log-SNR
    0.886. Both spend two of the five cells on the ends (t < 0.008, t > 0.9987, where
    sigma/alpha passes 80 and 0.002) and leave the middle of the path, where this flow
    bends, to three cells."""
    err = _errors(RING, COSINE, "heun2", 5, ["uniform", "edm", "logsnr"])
    assert err["uniform"] < 0.2, err
    assert 2 * err["uniform"] < err["edm"] < err["logsnr"], err


def test_on_sharp_data_the_log_snr_grid_wins():
    """The same ring with std 0.02: the flow's hard part moves to the data end, where the
    log-SNR and EDM grids put their steps. heun2 with 16 steps (32 NFE), cosine path.
    Measured: uniform 0.0457, EDM 0.0242, log-SNR 0.0147."""
    sharp = fs.GaussianMixture.ring(8, radius=4.0, std=0.02)
    err = _errors(sharp, COSINE, "heun2", 16, ["uniform", "edm", "logsnr"])
    assert 2 * err["logsnr"] < err["uniform"], err
    assert 1.4 * err["edm"] < err["uniform"], err
