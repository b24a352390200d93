"""The ODE front door on closed-form Gaussian-mixture fields (float64): measured orders,
tolerances, distributions, counted NFE, reversibility, probability flow, guidance, failures."""

import inspect
import math

import pytest
import torch
from _cases import Counter, gen, noise, slope, three_gaussians, w2
from torchdiffeq._impl.odeint import SOLVERS as TORCHDIFFEQ_SOLVERS
from torchdiffeq._impl.solvers import AdaptiveStepsizeODESolver

import flowsolve as fs
from flowsolve._core.errors import IntegrationError, NonFiniteStateError
from flowsolve._core.finite import FiniteRecord
from flowsolve.ode.fixed_step import TABLEAUS, Tableau
from flowsolve.ode.solve import ODE_SOLVERS, CapturedSampler, sample
from flowsolve.paths.fields import guided, probability_flow

F64 = torch.float64
DATA = three_gaussians()
OTHER = fs.GaussianMixture.ring(4, radius=3.0, std=0.4)
PATH = fs.AffineGaussianPath(fs.CondOTScheduler())
U = fs.analytic.marginal_velocity(DATA, PATH)


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm(dim=1).pow(2).mean().sqrt())



@pytest.fixture(scope="module")
def x0():
    return noise(64, 0)


@pytest.fixture(scope="module")
def reference(x0):
    """x(1) to ~1e-12: dopri8 and scipy's DOP853 at rtol = atol = 1e-12 must agree."""
    a = sample(U, x0, "dopri8", rtol=1e-12, atol=1e-12)
    b = sample(U, x0, "DOP853", rtol=1e-12, atol=1e-12)
    assert (a.x - b.x).abs().max() < 1e-10
    return a.x


# -- the registry ------------------------------------------------------------------------------
def test_registry_is_read_from_the_libraries():
    from_torchdiffeq = {n for n, i in ODE_SOLVERS.items() if i.library == "torchdiffeq"}
    assert from_torchdiffeq == set(TORCHDIFFEQ_SOLVERS) - {"scipy_solver"}
    for name in from_torchdiffeq:
        cls = TORCHDIFFEQ_SOLVERS[name]
        assert ODE_SOLVERS[name].adaptive == issubclass(cls, AdaptiveStepsizeODESolver)
        if "adams" not in name:  # Runge-Kutta: the declared order is the library's
            assert ODE_SOLVERS[name].order == cls.order, name
    assert {n for n, i in ODE_SOLVERS.items() if i.library == "scipy"} >= {
        "RK45", "DOP853", "Radau", "LSODA"}
    assert ODE_SOLVERS["euler"].order == 1 and ODE_SOLVERS["rk4"].order == 4
    assert ODE_SOLVERS["dopri5"].adaptive and not ODE_SOLVERS["fast_rk4"].adaptive
    assert ODE_SOLVERS["implicit_adams"].order is None


def test_registry_refuses_non_names_and_duplicates(x0):
    from flowsolve._core.registry import SolverInfo, SolverRegistry, UnknownSolverError

    with pytest.raises(ValueError, match=r"ODE solver must be a name \(str\); got \['rk4'\] "
                       r"of type list; accepted: .*dopri5.*rk4"):
        sample(U, x0, ["rk4"], steps=4)
    assert ["rk4"] not in ODE_SOLVERS and ODE_SOLVERS.get(["rk4"]) is None
    with pytest.raises(UnknownSolverError):
        ODE_SOLVERS[{"rk4"}]
    a = SolverInfo("a", "ode", False, 1.0, "x", "a")
    with pytest.raises(ValueError, match="'a' is registered twice"):
        SolverRegistry([a, SolverInfo("a", "ode", True, 2.0, "x", "b")])
    assert list(SolverRegistry([a, SolverInfo("b", "ode", True, 2.0, "x", "b")])) == ["a", "b"]


def test_unknown_solver_lists_the_valid_names(x0):
    with pytest.raises(ValueError, match="unknown ODE solver 'rk5'") as err:
        sample(U, x0, "rk5", steps=4)
    for name in ("dopri5", "rk4", "RK45", "fast_euler", "implicit_adams"):
        assert name in str(err.value)


