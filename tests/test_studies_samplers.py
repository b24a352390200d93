"""Solver studies with the low-NFE samplers and time grids: records per (solver, grid),
fitted orders per grid against the declared ones on the closed-form mixture, every record
the solve it names (recomputed by hand on the grid it names), ``prediction=`` read through,
the grid column through CSV (and old files without it)."""

import csv
import math

import pytest
import torch
from _cases import noise as _x0

import flowsolve as fs
from flowsolve.ode.grids import LogSNRGrid, ShiftGrid, time_grid
from flowsolve.ode.solve import ODE_SOLVERS, sample
from flowsolve.sde.solve import SDE_SOLVERS, GridBrownian, sample_sde
from flowsolve.studies.compare import RECORD_FIELDS, Study, compare_solvers
from flowsolve.studies.results import order_key

F64 = torch.float64
PATH = fs.AffineGaussianPath(fs.CondOTScheduler())
RING = fs.GaussianMixture.ring(4, radius=2.0)
U_RING = fs.analytic.marginal_velocity(RING, PATH)
D_RING = fs.analytic.posterior_mean(RING, PATH)  # the same model as an x1 prediction
T0, T1 = 0.2, 0.8  # lambda finite at both ends: no step of infinite length
STEPS = [8, 16, 32]
GRIDS = ["uniform", "logsnr", 3.0]
FIXED = ["ddim", "dpmpp_2m", "heun2"]


def _rms(x, ref) -> float:
    return float((x - ref).flatten(1).norm(dim=1).square().mean().sqrt())


@pytest.fixture(scope="module")
def x0():
    return _x0(32)


@pytest.fixture(scope="module")
def reference(x0):
    return sample(U_RING, x0, "DOP853", rtol=1e-12, atol=1e-12, t0=T0, t1=T1).x


@pytest.fixture(scope="module")
def grid_study(x0, reference) -> Study:
    return compare_solvers(U_RING, x0, solvers=[*FIXED, "dopri5"], steps=STEPS,
                           tolerances=[1e-4, 1e-6], path=PATH, grids=GRIDS, t0=T0, t1=T1,
                           reference=reference, repeats=1, warmup=0)


def test_records_per_solver_grid_and_budget(grid_study):
    got = [(r["solver"], r["grid"], r["budget"]) for r in grid_study.records]
    expected = [(s, g, n) for s in FIXED for g in ("uniform", "logsnr", "shift3")
                for n in STEPS] + [("dopri5", None, 1e-4), ("dopri5", None, 1e-6)]
    assert got == expected  # adaptive solvers ignore grids: one set of records, no grid
    assert all(tuple(r) == RECORD_FIELDS and RECORD_FIELDS[-1] == "grid"
               for r in grid_study.records)
    keys = [order_key(s, g) for s in FIXED for g in ("uniform", "logsnr", "shift3")]
    assert list(grid_study.orders) == [*keys, "dopri5"]
    assert grid_study.orders["dpmpp_2m@logsnr"]["grid"] == "logsnr"
    assert grid_study.orders["heun2"]["grid"] == "uniform"
    assert grid_study.meta["path"] == repr(PATH) and grid_study.meta["prediction"] == "velocity"
    assert list(grid_study.meta["grids"]) == ["uniform", "logsnr", "shift3"]


@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m"])
def test_sampler_order_on_the_logsnr_grid_is_the_declared_one(grid_study, solver):
    entry = grid_study.orders[f"{solver}@logsnr"]
    assert entry["declared"] == ODE_SOLVERS[solver].order
    assert entry["points"] == 3 and abs(entry["fitted"] - entry["declared"]) < 0.3, entry


def test_every_record_is_the_solve_on_the_grid_it_names(grid_study, x0, reference):
    """Each fixed-step record's NFE and error are those of a solve on the grid built by hand
    from its label; the grids give different errors (the grid did reach the solver)."""
    grids = {"uniform": "uniform", "logsnr": "logsnr", "shift3": ShiftGrid(3.0)}
    for r in grid_study.records:
        if r["kind"] != "fixed":
            continue
        times = time_grid(grids[r["grid"]], r["budget"], t0=T0, t1=T1, path=PATH)
        sol = sample(U_RING, x0, r["solver"], grid=times, path=PATH, t0=T0, t1=T1)
        assert (r["nfe"], r["steps"]) == (sol.nfe, r["budget"])
        assert r["error"] == pytest.approx(_rms(sol.x, reference), rel=1e-12, abs=0)
        assert r["h"] == pytest.approx((T1 - T0) / r["budget"], rel=1e-15)
    by = {(r["solver"], r["grid"], r["budget"]): r["error"] for r in grid_study.records}
    for s in FIXED:
        errs = [by[s, g, 16] for g in ("uniform", "logsnr", "shift3")]
        assert len({round(e, 12) for e in errs}) == 3, errs


