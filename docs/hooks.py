"""mkdocs hooks (``hooks:`` in mkdocs.yml): pages and figures made at build time.

- ``figures/*.svg``: the placement figures of docs/gen_figures.py, drawn from
  ``jlm.inspect.describe`` of real layouts on simulated CPU devices;
- ``api/*.md``: the API reference of docs/gen_api.py, one mkdocstrings entry
  per name in ``jlocalmap.__all__`` (and in ``jlocalmap.testing.__all__``);
- ``source/<path>.md``: a page showing a repository file that a page links to
  outside docs/ (``[the test](../tests/test_x.py)``), so that such links
  resolve in the built site too; the links are rewritten to those pages (a
  link to ``examples/<name>.py`` goes to the example's page instead, which
  shows the source and its output).

None is written into the source tree: all exist only in the build, so none
can drift from the library.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

# mkdocs puts this file's folder on sys.path only while it imports the file:
# its siblings are imported now (both are light; jax starts later, in on_files).
import gen_api
import gen_figures

_generated: dict[str, str] = {}


def generated_files() -> dict[str, str]:
    """Path under docs/ -> content of every generated file (computed once per process)."""
    if not _generated:
        figures = gen_figures.render_all()  # first: it simulates CPU devices before jax starts
        import jlocalmap
        _generated.update({f"figures/{name}": svg for name, svg in figures.items()})
        _generated.update(gen_api.api_pages(jlocalmap))
        import jlocalmap.testing
        _generated["api/testing.md"] = gen_api.module_page(
            jlocalmap.testing, "jlocalmap.testing",
            "The kit for testing your own sharded code: values and gradients against the "
            "unsharded run, collective counts, the pytest plugin's meshes and device count "
            "(`import jlocalmap.testing`; it imports pytest). "
            "Guide: [testing your sharded code](../testing.md).")
    return _generated


# A Markdown link's target: ](path) or ](path#anchor), not a URL or an absolute path.
_LINK = re.compile(r"\]\((?![a-z]+:|/|#)([^)\s#]+)(#[^)\s]*)?\)")
_LANGUAGES = {".py": "python", ".sh": "bash", ".toml": "toml", ".yml": "yaml", ".yaml": "yaml",
              ".md": "markdown", ".txt": "text"}
_source_links: dict[tuple[str, str], str] = {}  # (page, link target) -> page it points to now


def _repository_files(page_uri: str, markdown: str, docs_dir: Path) -> dict[str, str]:
    """The link targets of a page that are files of the repository outside docs/."""
    root = docs_dir.parent
    found = {}
    for target, _ in _LINK.findall(markdown):
        path = (docs_dir / posixpath.dirname(page_uri) / target).resolve()
        if path.is_file() and docs_dir not in path.parents and root in path.parents:
            found[target] = path.relative_to(root).as_posix()
    return found


def _source_page(repository_path: str) -> str:
    language = _LANGUAGES.get(Path(repository_path).suffix, "text")
    return (f"# `{repository_path}`\n\n```{language}\n"
            f"--8<-- \"{repository_path}\"\n```\n")


def on_files(files, config):
    from mkdocs.structure.files import File
    for path, content in generated_files().items():
        files.append(File.generated(config, path, content=content))
    docs_dir = Path(config["docs_dir"]).resolve()
    sources = set()
    for page in list(files.documentation_pages()):
        if page.abs_src_path is None:  # generated pages link only inside docs/
            continue
        markdown = Path(page.abs_src_path).read_text(encoding="utf-8")
        for target, path in _repository_files(page.src_uri, markdown, docs_dir).items():
            example_page = f"{Path(path).with_suffix('.md')}"  # examples/x.py -> examples/x.md
            if path.startswith("examples/") and (docs_dir / example_page).is_file():
                _source_links[(page.src_uri, target)] = example_page  # source and output
            else:
                _source_links[(page.src_uri, target)] = f"source/{path}.md"
                sources.add(path)
    for path in sorted(sources):
        files.append(File.generated(config, f"source/{path}.md", content=_source_page(path)))
    return files


def on_page_markdown(markdown, page, config, files):
    """Links to repository files outside docs/ point at their source pages instead."""
    def relink(match: re.Match) -> str:
        target, anchor = match.group(1), match.group(2) or ""
        page_uri = _source_links.get((page.file.src_uri, target))
        if page_uri is None:
            return match.group(0)
        here = posixpath.dirname(page.file.src_uri) or "."
        return f"]({posixpath.relpath(page_uri, here)}{anchor})"
    return _LINK.sub(relink, markdown)
