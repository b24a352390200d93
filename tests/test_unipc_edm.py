"""UniPC (flowsolve.ode.unipc) and EDM's Heun sampler (flowsolve.ode.edm), in float64: the phi
functions and the UniPC weights against their integral definitions, each step's exactness
on data predictions polynomial in lambda, agreement with an independent transcription of
the reference UniPC loop and of EDM's Algorithm 1, exact on a point mass, global orders
against the closed-form flow of Gaussian data and against a tight reference on a mixture
(with and without the corrector), infinite log-SNR ends, NFE counted independently, the
five model parameterisations and refused arguments."""

import math

import pytest
import torch
from _cases import F64, Counter, gen, noise, slope
from scipy.integrate import quad

import flowsolve as fs
from flowsolve.ode.backends import ODE_SOLVERS
from flowsolve.ode.edm import SAMPLERS as EDM_SAMPLERS
from flowsolve.ode.semilinear import SamplerLoop, nodes
from flowsolve.ode.solve import sample
from flowsolve.ode.unipc import SAMPLERS as UNIPC_SAMPLERS
from flowsolve.ode.unipc import UniPC, phi, unipc_plan, unipc_weights

SCHEDULERS = [fs.CondOTScheduler(), fs.CosineScheduler(), fs.LinearVPScheduler()]
UNIPC = [s.name for s in UNIPC_SAMPLERS]
NAMES = [*UNIPC, "edm_heun"]
ORDER = {s.name: s.order for s in (*UNIPC_SAMPLERS, *EDM_SAMPLERS)}
PREDICTIONS = ["velocity", "score", "epsilon", "x1", "v"]
T0, T1 = 0.05, 0.95  # finite lambda at both ends on the three schedulers
M, C = torch.tensor([1.0, -2.0], dtype=F64), 1.0  # Gaussian data N(M, C^2 I)
MIX = fs.GaussianMixture(torch.tensor([[-1.0, 0.5], [1.0, -0.5]], dtype=F64),
                         torch.tensor([[0.5, 0.8], [0.7, 0.4]], dtype=F64),
                         torch.tensor([0.6, 0.4], dtype=F64))


def test_the_modules_register_every_sampler_with_its_facts():
    assert UNIPC == ["unipc1_bh1", "unipc2_bh1", "unipc3_bh1",
                     "unipc1_bh2", "unipc2_bh2", "unipc3_bh2"]
    for name in NAMES:
        info = ODE_SOLVERS[name]
        assert info.needs_path and not info.adaptive and not info.stochastic
        assert info.multistep == name.startswith("unipc")
    assert ORDER == {"unipc1_bh1": 2, "unipc2_bh1": 3, "unipc3_bh1": 4, "unipc1_bh2": 2,
                     "unipc2_bh2": 3, "unipc3_bh2": 4, "edm_heun": 2}
    assert UniPC(3, "bh2", corrector=False).order == 3


# -- helpers -----------------------------------------------------------------------------------

def gaussian_denoiser(scheduler):
    """The closed-form posterior mean of N(M, C^2 I): ``M + alpha C^2 (x - alpha M) /
    (alpha^2 C^2 + sigma^2)`` (an x1 model)."""

    def model(x, t):
        v = scheduler(t)
        a, s = v.alpha_t, v.sigma_t
        return M + a * C * C * (x - a * M) / (a * a * C * C + s * s)

    return model


def gaussian_flow(scheduler, z, t):
    """The probability flow of N(M, C^2 I): ``x_t = alpha_t M + sqrt(alpha_t^2 C^2 +
    sigma_t^2) z``."""
    v = scheduler(torch.tensor(t, dtype=F64))
    return v.alpha_t * M + (v.alpha_t ** 2 * C * C + v.sigma_t ** 2).sqrt() * z


