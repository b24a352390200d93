"""The stochastic low-NFE samplers (flowsolve.sde.samplers) and grids for SDE solves,
against closed forms in float64.

The samplers are affine in ``(x0, z_1 .. z_N)`` whenever the model's posterior mean ``D`` is
affine in x, as it is for Gaussian data (or a point). The law of their output is then
Gaussian and computed *exactly* (no Monte Carlo) by :func:`exact_law`: one solve of a batch
whose rows are ``x0 = 0``, the unit vectors ``x0 = e_j`` and, for each step i, the unit
noises ``z_i = e_j`` (read from a Brownian object that returns exactly those increments),
gives the output's mean and its linear maps ``M`` (from x0) and ``C_i`` (from z_i):
``Cov = M Cov_0 M^T + sum_i C_i C_i^T``.

Point mass (``D = p``): one step of ``ancestral`` from ``x_s ~ N(alpha_s p, sigma_s^2 I)``
gives ``alpha_t p + k (x_s - alpha_s p) / sigma_s + c z`` with ``k^2 + c^2 = sigma_t^2``,
i.e. ``N(alpha_t p, sigma_t^2 I)``: the exact marginal, for every eta and grid.
``dpmpp_2m_sde``'s first-order part is the same transition with ``eta_ddim^2 (1 - e^{-2h}) =
1 - e^{-2 eta h}``, and ``D1 = 0``; EDM's churn adds exactly the variance between two noise
levels and its ODE ``dy/dr = (y - p) / r`` has solutions ``p + k r``, which Euler and Heun
integrate exactly. So every sampler keeps the point's marginals exactly on any grid.
"""

import math

import pytest
import torch
import torchsde
from _cases import gen, slope, three_gaussians

import flowsolve as fs
from flowsolve.ode.grids import time_grid
from flowsolve.sde.brownian import GridBrownian
from flowsolve.sde.diffusions import diffusion_schedule
from flowsolve.sde.samplers import SAMPLERS, make_sampler
from flowsolve.sde.solve import SDE_SOLVERS, langevin, sample_sde

F64 = torch.float64
PATHS = {
    "condot": fs.AffineGaussianPath(fs.CondOTScheduler()),
    "cosine": fs.AffineGaussianPath(fs.CosineScheduler()),
    "linear_vp": fs.AffineGaussianPath(fs.LinearVPScheduler()),
    "ve": fs.AffineGaussianPath(fs.VEScheduler()),
}
PATH = PATHS["condot"]
MIXTURE = three_gaussians()
U = fs.analytic.marginal_velocity(MIXTURE, PATH)
S = fs.analytic.marginal_score(MIXTURE, PATH)
GAUSS = fs.Gaussian(torch.tensor([1.0, -0.5], dtype=F64), torch.tensor([0.3, 1.5], dtype=F64))
# (solver, options): every sampler, ancestral with two etas
CASES = [("ancestral", {}), ("ancestral", {"eta": 0.5}), ("dpmpp_2m_sde", {}),
         ("edm_stochastic", {})]
IDS = ["ancestral", "ancestral-eta0.5", "dpmpp_2m_sde", "edm_stochastic"]


def values(path, t: float) -> tuple[float, float]:
    v = path.scheduler(torch.tensor(t, dtype=F64))
    return float(v.alpha_t), float(v.sigma_t)