@pytest.mark.parametrize("tab", TABLEAUS.values(), ids=TABLEAUS)
def test_tableaus_meet_their_order_conditions(tab):
    """Butcher's conditions up to the declared order: b.c^(k-1) = 1/k, and for order >= 3,
    b.(A c) = 1/6, for order 4, b.(c * A c) = 1/8, b.(A c^2) = 1/12, b.(A A c) = 1/24."""
    s = tab.stages
    a = torch.zeros(s, s, dtype=F64)
    for i, row in enumerate(tab.a):
        a[i, : len(row)] = torch.tensor(row, dtype=F64)
    b, c = torch.tensor(tab.b, dtype=F64), torch.tensor(tab.c, dtype=F64)
    for k in range(1, tab.order + 1):
        assert abs(float(b @ c ** (k - 1)) - 1 / k) < 1e-14
    if tab.order >= 3:
        assert abs(float(b @ (a @ c)) - 1 / 6) < 1e-14
    if tab.order >= 4:
        assert abs(float(b @ (c * (a @ c))) - 1 / 8) < 1e-14
        assert abs(float(b @ (a @ c**2)) - 1 / 12) < 1e-14
        assert abs(float(b @ (a @ (a @ c))) - 1 / 24) < 1e-14


def test_a_bad_tableau_refuses_to_exist():
    with pytest.raises(ValueError, match="sum"):
        Tableau("bad", 1, (0.0, 0.5), ((), (0.4,)), (0.0, 1.0))
    with pytest.raises(ValueError, match="sum"):
        Tableau("bad", 1, (0.0,), ((),), (0.9,))


# -- accuracy ----------------------------------------------------------------------------------
@pytest.mark.parametrize("solver, order, grids", [
    ("euler", 1, [16, 32, 64, 128]),
    ("midpoint", 2, [16, 32, 64]),
    ("heun2", 2, [16, 32, 64]),
    ("heun3", 3, [16, 32, 64]),
    ("rk4", 4, [8, 16, 32]),
])
def test_empirical_order_of_fixed_step_solvers(solver, order, grids, x0, reference):
    errs = [rms(sample(U, x0, solver, steps=n).x, reference) for n in grids]
    assert errs[-1] > 1e3 * 1e-12  # far above the reference's error
    measured = slope([1 / n for n in grids], errs)
    assert abs(measured - order) <= 0.3, (solver, measured, errs)


@pytest.mark.parametrize("solver", ["euler", "midpoint", "heun2", "heun3", "rk4"])
def test_fast_loop_gives_the_torchdiffeq_numbers(solver):
    x = noise(32, 1)
    for t0, t1 in ((0.0, 1.0), (1.0, 0.0)):
        times = [t0, 0.5, t1]
        lib = sample(U, x, solver, steps=16, t0=t0, t1=t1, times=times)
        fast = sample(U, x, f"fast_{solver}", steps=16, t0=t0, t1=t1, times=times)
        assert (lib.x - fast.x).abs().max() < 1e-13
        assert (lib.trajectory - fast.trajectory).abs().max() < 1e-13
        assert lib.nfe == fast.nfe == 16 * TABLEAUS[solver].stages
        assert torch.equal(fast.trajectory[-1], fast.x) and torch.equal(fast.trajectory[0], x)


ADAPTIVE_TOLS = (1e-3, 1e-4, 1e-5)


@pytest.mark.parametrize("solver", ODE_SOLVERS.names(adaptive=True))
def test_adaptive_solvers_meet_their_tolerance_and_work_harder_for_less(solver, x0,
                                                                        reference):
    """Tolerances bound the local error per step; the global error at t = 1 stays within a
    fixed factor of them (100; fehlberg2's estimator measures its embedded first-order
    solution with a 1/512 weight, so its global error runs ~600 tol), and NFE grows."""
    factor = 1000 if solver == "fehlberg2" else 100
    nfes = []
    for tol in ADAPTIVE_TOLS:
        res = sample(U, x0, solver, rtol=tol, atol=tol)
        err = float((res.x - reference).abs().max())
        assert err <= factor * tol, (solver, tol, err)
        assert res.steps > 0 and res.nfe > res.steps
        nfes.append(res.nfe)
    assert nfes == sorted(nfes) and nfes[0] < nfes[-1], nfes