def logsnr_grid(scheduler, n, short_start=False, t0=T0, t1=T1):
    """``n`` steps uniform in lambda on [t0, t1]; with ``short_start`` one more, the first of
    length ``q^2`` (``q = 1/n`` of the span). UniPC-p starts with lower orders (step i uses
    min(p, i + 1) values): its first step's local error ``O(h^3)`` (UniP-1 + UniC-1) caps
    the global order of UniPC-3 at 3, and UniP-1's ``O(h^2)`` that of UniP-3 at 2, as
    h -> 0. A first step of ``q^2`` makes those errors ``O(q^6)`` and ``O(q^4)``."""
    lo, hi = (float(v) for v in scheduler.log_snr(torch.tensor([t0, t1], dtype=F64)))
    q = 1.0 / n
    frac = [0.0, q * q, *(k * q for k in range(1, n + 1))] if short_start else \
        [k * q for k in range(n + 1)]
    t = scheduler.snr_inverse((lo + (hi - lo) * torch.tensor(frac, dtype=F64)).exp()).tolist()
    t[0], t[-1] = t0, t1
    return t


def run(sampler, model, path, grid, x0, prediction="x1"):
    """The state at the grid's end (the sampler's own loop, for unregistered samplers)."""
    loop = SamplerLoop(sampler, model, path, prediction, grid, x0)
    x, _, finite = loop(x0)
    loop.check(finite)
    return x


def rms(a, b) -> float:
    return float((a - b).pow(2).sum(-1).mean().sqrt())


@pytest.fixture(scope="module")
def mixture_case():
    """``mixture_case(scheduler, t0, t1)``: an exact sample x0 of the mixture's p_t0 and its
    tight dopri8 solution at t1 (computed once per case)."""
    cache = {}

    def get(scheduler, t0=T0, t1=T1):
        key = (repr(scheduler), t0, t1)
        if key not in cache:
            path = fs.AffineGaussianPath(scheduler)
            g = gen(2)
            x0 = path.sample(noise(16, 3), MIX.sample(16, generator=g, dtype=F64), t0).x_t
            u = fs.analytic.marginal_velocity(MIX, path)
            cache[key] = x0, sample(u, x0, "dopri8", rtol=1e-12, atol=1e-12, t0=t0, t1=t1).x
        return cache[key]

    return get


# -- 1. the coefficients -----------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_phi_is_its_integral(k):
    # phi_k(z) = int_0^1 e^{(1 - u) z} u^{k-1} / (k-1)! du, across the series / recursion switch
    for z in [-30.0, -3.0, -1.0001, -0.9999, -0.1, -1e-6, 0.0, 1e-8, 0.5, 2.0]:
        exact = quad(lambda u, z=z: math.exp((1 - u) * z) * u ** (k - 1) / math.factorial(k - 1),
                     0, 1, epsabs=0, epsrel=1e-13)[0]
        assert abs(phi(k, z) - exact) <= 1e-13 * abs(exact), (z, phi(k, z), exact)
    assert phi(0, 0.3) == math.exp(0.3)


