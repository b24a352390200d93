"""Solver studies on closed-form fields: fitted orders match theory, references behave,
results round-trip through CSV / JSON and plot."""

import math
import sys

import pytest
import torch
from _cases import noise as _x0

import flowsolve as fs
from flowsolve.ode.solve import ODE_SOLVERS, sample
from flowsolve.sde.solve import SDE_SOLVERS, GridBrownian, sample_sde
from flowsolve.studies.compare import RECORD_FIELDS, Study, compare_solvers, fit_order

F64 = torch.float64
PATH = fs.AffineGaussianPath(fs.CondOTScheduler())
RING = fs.GaussianMixture.ring(4, radius=2.0)
U_RING = fs.analytic.marginal_velocity(RING, PATH)
FIXED, ADAPTIVE = ("euler", "midpoint", "rk4"), ("dopri5", "bosh3")


def _rows(study: Study, solver: str) -> list[dict]:
    return [r for r in study.records if r["solver"] == solver]


@pytest.fixture(scope="module")
def ode_study() -> Study:
    data = RING.sample(256, generator=torch.Generator().manual_seed(1), dtype=F64)
    return compare_solvers(U_RING, _x0(64), solvers=[*FIXED, *ADAPTIVE], steps=[8, 16, 32, 64],
                           tolerances=[1e-3, 1e-5, 1e-7], data=data, repeats=2, warmup=1)


# -- ODE solvers on the Gaussian-mixture velocity -------------------------------------------
@pytest.mark.parametrize("solver, order", [("euler", 1.0), ("midpoint", 2.0), ("rk4", 4.0)])
def test_fitted_orders_match_theory(ode_study, solver, order):
    entry = ode_study.orders[solver]
    assert entry["declared"] == ODE_SOLVERS[solver].order == order
    assert entry["points"] == 4  # every budget is above the reference floor
    assert abs(entry["fitted"] - order) < 0.3, entry
    assert len(entry["successive"]) == 3


def test_rk4_beats_euler_at_equal_nfe(ode_study):
    euler = {r["nfe"]: r["error"] for r in _rows(ode_study, "euler")}
    rk4 = {r["nfe"]: r["error"] for r in _rows(ode_study, "rk4")}
    shared = sorted(set(euler) & set(rk4))
    assert shared == [32, 64]
    for nfe in shared:
        assert rk4[nfe] < 1e-2 * euler[nfe]


@pytest.mark.parametrize("solver", ADAPTIVE)
def test_adaptive_error_falls_with_tolerance_and_nfe_grows(ode_study, solver):
    rows = sorted(_rows(ode_study, solver), key=lambda r: -r["budget"])  # loosest first
    assert [r["budget"] for r in rows] == [1e-3, 1e-5, 1e-7]
    errors, nfes = [r["error"] for r in rows], [r["nfe"] for r in rows]
    assert all(a > 10 * b for a, b in zip(errors[:-1], errors[1:], strict=True)), errors
    assert all(a < b for a, b in zip(nfes[:-1], nfes[1:], strict=True)), nfes
    assert ode_study.orders[solver]["fitted"] is None  # no fixed step size to fit against
    assert all(r["h"] is None and r["kind"] == "adaptive" for r in rows)


def test_record_nfe_is_the_front_doors_count(ode_study):
    x0 = _x0(64)
    for r in ode_study.records:
        kw = {"rtol": r["budget"], "atol": r["budget"]} if r["kind"] == "adaptive" else {
            "steps": r["budget"]}
        sol = sample(U_RING, x0, r["solver"], **kw)
        assert (r["nfe"], r["steps"], r["rejected"]) == (sol.nfe, sol.steps, sol.rejected)


def test_records_are_complete_and_timed(ode_study):
    assert len(ode_study.records) == 3 * 4 + 2 * 3
    for r in ode_study.records:
        assert tuple(r) == RECORD_FIELDS
        assert 0 < r["time_min"] <= r["time_median"]
        assert r["w2"] > 0 and r["ll_error"] is None
        assert r["below_floor"] is False  # float64: every error is above the 3e-9 floor
    assert ode_study.meta["reference"] == "auto" and ode_study.meta["repeats"] == 2
    assert ode_study.meta["threads"] == torch.get_num_threads() == 1  # tests/conftest.py