# -- distributions -----------------------------------------------------------------------------
N_W2 = 1000


@pytest.fixture(scope="module")
def w2_floor():
    """W2 between two fresh mixture samples of the same size (the Monte-Carlo floor)."""
    g = gen(10)
    return sum(w2(DATA.sample(N_W2, generator=g, dtype=F64),
                  DATA.sample(N_W2, generator=g, dtype=F64)) for _ in range(3)) / 3


@pytest.mark.parametrize("scheduler", [fs.CondOTScheduler(), fs.CosineScheduler(),
                                       fs.LinearVPScheduler()], ids=repr)
def test_sampling_the_analytic_field_reproduces_the_mixture(scheduler, w2_floor):
    path = fs.AffineGaussianPath(scheduler)
    u = fs.analytic.marginal_velocity(DATA, path)
    g = gen(11)
    # an exact sample of p_0 (alpha_0 > 0 for linear VP: not exactly N(0, I))
    x0 = path.sample(noise(N_W2, 12), DATA.sample(N_W2, generator=g, dtype=F64), 0.0).x_t
    res = sample(u, x0, "dopri5", rtol=1e-5, atol=1e-5)
    dist = w2(res.x, DATA.sample(N_W2, generator=g, dtype=F64))
    assert dist < 1.4 * w2_floor, (dist, w2_floor)
    assert torch.allclose(res.x.mean(0), DATA.mean, atol=0.2)


# -- counting ----------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Functional iteration did not converge")
@pytest.mark.parametrize("solver", list(ODE_SOLVERS))
def test_reported_nfe_equals_the_calls_counted_independently(solver):
    info = ODE_SOLVERS[solver]
    counter = Counter(U)
    kwargs = {"rtol": 1e-4, "atol": 1e-4} if info.adaptive else {"steps": 8}
    if info.needs_path:  # the low-NFE samplers
        kwargs["path"] = PATH
    res = sample(counter, noise(16, 2), solver, **kwargs)
    assert res.nfe == counter.calls > 0
    if info.needs_path:
        assert res.steps == 8
    elif info.library == "flowsolve" or solver in TABLEAUS:  # explicit RK on linspace: N * s
        assert res.nfe == 8 * TABLEAUS[info.method].stages and res.steps == 8


# -- direction, trajectories, probability flow -------------------------------------------------
@pytest.mark.parametrize("solver, kwargs, tol", [
    ("dopri5", {"rtol": 1e-10, "atol": 1e-10}, 1e-7),
    ("DOP853", {"rtol": 1e-10, "atol": 1e-10}, 1e-7),
    ("fast_rk4", {"steps": 128}, 1e-6),
])
def test_backwards_integration_returns_to_x0(solver, kwargs, tol, x0):
    x1 = sample(U, x0, solver, **kwargs).x
    back = sample(U, x1, solver, t0=1.0, t1=0.0, **kwargs)
    assert (back.x - x0).abs().max() < tol


def test_trajectory_at_requested_times_matches_shorter_solves(x0):
    fixed = sample(U, x0, "rk4", steps=16, times=[0.25, 0.5, 1.0])
    half = sample(U, x0, "rk4", steps=8, t1=0.5)
    assert fixed.trajectory.shape == (3, *x0.shape)
    assert torch.allclose(fixed.trajectory[1], half.x, atol=1e-12, rtol=0)
    assert torch.equal(fixed.trajectory[-1], fixed.x)
    tight = {"rtol": 1e-10, "atol": 1e-10}
    for solver in ("dopri5", "RK45"):
        dense = sample(U, x0, solver, times=[0.3, 0.7], **tight)
        direct = sample(U, x0, solver, t1=0.3, **tight)
        assert (dense.trajectory[0] - direct.x).abs().max() < 1e-7