def test_the_weights_solve_the_order_conditions_with_the_reference_simplifications():
    # b_j = j! hh phi_{j+1}(hh) / B(h) with hh = -h; sum_m rho_m r_m^{j-1} = b_j (j = 1..k)
    # except rho = [1/2] for one ratio; B(h) = hh (bh1) or e^hh - 1 (bh2)
    for h in [0.05, 0.4, 2.5]:
        hh = -h
        for variant, big_b in [("bh1", hh), ("bh2", math.expm1(hh))]:
            assert unipc_weights([], h, variant) == ([], big_b)
            for rs in ([-1.0], [1.0]):
                assert unipc_weights(rs, h, variant) == ([0.5], big_b)
            for rs in ([-1.0, 1.0], [-0.7, -1.9], [-1.0, -2.0, 1.0], [-0.5, -1.6, 1.0]):
                rho, b_out = unipc_weights(rs, h, variant)
                assert b_out == big_b
                for j in range(1, len(rs) + 1):
                    integral = quad(lambda u, j=j, hh=hh: math.exp((1 - u) * hh) * u ** j,
                                    0, 1, epsabs=0, epsrel=1e-13)[0]  # j! phi_{j+1}(hh)
                    b_j = hh * integral / big_b
                    lhs = sum(q * r ** (j - 1) for q, r in zip(rho, rs, strict=True))
                    assert abs(lhs - b_j) < 1e-12 * max(1.0, abs(b_j)), (rs, j)
    # with the weights solved, B(h) cancels: B rho is the same for both variants
    rho1, b1 = unipc_weights([-1.0, -2.0, 1.0], 0.3, "bh1")
    rho2, b2 = unipc_weights([-1.0, -2.0, 1.0], 0.3, "bh2")
    for q1, q2 in zip(rho1, rho2, strict=True):
        assert abs(b1 * q1 - b2 * q2) < 1e-14


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_each_step_is_exact_for_data_predictions_polynomial_in_lambda(variant):
    # D = P(lambda) whatever x: the exact step is x_t = (sigma_t / sigma_s) x_s +
    # sigma_t int e^lambda P dlambda. A step combining k values (with solved weights) is
    # exact for deg P <= k - 1, its corrector for deg P <= k; the order-2 predictor and the
    # order-1 corrector (rho = 1/2) only to first order (exact for constants)
    scheduler = fs.CosineScheduler()
    grid = nodes(scheduler, [0.1, 0.2, 0.28, 0.45, 0.5, 0.62, 0.8])
    plan = unipc_plan(grid, 3, variant, corrector=True)
    assert [st.order for st in plan] == [1, 2, 3, 3, 3, 3]
    assert [st.wc is None for st in plan] == [False] * 5 + [True]
    for deg in range(5):
        coef = [0.3, -1.1, 0.7, 0.25, -0.4][:deg + 1]

        def poly(lam, coef=coef):
            return sum(c * lam ** n for n, c in enumerate(coef))

        for i, st in enumerate(plan):
            s, t = grid[i], grid[i + 1]
            xs = 0.8
            exact = t.sigma * (xs / s.sigma + quad(lambda lam: math.exp(lam) * poly(lam),
                                                   s.lam, t.lam, epsabs=0, epsrel=1e-13)[0])
            values = [poly(grid[j].lam) for j in st.src]
            pred = st.a * xs + sum(w * v for w, v in zip(st.w, values, strict=True))
            tol = 1e-12 * max(1.0, abs(exact))
            if deg <= (0 if st.order == 2 else st.order - 1):
                assert abs(pred - exact) < tol, ("predictor", i, deg)
            elif deg == st.order:  # one degree too many: not exact
                assert abs(pred - exact) > 1e3 * tol, ("predictor", i, deg)
            if st.wc is not None:
                corr = st.a * xs + st.wc_t * poly(t.lam) + sum(
                    w * v for w, v in zip(st.wc, values, strict=True))
                if deg <= (0 if st.order == 1 else st.order):
                    assert abs(corr - exact) < tol, ("corrector", i, deg)
                elif deg == st.order + 1:
                    assert abs(corr - exact) > 1e3 * tol, ("corrector", i, deg)


