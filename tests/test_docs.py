"""The code on the documentation pages runs as written, and the site shows it as written.

Every ```python block of the hand-written pages (docs/index.md, getting-started, concepts,
how-to) is executed, a page's blocks in order in one namespace, as a reader would paste
them. The examples page only includes the scripts of examples/, which
tests/test_examples.py runs.

The docstrings are checked as the API pages render them (docs/api/griffe_rst.py), and the
built site (one mkdocs build, about 10 s) for what a reader would miss: a script or style
sheet from another host (the site works offline), uncoloured code, a list run into a
paragraph, attribute values instead of annotations. The slow test runs docs/check_site.py,
which loads the pages in headless Chromium.
"""

import importlib.util
import re
import subprocess
import sys
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


# -- the docstrings as the API pages render them ------------------------------------------------
def _griffe_rst():
    pytest.importorskip("griffe")
    spec = importlib.util.spec_from_file_location("griffe_rst", DOCS / "api" / "griffe_rst.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_attributes_naming_several_become_one_item_each():
    """Google ``Attributes:`` items read ``a, b: text`` as the name ``a,`` of type ``b``;
    docs/api/griffe_rst.py splits them (the sources keep one line)."""
    rst = _griffe_rst()
    lines = ["Result.", "", "Attributes:", "    x: the state.", "    solver, t0, t1: what.",
             "    times, trajectory: the times and", "        the states.", "",
             "Example:", "    >>> 1", "    1"]
    assert rst._attribute_items(lines) == [
        "Result.", "", "Attributes:", "    x: the state.", "    solver: what.", "    t0: what.",
        "    t1: what.", "    times: the times and", "        the states.",
        "    trajectory: the times and", "        the states.", "", "Example:", "    >>> 1",
        "    1"]


def test_python_literal_blocks_are_fenced_and_formulas_stay_plain():
    rst = _griffe_rst()
    python = ["Example::", "", "    y = f(x,", "          1)", "", "Next."]
    assert rst._literal_blocks(python) == ["Example::", "", "```python", "y = f(x,", "      1)",
                                           "```", "", "Next."]
    formula = ["The flow::", "", "    dX = u_t(X) dt + g_t dW,   t in [0, 1].", "", "Next."]
    assert rst._literal_blocks(formula) == formula
    maths = [".. math::", "", "    x = y", "", "Next."]  # parses, but is a directive's body
    assert rst._literal_blocks(maths) == maths


def test_every_attribute_renders_under_its_own_name():
    """Every ``Attributes:`` item of the package, parsed as mkdocstrings parses it (after
    docs/api/griffe_rst.py), is one identifier: no ``solver,`` of type ``(t0, t1)``."""
    import griffe

    extension = f"{DOCS / 'api' / 'griffe_rst.py'}:RstDocstrings"
    package = griffe.load("flowsolve", search_paths=[str(ROOT)],
                          extensions=griffe.load_extensions(extension))
    bad, stack, attributes = [], [package], 0
    while stack:
        obj = stack.pop()
        stack += [m for m in obj.members.values() if not m.is_alias]
        if obj.docstring is None:
            continue
        sections = obj.docstring.parse("google", returns_multiple_items=False, warnings=False)
        for section in sections:
            if section.kind.value == "attributes":
                attributes += len(section.value)
                bad += [f"{obj.path}: {a.name!r}" for a in section.value
                        if not a.name.isidentifier()]
    assert attributes > 20
    assert not bad, bad


def test_docstrings_and_pages_cite_no_file_outside_the_repository():
    cited = re.compile(r"STYLE\.md|DESIGN\.md|\.\./shared|\bnotes/")
    files = [ROOT / "README.md", *(ROOT / "flowsolve").rglob("*.py"), *DOCS.rglob("*.md")]
    hits = [f"{f.relative_to(ROOT)}:{n}" for f in files
            for n, line in enumerate(f.read_text().splitlines(), 1) if cited.search(line)]
    assert not hits, hits


def test_study_files_read_back_by_from_csv_and_from_json(tmp_path):
    from flowsolve.studies.compare import RECORD_FIELDS, Study

    record = dict.fromkeys(RECORD_FIELDS) | {"solver": "euler", "budget": 4, "error": 0.5}
    study = Study([record], {"euler": {"fitted": None}}, {"threads": 1})
    again = Study.from_csv(study.to_csv(tmp_path / "s.csv"))
    assert (again.records, again.orders, again.meta) == ([record], {}, {})
    assert Study.from_json(study.to_json(tmp_path / "s.json")) == study
    with pytest.warns(DeprecationWarning, match=r"Study\.from_csv"):
        assert Study.read_csv(tmp_path / "s.csv") == study.records


# -- the built site -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site as `make docs` builds it (about 10 s on the 2-core VM)."""
    pytest.importorskip("mkdocs")
    out = tmp_path_factory.mktemp("site")
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--quiet", "--site-dir",
                          str(out)], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    return out