def test_probability_flow_from_the_score_equals_the_velocity_ode():
    score = fs.analytic.marginal_score(DATA, PATH)
    t0 = 1e-3  # the score -> velocity conversion is singular at alpha_0 = 0
    x = PATH.sample(noise(64, 3), DATA.sample(64, generator=gen(4), dtype=F64), t0).x_t
    flow = probability_flow(score, PATH)
    for solver, kwargs, tol in (("dopri5", {"rtol": 1e-10, "atol": 1e-10}, 1e-8),
                                ("fast_rk4", {"steps": 32}, 1e-11)):
        a = sample(flow, x, solver, t0=t0, **kwargs)
        b = sample(U, x, solver, t0=t0, **kwargs)
        assert (a.x - b.x).abs().max() < tol
    with pytest.raises(ValueError, match="singular at t=0.0"):
        sample(flow, x, "rk4", steps=4)  # from t0 = 0: refused once, up front


# -- guidance ----------------------------------------------------------------------------------
NULL = 7


def two_mixture_model(cond_field, uncond_field):
    """A 'conditional model': the conditional field for any label but NULL."""
    calls = []

    def model(x, t, y):
        calls.append(x.shape[0])
        is_null = (y == NULL).reshape(-1, 1)
        return torch.where(is_null, uncond_field(x, t), cond_field(x, t))

    return model, calls


@pytest.mark.parametrize("kind", ["velocity", "score"])
def test_guided_sampling_w1_is_conditional_and_w0_unconditional(kind):
    make = fs.analytic.marginal_velocity if kind == "velocity" else fs.analytic.marginal_score
    cond, uncond = make(DATA, PATH), make(OTHER, PATH)
    model, calls = two_mixture_model(cond, uncond)
    labels = torch.zeros(32, dtype=torch.long)
    x = PATH.sample(noise(32, 5), DATA.sample(32, generator=gen(6), dtype=F64), 0.1).x_t

    def as_field(f):
        return f if kind == "velocity" else probability_flow(f, PATH)

    for w, expected in ((1.0, cond), (0.0, uncond)):
        got = sample(as_field(guided(model, labels, w, null_label=NULL)), x, "rk4", steps=8,
                     t0=0.1)
        want = sample(as_field(expected), x, "rk4", steps=8, t0=0.1)
        assert (got.x - want.x).abs().max() < 1e-12
        assert calls[-got.nfe:] == [32] * got.nfe  # w = 0, 1: one B-sample call per evaluation


# -- failures ----------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", ["dopri5", "RK45", "LSODA"])
def test_step_budget_raises_and_never_hangs(solver, x0):
    with pytest.raises(IntegrationError, match="max_steps=1") as err:
        sample(U, x0, solver, rtol=1e-10, atol=1e-10, max_steps=1)
    assert err.value.status == "max_steps" and err.value.solver == solver


def nan_after_half(x, t):
    return torch.where(torch.as_tensor(t) > 0.5, torch.full_like(x, math.nan), -x)


@pytest.mark.parametrize("solver", ["euler", "fast_euler", "rk4", "dopri5", "bosh3", "RK45",
                                    "Radau"])
def test_non_finite_state_raises_naming_time_and_solver(solver, x0):
    kwargs = {} if ODE_SOLVERS[solver].adaptive else {"steps": 8}
    with pytest.raises(NonFiniteStateError, match=f"solver '{solver}'") as err:
        sample(nan_after_half, x0, solver, **kwargs)
    assert isinstance(err.value, FloatingPointError) and err.value.status == "non_finite"
    assert 0.5 < err.value.t <= 1.0 and f"t={err.value.t:.10g}" in str(err.value)


@pytest.mark.parametrize("eager", [True, False], ids=["cpu-eager", "device-lazy"])
def test_finite_record_names_the_first_non_finite_key(eager):
    """Both modes of the record: read at once (CPU) or kept on the device and read once (the
    mode used on accelerators, exercised here on CPU tensors)."""
    rec = FiniteRecord(torch.device("cpu"), eager=eager)
    values = [1.0, -2.0, math.inf, math.nan, -math.inf]
    flags = [rec.add(torch.tensor([[0.0, v]]), key) for key, v in zip("abcde", values,
                                                                       strict=True)]
    assert rec.first_bad() == "c"
    assert flags == ([False, False, True, True, True] if eager else [False] * 5)
    fine = FiniteRecord(torch.device("cpu"), eager=eager)
    fine.add(torch.ones(3, 2), 0.5)
    assert fine.first_bad() is None


