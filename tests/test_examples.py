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


def test_demo_command_runs():
    out = subprocess.run([sys.executable, "-m", "flowsolve", "demo"], capture_output=True,
                         text=True, check=True, cwd=ROOT).stdout
    assert "exact marginal log-density" in out
