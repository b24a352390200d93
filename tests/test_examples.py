"""Examples and the README's code run as they are written."""

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
#: command-line arguments of examples whose bare run is too long for a smoke test
ARGS = {"cfg_digits": ["--quick", "--quiet"]}
#: modules an example needs beyond flowsolve's required dependencies
NEEDS = {"cfg_digits": "sklearn"}


def _check_cfg_digits(path: Path, cwd: Path) -> None:
    """The quick run's files: one finite row per guidance weight, samples (10, n, 1, 8, 8) in
    [-1, 1], chance fidelity at w = 0; an existing folder refused without --force; the same
    seed gives the same numbers with --force."""
    out = cwd / "runs" / "cfg_digits"
    results = json.loads((out / "results.json").read_text())
    weights = results["settings"]["weights"]
    assert [row["w"] for row in results["rows"]] == weights == [0.0, 1.0, 2.0, 4.0]
    for row in results["rows"]:
        for key in ("fidelity", "within_class_std", "class_mmd2", "outside"):
            assert math.isfinite(row[key]), (row["w"], key)
        assert 0 <= row["fidelity"] <= 1 and sum(row["predicted_histogram"]) == 10 * 8
    assert results["reference"]["classifier_accuracy"] > 0.9
    # w = 0 ignores the label, and x0 is independent of it: E[fidelity] = 1/10 exactly
    # (standard deviation at most sqrt(0.9 / (100 * 8)) = 0.034)
    assert abs(results["rows"][0]["fidelity"] - 0.1) < 0.15
    # even 40 steps learn the guidance effect: w = 2 gave 0.74-0.86 over seeds 0-4
    assert results["rows"][2]["fidelity"] > results["rows"][0]["fidelity"] + 0.3
    import torch

    samples = torch.load(out / "samples.pt", weights_only=True)
    assert list(samples) == weights
    for x in samples.values():
        assert x.shape == (10, 8, 1, 8, 8) and bool(torch.isfinite(x).all())
        assert float(x.abs().max()) <= 1
    assert (out / "results.csv").read_text().count("\n") == 1 + len(weights)
    if importlib.util.find_spec("matplotlib") is not None:
        assert results["pngs"] == [f"samples_w{w:g}.png" for w in weights]
        assert all((out / name).stat().st_size > 0 for name in results["pngs"])

    again = subprocess.run([sys.executable, str(path), *ARGS["cfg_digits"]], cwd=cwd,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode != 0 and "--force" in again.stderr
    subprocess.run([sys.executable, str(path), *ARGS["cfg_digits"], "--force"], cwd=cwd,
                   check=True, timeout=600, capture_output=True)
    rerun = json.loads((out / "results.json").read_text())

    def numbers(res):
        return [{k: v for k, v in row.items() if k != "sample_seconds"} for row in res["rows"]]

    assert numbers(rerun) == numbers(results)  # seeded through torch.Generator only


CHECKS = {"cfg_digits": _check_cfg_digits}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(path, tmp_path):
    if path.stem in NEEDS:
        pytest.importorskip(NEEDS[path.stem])
    # a fresh interpreter: examples may set global torch state (default dtype, threads)
    subprocess.run([sys.executable, str(path), *ARGS.get(path.stem, [])], cwd=tmp_path,
                   check=True, timeout=600, capture_output=True)
    if path.stem in CHECKS:
        CHECKS[path.stem](path, tmp_path)


def test_readme_python_blocks_run():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README.md has no python example"
    for block in blocks:
        subprocess.run([sys.executable, "-c", block], check=True, timeout=300, cwd=ROOT)


def test_demo_command_writes_its_report(tmp_path):
    """The README's main job, shortened (200 training steps): all six parts and the files."""
    out = subprocess.run([sys.executable, "-m", "flowsolve", "demo", "--steps", "200",
                          "--out", str(tmp_path / "report")], capture_output=True, text=True,
                         check=True, cwd=tmp_path, timeout=600).stdout
    assert "report: " in out
    summary = (tmp_path / "report" / "summary.md").read_text()
    for part in ("exact path", "OT-CFM training", "exact likelihood", "solver study",
                 "low-NFE front", "scheduler transfer"):
        assert part in summary
    for name in ("study.csv", "study.json", "study.png", "samples.png", "front.csv"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    closed = subprocess.run([sys.executable, "-m", "flowsolve", "demo", "--closed-form"],
                            capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert "exact marginal log-density" in closed