@pytest.mark.parametrize("kwargs, match", [
    ({"solver": "dopri5", "steps": 10}, "adaptive"),
    ({"solver": "rk4"}, "fixed-step: give steps"),
    ({"solver": "rk4", "steps": 0}, "steps must be a positive int"),
    ({"solver": "euler", "steps": 4, "rtol": 1e-3}, "rtol/atol apply to adaptive"),
    ({"solver": "euler", "steps": 4, "max_steps": 3}, "max_steps"),
    ({"solver": "dopri5", "rtol": -1.0}, "rtol must be a positive number"),
    ({"solver": "rk4", "steps": 4, "times": [0.3]}, "points of the grid"),
    ({"solver": "rk4", "steps": 4, "times": [0.5, 0.25]}, "strictly monotone"),
    ({"solver": "rk4", "steps": 4, "t0": 0.5, "t1": 0.5}, "distinct"),
    ({"solver": "rk4", "steps": 4, "t1": 1.5}, "t0 and t1"),
    ({"solver": "rk4", "steps": 4, "options": {"step_size": 0.1}}, "grid is linspace"),
    ({"solver": "rk4", "steps": 4, "cuda_graph": True}, "cuda_graph"),
    ({"solver": "fast_rk4", "steps": 4, "cuda_graph": True}, "CUDA device"),
])
def test_arguments_are_checked(kwargs, match, x0):
    with pytest.raises(ValueError, match=match):
        sample(U, x0, **kwargs)


@pytest.mark.parametrize("kwargs, error", [
    ({"solver": "rk4", "steps": 2.5}, TypeError),
    ({"solver": "dopri5", "atol": "tight"}, TypeError),
    ({"solver": "rk4", "steps": 4, "t0": torch.tensor(0.0)}, TypeError),
])
def test_argument_types_are_checked(kwargs, error, x0):
    with pytest.raises(error):
        sample(U, x0, **kwargs)
    with pytest.raises(TypeError, match="x0 must be a floating-point tensor"):
        sample(U, x0.long(), "rk4", steps=4)
    with pytest.raises(ValueError, match="x0 contains inf or NaN"):
        sample(U, torch.full_like(x0, math.inf), "rk4", steps=4)


@pytest.mark.parametrize("solver", ["rk4", "fast_rk4", "dopri5"])
def test_gradients_flow_through_the_solve(solver):
    """d x(1) / d x(0) by autograd through the solver matches a central finite difference."""
    x = noise(4, 8).requires_grad_(True)
    kwargs = {"steps": 16} if solver != "dopri5" else {"rtol": 1e-9, "atol": 1e-9}
    (grad,) = torch.autograd.grad(sample(U, x, solver, **kwargs).x.sum(), x)
    eps, e = 1e-6, torch.zeros_like(x)
    e[0, 0] = eps
    with torch.no_grad():
        fd = (sample(U, x + e, solver, **kwargs).x.sum() - sample(U, x - e, solver,
                                                                   **kwargs).x.sum()) / (2 * eps)
    assert abs(float(grad[0, 0]) - float(fd)) < 1e-5


@pytest.mark.filterwarnings("ignore:Functional iteration did not converge")
def test_implicit_adams_takes_its_corrector_tolerance(x0, reference):
    """Each tolerance reaches the corrector: loosening either one alone saves iterations
    (measured nfe 76 tight, 48 with rtol = 1, 36 with atol = 1)."""
    assert "rtol" in inspect.signature(TORCHDIFFEQ_SOLVERS["implicit_adams"]).parameters
    tight = sample(U, x0, "implicit_adams", steps=16, rtol=1e-6, atol=1e-6)
    assert tight.steps == 16 and rms(tight.x, reference) < 1e-2  # measured 2e-3
    loose_rtol = sample(U, x0, "implicit_adams", steps=16, rtol=1.0, atol=1e-6)
    loose_atol = sample(U, x0, "implicit_adams", steps=16, rtol=1e-6, atol=1.0)
    assert tight.nfe > loose_rtol.nfe and tight.nfe > loose_atol.nfe, (
        tight.nfe, loose_rtol.nfe, loose_atol.nfe)