def gaussian_law(path, data, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact marginal of Gaussian data at t: ``N(alpha m, alpha^2 C + sigma^2 I)``."""
    a, s = values(path, t)
    d = data.mean.numel()
    return a * data.mean, a * a * data.covariance + s * s * torch.eye(d, dtype=F64)


class ChosenIncrements(torchsde.BaseBrownian):
    """A Brownian object whose increment over cell i of ``grid`` is ``sqrt(h_i) Z[i]``."""

    dtype, device, levy_area_approximation = F64, torch.device("cpu"), "none"
    shape = None

    def __init__(self, grid, z):
        self.grid, self.z, self.shape = list(grid), z, tuple(z.shape[1:])
        self.cell = {t: i for i, t in enumerate(self.grid[:-1])}

    def __call__(self, ta, tb=None, return_U=False, return_A=False):
        i = self.cell[float(ta)]
        assert float(tb) == self.grid[i + 1], (ta, tb)
        return math.sqrt(self.grid[i + 1] - self.grid[i]) * self.z[i]

    def __repr__(self):
        return "ChosenIncrements()"


def exact_law(model, path, solver, steps, *, law0, grid="logsnr", t0=0.0, t1=1.0,
              options=None, prediction="velocity"):
    """Mean and covariance of a sampler's output from ``x0 ~ N(law0)`` for a model whose
    posterior mean is affine in x (module doc)."""
    ts = time_grid(grid, steps, t0=t0, t1=t1, path=path)
    n, d = len(ts) - 1, law0[0].numel()
    rows = 1 + d + n * d
    x0 = torch.zeros(rows, d, dtype=F64)
    x0[1:1 + d] = torch.eye(d, dtype=F64)
    z = torch.zeros(n, rows, d, dtype=F64)
    for i in range(n):
        z[i, 1 + d + i * d: 1 + d + (i + 1) * d] = torch.eye(d, dtype=F64)
    out = sample_sde(model, x0, solver=solver, path=path, steps=steps, grid=grid, t0=t0,
                     t1=t1, bm=ChosenIncrements(ts, z), options=options,
                     prediction=prediction).x
    m, c = (out[1:1 + d] - out[0]).T, (out[1 + d:] - out[0]).T
    return out[0] + m @ law0[0], m @ law0[1] @ m.T + c @ c.T


def point_model(p):
    """The exact x1-prediction of data that is the point p: ``E[x1 | x_t] = p``."""
    return lambda x, t: p.expand_as(x)


# -- the registry ------------------------------------------------------------------------------
def test_registered_with_their_facts():
    samplers = {n: i for n, i in SDE_SOLVERS.items() if i.library == "flowsolve"}
    assert set(samplers) == {"ancestral", "dpmpp_2m_sde", "edm_stochastic"}
    assert all(i.kind == "sde" and i.stochastic and i.needs_path and not i.adaptive
               for i in samplers.values())
    assert [samplers[n].multistep for n in sorted(samplers)] == [False, True, False]
    assert [samplers[n].order for n in sorted(samplers)] == [1.0, 1.0, None]
    assert {s.name for s in SAMPLERS} == set(samplers)


# -- (a) a point: exact on any grid --------------------------------------------------------------
@pytest.mark.parametrize("solver,options", CASES, ids=IDS)
@pytest.mark.parametrize("path_name", ["condot", "cosine", "linear_vp"])
def test_point_mass_data_lands_on_the_point(solver, options, path_name):
    p = torch.tensor([0.7, -1.3], dtype=F64)
    for grid in ("uniform", "logsnr"):
        res = sample_sde(point_model(p), torch.randn(64, 2, generator=gen(1), dtype=F64),
                         solver=solver, path=PATHS[path_name], steps=7, grid=grid,
                         generator=gen(2), prediction="x1", options=options)
        torch.testing.assert_close(res.x, p.expand(64, 2), rtol=0, atol=1e-13)


@pytest.mark.parametrize("solver,options", [*CASES, ("ancestral", {"eta": 0.0}),
                                            ("dpmpp_2m_sde", {"eta": 0.3}),
                                            ("edm_stochastic", {"s_churn": 80.0,
                                                                "s_tmin": 0.0,
                                                                "s_tmax": math.inf})])
@pytest.mark.parametrize("path_name", sorted(PATHS))
def test_point_mass_marginals_are_exact_on_any_grid(solver, options, path_name):
    """From p_0 to t1 = 0.7 (the first step from alpha = 0 included): the output is exactly
    N(alpha_t1 p, sigma_t1^2 I) (module doc), computed without Monte Carlo."""
    path, p = PATHS[path_name], torch.tensor([0.7, -1.3], dtype=F64)

    def point(t):  # N(alpha_t p, sigma_t^2 I)
        a, s = values(path, t)
        return a * p, s * s * torch.eye(2, dtype=F64)

    for grid in ("uniform", "logsnr", [0.0, 0.05, 0.3, 0.35, 0.7]):
        m, c = exact_law(point_model(p), path, solver, None if isinstance(grid, list) else 6,
                         law0=point(0.0), grid=grid, t1=0.7,
                         options=options, prediction="x1")
        want_m, want_c = point(0.7)
        torch.testing.assert_close(m, want_m, rtol=0, atol=1e-12)
        torch.testing.assert_close(c, want_c, rtol=0, atol=1e-12)


# -- (b) the marginals of a mixture --------------------------------------------------------------
N_MC = 10_000
# (solver, options, steps, grid): the first-order ancestral sampler needs the most steps
MC_CASES = [("ancestral", {}, 400, "uniform"), ("ancestral", {"eta": 0.5}, 200, "uniform"),
            ("dpmpp_2m_sde", {}, 50, "logsnr"), ("edm_stochastic", {}, 60, "uniform")]


@pytest.fixture(scope="module")
def mixture_entropy():
    """E_p[log p] of the mixture from 200 000 of its own samples, and its standard error."""
    lp = MIXTURE.log_prob(MIXTURE.sample(200_000, generator=gen(40), dtype=F64))
    return float(lp.mean()), float(lp.std()) / math.sqrt(lp.numel())


@pytest.mark.parametrize("solver,options,steps,grid", MC_CASES, ids=IDS)
def test_samples_keep_the_mixture(solver, options, steps, grid, mixture_entropy):
    """The mean exact log-density of the samples, E[log p(X)], matches the data's own
    E_p[log p] within 4 standard errors of the difference (10 000 samples against 200 000:
    s.e. 0.0107). Measured: -2.9958 (ancestral, 400 steps), -2.9881 (eta 0.5, 200),
    -3.0177 (dpmpp_2m_sde, 50), -3.0253 (edm_stochastic, 60) against -3.0116 (1.5, 2.2, 0.6
    and 1.2 s.e.). A wrong noise scale fails it: the sign of eta^2 e^{-2h} flipped in
    ancestral's sqrt(sigma_t^2 - c^2) (eta 0.5), e^{-h} for e^{-2h} in its c or in
    dpmpp_2m_sde's, EDM's churn sqrt(r_hat^2 + r_i^2)."""
    x = sample_sde(U, torch.randn(N_MC, 2, generator=gen(41), dtype=F64), solver=solver,
                   path=PATH, steps=steps, grid=grid, generator=gen(42), options=options).x
    lp = MIXTURE.log_prob(x)
    mean, se = mixture_entropy
    se_diff = math.hypot(float(lp.std()) / math.sqrt(N_MC), se)
    assert abs(float(lp.mean()) - mean) < 4 * se_diff, (float(lp.mean()), mean, se_diff)


# -- (c) Gaussian data: exact laws and their orders ----------------------------------------------
@pytest.mark.parametrize("solver,options,lo,hi", [
    ("ancestral", {}, 0.85, 1.15), ("ancestral", {"eta": 0.5}, 0.85, 1.15),
    ("dpmpp_2m_sde", {}, 1.8, 2.2), ("edm_stochastic", {"s_churn": 0.0}, 1.85, 2.2)])
def test_weak_order_on_gaussian_data(solver, options, lo, hi):
    """The exact law of the output at t1 = 0.95 from p_0.05, on the log-SNR grid (uniform in
    lambda: the step h = const / N): the error |mean| + |Cov| (Frobenius) against the data's
    marginal falls as N^-1 for ancestral and N^-2 for dpmpp_2m_sde and EDM's Heun (no churn).
    Measured slopes over N = 16 .. 128: 0.91, 0.94, 1.94, 2.05."""
    path, t0, t1 = PATH, 0.05, 0.95
    model = fs.analytic.marginal_velocity(GAUSS, path)
    want = gaussian_law(path, GAUSS, t1)
    steps = [16, 32, 64, 128]
    errs = []
    for n in steps:
        m, c = exact_law(model, path, solver, n, law0=gaussian_law(path, GAUSS, t0), t0=t0,
                         t1=t1, options=options)
        errs.append(float((m - want[0]).norm() + (c - want[1]).norm()))
    assert lo < slope([1 / n for n in steps], errs) < hi, errs


@pytest.mark.parametrize("solver,options,grid,tol", [
    ("ancestral", {}, "uniform", 0.07), ("dpmpp_2m_sde", {}, "logsnr", 4.5e-3),
    ("edm_stochastic", {}, "uniform", 0.012)])
def test_exact_law_from_noise_to_data(solver, options, grid, tol):
    """[0, 1] with both infinite ends, 128 steps: the output law is within ``tol`` of the
    data (|mean| + |Cov|; measured 0.057, 0.0036, 0.0091)."""
    m, c = exact_law(fs.analytic.marginal_velocity(GAUSS, PATH), PATH, solver, 128,
                     law0=(torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64)), grid=grid,
                     options=options)
    err = float((m - GAUSS.mean).norm() + (c - GAUSS.covariance).norm())
    assert err < tol, err


@pytest.mark.parametrize("solver,options,grid", [
    ("ancestral", {}, "uniform"), ("ancestral", {"eta": 0.5}, "uniform"),
    ("dpmpp_2m_sde", {}, "logsnr"), ("edm_stochastic", {}, "uniform")], ids=IDS)
def test_gaussian_sample_moments(solver, options, grid):
    """Sample mean and covariance of 20 000 samples (50 steps, noise from a generator)
    against the exact law of the sampler's output (:func:`exact_law`) within 4.5 standard
    errors (s.e. of a mean sqrt(C_ii / n); of a covariance entry sqrt((C_ii C_jj + C_ij^2) /
    n)), and so against the data's within 4.5 s.e. plus that law's exact bias (the first-order
    ancestral sampler's Cov_22 is 0.07 low at 50 steps; dpmpp_2m_sde's 0.02 high)."""
    n, steps = 20_000, 50
    model = fs.analytic.marginal_velocity(GAUSS, PATH)
    x = sample_sde(model, torch.randn(n, 2, generator=gen(43), dtype=F64), solver=solver,
                   path=PATH, steps=steps, grid=grid, generator=gen(44), options=options).x
    m, c = exact_law(model, PATH, solver, steps, grid=grid, options=options,
                     law0=(torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64)))
    se_mean = (c.diagonal() / n).sqrt()
    se_cov = ((c.diagonal()[:, None] * c.diagonal()[None, :] + c**2) / n).sqrt()
    mean, cov = x.mean(0), torch.cov(x.T)
    assert ((mean - m).abs() < 4.5 * se_mean).all(), (mean, m)
    assert ((cov - c).abs() < 4.5 * se_cov).all(), (cov, c)
    assert ((mean - GAUSS.mean).abs() < 4.5 * se_mean + (m - GAUSS.mean).abs()).all()
    assert ((cov - GAUSS.covariance).abs() < 4.5 * se_cov + (c - GAUSS.covariance).abs()).all()


# -- pathwise: the SDE each sampler discretises --------------------------------------------------
@pytest.fixture(scope="module")
def forward_sde_reference():
    """x0 ~ p_0.1 (200 points), a Brownian path on 128 cells of [0.1, 0.9], and the solution
    at 0.9 of sample_sde with the exact velocity and score and g = scale * g_forward by srk
    (strong order 1.5), per scale."""
    g = gen(45)
    t0, t1 = 0.1, 0.9
    x0 = PATH.sample(torch.randn(200, 2, generator=g, dtype=F64),
                     MIXTURE.sample(200, generator=g, dtype=F64), t0).x_t
    bm = GridBrownian(x0.shape, steps=128, t0=t0, t1=t1, generator=g, dtype=F64,
                      levy_area="space-time")
    refs: dict[float, torch.Tensor] = {}

    def reference(scale: float) -> torch.Tensor:
        if scale not in refs:
            g_t = diffusion_schedule("forward", path=PATH, scale=scale)
            refs[scale] = sample_sde(U, x0, score=S, solver="srk", steps=128, t0=t0, t1=t1,
                                     bm=bm, diffusion=g_t).x
        return refs[scale]

    return x0, bm, reference


@pytest.mark.parametrize("solver,options,scale", [
    ("ancestral", {}, 1.0), ("dpmpp_2m_sde", {}, 1.0),
    pytest.param("ancestral", {"eta": 0.5}, 0.5, marks=pytest.mark.slow),
    pytest.param("dpmpp_2m_sde", {"eta": 0.25}, 0.5, marks=pytest.mark.slow)])
def test_strong_order_one_towards_the_forward_sde(solver, options, scale,
                                                  forward_sde_reference):
    """Given the same Brownian path, ancestral(eta) converges to the SDE with g = eta
    g_forward and dpmpp_2m_sde(eta) to g = sqrt(eta) g_forward (g_forward^2 = 2 sigma^2
    lambda', diffusion="forward"), with strong order 1 (the declared order): measured 0.92
    and 1.10 over 8 .. 32 steps, mean errors 0.11 and 0.07 at 32 steps (0.99 and 1.14 over
    16 .. 128 steps against 1024 cells of heun)."""
    x0, bm, reference = forward_sde_reference
    steps = [8, 16, 32]
    errs = [float((sample_sde(U, x0, solver=solver, path=PATH, steps=n, t0=0.1, t1=0.9, bm=bm,
                              options=options).x - reference(scale)).norm(dim=1).mean())
            for n in steps]
    assert 0.8 < slope([1 / n for n in steps], errs) < 1.35, errs
    assert errs[-1] < 0.15, errs


# -- the formulas against the literature ---------------------------------------------------------
def test_ancestral_step_is_ddpm_posterior_and_ddim_eta_on_a_vp_path():
    """On the linear VP path (abar = alpha^2): eta = 1 samples DDPM's posterior
    q(x_t | x_s, x1 = D): mean sqrt(abar_t) beta / (1 - abar_s) D + sqrt(a) (1 - abar_t) /
    (1 - abar_s) x_s, variance (1 - abar_t) / (1 - abar_s) beta, a = abar_s / abar_t,
    beta = 1 - a; eta = 0.5 is DDIM's eq. 12 with sigma = eta sqrt((1 - abar_t) /
    (1 - abar_s)) sqrt(1 - a)."""
    path = PATHS["linear_vp"]
    s, t = 0.3, 0.6
    (a_s, s_s), (a_t, _) = values(path, s), values(path, t)
    abar_s, abar_t = a_s**2, a_t**2
    x = torch.randn(50, 2, generator=gen(46), dtype=F64)
    d = fs.analytic.posterior_mean(MIXTURE, path)(x, torch.tensor(s, dtype=F64))
    eps = (x - a_s * d) / s_s
    z = torch.randn(1, 50, 2, generator=gen(47), dtype=F64)[0]  # the sampler's one draw
    u = fs.analytic.marginal_velocity(MIXTURE, path)
    a, beta = abar_s / abar_t, 1 - abar_s / abar_t
    ddpm = (abar_t**0.5 * beta / (1 - abar_s) * d + a**0.5 * (1 - abar_t) / (1 - abar_s) * x
            + ((1 - abar_t) / (1 - abar_s) * beta) ** 0.5 * z)
    got = sample_sde(u, x, solver="ancestral", path=path, grid=[s, t], t0=s, t1=t,
                     generator=gen(47)).x
    torch.testing.assert_close(got, ddpm, rtol=1e-12, atol=1e-12)
    sig = 0.5 * ((1 - abar_t) / (1 - abar_s)) ** 0.5 * (1 - a) ** 0.5
    ddim = abar_t**0.5 * d + (1 - abar_t - sig**2) ** 0.5 * eps + sig * z
    got = sample_sde(u, x, solver="ancestral", path=path, grid=[s, t], t0=s, t1=t,
                     generator=gen(47), options={"eta": 0.5}).x
    torch.testing.assert_close(got, ddim, rtol=1e-12, atol=1e-12)


def test_dpmpp_2m_sde_steps_follow_the_midpoint_formula():
    """Two steps on [0.2, 0.8] from the exact posterior means and the sampler's own draws:
    x_t = (sigma_t / sigma_s) e^{-h} x_s + alpha_t (1 - e^{-2h}) (D_s + D1 / 2)
    + sigma_t sqrt(1 - e^{-2h}) z, D1 = (D_s - D_prev) / r, r = h_prev / h (first step
    D1 = 0), as k-diffusion's sample_dpmpp_2m_sde(solver_type="midpoint", eta=1)."""
    ts = [0.2, 0.45, 0.8]
    x0 = torch.randn(40, 2, generator=gen(48), dtype=F64)
    z = torch.randn(2, 40, 2, generator=gen(49), dtype=F64)
    post = fs.analytic.posterior_mean(MIXTURE, PATH)
    nodes = [values(PATH, t) for t in ts]
    lam = [math.log(a / s) for a, s in nodes]
    x, d_prev = x0, None
    for i in range(2):
        (_, s_s), (a_t, s_t) = nodes[i], nodes[i + 1]
        h = lam[i + 1] - lam[i]
        d = post(x, torch.tensor(ts[i], dtype=F64))
        d1 = 0 * d if d_prev is None else (d - d_prev) / ((lam[i] - lam[i - 1]) / h)
        x = (s_t / s_s * math.exp(-h) * x + a_t * (1 - math.exp(-2 * h)) * (d + d1 / 2)
             + s_t * math.sqrt(1 - math.exp(-2 * h)) * z[i])
        d_prev = d
    got = sample_sde(U, x0, solver="dpmpp_2m_sde", path=PATH, grid=ts, t0=0.2, t1=0.8,
                     generator=gen(49)).x
    torch.testing.assert_close(got, x, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("solver,ode", [("ancestral", "ddim"), ("dpmpp_2m_sde", "dpmpp_2m")])
def test_eta_zero_is_the_deterministic_sampler(solver, ode):
    x0 = torch.randn(30, 2, generator=gen(50), dtype=F64)
    for grid in ("uniform", "logsnr"):
        got = sample_sde(U, x0, solver=solver, path=PATH, steps=9, grid=grid, generator=gen(0),
                         options={"eta": 0.0}).x
        want = fs.sample(U, x0, ode, steps=9, grid=grid, path=PATH).x
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_edm_churn_levels_and_clamp():
    """The model is called at t_hat with sigma/alpha = (1 + gamma) r_i where r_i lies in
    [s_tmin, s_tmax] (gamma = min(s_churn / N, sqrt 2 - 1)), at t_i elsewhere and at every
    t_{i+1} but the last (Euler to sigma = 0); on linear VP a churned level beyond the
    path's largest, r(0), is clamped to t_hat = 0."""
    calls = []

    def recording(model):
        def f(x, t):
            calls.append(float(t))
            return model(x, t)
        return f

    x0 = torch.randn(8, 2, generator=gen(51), dtype=F64)
    n, opts = 6, {"s_churn": 1.2, "s_tmin": 0.1, "s_tmax": 5.0}
    res = sample_sde(recording(U), x0, solver="edm_stochastic", path=PATH, steps=n,
                     grid="edm", generator=gen(52), options=opts)
    grid = res.grid.tolist()
    r = [math.inf if t == 0 else (1 - t) / t for t in grid]  # CondOT: sigma/alpha
    gamma = 1.2 / n
    hats = []
    for i in range(n):
        churn = opts["s_tmin"] <= r[i] <= opts["s_tmax"]
        hats.append(1 / (1 + (1 + gamma) * r[i]) if churn else grid[i])  # CondOT inverse
    # steps 0 (from alpha = 0) and n - 1 (to sigma = 0) have an infinite end: one call
    want = [v for i in range(n) for v in ([hats[i], grid[i + 1]] if 0 < i < n - 1 else
                                          [hats[i]])]
    assert res.nfe == len(calls) == 2 * n - 2
    torch.testing.assert_close(torch.tensor(calls, dtype=F64), torch.tensor(want, dtype=F64),
                               rtol=1e-12, atol=1e-14)
    assert sum(h != g for h, g in zip(hats, grid, strict=False)) >= 2  # churn happened
    # clamp: linear VP, r(0) = 156.3; s_churn large makes r_hat = 1.414 r_0 > r(0) at step 0
    vp = PATHS["linear_vp"]
    calls.clear()
    sample_sde(recording(fs.analytic.marginal_velocity(MIXTURE, vp)), x0,
               solver="edm_stochastic", path=vp, steps=4, grid=[0.001, 0.2, 0.5, 0.8, 1.0],
               t0=0.001, generator=gen(53), options={"s_churn": 100.0, "s_tmax": math.inf})
    assert calls[0] == 0.0
    # no churn (s_tmax below every level) is EDM's deterministic Heun, s_churn = 0
    kw = dict(solver="edm_stochastic", path=PATH, steps=n, grid="edm", generator=gen(52))
    a = sample_sde(U, x0, options={"s_churn": 40.0, "s_tmax": 0.0, "s_tmin": 0.0}, **kw).x
    b = sample_sde(U, x0, options={"s_churn": 0.0}, **kw).x
    assert torch.equal(a, b)


# -- (d) noise, grids, refusals, NFE -------------------------------------------------------------
@pytest.mark.parametrize("solver,options", CASES, ids=IDS)
def test_same_generator_same_samples_and_the_generator_is_a_brownian_path(solver, options):
    x0 = torch.randn(16, 2, generator=gen(54), dtype=F64)
    kw = dict(solver=solver, path=PATH, steps=10, grid="logsnr", options=options)
    a = sample_sde(U, x0, generator=gen(55), **kw).x
    b = sample_sde(U, x0, generator=gen(55), **kw).x
    c = sample_sde(U, x0, generator=gen(56), **kw).x
    assert torch.equal(a, b) and not torch.allclose(a, c)
    # the generator's draws are those of a GridBrownian on the solve's grid from it
    ts = time_grid("logsnr", 10, path=PATH)
    bm = GridBrownian(x0.shape, grid=ts, generator=gen(55), dtype=F64)
    torch.testing.assert_close(sample_sde(U, x0, bm=bm, **kw).x, a, rtol=1e-11, atol=1e-11)


def test_samplers_on_one_brownian_path_see_the_same_increments():
    """For a point at 0 (D = 0), dpmpp_2m_sde is ancestral(eta = 1) (D1 = 0): given one bm
    (or one generator) they agree; on a sub-grid a step reads the aggregated increment
    (one step from x0 = 0: x = c (W(t1) - W(t0)) / sqrt(t1 - t0), c = sigma_t1
    sqrt(1 - e^{-2h}))."""
    zero = point_model(torch.zeros(2, dtype=F64))
    x0 = torch.randn(16, 2, generator=gen(57), dtype=F64)
    fine = sorted({*time_grid("logsnr", 12, path=PATH), *time_grid("uniform", 12)})
    bm = GridBrownian(x0.shape, grid=fine, generator=gen(58), dtype=F64)
    for grid in ("logsnr", "uniform"):
        kw = dict(path=PATH, steps=12, grid=grid, prediction="x1", bm=bm)
        a = sample_sde(zero, x0, solver="ancestral", **kw).x
        b = sample_sde(zero, x0, solver="dpmpp_2m_sde", **kw).x
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    t0, t1 = fine[3], fine[9]
    one = sample_sde(zero, torch.zeros_like(x0), solver="ancestral", path=PATH, grid=[t0, t1],
                     t0=t0, t1=t1, prediction="x1", bm=bm).x
    (a0, s0), (a1, s1) = values(PATH, t0), values(PATH, t1)
    c = s1 * math.sqrt(1 - (a0 * s1 / (s0 * a1)) ** 2)
    torch.testing.assert_close(one, c * bm(t0, t1) / math.sqrt(t1 - t0), rtol=1e-12,
                               atol=1e-13)
    with pytest.raises(ValueError, match="does not lie on its grid"):
        sample_sde(zero, x0, solver="ancestral", path=PATH, steps=5, prediction="x1", bm=bm)


def test_grid_reaches_torchsde_solvers():
    times = []

    def recording(x, t):
        times.append(float(t))
        return U(x, t)

    x0 = torch.randn(8, 2, generator=gen(59), dtype=F64)
    res = sample_sde(recording, x0, score=S, solver="euler", path=PATH, steps=6, grid="logsnr",
                     t1=0.99, generator=gen(60))
    ts = time_grid("logsnr", 6, t1=0.99, path=PATH)
    assert res.grid.dtype == F64 and res.grid.tolist() == ts
    torch.testing.assert_close(torch.tensor(times, dtype=F64), torch.tensor(ts[:-1], dtype=F64),
                               rtol=0,
                               atol=0)
    # a non-uniform sub-grid of a GridBrownian reads its aggregated increments:
    # u = s = 0, g = 1 gives x(t1) = x0 + W(t1) - W(t0)
    fine = [0.0, 0.01, 0.1, 0.2, 0.5, 0.6, 0.9, 1.0]
    bm = GridBrownian(x0.shape, grid=fine, generator=gen(61), dtype=F64)
    still = sample_sde(lambda x, t: 0 * x, x0, score=lambda x, t: 0 * x, solver="heun",
                       grid=[0.01, 0.2, 0.6, 0.9], t0=0.01, t1=0.9, bm=bm)
    torch.testing.assert_close(still.x, x0 + bm(0.01, 0.9), rtol=1e-13, atol=1e-13)
    assert still.steps == 3 and still.nfe_drift == 6
    # the default uniform grid draws exactly what it always drew
    default = sample_sde(U, x0, score=S, steps=10, generator=gen(62))
    old = sample_sde(U, x0, score=S, steps=10, bm=GridBrownian(
        x0.shape, steps=10, generator=gen(62), dtype=F64))
    assert torch.equal(default.x, old.x)
    assert default.grid.tolist() == torch.linspace(0, 1, 11, dtype=F64).tolist()
    # a float32 state steps on the grid rounded to float32 (here a cell of 1e-6, below a
    # hundred float32 ulps); times it merges are refused
    x32 = x0.float()
    res = sample_sde(U, x32, score=S, solver="euler", grid=[0.0, 0.5, 0.999, 0.999001, 0.9995],
                     t1=0.9995, generator=gen(63))
    assert res.x.dtype == torch.float32 and torch.isfinite(res.x).all()
    with pytest.raises(ValueError, match=r"one time in torch.float32.*float64 state"):
        sample_sde(U, x32, score=S, grid=[0.0, 0.5, 0.5 + 1e-9, 0.9], t1=0.9)


def test_torchsde_solvers_take_a_prediction():
    """An x1 model through prediction= gives the velocity model's solve."""
    x0 = torch.randn(16, 2, generator=gen(63), dtype=F64)
    kw = dict(path=PATH, diffusion="sigma_scaled", steps=20, t1=0.9, solver="heun")
    a = sample_sde(fs.analytic.posterior_mean(MIXTURE, PATH), x0, prediction="x1",
                   generator=gen(64), **kw).x
    torch.testing.assert_close(a, sample_sde(U, x0, generator=gen(64), **kw).x, rtol=1e-10,
                               atol=1e-10)


@pytest.mark.parametrize("path_name", sorted(PATHS))
@pytest.mark.parametrize("grid", ["uniform", "logsnr", "edm"])
def test_infinite_ends_are_never_nan(path_name, grid):
    path = PATHS[path_name]
    u = fs.analytic.marginal_velocity(MIXTURE, path)
    x0 = torch.randn(32, 2, generator=gen(65), dtype=F64) * values(path, 0.0)[1]
    for solver, options in CASES:
        for prediction, model in (("velocity", u),
                                  ("x1", fs.analytic.posterior_mean(MIXTURE, path))):
            res = sample_sde(model, x0, solver=solver, path=path, steps=5, grid=grid,
                             generator=gen(66), options=options, prediction=prediction)
            assert torch.isfinite(res.x).all(), (solver, prediction)


@pytest.mark.parametrize("solver,nfe", [("ancestral", 10), ("dpmpp_2m_sde", 10),
                                        ("edm_stochastic", 18)])
def test_nfe_counted(solver, nfe):
    """One model call a step; EDM two, but one on the step from alpha = 0 and on the last
    step to sigma = 0."""
    calls = []

    def counting(x, t):
        calls.append(t)
        return U(x, t)

    res = sample_sde(counting, torch.randn(4, 2, generator=gen(67), dtype=F64), solver=solver,
                     path=PATH, steps=10, generator=gen(68), times=[0.0, 0.5, 1.0])
    assert res.nfe == res.nfe_drift == len(calls) == nfe and res.nfe_diffusion == 0
    assert res.steps == 10 and res.solver == solver
    assert res.trajectory.shape == (3, 4, 2) and torch.equal(res.trajectory[-1], res.x)
    assert res.times.tolist() == [0.0, 0.5, 1.0]


def test_bad_arguments_are_refused_by_name():
    x0 = torch.randn(4, 2, generator=gen(69), dtype=F64)
    bad = [
        (dict(solver="ancestral", path=PATH, diffusion=1.0),
         r"solver 'ancestral' sets its own noise.*eta=1.0.*diffusion= applies to the torchsde "
         r"solvers \(euler"),
        (dict(solver="dpmpp_2m_sde", path=PATH, score=S), r"takes one model.*got score="),
        (dict(solver="edm_stochastic"), r"steps in the path's log-SNR: pass path="),
        (dict(solver="ancestral", path=PATH, options={"eta": 1.5}),
         r"'ancestral': option eta must be a number in \[0, 1\]; got 1.5"),
        (dict(solver="ancestral", path=PATH, options={"etta": 0.5}),
         r"'ancestral' takes the options eta; got unknown 'etta'"),
        (dict(solver="edm_stochastic", path=PATH, options={"s_tmin": 2.0, "s_tmax": 1.0}),
         r"need s_tmin <= s_tmax"),
        (dict(solver="edm_stochastic", path=PATH, options={"s_noise": 0.0}),
         r"s_noise must be a finite number > 0; got 0.0"),
        (dict(solver="edm_stochastic", path=PATH, options={"s_churn": -1}),
         r"s_churn must be a finite number >= 0; got -1"),
        (dict(solver="euler", score=S, options={"eta": 1.0}),
         r"solver 'euler' takes no options.*ancestral"),
        (dict(solver="euler", score=S, grid="logsnr"), r"grid 'logsnr'.*pass path="),
        (dict(solver="euler", prediction="x1"), r"'x1' model is converted.*pass path="),
        (dict(solver="ancestral", path=PATH, bm=GridBrownian((3, 2), steps=100)),
         r"bm must be a torchsde Brownian object of shape \(B, D\) = \(4, 2\)"),
    ]
    for kw, message in bad:
        with pytest.raises(ValueError, match=message):
            sample_sde(U, x0, **kw)
    with pytest.raises(TypeError, match="option eta must be a number"):
        sample_sde(U, x0, solver="ancestral", path=PATH, options={"eta": "high"})
    with pytest.raises(TypeError, match="options must be a dict"):
        sample_sde(U, x0, solver="ancestral", path=PATH, options=[0.5])
    with pytest.raises(ValueError, match="needs the model as field="):
        sample_sde(None, x0, solver="ancestral", path=PATH)
    with pytest.raises(ValueError, match="gives no data prediction.*t=0.0"):
        sample_sde(U, x0, solver="ancestral", path=PATH, prediction="epsilon")
    with pytest.raises(ValueError, match="langevin runs torchsde's solvers"):
        langevin(S, x0, dt=0.1, steps=3, solver="ancestral")
    assert repr(make_sampler("edm_stochastic", {"s_noise": 1.003})) == (
        "EDMStochastic(s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)")