def test_w2_reference_is_the_floor_of_the_w2_column(ode_study):
    # the reference's own W2 to the 256 data samples: what an exact solver scores
    # (triangle inequality, and W2 to the reference <= the RMS error: |w2 - floor| <= error;
    # so w2 moves off its floor by at most the error, and may move below it)
    floor = ode_study.meta["w2_reference"]
    assert floor > 0.1
    for r in ode_study.records:
        assert abs(r["w2"] - floor) <= r["error"] * (1 + 1e-9) + 1e-12, r
    rk4 = _rows(ode_study, "rk4")[-1]  # 64 steps: error ~1e-7, so W2 within ~1e-7 of it
    assert abs(rk4["w2"] - floor) < 1e-6


def test_table_lists_records_and_orders(ode_study):
    text = ode_study.table()
    assert "| solver | budget | NFE |" in text and "W2 to data" in text
    assert "loglik" not in text  # never measured: the column is left out
    fitted = f"{ode_study.orders['rk4']['fitted']:.3g}"
    assert f"| rk4 | 4 | {fitted} | 4 |" in text


# -- references -------------------------------------------------------------------------------
GAUSS_MU, GAUSS_STD = torch.tensor([1.0, -2.0], dtype=F64), torch.tensor([0.5, 2.0], dtype=F64)
U_GAUSS = fs.analytic.marginal_velocity(fs.Gaussian(GAUSS_MU, GAUSS_STD**2), PATH)


def _gauss_exact(x0):
    # CondOT flow of N(mu, diag s^2): x(t) - t mu = sqrt(t^2 s^2 + (1 - t)^2) x(0)
    return GAUSS_MU + GAUSS_STD * x0


def test_auto_reference_matches_the_closed_form():
    x0 = _x0(32)
    kw = dict(solvers=["rk4"], steps=[4, 8, 16], repeats=1, warmup=0)
    auto = compare_solvers(U_GAUSS, x0, **kw)
    exact = compare_solvers(U_GAUSS, x0, reference=_gauss_exact(x0), **kw)
    assert auto.meta["reference_solver"] == "DOP853" and auto.meta["reference_tol"] == 1e-10
    assert auto.meta["reference_nfe"] > 0 and exact.meta["reference"] == "given"
    for a, e in zip(auto.records, exact.records, strict=True):
        assert abs(a["error"] - e["error"]) < 1e-9
        by_hand = (sample(U_GAUSS, x0, "rk4", steps=e["budget"]).x - _gauss_exact(x0))
        assert e["error"] == pytest.approx(float(by_hand.norm(dim=1).square().mean().sqrt()),
                                           rel=1e-12)
    other = compare_solvers(U_GAUSS, x0, reference_solver="dopri5", reference_tol=1e-9, **kw)
    assert (other.meta["reference_solver"], other.meta["reference_tol"]) == ("dopri5", 1e-9)


def test_w2_to_data_is_at_most_the_rms_error_to_the_same_points():
    # pairing sample b with reference b is one coupling, so W2 <= RMS error
    x0 = _x0(32)
    exact = _gauss_exact(x0)
    study = compare_solvers(U_GAUSS, x0, solvers=["euler"], steps=[2, 4], reference=exact,
                            data=exact, repeats=1, warmup=0)
    for r in study.records:
        assert 0 < r["w2"] <= r["error"] * (1 + 1e-12)
    assert study.meta["w2_reference"] == pytest.approx(0.0, abs=1e-12)  # data = reference


def test_no_reference_measures_work_only():
    study = compare_solvers(U_GAUSS, _x0(8), solvers=["euler", "dopri5"], steps=[2, 4],
                            tolerances=[1e-3], reference=None, repeats=1, warmup=0)
    assert study.meta["reference"] is None
    assert all(r["error"] is None and r["mean_error"] is None for r in study.records)
    assert all(r["nfe"] > 0 for r in study.records)
    assert study.orders["euler"]["fitted"] is None
    assert "| error |" not in study.table()
    with pytest.raises(ValueError, match="no positive 'error'"):
        study.plot("unused.png")