def test_explicit_adams_converges_at_order_three_by_default(x0, reference):
    """sample() caps torchdiffeq's Adams-Bashforth at max_order=4 (3 steps, order 3): the
    error falls with the steps at slope 3. torchdiffeq's own max_order=12 is unstable here
    (its error grows from 40 to 80 steps)."""
    grids = [20, 40, 80]
    errs = [rms(sample(U, x0, "explicit_adams", steps=n).x, reference) for n in grids]
    assert errs[0] > errs[1] > errs[2], errs
    assert abs(slope([1 / n for n in grids], errs) - 3) <= 0.3, errs
    twelve = [rms(sample(U, x0, "explicit_adams", steps=n, options={"max_order": 12}).x,
                  reference) for n in grids]
    assert twelve[-1] > 10 * errs[-1], twelve  # the option still reaches torchdiffeq


@pytest.mark.parametrize("solver", ["euler", "rk4", "fast_euler", "fast_rk4", "dopri5",
                                    "bosh3", "RK45", "LSODA"])
def test_float32_state_stays_float32(solver):
    """x0, the field and the solve in float32: x, times and trajectory come back in float32
    and agree with the float64 solve (fixed-step: to float32 round-off; adaptive: to the
    tolerance 1e-5, as the steps chosen differ)."""
    adaptive = ODE_SOLVERS[solver].adaptive
    kwargs = {} if adaptive else {"steps": 16}
    x64 = noise(32, 11)
    res = sample(U, x64.float(), solver, times=[0.5, 1.0], **kwargs)
    ref = sample(U, x64, solver, times=[0.5, 1.0], **kwargs)
    assert res.x.dtype == res.times.dtype == res.trajectory.dtype == torch.float32
    tol = 1e-3 if adaptive else 1e-5
    assert (res.x.double() - ref.x).abs().max() < tol
    assert (res.trajectory.double() - ref.trajectory).abs().max() < tol


@pytest.mark.parametrize("solver", ["rk4", "fast_rk4", "dopri5", "RK45"])
def test_float32_times_at_the_endpoints_name_the_endpoints(solver):
    """``linspace(0, 0.3, 11, dtype=float32)`` ends at 0.30000001 > t1 = 0.3: within 4
    float32 ulps of an endpoint a time is that endpoint; farther out it is refused."""
    kwargs = {} if ODE_SOLVERS[solver].adaptive else {"steps": 10}
    x = noise(16, 12)
    for t0, t1 in ((0.0, 0.3), (0.3, 0.0)):
        times = torch.linspace(t0, t1, 11, dtype=torch.float32)
        assert float(times[0 if t0 else -1]) > 0.3  # the float32 rounding in question
        res = sample(U, x, solver, t0=t0, t1=t1, times=times, **kwargs)
        assert res.trajectory.shape == (11, *x.shape)
        assert res.times[0].item() == t0 and res.times[-1].item() == t1
        assert torch.equal(res.trajectory[0], x) and torch.equal(res.trajectory[-1], res.x)
    with pytest.raises(ValueError, match="inside that interval"):
        sample(U, x, solver, t1=0.3, times=[0.0, 0.3 + 1e-5], **kwargs)


@pytest.mark.parametrize("solver", ["dopri5", "bosh3", "RK45", "LSODA"])
def test_an_interior_float64_time_near_an_endpoint_is_kept(solver):
    """Only float32 rounding beyond an endpoint is snapped: the float64 time 2e-7 (and
    3e-7 as the first time) is inside [0, 1] and stays where it is. dx/dt = 1e6 gives
    x(t) = 1 + 1e6 t: 1.2 at 2e-7, not x(0) = 1."""
    x = torch.ones(2, 1, dtype=torch.float64)

    def field(x, t):
        return torch.full_like(x, 1e6)

    res = sample(field, x, solver, times=[0.0, 2e-7, 1.0])
    assert res.times.tolist() == [0.0, 2e-7, 1.0]
    assert torch.allclose(res.trajectory[:, :, 0].T,
                          torch.tensor([1.0, 1.2, 1.0 + 1e6], dtype=torch.float64)
                          .expand(2, 3), rtol=1e-6, atol=0)
    res = sample(field, x, solver, times=[3e-7, 0.5])
    assert res.times.tolist() == [3e-7, 0.5]
    assert res.trajectory[0].flatten().tolist() == pytest.approx([1.3, 1.3], rel=1e-9)