def test_table_has_a_grid_column_and_keys_per_grid(grid_study):
    text = grid_study.table()
    assert "| solver | grid | budget |" in text and "| dpmpp_2m | logsnr | 16 | 16 |" in text
    assert "| dopri5 | - | 0.0001 |" in text
    fitted = f"{grid_study.orders['dpmpp_2m@logsnr']['fitted']:.3g}"
    assert f"| dpmpp_2m@logsnr | 2 | {fitted} | 3 |" in text


def test_grid_column_round_trips_through_csv_and_json(grid_study, tmp_path):
    grid_study.to_csv(tmp_path / "s.csv")
    grid_study.to_json(tmp_path / "s.json")
    assert Study.from_csv(tmp_path / "s.csv").records == grid_study.records
    back = Study.from_json(tmp_path / "s.json")
    assert (back.records, back.orders) == (grid_study.records, grid_study.orders)
    header = (tmp_path / "s.csv").read_text().split("\n", 1)[0]
    assert header.split(",") == list(RECORD_FIELDS) and header.endswith(",grid")


def test_a_csv_written_before_the_grid_column_still_loads(tmp_path):
    """An older study file: its columns are read as before and ``grid`` is None."""
    old = RECORD_FIELDS[:-1]
    rows = [dict.fromkeys(old, "") | {"solver": "rk4", "kind": "fixed", "library":
                                      "torchdiffeq", "budget": "8", "h": "0.125",
                                      "error": "1e-05", "below_floor": "False"}]
    with open(tmp_path / "old.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=old, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    (rec,) = Study.from_csv(tmp_path / "old.csv").records
    assert tuple(rec) == RECORD_FIELDS and rec["grid"] is None
    assert (rec["solver"], rec["budget"], rec["h"], rec["error"], rec["below_floor"]) == \
        ("rk4", 8, 0.125, 1e-5, False)


def test_given_times_and_labels(x0, reference, tmp_path):
    """Given times fix their one budget (a single record per solver, no order to fit); a
    mapping labels grids, and a label that looks like a number stays text in CSV."""
    times = [T0, 0.3, 0.45, 0.6, T1]
    study = compare_solvers(U_RING, x0, solvers=["dpmpp_2m", "rk4"], steps=STEPS, path=PATH,
                            grids={"mine": times, "7": LogSNRGrid(sigma_min=0.01)},
                            t0=T0, t1=T1, reference=reference, repeats=1, warmup=0)
    got = [(r["solver"], r["grid"], r["budget"]) for r in study.records]
    assert got == [(s, g, n) for s in ("dpmpp_2m", "rk4")
                   for g, ns in (("mine", [4]), ("7", STEPS)) for n in ns]
    assert study.orders["rk4@mine"]["fitted"] is None and study.orders["rk4@7"]["fitted"] > 3
    for r in study.records[:1] + study.records[4:5]:  # each solver's solve on the given times
        sol = sample(U_RING, x0, r["solver"], grid=times, path=PATH, t0=T0, t1=T1)
        assert r["error"] == pytest.approx(_rms(sol.x, reference), rel=1e-12, abs=0)
    study.to_csv(tmp_path / "s.csv")
    assert [r["grid"] for r in Study.from_csv(tmp_path / "s.csv").records] == \
        [r["grid"] for r in study.records]
    labelled = compare_solvers(U_RING, x0, solvers=["rk4"], steps=[4], path=PATH,
                               grids=[ShiftGrid(2.5), LogSNRGrid(sigma_min=0.01)],
                               reference=reference, t0=T0, t1=T1, repeats=1, warmup=0)
    assert [r["grid"] for r in labelled.records] == ["shift2.5", "logsnr(sigma_min=0.01)"]


def test_prediction_is_passed_to_every_solve(x0, reference):
    """The same model as an x1 prediction gives the velocity study's errors (the samplers
    read it as the posterior mean, the other solvers integrate the converted velocity, the
    reference is solved on that velocity)."""
    kw = dict(solvers=["dpmpp_2m", "rk4", "dopri5"], steps=[4, 8], tolerances=[1e-5],
              path=PATH, grids=["logsnr"], t0=T0, t1=T1, repeats=1, warmup=0)
    as_v = compare_solvers(U_RING, x0, reference=reference, **kw)
    as_x1 = compare_solvers(D_RING, x0, prediction="x1", reference=reference, **kw)
    auto = compare_solvers(D_RING, x0, prediction="x1", reference="auto", **kw)
    for a, b, c in zip(as_v.records, as_x1.records, auto.records, strict=True):
        assert (a["solver"], a["grid"], a["nfe"]) == (b["solver"], b["grid"], b["nfe"])
        assert b["error"] == pytest.approx(a["error"], rel=1e-8)
        assert c["error"] == pytest.approx(a["error"], rel=1e-6)
    assert as_x1.meta["prediction"] == "x1"
    misread = compare_solvers(D_RING, x0, reference=reference, **kw)  # x1 read as velocity
    assert misread.records[0]["error"] > 10 * as_v.records[0]["error"]


@pytest.mark.parametrize("kw, match", [
    (dict(solvers=["dpmpp_2m"]), r"samplers that step in the path's log-SNR: pass path="),
    (dict(solvers=["rk4"], grids=["logsnr"]), r"grid 'logsnr' is built from the path"),
    (dict(solvers=["rk4"], prediction="x1"), r"'x1' model is converted.*pass path="),
    (dict(solvers=["rk4"], path=PATH, prediction="noise2"), "not a parameterisation"),
    (dict(solvers=["rk4"], grids=["cosine"]), r"grids\[0\]: unknown grid 'cosine'"),
    (dict(solvers=["rk4"], grids=[0.0, 0.5, 1.0]), r"grids\[0\].*nested list"),
    (dict(solvers=["rk4"], grids=["logsnr", LogSNRGrid()], path=PATH), "'logsnr' twice"),
    (dict(solvers=["rk4"], grids=[], path=PATH), "grids must be"),
    (dict(solvers=["rk4"], grids={"a": [0.0, 0.5, 0.9]}), "must start at t0=0.0 and end"),
    (dict(solvers=["ddim"], path=PATH, t0=1.0, t1=0.0), r"noise to data \(t0 < t1\)"),
])
def test_bad_sampler_and_grid_settings_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        compare_solvers(U_RING, _x0(4), **{"steps": [2], **kw})


@pytest.mark.skipif("ancestral" not in SDE_SOLVERS.names(),
                    reason="no stochastic sampler registered")
def test_stochastic_samplers_take_the_path_and_share_the_brownian_path():
    """``sde:ancestral`` needs a path (the study's: no sde dict needed); each budget is the
    sampler on the shared Brownian path, measured against itself at the reference steps."""
    x0 = _x0(32)
    kw = dict(solvers=["sde:ancestral"], steps=[4, 8], reference=None, t0=T0, t1=T1,
              repeats=1, warmup=0)
    with pytest.raises(ValueError, match="pass path="):
        compare_solvers(U_RING, x0, **kw)
    study = compare_solvers(U_RING, x0, path=PATH, generator=torch.Generator().manual_seed(3),
                            **kw)
    assert [(r["solver"], r["grid"], r["budget"]) for r in study.records] == \
        [("sde:ancestral", "uniform", 4), ("sde:ancestral", "uniform", 8)]
    n_ref = study.meta["sde"]["reference_steps"]
    bm = GridBrownian(x0.shape, steps=n_ref, t0=T0, t1=T1,
                      generator=torch.Generator().manual_seed(3), dtype=F64,
                      levy_area="space-time")
    run = dict(solver="ancestral", path=PATH, t0=T0, t1=T1, bm=bm)
    ref = sample_sde(U_RING, x0, steps=n_ref, **run).x
    sol = sample_sde(U_RING, x0, steps=8, **run)
    assert study.records[1]["nfe"] == sol.nfe
    assert study.records[1]["error"] == pytest.approx(_rms(sol.x, ref), rel=1e-12)
    assert 0 < study.records[1]["error"] < study.records[0]["error"] and math.isfinite(
        study.orders["sde:ancestral"]["fitted"])