# -- 2. independent transcriptions: the reference UniPC loop and EDM's Algorithm 1 -------------
def reference_unipc(model, scheduler, times, x, order, variant):
    """UniPC's multistep loop in the data prediction, transcribed from the paper and the
    reference implementation's structure (torch solves, warm-up orders 1, 2, ..., the
    corrector at every step but the last, the model value at the predicted point kept as
    history, no extra evaluation). Finite lambda only."""
    lam = scheduler.log_snr(torch.tensor(times, dtype=F64))
    v = scheduler(torch.tensor(times, dtype=F64))
    alpha, sigma = v.alpha_t, v.sigma_t
    hist_t, hist_m = [0], [model(x, torch.tensor(times[0], dtype=F64))]
    n = len(times) - 1
    for i in range(1, n + 1):
        k = min(order, len(hist_m))
        s = hist_t[-1]
        h = lam[i] - lam[s]
        rks, d1s = [], []
        for m in range(1, k):
            j = hist_t[-(m + 1)]
            rk = (lam[j] - lam[s]) / h
            rks.append(rk)
            d1s.append((hist_m[-(m + 1)] - hist_m[-1]) / rk)
        rks = torch.tensor([*[float(r) for r in rks], 1.0], dtype=F64)
        hh = -h
        big_b = hh if variant == "bh1" else torch.expm1(hh)
        h_phi_1 = torch.expm1(hh)
        h_phi_k, fact = h_phi_1 / hh - 1, 1
        rows, b = [], []
        for j in range(1, k + 1):
            rows.append(rks ** (j - 1))
            b.append(h_phi_k * fact / big_b)
            fact *= j + 1
            h_phi_k = h_phi_k / hh - 1 / fact
        r_mat, b = torch.stack(rows), torch.stack(b)
        x_lin = sigma[i] / sigma[s] * x - alpha[i] * h_phi_1 * hist_m[-1]
        if k == 1:
            x_new = x_lin
        else:
            rho_p = torch.tensor([0.5], dtype=F64) if k == 2 else \
                torch.linalg.solve(r_mat[:-1, :-1], b[:-1])
            x_new = x_lin - alpha[i] * big_b * sum(r * d for r, d in zip(rho_p, d1s, strict=True))
        if i < n:
            m_t = model(x_new, torch.tensor(times[i], dtype=F64))
            rho_c = torch.tensor([0.5], dtype=F64) if k == 1 else torch.linalg.solve(r_mat, b)
            corr = sum((r * d for r, d in zip(rho_c[:-1], d1s, strict=True)),
                       torch.zeros_like(x))
            x_new = x_lin - alpha[i] * big_b * (corr + rho_c[-1] * (m_t - hist_m[-1]))
            hist_t, hist_m = (hist_t + [i])[-order:], (hist_m + [m_t])[-order:]
        x = x_new
    return x


@pytest.mark.parametrize("scheduler", SCHEDULERS, ids=repr)
@pytest.mark.parametrize("name", UNIPC)
def test_unipc_is_the_reference_algorithm(name, scheduler):
    path = fs.AffineGaussianPath(scheduler)
    model = fs.analytic.posterior_mean(MIX, path)
    x0 = noise(8, 4)
    p, variant = int(name[5]), name[-3:]
    for times in ([0.1, 0.2, 0.27, 0.4, 0.55, 0.6, 0.75, 0.9], [0.3, 0.7], [0.2, 0.5, 0.9]):
        ours = sample(model, x0, name, grid=times, path=path, prediction="x1", t0=times[0],
                      t1=times[-1]).x
        ref = reference_unipc(model, scheduler, times, x0, p, variant)
        assert (ours - ref).abs().max() < 1e-12, times


def karras_algorithm_1(model, scheduler, times, x):
    """EDM's Algorithm 1 in y = x / alpha and sigma_EDM = r = sigma / alpha (D = model)."""
    v = scheduler(torch.tensor(times, dtype=F64))
    alpha, r = v.alpha_t.tolist(), (v.sigma_t / v.alpha_t).tolist()
    y = x / alpha[0]

    def d(y, i):
        return (y - model(alpha[i] * y, torch.tensor(times[i], dtype=F64))) / r[i]

    for i in range(len(times) - 1):
        d_i = d(y, i)
        y_next = y + (r[i + 1] - r[i]) * d_i
        if r[i + 1] != 0:
            y_next = y + (r[i + 1] - r[i]) * (d_i + d(y_next, i + 1)) / 2
        y = y_next
    return alpha[-1] * y