@pytest.mark.parametrize("solver", ["rk4", "fast_rk4", "dopri5", "RK45"])
def test_float32_rounding_beyond_either_end_is_snapped_only_for_float32_times(solver):
    """-1e-8 and 1.0000001 are float32 roundings of 0 and 1: snapped when the times come
    as a float32 tensor; as float64 they lie outside the interval and are refused."""
    kwargs = {} if ODE_SOLVERS[solver].adaptive else {"steps": 2}
    x = noise(8, 13)
    times = torch.tensor([-1e-8, 0.5, 1.0000001], dtype=torch.float32)
    assert times[0] < 0 and times[-1] > 1
    res = sample(U, x, solver, times=times, **kwargs)
    assert res.times.tolist() == [0.0, 0.5, 1.0]
    assert torch.equal(res.trajectory[0], x) and torch.equal(res.trajectory[-1], res.x)
    with pytest.raises(ValueError, match=r"got \[-1e-08, 0.5, 1.0\] \(outside the interval"):
        sample(U, x, solver, times=[-1e-8, 0.5, 1.0], **kwargs)
    with pytest.raises(ValueError, match="outside the interval"):
        sample(U, x, solver, times=times.double(), **kwargs)


def test_an_error_quotes_the_times_as_given(x0):
    """1e-7 lies within float32 rounding of t0 = 0, but is inside: the refused
    (non-monotone) times are quoted as given, not with 1e-7 moved to 0."""
    with pytest.raises(ValueError, match=r"got \[0.5, 1e-07\] \(not strictly monotone\)"):
        sample(U, x0, "dopri5", times=[0.5, 1e-7])
    with pytest.raises(ValueError, match=r"got \[0.5, 1e-07\] \(not strictly monotone\)"):
        sample(U, x0, "rk4", steps=4, times=torch.tensor([0.5, 1e-7], dtype=torch.float64))


@pytest.mark.parametrize("solver", ["rk4", "fast_rk4"])
def test_two_times_naming_one_grid_point_are_refused(solver, x0):
    """0.5 and 0.5000001 both round to grid point 0.5 of 4 steps: both back ends refuse them
    (rather than one recording two states and the other one)."""
    with pytest.raises(ValueError, match=r"times 0.5 and 0.5000001 both name the grid point "
                                         r"0.5 \(index 2\)"):
        sample(U, x0, solver, steps=4, times=[0.5, 0.5000001])
    res = sample(U, x0, solver, steps=4, times=[0.25, 0.5000001])
    assert res.times.shape == (2,) and res.trajectory.shape == (2, *x0.shape)


@pytest.mark.filterwarnings("ignore:Functional iteration did not converge")
@pytest.mark.parametrize("solver", list(ODE_SOLVERS))
@pytest.mark.parametrize("bad", ["shape", "dtype"])
def test_a_field_of_the_wrong_shape_or_dtype_is_refused(solver, bad):
    """A field returning (B, 1) for x (B, 2) would be broadcast by euler, and one returning
    float64 for float32 x would turn fast_euler's state float64: every solver refuses both
    at the first evaluation, naming the shapes and dtypes."""
    kwargs = {} if ODE_SOLVERS[solver].adaptive else {"steps": 4}
    if ODE_SOLVERS[solver].needs_path:
        kwargs["path"] = PATH
    if bad == "shape":
        x, field = noise(8, 13), lambda x, t: U(x, t)[:, :1]
        match = r"x is \(8, 2\) torch.float64, the field returned \(8, 1\) torch.float64"
    else:
        x, field = noise(8, 13).float(), lambda x, t: U(x, t).double()
        match = r"x is \(8, 2\) torch.float32, the field returned \(8, 2\) torch.float64"
    counter = Counter(field)
    with pytest.raises(ValueError, match="field must return a tensor of x's shape and dtype: "
                                         + match):
        sample(counter, x, solver, **kwargs)
    assert counter.calls == 1


