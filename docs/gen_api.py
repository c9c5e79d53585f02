"""The API reference pages, written at build time from ``jlocalmap.__all__``.

Every exported name gets an entry rendered by mkdocstrings from its docstring,
under its public path ``jlocalmap.<name>``: the pages never name an internal
module, so moving a definition between modules changes nothing here, and a
name added to ``__all__`` appears without editing the docs (on the index page,
until ``GROUPS`` places it on a topic page).

One exception is found, not listed: a function exported under the name of a
submodule (``jlocalmap.local_map`` is the function and the module
``jlocalmap/local_map.py``). Static analysis (griffe) resolves that path to
the module, so such an entry is rendered from the definition's own path, under
the public heading and with an anchor ``jlocalmap.<name>`` for cross-references.

Example:
    >>> import jlocalmap
    >>> pages = api_pages(jlocalmap)
    >>> "::: jlocalmap.Shard" in pages["api/placements.md"]
    True
    >>> sorted(pages)[0]
    'api/collectives.md'
"""

from __future__ import annotations

import importlib.util
import inspect
from types import ModuleType

from griffe_roles import convert_roles

# (page, title, what the page covers, names): topic pages of the reference.
GROUPS = (
    ("api/placements.md", "Placements",
     "The three placements and their translation to and from JAX's `PartitionSpec`. "
     "Guide: [placements and PartitionSpecs](../placements.md).",
     ("Placement", "Shard", "Replicate", "Partial", "Placements", "PlacementList", "PlacementTree",
      "placements_to_spec", "spec_to_placements")),
    ("api/local_map.md", "local_map",
     "The decorator: run a function written for local shards on distributed values. "
     "Guide: [local_map semantics](../local_map.md).",
     ("local_map", "LocalMapped", "clear_caches")),
    ("api/layouts.md", "Layouts",
     "Laying values out, moving them, reading them back; uneven shards. "
     "Guides: [placements](../placements.md), [uneven shards](../uneven.md).",
     ("distribute_tensor", "redistribute", "full_tensor", "placements_of", "UnevenArray",
      "Layout", "local_valid_size")),
    ("api/collectives.md", "Collectives",
     "Functional collectives for `local_map` bodies (torch's `funcol`). "
     "Guide: [collectives](../collectives.md).",
     ("collectives",)),
    ("api/inspect.md", "jlocalmap.inspect",
     "Reading programs and values (torch's `debug` tools): the `local_map` regions of a "
     "traced program (settings, shapes, forward, backward, residuals), what a compiled "
     "program communicates (torch's `CommDebugMode`) and where a value lives. Guides: "
     "[regions](../regions.md), [counting communication](../collectives.md#counting-communication).",
     ("inspect",)),
    ("api/strategies.md", "jlocalmap.strategies",
     "One region written several ways, and the choice among them by a cost model or by "
     "measurement. Guide: [strategy regions](../strategies.md).",
     ("strategies",)),
    ("api/estimates.md", "Estimates",
     "A step's memory, FLOPs, collectives and time per device on hardware and a mesh "
     "this machine does not have. Guide: [estimates](../estimates.md).",
     ("estimate", "Estimate", "Hardware")),
    ("api/errors.md", "Errors",
     "The exceptions jlocalmap raises; each message names the argument, what was expected, "
     "what was found and the fix.",
     ("LocalMapError", "LocalMapValueError", "LocalMapTypeError", "PlacementValueError",
      "PlacementTypeError")),
)


def _shadowed_by_submodule(package: ModuleType, name: str) -> bool:
    obj = getattr(package, name)
    return (not inspect.ismodule(obj)
            and importlib.util.find_spec(f"{package.__name__}.{name}") is not None)


def entry(package: ModuleType, name: str) -> str:
    """The mkdocstrings block of one exported name."""
    public = f"{package.__name__}.{name}"
    if not _shadowed_by_submodule(package, name):
        return f"::: {public}\n"
    obj = getattr(package, name)
    return (f"[](){{#{public}}}\n\n"
            f"::: {obj.__module__}.{obj.__qualname__}\n"
            f"    options:\n      heading: \"{public}\"\n      toc_label: \"{name}\"\n")


def summary(package: ModuleType, name: str) -> str:
    """The first sentence of a name's docstring, on one line, roles as links."""
    doc = inspect.getdoc(getattr(package, name)) or ""
    first = " ".join(doc.split("\n\n", 1)[0].split())
    cut = first.find(". ")
    first = first if cut < 0 else first[:cut + 1]
    return convert_roles(first, package.__all__).replace("|", "\\|")


def _page(package: ModuleType, title: str, about: str, names: list[str]) -> str:
    body = "\n".join(entry(package, n) for n in names)
    return f"# {title}\n\n{about}\n\n{body}"


def _index(package: ModuleType, pages: list[tuple[str, str, list[str]]],
           others: list[str]) -> str:
    lines = ["# API reference", "",
             f"Every public name of `{package.__name__}` (its `__all__`), with the first "
             "line of its docstring. Import the package as `jlm`: "
             "`import jlocalmap as jlm`.", ""]
    for path, title, names in pages:
        lines += [f"## [{title}]({path.removeprefix('api/')})", "",
                  "| name | summary |", "| --- | --- |"]
        lines += [f"| [`{n}`][{package.__name__}.{n}] | {summary(package, n)} |" for n in names]
        lines.append("")
    if others:
        lines += ["## Other names", ""] + [entry(package, n) for n in others]
    return "\n".join(lines) + "\n"


def module_page(module: ModuleType, title: str, about: str) -> str:
    """The page of a public module that the package does not import (its names
    are the module's own ``__all__``), e.g. ``jlocalmap.testing``."""
    return _page(module, title, about, list(module.__all__))


def api_pages(package: ModuleType) -> dict[str, str]:
    """Markdown of ``api/index.md`` and every topic page, by path under docs/."""
    exported = list(package.__all__)
    pages, placed = {}, set()
    listed = []
    for path, title, about, names in GROUPS:
        names = [n for n in names if n in exported]  # a name dropped from __all__ is dropped
        placed.update(names)
        pages[path] = _page(package, title, about, names)
        listed.append((path, title, names))
    others = [n for n in exported if n not in placed]
    pages["api/index.md"] = _index(package, listed, others)
    return pages