@pytest.mark.parametrize("scheduler", [*SCHEDULERS, fs.VEScheduler(0.002, 80.0)], ids=repr)
def test_edm_heun_is_karras_algorithm_1(scheduler):
    path = fs.AffineGaussianPath(scheduler)
    model = fs.analytic.posterior_mean(MIX, path)
    x0 = noise(8, 5) * float(scheduler(torch.tensor(0.05, dtype=F64)).sigma_t)
    ends = [(0.05, 0.95)] + ([(0.05, 1.0)] if scheduler.log_snr(torch.tensor(1.0)) == math.inf
                             else [])  # the last step to sigma = 0: Euler
    for t0, t1 in ends:
        for grid in ("edm", "logsnr"):
            res = sample(model, x0, "edm_heun", steps=7, grid=grid, path=path,
                         prediction="x1", t0=t0, t1=t1)
            ref = karras_algorithm_1(model, scheduler, res.grid.tolist(), x0)
            assert (res.x - ref).abs().max() < 1e-12 * (1 + ref.abs().max()), (t1, grid)


# -- 3. a point mass: D(x, t) = m --------------------------------------------------------------
@pytest.mark.parametrize("scheduler", SCHEDULERS, ids=repr)
@pytest.mark.parametrize("name", NAMES)
def test_a_point_mass_is_reached_exactly(name, scheduler):
    # the flow of a point mass is x_t = alpha_t m + sigma_t z; DDIM is exact on it and every
    # correction (differences of D, Heun's eps' - eps) vanishes
    path = fs.AffineGaussianPath(scheduler)
    m = torch.tensor([0.7, -1.3], dtype=F64)
    z = noise(8, 6)

    def model(x, t):
        return m.expand_as(x)

    for t0, t1 in [(0.0, 1.0), (T0, T1)]:
        v = scheduler(torch.tensor([t0, t1], dtype=F64))
        x0 = v.alpha_t[0] * m + v.sigma_t[0] * z
        for steps, grid in [(1, "uniform"), (2, "logsnr"), (5, "edm"), (16, "logsnr")]:
            res = sample(model, x0, name, steps=steps, grid=grid, path=path, prediction="x1",
                         t0=t0, t1=t1)
            exact = v.alpha_t[1] * m + v.sigma_t[1] * z
            assert (res.x - exact).abs().max() < 1e-13, (t0, steps, grid)


# -- 4. orders: Gaussian data (closed-form flow) and a mixture (tight reference) ---------------
STEPS = {1: (16, 32, 64), 2: (16, 32, 64), 3: (64, 96, 128)}


def fitted_order(sampler, model, path, x0, exact, p):
    """The fitted order of the error at T1 against the lambda-step, on log-SNR grids (with a
    short first step for p = 3: see :func:`logsnr_grid`)."""
    errs = [rms(run(sampler, model, path, logsnr_grid(path.scheduler, n, p == 3), x0), exact)
            for n in STEPS[p]]
    return slope([1 / n for n in STEPS[p]], errs), errs


def registered(name):
    return next(s for s in (*UNIPC_SAMPLERS, *EDM_SAMPLERS) if s.name == name)


def p_of(name):
    return 2 if name == "edm_heun" else int(name[5])


@pytest.mark.parametrize("scheduler", SCHEDULERS, ids=repr)
@pytest.mark.parametrize("name", NAMES)
def test_order_on_the_closed_form_flow_of_gaussian_data(name, scheduler):
    path = fs.AffineGaussianPath(scheduler)
    z = noise(16, 3)
    x0, exact = gaussian_flow(scheduler, z, T0), gaussian_flow(scheduler, z, T1)
    model = gaussian_denoiser(scheduler)
    assert torch.allclose(model(x0, torch.tensor(T0, dtype=F64)),
                          fs.analytic.posterior_mean(fs.Gaussian(M, torch.full((2,), C * C)),
                                                     path)(x0, T0), rtol=0, atol=1e-13)
    order, errs = fitted_order(registered(name), model, path, x0, exact, p_of(name))
    assert abs(order - ORDER[name]) < 0.3, (order, errs)