def test_adjoint_nfe_counts_the_forward_solve_only():
    """``nfe`` is read when the forward solve returns; the adjoint's backward solve calls
    the field again, uncounted (as documented). Its gradient is the closed form:
    dx/dt = a x gives x(1) = e^a x0, d sum x(1) / da = e^a sum x0."""

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.calls = torch.nn.Parameter(torch.tensor(0.5, dtype=F64)), 0

        def forward(self, x, t):
            self.calls += 1
            return self.a * x

    field, x = Linear(), noise(8, 14)
    res = sample(field, x, "rk4", steps=10, adjoint=True)
    assert res.nfe == field.calls == 40
    res.x.sum().backward()
    assert field.calls > 40 and res.nfe == 40
    assert "evaluations are not counted" in sample.__doc__
    expected = math.exp(0.5) * x.sum().item()
    assert field.a.grad.item() == pytest.approx(expected, rel=1e-5)


def test_captured_sampler_refuses_a_cpu_state(x0):
    with pytest.raises(ValueError, match="CUDA device"):
        CapturedSampler(U, x0, "fast_euler", steps=4)
    with pytest.raises(ValueError, match="only fast_"):
        CapturedSampler(U, x0, "rk4", steps=4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_captured_sampler_equals_the_eager_loop_on_cuda():  # pragma: no cover - GPU only
    x = noise(256, 7).cuda()
    field = fs.analytic.marginal_velocity(DATA, PATH)
    sampler = CapturedSampler(field, x, "fast_rk4", steps=16)
    eager = sample(field, x, "fast_rk4", steps=16)
    for _ in range(2):
        got = sampler(x)
        assert torch.equal(got.x, eager.x) and got.nfe == eager.nfe


def test_a_torchdiffeq_style_field_is_told_the_argument_order():
    """f(t, x) where (x, t) is expected: a 0-d output, or the model's own shape error on
    its first call, now says how the field is called and how to wrap it."""
    x0 = torch.randn(8, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"returned \(\) .*field\(x, t\).*lambda x, t: f\(t, x\)"):
        sample(lambda t, x: -x, x0, "rk4", steps=4)
    net = fs.MLP(2, hidden=8, depth=1, generator=torch.Generator().manual_seed(0)).double()
    with pytest.raises(ValueError, match=r"x must be shaped \(B, 2\)") as info:
        sample(lambda t, x: net(x, t), x0, "euler", steps=2)
    assert any("lambda x, t: f(t, x)" in note for note in info.value.__notes__)
    calls = []

    def counted(x, t):  # a field that works is called without any extra wrapping cost
        calls.append(t)
        return -x

    assert torch.equal(sample(counted, x0, "euler", steps=2).x, x0 * 0.25)
    assert len(calls) == 2


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_tolerances_the_dtype_cannot_resolve_are_refused_up_front(dtype):
    """rtol = atol = 1e-300 used to end in "t must lie in [0,1]; got nan" or a step
    underflow; now the call names both tolerances, the dtype and what is accepted."""
    u = fs.analytic.marginal_velocity(DATA, fs.AffineGaussianPath(fs.CondOTScheduler()))
    x0 = noise(8, 3).to(dtype)
    eps = torch.finfo(dtype).eps
    # scipy integrates a float64 copy of the state: float64's resolution is its limit
    for solver, limit in (("dopri5", dtype), ("RK45", F64)):
        with pytest.raises(ValueError, match=rf"rtol=1e-300 and atol=1e-300 are below what "
                                             rf"{limit} can resolve"):
            sample(u, x0, solver, rtol=1e-300, atol=1e-300)
        tiny = torch.finfo(limit).eps / 20
        with pytest.raises(ValueError, match="below what"):
            sample(u, x0, solver, rtol=tiny, atol=tiny)
    # either tolerance at the dtype's resolution is accepted
    scale = max(1.0, float(x0.abs().max()))
    assert sample(u, x0, "dopri5", rtol=1e-300, atol=2 * eps * scale, max_steps=100_000).nfe > 0
    assert sample(u, x0, "dopri5", rtol=eps, atol=1e-300, max_steps=100_000).nfe > 0
