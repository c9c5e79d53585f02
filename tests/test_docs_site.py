"""The documentation site: it builds with ``mkdocs build --strict`` (every link,
anchor, cross-reference and nav entry resolves), every public name has its API
entry, the figures show what jlocalmap does, and the home page's example runs.

The doctests of docs/*.md run separately (``--doctest-glob``); these tests
cover what a doctest cannot: the build itself and the pages' plain code.
"""

import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import need

import jlocalmap

need("mkdocs")   # the site's build (the docs tools are in the test extra too)

ROOT = Path(__file__).resolve().parent.parent
BUILD_TIMEOUT_S = 600
sys.path.insert(0, str(ROOT / "docs"))  # the build's tools, importable by name as in the hook

import gen_figures  # noqa: E402


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site, built strictly into a temporary folder (not the checkout's site/)."""
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stderr[-6000:]}"
    return out


def _api_html(site: Path) -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in (site / "api").rglob("*.html"))


def test_every_public_name_has_an_api_entry(site):
    html = _api_html(site)
    missing = [name for name in jlocalmap.__all__
               if f'id="jlocalmap.{name}"' not in html]
    assert not missing, f"no API entry (id='jlocalmap.<name>') for {missing}"


def test_api_entries_render_docstring_examples_as_code(site):
    # Each entry shows its docstring's example as highlighted doctest code, not as text.
    page = (site / "api" / "placements" / "index.html").read_text(encoding="utf-8")
    entry = page[page.index('id="jlocalmap.Shard"'):page.index('id="jlocalmap.Replicate"')]
    assert "Shard(dim=0)" in entry and 'class="highlight"' in entry
    assert ":class:" not in _api_html(site), "a Sphinx role was left unconverted"


def test_figures_are_built_from_the_library(site):
    for figure in gen_figures.FIGURES:
        svg = (site / "figures" / figure.name).read_text(encoding="utf-8")
        n_devices = 1
        for size in figure.mesh_shape:
            n_devices *= size
        assert all(f"device {d}<" in svg for d in range(n_devices)), figure.name


def test_uneven_figure_reads_dtensor_chunks_and_padding():
    # 9 rows over [Shard(0), Shard(0)] on 2 x 2: torch.chunk gives 5 + 4, then 3 + 2 and
    # 2 + 2; every local value is padded to the largest chunk, 3 rows.
    figure = next(f for f in gen_figures.FIGURES if f.name == "uneven.svg")
    rows = gen_figures.describe_figure(figure).rows
    assert [r.index[0] for r in rows] == [(0, 3), (3, 5), (5, 7), (7, 9)]
    assert [r.padding for r in rows] == [0, 1, 1, 1]


def test_partial_figure_marks_every_device_a_summand():
    figure = next(f for f in gen_figures.FIGURES if f.name == "replicate_partial.svg")
    described = gen_figures.describe_figure(figure)
    assert described.placements == "[Replicate(), Partial(sum)]"
    assert all(r.partial and r.index == ((0, 4), (0, 4)) for r in described.rows)


def test_example_pages_show_source_and_output(site):
    for output in sorted((ROOT / "docs" / "examples" / "output").glob("*.txt")):
        page = site / "examples" / output.stem / "index.html"
        html = page.read_text(encoding="utf-8")
        last_line = output.read_text(encoding="utf-8").strip().splitlines()[-1]
        assert _text(last_line) in _text(html), f"{page}: output not included"
        assert "import jlocalmap as jlm" in _text(html), f"{page}: source not included"


def test_every_example_program_has_a_page():
    examples = {p.stem for p in (ROOT / "examples").glob("*.py")}
    pages = {p.stem for p in (ROOT / "docs" / "examples").glob("*.md")} - {"index"}
    assert examples <= pages, f"examples without a page in docs/examples/: {examples - pages}"


def _text(html: str) -> str:
    """Visible text: tags dropped, entities of the characters outputs use decoded."""
    text = re.sub(r"<[^>]+>", "", html)
    for entity, char in (("&lt;", "<"), ("&gt;", ">"), ("&amp;", "&"), ("&quot;", '"'),
                         ("&#39;", "'")):
        text = text.replace(entity, char)
    return text


def test_home_page_example_runs_and_prints_what_the_page_says():
    page = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    code, shown = re.search(r"```python\n(.*?)```\n\n```\n(.*?)```", page, re.S).groups()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "docs/index.md", "exec"), {"__name__": "docs_index"})
    assert out.getvalue() == shown
