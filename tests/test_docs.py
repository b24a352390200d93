"""The code on the documentation pages runs as written.

Every ```python block of the hand-written pages (docs/index.md, getting-started, concepts,
how-to) is executed, a page's blocks in order in one namespace, as a reader would paste
them. The examples page only includes the scripts of examples/, which
tests/test_examples.py runs.
"""

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(
    [DOCS / "index.md", DOCS / "getting-started.md",
     *(DOCS / "concepts").glob("*.md"), *(DOCS / "howto").glob("*.md")]
)
INCLUDES_ONLY = {DOCS / "howto" / "examples.md"}  # --8<-- includes of examples/*.py
BLOCK = re.compile(r"^```python\n(.*?)^```", flags=re.S | re.M)


def _blocks(page: Path) -> list[str]:
    return BLOCK.findall(page.read_text())


def test_the_pages_with_code_are_found():
    with_code = [p for p in PAGES if p not in INCLUDES_ONLY and _blocks(p)]
    assert len(with_code) >= 10, [p.name for p in with_code]
    for page in INCLUDES_ONLY:
        assert all(b.strip().startswith("--8<--") for b in _blocks(page)), page


@pytest.mark.parametrize("page", [p for p in PAGES if p not in INCLUDES_ONLY and _blocks(p)],
                         ids=lambda p: str(p.relative_to(DOCS)))
def test_page_code_runs(page, tmp_path, monkeypatch):
    blocks = _blocks(page)
    torch.set_num_threads(1)  # as tests/conftest.py: small tensors on a shared CPU
    monkeypatch.chdir(tmp_path)  # whatever a snippet writes stays out of the checkout
    dtype = torch.get_default_dtype()
    namespace = {"__name__": f"docs.{page.stem}"}
    with torch.random.fork_rng():  # model initialisation draws from the global RNG
        torch.manual_seed(0)
        try:
            for i, block in enumerate(blocks):
                code = compile(block, f"{page.relative_to(ROOT)} [python block {i + 1}]", "exec")
                exec(code, namespace)
        finally:
            torch.set_default_dtype(dtype)


def test_api_overview_lists_every_public_name():
    """docs/api/index.md links every flat name of ``flowsolve.__all__`` (the strict docs
    build checks that each link resolves to a rendered object)."""
    import types

    import flowsolve as fs

    text = (DOCS / "api" / "index.md").read_text()
    listed = set(re.findall(r"\[`(\w+)`\]\[flowsolve\.[\w.]+\]", text))
    public = {n for n in fs.__all__ if not isinstance(getattr(fs, n), types.ModuleType)}
    assert public <= listed, sorted(public - listed)
