"""The layers of docs/architecture.md, held in one list: the folder tree, the import direction
and the module map of the docs are all checked against ``LAYERS``."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "flowsolve"

# Bottom to top: (subpackage or top-level module, tiers of its modules). A module may import
# any module of a lower entry and, inside its own subpackage, modules of lower tiers only.
LAYERS: list[tuple[str, list[set[str]]]] = [
    ("_core", [{"types", "errors"}, {"finite", "checks", "counting", "files", "registry",
                                     "threads", "progress", "distributed"}]),
    ("paths", [{"schedules"}, {"affine"},
               {"discrete", "preconditioning", "fields", "transfer", "bridges"}]),
    ("truth", [{"analytic"}, {"gaussian_bridge"}]),
    ("ode", [{"grids", "systems", "fixed_step", "per_sample", "semilinear"},
             {"dpm_solver", "unipc", "edm"},
             {"samplers", "args"}, {"backends"}, {"solve"}]),
    ("sde", [{"brownian", "diffusions"}, {"samplers"}, {"backends"}, {"solve"}]),
    ("likelihood", [{"divergence", "bits", "dataset", "reweighting"}, {"augmented"},
                    {"cnf", "generated"}, {"dataset_likelihood"}]),
    ("training", [{"ema", "nets", "coupling_base", "checkpoint"},
                  {"losses", "data", "unet", "ot_couplings"},
                  {"relaxed_couplings", "conditional_couplings"}, {"couplings"},
                  {"pipeline", "score_flow", "config"}, {"loop"}]),
    ("metrics", []),
    ("studies", [{"results", "specs"}, {"references", "sde_runs"}, {"runs", "grid_search"},
                 {"front", "compare"}]),
    ("cli", [{"demo", "plots", "common", "options"},
             {"demo_command", "compare", "train", "sample", "likelihood", "transfer"},
             {"main"}]),
]
THIRD_PARTY_OWNERS = {
    "ot": {"training.ot_couplings", "training.relaxed_couplings", "metrics"},
    "torchdiffeq": {"ode.systems", "ode.backends", "ode.solve"},
    "torchsde": {"sde.solve", "sde.backends", "sde.brownian"},
}


def rank(dotted: str) -> tuple[int, int]:
    """(layer, tier) of ``"ode.solve"`` or ``"metrics"``; KeyError if it has no place."""
    top, _, mod = dotted.partition(".")
    for i, (name, tiers) in enumerate(LAYERS):
        if name == top:
            if not mod and not tiers:
                return i, 0
            for j, tier in enumerate(tiers):
                if mod in tier:
                    return i, j
    raise KeyError(dotted)


def placed_modules() -> list[str]:
    return [f"{name}.{m}" if tiers else name for name, tiers in LAYERS
            for tier in (tiers or [{""}]) for m in sorted(tier)]


def tree_modules() -> list[str]:
    """Every module of the package but the ``__init__`` / ``__main__`` files."""
    found = []
    for p in PACKAGE.rglob("*.py"):
        if p.stem in ("__init__", "__main__"):
            continue
        found.append(".".join(p.relative_to(PACKAGE).with_suffix("").parts))
    return sorted(found)


def flowsolve_imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(dotted module, imported names)`` of each relative import, resolved from ``path``."""
    here = path.relative_to(PACKAGE).with_suffix("").parts[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(here[: len(here) - (node.level - 1)])
            names = [a.name for a in node.names]
            target = base + (node.module.split(".") if node.module else [])
            if PACKAGE.joinpath(*target).is_dir():  # from ..truth import analytic: modules
                out += [(".".join(target + [n]), []) for n in names]
            else:
                out.append((".".join(target), names))
    return out


def third_party_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
    return names


MODULES = sorted(PACKAGE.rglob("*.py"))
IDS = [p.relative_to(PACKAGE).as_posix() for p in MODULES]


def test_every_module_has_exactly_one_place():
    assert tree_modules() == sorted(placed_modules())


@pytest.mark.parametrize("path", MODULES, ids=IDS)
def test_imports_flow_downwards(path):
    me = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    if path.stem in ("__init__", "__main__"):
        return  # the front doors re-export from every layer
    mine = rank(me)
    for target, names in flowsolve_imports(path):
        assert rank(target) < mine, f"{me} (layer, tier {mine}) imports {target} {rank(target)}"
        private = [n for n in names if n.startswith("_")]
        assert not private, f"{me} imports private names {private} of {target}"
    for lib, owners in THIRD_PARTY_OWNERS.items():
        if lib in third_party_imports(path):
            assert me in owners, f"only {sorted(owners)} import {lib}; {me} does"


def test_subpackage_inits_import_nothing():
    """A subpackage's ``__init__`` is its docstring: importing ``flowsolve.ode`` cannot drag a
    higher layer in, and each name has one home."""
    for p in PACKAGE.glob("*/__init__.py"):
        assert not flowsolve_imports(p), p


def test_architecture_doc_lists_the_tree_in_layer_order():
    """The module map of docs/architecture.md names every module once, bottom to top."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    rows = re.findall(r"^\|[^|\n]*\| `((?:[a-z_]+/)?[a-z_]+)\.py` \|", text, re.M)
    listed = [row.replace("/", ".") for row in rows]
    assert sorted(listed) == tree_modules()
    ranks = [rank(m) for m in listed]
    assert ranks == sorted(ranks), "docs/architecture.md lists the modules out of layer order"
