"""mkdocs hooks (``hooks:`` in mkdocs.yml): pages and figures made at build time.

- ``figures/*.svg``: the placement figures of docs/gen_figures.py, drawn from
  ``jlm.describe`` of real layouts on simulated CPU devices;
- ``api/*.md``: the API reference of docs/gen_api.py, one mkdocstrings entry
  per name in ``jlocalmap.__all__``.

Neither is written into the source tree: both exist only in the build, so
neither can drift from the library.
"""

from __future__ import annotations

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
    return _generated


def on_files(files, config):
    from mkdocs.structure.files import File
    for path, content in generated_files().items():
        files.append(File.generated(config, path, content=content))
    return files