@pytest.mark.parametrize("scheduler", SCHEDULERS, ids=repr)
@pytest.mark.parametrize("name", NAMES)
def test_order_on_a_mixture_against_a_tight_reference(name, scheduler, mixture_case):
    path = fs.AffineGaussianPath(scheduler)
    x0, ref = mixture_case(scheduler)
    model = fs.analytic.posterior_mean(MIX, path)
    order, errs = fitted_order(registered(name), model, path, x0, ref, p_of(name))
    assert abs(order - ORDER[name]) < 0.3, (order, errs)


@pytest.mark.parametrize("scheduler", SCHEDULERS, ids=repr)
@pytest.mark.parametrize("p, variant", [(1, "bh1"), (2, "bh1"), (2, "bh2"), (3, "bh1")])
def test_without_the_corrector_the_order_is_p(p, variant, scheduler, mixture_case):
    # UniP-p alone: one order less than with UniC (the test above), at the same NFE = steps;
    # (3, "bh2") differs from (3, "bh1") only in its warm-up steps
    path = fs.AffineGaussianPath(scheduler)
    x0, ref = mixture_case(scheduler)
    model = fs.analytic.posterior_mean(MIX, path)
    order, errs = fitted_order(UniPC(p, variant, corrector=False), model, path, x0, ref, p)
    assert abs(order - p) < 0.3, (order, errs)
    grid = logsnr_grid(scheduler, STEPS[p][-1], p == 3)
    assert rms(run(UniPC(p, variant), model, path, grid, x0), ref) < errs[-1] / 5


# -- 5. NFE, infinite ends, parameterisations --------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_nfe_is_the_calls_counted_independently(name):
    scheduler = fs.CosineScheduler()
    path = fs.AffineGaussianPath(scheduler)
    u = fs.analytic.marginal_velocity(MIX, path)
    x0 = noise(8, 7)
    for t0, t1 in [(0.0, 1.0), (T0, T1)]:
        for steps in (1, 2, 3, 6):
            counter = Counter(u)
            res = sample(counter, x0, name, steps=steps, grid="logsnr", path=path, t0=t0, t1=t1)
            assert res.nfe == counter.calls
            lam = scheduler.log_snr(res.grid.to(F64))
            heun = int((torch.isfinite(lam[1:] - lam[:-1]) & torch.isfinite(lam[1:])).sum())
            expected = steps if name.startswith("unipc") else steps + heun
            assert res.nfe == expected, (t0, steps)
            if name.startswith("unipc"):  # never at t1: the last step has no corrector
                assert t1 not in counter.times
                assert sorted(set(counter.times)) == sorted(res.grid.tolist()[:-1])


@pytest.mark.parametrize("name", NAMES)
def test_on_zero_one_the_infinite_ends_give_finite_samples_close_to_the_reference(
        name, mixture_case):
    for scheduler in SCHEDULERS:
        path = fs.AffineGaussianPath(scheduler)
        u = fs.analytic.marginal_velocity(MIX, path)
        x0, ref = mixture_case(scheduler, 0.0, 1.0)
        errs = []
        for steps in (12, 48):
            res = sample(u, x0, name, steps=steps, grid="logsnr", path=path)
            assert torch.isfinite(res.x).all()
            errs.append(rms(res.x, ref))
        assert errs[1] < min(errs[0] / 3, 0.02), (scheduler, errs)


