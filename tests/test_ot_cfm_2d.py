"""The 2-D OT-CFM reproduction (examples/ot_cfm_2d.py), in a short version.

One task (N->8gaussians), one seed, 300 steps of batch 256, 1,000-point test sets: OT-CFM
must show the paper's effect against I-CFM trained on the same data, batches, times and
initial weights (only the coupling differs), and a second invocation must skip the
finished runs. [SF]2M on N->moons at the same budget: its velocity must be SB-CFM's, and
its SDE must reach the thin moons as well as its ODE, which it cannot without the score.
"""

import json

import pytest
import torch
from _examples import load_example

from flowsolve.metrics import wasserstein2
from flowsolve.sde.solve import sample_sde
from flowsolve.training.loop import load_weights


@pytest.fixture(scope="module")
def example():
    return load_example("ot_cfm_2d")


@pytest.fixture(scope="module")
def first(example, tmp_path_factory):
    out = tmp_path_factory.mktemp("ot_cfm_2d")
    argv = ["--quick", "--tasks", "N-8gaussians", "--methods", "icfm", "otcfm", "--seeds", "0",
            "--out", str(out), "--quiet"]
    return out, argv, {r["method"]: r for r in example.main(argv)}


def test_ot_cfm_has_lower_path_energy_and_better_few_step_samples(first):
    _, _, runs = first
    icfm, otcfm = runs["icfm"], runs["otcfm"]
    assert icfm["status"] == otcfm["status"] == "trained"
    # normalised path energy: I-CFM's paths cross and cost far more than W2^2(q0, q1)
    assert otcfm["npe"] < 0.5 * icfm["npe"], (otcfm["npe"], icfm["npe"])
    assert icfm["npe"] > 0.1
    # few-step samples: OT-CFM's nearly straight paths suffer less from 1 or 2 Euler steps
    for steps in ("1", "2"):
        assert otcfm["w2_low_nfe"][steps] < 0.9 * icfm["w2_low_nfe"][steps], steps


def test_second_invocation_skips_finished_runs(example, first):
    out, argv, runs = first
    again = {r["method"]: r for r in example.main(argv)}
    assert {r["status"] for r in again.values()} == {"skipped"}
    for name in runs:
        assert again[name]["w2"] == runs[name]["w2"]
    table = (out / "results.md").read_text()
    assert "OT-CFM" in table and "I-CFM" in table
    assert (out / "results.csv").read_text().count("\n") == 3  # header + 2 rows


def test_unfinished_run_resumes_from_its_checkpoint(example, first):
    out, argv, runs = first
    result = out / "runs" / "N-8gaussians__otcfm__seed0.json"
    saved = json.loads(result.read_text())
    result.unlink()  # as if the process died after training, before writing its result
    again = {r["method"]: r for r in example.main(argv)}
    assert again["otcfm"]["status"] == "resumed"
    assert again["otcfm"]["resumed_from_step"] == saved["steps"]  # nothing left to train
    assert again["otcfm"]["w2"] == saved["w2"] and again["otcfm"]["npe"] == saved["npe"]
    assert again["icfm"]["status"] == "skipped"


def test_another_protocol_is_refused_in_the_same_folder(example, first):
    out, argv, _ = first
    with pytest.raises(SystemExit, match="another protocol"):
        example.main([*argv, "--steps", "7"])


def test_report_tabulates_every_finished_run_and_trains_nothing(example, first, tmp_path):
    out, argv, runs = first
    # a run of another seed, finished by another process, joins the table: its mean and std
    other = json.loads((out / "runs" / "N-8gaussians__otcfm__seed0.json").read_text())
    other = {**other, "seed": 1, "w2": other["w2"] + 0.2}
    (out / "runs" / "N-8gaussians__otcfm__seed1.json").write_text(json.dumps(other))
    try:
        records = example.main(["--quick", "--out", str(out), "--report"])
        assert sorted((r["method"], r["seed"]) for r in records) == [
            ("icfm", 0), ("otcfm", 0), ("otcfm", 1)]
        assert all("status" not in r for r in records)  # read, not trained
        row = next(line for line in (out / "results.md").read_text().splitlines()
                   if "| OT-CFM |" in line)
        mean, std = runs["otcfm"]["w2"] + 0.1, 0.2 / 2**0.5
        assert f"| 2 | {mean:.3f} ± {std:.3f} |" in row
    finally:
        (out / "runs" / "N-8gaussians__otcfm__seed1.json").unlink()
    with pytest.raises(SystemExit, match="no protocol.json"):
        example.main(["--quick", "--out", str(tmp_path / "empty"), "--report"])


@pytest.fixture(scope="module")
def bridges(example, tmp_path_factory):
    """SB-CFM and [SF]2M on N->moons, one seed, the quick protocol (about 10 s of training)."""
    out = tmp_path_factory.mktemp("ot_cfm_2d_sf2m")
    argv = ["--quick", "--tasks", "N-moons", "--methods", "sbcfm", "sf2m", "--seeds", "0",
            "--out", str(out), "--quiet"]
    return out, argv, {r["method"]: r for r in example.main(argv)}


def test_sf2m_velocity_is_sb_cfms_and_its_sde_reaches_the_data(example, bridges):
    out, _, runs = bridges
    sb, sf = runs["sbcfm"], runs["sf2m"]
    assert sb["status"] == sf["status"] == "trained"
    # the same seed, batches, plan, times and bridge noise, and a flow loss that does not see
    # the score network: [SF]2M's velocity is SB-CFM's, weight for weight
    for key in ("w2", "npe", "pe", "w2_low_nfe"):
        assert sf[key] == sb[key], key
    assert "w2_sde" not in sb and sf["sde"]["finite"]
    # dX = [v + s/2] dt + dW lands as close to the thin moons as the ODE (0.50 and 0.50 at
    # seed 0); without the score term the unit noise blurs them (0.77), with -s more (1.54)
    assert sf["w2_sde"] < sf["w2"] + 0.1, (sf["w2_sde"], sf["w2"])
    proto = example.PROTOCOLS["quick"][0]
    data = example.task_data("N-moons", 0, proto)
    model = example.make_method_model(example.METHODS["sf2m"], 0)
    load_weights(model, out / "checkpoints" / "N-moons__sf2m__seed0.pt")
    with torch.no_grad():
        x = sample_sde(model, data["x0_test"], score=lambda x, t: torch.zeros_like(x),
                       diffusion=1.0, steps=100,
                       generator=example._generator(0, example.SDE_NOISE_STREAM)).x
    unscored = float(wasserstein2(x, data["x1_test"]))
    assert unscored > sf["w2_sde"] + 0.15, (unscored, sf["w2_sde"])
    # the table: the SDE column, empty for the ODE-only method
    table = (out / "results.md").read_text().splitlines()
    assert "| W2 (100 Euler) | W2 (SDE 100) | NPE |" in table[0]
    assert f"| {sb['w2']:.3f} |  | {sb['npe']:.4f} |" in next(r for r in table if "SB-CFM" in r)
    assert f"| {sf['w2_sde']:.3f} |" in next(r for r in table if "[SF]2M" in r)


def test_sf2m_sde_noise_is_seeded(example, bridges):
    out, argv, runs = bridges
    result = out / "runs" / "N-moons__sf2m__seed0.json"
    result.unlink()  # re-evaluated from the finished checkpoint: the same noise, same W2
    again = {r["method"]: r for r in example.main(argv)}
    assert again["sf2m"]["status"] == "resumed"
    assert again["sf2m"]["w2_sde"] == runs["sf2m"]["w2_sde"]