RING8 = fs.GaussianMixture.ring(8, radius=4.0, std=0.5)
U_RING8 = fs.analytic.marginal_velocity(RING8, PATH)


def _true_error(field, x0, true, solver, budget, kind) -> float:
    kw = {"rtol": budget, "atol": budget} if kind == "adaptive" else {"steps": budget}
    x = sample(field, x0, solver, **kw).x.double()
    return float((x - true).norm(dim=1).square().mean().sqrt())


def test_float32_study_is_measured_against_a_float64_reference():
    """A float32 study's reference is solved in float64 at 1e-10 (from x0 in float64), not in
    float32 at 1e-6: that one stays near float32 round-off, so it reported rk4 at 64 steps
    as 2.3e-6 (true 5.8e-7) and DOP853 at its own tolerance 1e-6 as exactly 0."""
    x0 = _x0(64, dtype=torch.float32)
    true = sample(U_RING8, x0.double(), "rk4", steps=2048).x  # the exact flow, to ~1e-12
    study = compare_solvers(U_RING8, x0, solvers=["rk4", "DOP853"], steps=[4, 64],
                            repeats=1, warmup=0)  # DOP853: the default tolerances 1e-3 .. 1e-8
    assert len(study.records) == 2 + 6
    wrong = []  # (solver, budget, reported, true): none is 0, all within 20% of the truth
    for r in study.records:
        e = _true_error(U_RING8, x0, true, r["solver"], r["budget"], r["kind"])
        if not (r["error"] > 0 and abs(r["error"] / e - 1) < 0.2):
            wrong.append((r["solver"], r["budget"], r["error"], e))
    assert wrong == []
    meta = study.meta
    assert (meta["dtype"], meta["reference_dtype"], meta["reference_tol"]) == (
        "float32", "float64", 1e-10)
    # the floor is float32 round-off (1e3 eps), not the reference's 30 * 1e-10
    scale = 1 + float(true.norm(dim=1).square().mean().sqrt())
    assert meta["order_floor"] == pytest.approx(1e3 * torch.finfo(torch.float32).eps * scale,
                                                rel=1e-3)
    rk4 = _rows(study, "rk4")
    assert [r["below_floor"] for r in rk4] == [False, True]  # 7.5e-3 and 5.8e-7
    lines = study.table().splitlines()
    assert any(line.startswith("| rk4 | 64 |") and f"{rk4[1]['error']:.3g}*" in line
               for line in lines)
    assert not any(line.startswith("| rk4 | 4 |") and "*" in line for line in lines)
    assert any(line.startswith(f"(*) error at or below the study's floor "
                               f"({meta['order_floor']:.3g}): ") and "float32" in line
               for line in lines)


def _float32_only(x, t):
    """A field that computes in float32 whatever it is given, like a float32 network."""
    return U_GAUSS(x.float(), t.float())


def test_a_field_without_float64_gets_a_float32_reference_and_looser_budgets_only():
    x0 = _x0(8, dtype=torch.float32)
    kw = dict(solvers=["rk4", "dopri5"], steps=[4], repeats=1, warmup=0)
    with pytest.raises(ValueError, match=r"tolerance 1e-06 of solver 'dopri5' is at or below "
                                         r"the reference tolerance 1e-06.*net\.double"):
        compare_solvers(_float32_only, x0, **kw)  # the defaults reach 1e-8
    study = compare_solvers(_float32_only, x0, tolerances=[1e-3, 1e-5], **kw)
    assert (study.meta["reference_dtype"], study.meta["reference_tol"]) == ("float32", 1e-6)
    assert all(r["error"] > 0 for r in study.records)


@pytest.mark.parametrize("kw", [dict(reference_tol=1e-7), dict(reference_tol=1e-5,
                                                                 likelihood=True)])