@pytest.mark.parametrize("scheduler", SCHEDULERS[:2], ids=repr)
def test_infinite_ends_are_ddim_steps_and_their_history_is_not_used(scheduler):
    # CondOT and cosine: lambda = -inf at t = 0 and +inf at t = 1
    path = fs.AffineGaussianPath(scheduler)
    u = fs.analytic.marginal_velocity(MIX, path)
    x0 = noise(8, 8)

    def solve(name, grid, x=x0):
        return sample(u, x, name, grid=grid, path=path, t0=grid[0], t1=grid[-1]).x

    for name in NAMES:  # both steps have an infinite end
        assert torch.equal(solve(name, [0.0, 0.4, 1.0]), solve("ddim", [0.0, 0.4, 1.0]))
    grid = [0.0, 0.2, 0.35, 0.5, 0.7, 0.85]
    x1 = solve("ddim", grid[:2])
    for name in UNIPC:  # from t = 0.2 on: as a fresh start there (the value at t = 0 unused)
        assert torch.equal(solve(name, grid), solve(name, grid[1:], x1)), name
        assert torch.equal(solve(name, grid + [1.0]), solve(name, grid[1:] + [1.0], x1)), name
    # the last step, to sigma = 0, is DDIM: alpha_1 D(x_s, s) = the posterior mean at s
    post = fs.analytic.posterior_mean(MIX, path)
    res = sample(u, x0, "edm_heun", grid=[0.1, 0.3, 0.5, 1.0], path=path, t0=0.1,
                 times=[0.5, 1.0])
    assert (res.x - post(res.trajectory[0], 0.5)).abs().max() < 1e-12


@pytest.mark.parametrize("name", NAMES)
def test_every_parameterisation_gives_the_same_samples(name, mixture_case):
    for scheduler in SCHEDULERS:
        path = fs.AffineGaussianPath(scheduler)
        u = fs.analytic.marginal_velocity(MIX, path)
        x0, _ = mixture_case(scheduler)
        out = {kind: sample(fs.convert_field(u, path, "velocity", kind), x0, name, steps=6,
                            grid="logsnr", path=path, prediction=kind, t0=T0, t1=T1).x
               for kind in PREDICTIONS}
        for kind in PREDICTIONS[1:]:
            assert (out[kind] - out["velocity"]).abs().max() < 1e-10, (scheduler, kind)


def test_zero_length_and_extreme_steps_stay_finite():
    # on linear VP t = 1e-300, 1e-200, 1e-100 share one lambda (steps of length 0); on CondOT
    # the first steps are hundreds of units of lambda long
    for scheduler in SCHEDULERS:
        path = fs.AffineGaussianPath(scheduler)
        u = fs.analytic.marginal_velocity(MIX, path)
        times = [1e-300, 1e-200, 1e-100, 0.3, 0.5, 0.9]
        for name in UNIPC:
            res = sample(u, noise(8, 9), name, grid=times, path=path, t0=times[0], t1=0.9)
            assert torch.isfinite(res.x).all(), (scheduler, name)


def test_bad_arguments_are_refused_by_name():
    with pytest.raises(ValueError, match=r"UniPC order p must be 1, 2 or 3; got 4"):
        UniPC(4)
    with pytest.raises(ValueError, match=r"UniPC order p must be 1, 2 or 3; got True"):
        UniPC(True)
    with pytest.raises(ValueError, match=r"UniPC variant must be one of \('bh1', 'bh2'\); "
                                         r"got 'bh3'"):
        UniPC(2, "bh3")
    with pytest.raises(ValueError, match=r"phi: k must be an int >= 0; got -1"):
        phi(-1, 0.5)
    path = fs.AffineGaussianPath(fs.CondOTScheduler())
    u = fs.analytic.marginal_velocity(MIX, path)
    with pytest.raises(ValueError, match=r"a 'epsilon' model gives no data prediction .* "
                                         r"t=0\.0"):
        sample(u, noise(4, 1), "unipc2_bh1", steps=4, path=path, prediction="epsilon")
    with pytest.raises(ValueError, match=r"pass path="):
        sample(u, noise(4, 1), "edm_heun", steps=4)