def _pages(site: Path) -> list[Path]:
    pages = sorted(site.rglob("*.html"))
    assert len(pages) > 20
    return pages


def test_site_loads_nothing_from_other_hosts(site):
    """No page loads a script, style sheet, font or image from the network (the site works
    offline), and every file a page or style sheet loads is in the site."""
    elsewhere = re.compile(r"^(?:[a-z]+:)?//", re.I)
    resource = re.compile(r"<(?:script|img|iframe|source)\b[^>]*?\bsrc=\"([^\"]+)\""
                          r"|<link\b[^>]*?\bhref=\"([^\"]+)\"", re.I)
    external, missing = [], []
    for page in _pages(site):
        for match in resource.finditer(page.read_text()):
            url = match[1] or match[2]
            if elsewhere.match(url):
                external.append(f"{page.relative_to(site)}: {url}")
            elif not url.startswith("data:"):
                path = re.split(r"[?#]", url)[0]  # 404.html links from the site's root
                if not (site / path[1:] if path.startswith("/") else page.parent / path).exists():
                    missing.append(f"{page.relative_to(site)}: {url}")
    for sheet in site.rglob("*.css"):
        for url in re.findall(r"url\(\s*['\"]?([^'\")]+)", sheet.read_text()):
            if elsewhere.match(url):
                external.append(f"{sheet.relative_to(site)}: {url}")
            elif not url.startswith("data:"):
                if not (sheet.parent / re.split(r"[?#]", url)[0]).exists():
                    missing.append(f"{sheet.relative_to(site)}: {url}")
    assert not external, external
    assert not missing, missing
    # MathJax finds its fonts beside itself: every font its CHTML output names is there
    mathjax = site / "assets" / "mathjax"
    fonts = set(re.findall(r"MathJax_[\w-]+\.woff", (mathjax / "tex-chtml-full.js").read_text()))
    assert len(fonts) > 20
    assert all((mathjax / "output/chtml/fonts/woff-v2" / f).exists() for f in fonts)


def test_site_code_is_coloured_and_lists_are_lists(site):
    """Code blocks are coloured by Pygments at build time (no script needed); no Markdown
    list ran into the paragraph before it (a list needs a blank line above it)."""
    block = re.compile(r"<div class=\"language-(?:python|py|bash) highlight\"><pre>(.*?)</pre>",
                       re.S)
    paragraph = re.compile(r"<p>((?:(?!</p>).)*)</p>", re.S)
    maths = re.compile(r"<span class=\"arithmatex\">.*?</span>", re.S)
    plain, swallowed, python = [], [], 0
    for page in _pages(site):
        html = page.read_text()
        for code in block.findall(html):
            python += 1
            if '<span class="' not in code:
                plain.append(f"{page.relative_to(site)}: {code[:80]}")
        for text in paragraph.findall(html):
            if re.search(r"\n\s*(?:[-*]|\d+\.)\s+\S", maths.sub("", text)):
                swallowed.append(f"{page.relative_to(site)}: {text[:80]}")
    assert python > 50
    assert not plain, plain
    assert not swallowed, swallowed


def test_api_pages_show_annotations_not_attribute_values(site):
    sampling = (site / "api" / "sampling" / "index.html").read_text()
    text = re.sub(r"<[^>]+>", "", sampling)
    assert "ODE_SOLVERS: SolverRegistry" in text
    assert "_build_registry" not in text
    assert re.search(r"x0: Tensor", text) and "-&gt; Solution" in text
    start = sampling.index('id="flowsolve.ode.backends.Solution"')
    solution = sampling[start:sampling.index("doc-heading", start + 100)]
    items = re.findall(r"<b><code>(\w+)</code></b>\s*\(<code>(.*?)</code>\)", solution, re.S)
    names = [name for name, _ in items]
    assert {"solver", "t0", "t1", "times", "trajectory"} <= set(names), names


@pytest.mark.slow
def test_site_in_a_headless_browser(site):
    """docs/check_site.py: formulas typeset, code coloured, nothing cut off or loaded from
    elsewhere, the search answers (needs Debian's chromium-headless-shell or chromium)."""
    sys.path.insert(0, str(DOCS))
    try:
        import check_site
    finally:
        sys.path.remove(str(DOCS))
    if check_site.find_browser(None) is None:
        pytest.skip("no headless Chromium: apt-get install chromium-headless-shell")
    run = subprocess.run([sys.executable, str(DOCS / "check_site.py"), "--site", str(site)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