def test_adaptive_budgets_at_or_below_the_reference_tolerance_are_refused(kw):
    with pytest.raises(ValueError, match=r"tolerance 1e-0[57] of solver 'bosh3' is at or below "
                                         r"the reference tolerance 1e-0[57]"):
        compare_solvers(U_GAUSS, _x0(4), solvers=["rk4", "bosh3"], steps=[2],
                        tolerances=[1e-3, 1e-5, 1e-7], **kw)
    # a given reference has no tolerance: any budget is judged against it
    study = compare_solvers(U_GAUSS, _x0(4), solvers=["bosh3"], tolerances=[1e-3, 1e-8],
                            reference=_gauss_exact(_x0(4)), repeats=1, warmup=0)
    assert all(r["error"] > 0 for r in study.records)


@pytest.mark.parametrize("kw, match", [
    (dict(reference=torch.zeros(3, 2, dtype=F64)), "shaped like x0"),
    (dict(reference="exact"), "reference must be 'auto'"),
    (dict(reference_solver="rk4"), "must be adaptive"),
    (dict(reference_solver="nope"), "unknown ODE solver"),
])
def test_bad_references_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        compare_solvers(U_GAUSS, _x0(4), solvers=["euler"], steps=[2], **kw)


# -- SDE solvers on one Brownian path ---------------------------------------------------------
MIX2 = fs.GaussianMixture(torch.tensor([[-1.0, 0.0], [1.0, 0.5]]),
                          torch.tensor([[0.5, 0.3], [0.4, 0.6]]))
SDE_KW = dict(score=fs.analytic.marginal_score(MIX2, PATH), path=PATH, diffusion=0.5,
              reference_steps=256)


@pytest.fixture(scope="module")
def sde_study() -> Study:
    u = fs.analytic.marginal_velocity(MIX2, PATH)
    return compare_solvers(u, _x0(128), solvers=["sde:euler"], steps=[4, 8, 16, 32],
                           sde=SDE_KW, reference=None, repeats=1, warmup=0,
                           generator=torch.Generator().manual_seed(7))


def test_euler_maruyama_strong_order_is_one_for_additive_noise(sde_study):
    entry = sde_study.orders["sde:euler"]
    assert entry["declared"] == SDE_SOLVERS["euler"].order == 1.0
    assert entry["points"] == 4 and abs(entry["fitted"] - 1.0) < 0.3, entry
    assert sde_study.meta["sde"]["reference_solver"] == "srk"
    assert sde_study.meta["sde"]["reference_steps"] == 256


def test_sde_weak_errors_fall_and_nfe_is_counted(sde_study):
    rows = _rows(sde_study, "sde:euler")
    assert rows[-1]["mean_error"] < rows[0]["mean_error"]
    assert rows[-1]["moment2_error"] < rows[0]["moment2_error"]
    # the same solve, by hand, on the same Brownian path (same seed): same NFE and error
    u = fs.analytic.marginal_velocity(MIX2, PATH)
    x0 = _x0(128)
    bm = GridBrownian(x0.shape, steps=256, generator=torch.Generator().manual_seed(7),
                      dtype=F64, levy_area="space-time")
    kw = {k: v for k, v in SDE_KW.items() if k != "reference_steps"}
    ref = sample_sde(u, x0, solver="srk", steps=256, bm=bm, **kw).x
    sol = sample_sde(u, x0, solver="euler", steps=8, bm=bm, **kw)
    assert rows[1]["nfe"] == sol.nfe == 2 * 8  # velocity and score each step
    rms = float((sol.x - ref).norm(dim=1).square().mean().sqrt())
    assert rows[1]["error"] == pytest.approx(rms, rel=1e-12)


@pytest.mark.parametrize("kw, match", [
    (dict(sde=None), "SDE solvers need sde="),
    (dict(sde={**SDE_KW, "sigma": 1.0}), "unknown sde keys"),
    (dict(sde={**SDE_KW, "reference_steps": 12}), "multiple of every SDE step budget"),
    (dict(sde={**SDE_KW, "reference_solver": "rk4"}), "unknown SDE solver"),
])
def test_bad_sde_settings_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        compare_solvers(U_RING, _x0(4), solvers=["sde:euler"], steps=[4, 8], reference=None,
                        **kw)


