"""The import direction of docs/architecture.md: a lower module never imports a higher one."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "flowsolve"

# module -> the flowsolve modules it may import (transitively closed by layer)
LAYERS = {
    "_checks": 0, "registry": 0, "_counting": 0, "_solve_args": 0, "_files": 0, "_checkpoint": 0,
    "schedules": 1,
    "paths": 2,
    "analytic": 3, "losses": 3, "ema": 3, "couplings": 3, "metrics": 3, "nets": 3, "divergence": 3,
    "_study_results": 0, "data": 4, "unet": 4, "pipeline": 5, "evaluate": 0, "bridges": 4,
    "dequantize": 0,
    "fields": 4,
    "dynamics": 5, "fixed_step": 5.5, "sde": 5, "brownian": 4, "diffusions": 4,
    "transfer": 4,
    "solve": 6, "likelihood": 7, "train": 7, "studies": 8, "demo": 9, "cli": 10, "__main__": 11,
    "__init__": 11,
}
THIRD_PARTY_OWNERS = {
    "ot": {"couplings", "metrics"},
    "torchdiffeq": {"dynamics", "solve"},
    "torchsde": {"sde", "brownian"},
}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module is None:
                names.update(a.name for a in node.names)
            elif node.level == 1:
                names.add(node.module.split(".")[0])
            elif node.module:
                names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
    return names


MODULES = sorted(p for p in PACKAGE.glob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=[p.stem for p in MODULES])
def test_imports_flow_downwards(path):
    me = path.stem
    assert me in LAYERS, f"flowsolve/{me}.py is not placed in a layer in {__file__}"
    for name in imports_of(path):
        if name in LAYERS and name != me and me != "__init__":
            assert LAYERS[name] < LAYERS[me] or (LAYERS[name] == LAYERS[me] == 0), (
                f"{me} (layer {LAYERS[me]}) imports {name} (layer {LAYERS[name]})"
            )
        if name in THIRD_PARTY_OWNERS:
            assert me in THIRD_PARTY_OWNERS[name], f"only {THIRD_PARTY_OWNERS[name]} import {name}"
