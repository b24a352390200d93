"""Examples and the README's code run as they are written."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(path, tmp_path):
    # a fresh interpreter: examples may set global torch state (default dtype, threads)
    subprocess.run([sys.executable, str(path)], cwd=tmp_path, check=True, timeout=600,
                   capture_output=True)


def test_readme_python_blocks_run():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README.md has no python example"
    for block in blocks:
        subprocess.run([sys.executable, "-c", block], check=True, timeout=300, cwd=ROOT)


def test_demo_command_writes_its_report(tmp_path):
    """The README's main job, shortened (200 training steps): all five parts and the files."""
    out = subprocess.run([sys.executable, "-m", "flowsolve", "demo", "--steps", "200",
                          "--out", str(tmp_path / "report")], capture_output=True, text=True,
                         check=True, cwd=tmp_path, timeout=600).stdout
    assert "report: " in out
    summary = (tmp_path / "report" / "summary.md").read_text()
    for part in ("exact path", "OT-CFM training", "exact likelihood", "solver study",
                 "scheduler transfer"):
        assert part in summary
    for name in ("study.csv", "study.json", "study.png", "samples.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    closed = subprocess.run([sys.executable, "-m", "flowsolve", "demo", "--closed-form"],
                            capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert "exact marginal log-density" in closed