# -- log-likelihood ---------------------------------------------------------------------------
def test_likelihood_error_against_exact_and_reference_likelihoods():
    x0 = _x0(16)
    kw = dict(solvers=["rk4"], steps=[4, 8, 16], repeats=1, warmup=0)
    exact = compare_solvers(U_RING, x0, likelihood=RING.log_prob, **kw)
    solved = compare_solvers(U_RING, x0, likelihood=True, **kw)
    errors = [r["ll_error"] for r in exact.records]
    assert errors[0] > 4 * errors[1] > 16 * errors[2] > 0
    for a, b in zip(exact.records, solved.records, strict=True):
        assert abs(a["ll_error"] - b["ll_error"]) < 1e-8  # the reference solve is that good
        assert a["ll_nfe"] == 4 * a["budget"]
    assert exact.meta["likelihood"] == "given" and solved.meta["likelihood"] == "reference solve"


def test_likelihood_error_on_an_interval_starting_above_zero():
    """t0 = 0.3: the prior N(0, I) sits at t = 0.3 where p_0.3 is not N(0, I), so an exact
    log p_1 cannot be compared (refused); against a reference solve with the same prior the
    error still falls as h^4 (rk4) towards 0."""
    kw = dict(solvers=["rk4"], steps=[4, 8, 16], repeats=1, warmup=0, t0=0.3)
    with pytest.raises(ValueError, match=r"needs the interval to start at t = 0.*0\.3"):
        compare_solvers(U_RING, _x0(16), likelihood=RING.log_prob, **kw)
    # nor where it ends below t = 1: the solves give log p_0.5, not log p_1 (reported as a
    # flat 'error' of 2.1 nats, whatever the budget, before this was refused)
    for t0, t1, says in [(0.0, 0.5, r"\[0\.0, 0\.5\].*give log p_0\.5"),
                         (0.5, 0.0, r"\[0\.0, 0\.5\].*give log p_0\.5"),
                         (0.3, 0.8, r"\[0\.3, 0\.8\].*prior.*and give log p_0\.8")]:
        with pytest.raises(ValueError, match=r"exact log p_1: it needs the interval to start "
                                             r"at t = 0 and end at t = 1.*" + says):
            compare_solvers(U_RING, _x0(16), likelihood=RING.log_prob,
                            **{**kw, "t0": t0, "t1": t1})
    backward = compare_solvers(U_RING, _x0(16), likelihood=RING.log_prob,
                               **{**kw, "t0": 1.0, "t1": 0.0})  # [0, 1] the other way round
    assert [r["ll_error"] for r in backward.records][-1] < 1e-3
    errors = [r["ll_error"] for r in compare_solvers(U_RING, _x0(16), likelihood=True,
                                                     **kw).records]
    assert errors[0] > 8 * errors[1] > 64 * errors[2] > 0 and errors[2] < 1e-4


@pytest.mark.parametrize("kw, err, match", [
    (dict(likelihood=True, reference=None), ValueError, "likelihood needs points"),
    (dict(likelihood=lambda x: x.sum(), reference=None, data=RING.sample(4, dtype=F64)),
     ValueError, r"must return \(4,\)"),
    (dict(likelihood="exact"), TypeError, "likelihood must be"),
])
def test_bad_likelihood_settings_raise(kw, err, match):
    with pytest.raises(err, match=match):
        compare_solvers(U_RING, _x0(4), solvers=["rk4"], steps=[2], **kw)


# -- files and plots --------------------------------------------------------------------------
def test_csv_and_json_round_trip(ode_study, tmp_path):
    csv_path, json_path = tmp_path / "out" / "study.csv", tmp_path / "out" / "study.json"
    ode_study.to_csv(csv_path)
    ode_study.to_json(json_path)
    ode_study.to_json(json_path)  # replacing an existing file
    assert Study.from_csv(csv_path).records == ode_study.records
    back = Study.from_json(json_path)
    assert (back.records, back.orders, back.meta) == (ode_study.records, ode_study.orders,
                                                      ode_study.meta)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["study.csv", "study.json"]


def test_plot_writes_a_png(ode_study, tmp_path):
    pytest.importorskip("matplotlib")
    out = ode_study.plot(tmp_path / "wp.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert ode_study.plot(tmp_path / "w2.png", metric="w2").stat().st_size > 0
    with pytest.raises(ValueError, match="metric="):
        ode_study.plot(tmp_path / "x.png", metric="nfe")


def test_plot_without_matplotlib_says_how_to_install(ode_study, tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"flowsolve\[plot\]"):
        ode_study.plot(tmp_path / "wp.png")


# -- timing ---------------------------------------------------------------------------------
def test_timings_synchronise_every_accelerator_not_only_cuda(monkeypatch):
    """Each timed solve is bracketed by the device's synchronize (MPS too: its launches are
    asynchronous like CUDA's, so without it the times measure the launch only)."""
    from flowsolve.studies import compare as studies

    calls = []
    for name in ("cuda", "mps", "xpu"):
        module = getattr(torch, name)
        monkeypatch.setattr(module, "synchronize",
                            lambda *a, _name=name, **k: calls.append((_name, *a)))
    for device, expected in [("cpu", []), ("cuda", [("cuda", torch.device("cuda"))]),
                             ("cuda:1", [("cuda", torch.device("cuda:1"))]),
                             ("mps", [("mps",)]),  # torch.mps.synchronize() takes no device
                             ("xpu", [("xpu", torch.device("xpu"))])]:
        calls.clear()
        studies._sync(torch.device(device))
        assert calls == expected, device
    calls.clear()
    _, t_min, t_med = studies._timed(lambda: calls.append("run"), torch.device("mps"),
                                     repeats=2, warmup=1)
    assert calls == ["run", ("mps",), "run", ("mps",), ("mps",), "run", ("mps",)]
    assert 0 <= t_min <= t_med


# -- argument checks --------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    (dict(solvers=["rk5"]), r"unknown solver 'rk5'; accepted ODE solvers: .*rk4.*sde:euler"),
    (dict(solvers=["srk"]), "sde:srk"),
    (dict(solvers=[]), "non-empty list of distinct"),
    (dict(solvers=["rk4", "rk4"]), "non-empty list of distinct"),
    (dict(steps=[0, 4]), "positive ints"),
    (dict(steps=[4, 4]), "distinct"),
    (dict(steps=[2.5]), "positive ints"),
    (dict(steps=[]), "non-empty"),
    (dict(solvers=["dopri5"], tolerances=[1e-3, 2.0]), r"tolerances in \(0, 1\)"),
    (dict(solvers=["dopri5"], budgets={"dopri5": [8]}), "tolerances"),
    (dict(budgets={"heun3": [4]}), "not in solvers"),
    (dict(repeats=0), "repeats"),
    (dict(warmup=-1), "warmup"),
    (dict(norm="l1"), "norm="),
    (dict(data=torch.zeros(5, 3, dtype=F64)), "data must be"),
])
def test_bad_arguments_raise_value_error(kw, match):
    kw = {"solvers": ["rk4"], "steps": [2], **kw}
    with pytest.raises(ValueError, match=match):
        compare_solvers(U_RING, _x0(4), **kw)


def test_budgets_must_be_a_mapping():
    with pytest.raises(TypeError, match="mapping"):
        compare_solvers(U_RING, _x0(4), solvers=["rk4"], budgets=[4, 8])


def test_fit_order_is_the_least_squares_slope_above_the_floor():
    h = [2.0**-k for k in range(2, 7)]
    err = [5 * x**3 for x in h[:-1]] + [1e-12]  # last point is at the floor
    assert fit_order(h, err, floor=1e-10) == pytest.approx(3.0, abs=1e-12)
    assert fit_order(h, [None, 1e-3, None, None, None]) is None
    noisy = [e * (1.1 if i % 2 else 0.9) for i, e in enumerate(err[:-1])]
    assert fit_order(h[:-1], noisy) == pytest.approx(3.0, abs=0.2)
    assert not math.isnan(fit_order(h[:2], err[:2]))
