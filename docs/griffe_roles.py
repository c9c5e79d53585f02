r"""jlocalmap's docstrings, made readable for mkdocstrings' Google-style parser.

Three rewrites, done by this griffe extension (listed under the Python handler's
``extensions`` in mkdocs.yml) before a docstring is parsed:

- ``Example:`` becomes ``Examples:``: griffe renders an ``Examples`` section's
  ``>>>`` lines as highlighted code, and would read ``Example:`` as a generic
  admonition whose doctest output is then parsed as Markdown (brackets become
  broken links).
- Sphinx roles. The docstrings say ``:class:`Shard``` and ``:func:`~jlocalmap.layouts.uneven.pad```
  (reStructuredText), which Markdown would show as the literal text ``:class:``.
  A name that jlocalmap exports becomes a link to its API entry
  (``[`Shard`][jlocalmap.Shard]``), any other name plain code. Links go to the
  public path, so moving a definition between internal modules changes nothing.
- reStructuredText's escaped space after inline code (``ShapeDtypeStruct``\ s,
  a plural) is dropped; Markdown would show the backslash.

Example:
    >>> convert_example_header("Example:\n    >>> 1")
    'Examples:\n    >>> 1'
    >>> convert_roles("see :class:`~jlocalmap.layouts.uneven.UnevenArray` and :func:`pad`",
    ...               {"UnevenArray"})
    'see [`UnevenArray`][jlocalmap.UnevenArray] and `pad`'
    >>> convert_roles("``Region``\\ s", ())
    '``Region``s'
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):`(~?)([\w.]+)`")


def convert_roles(text: str, public_names: Iterable[str] | Mapping[str, str]) -> str:
    """``text`` with every Sphinx role replaced by an API link or inline code
    (``~`` shows the last component of the name, as in Sphinx). ``public_names``:
    top-level names, or a mapping of names to their public paths."""
    public = (dict(public_names) if isinstance(public_names, Mapping)
              else {n: f"jlocalmap.{n}" for n in public_names})

    def replace(match: re.Match) -> str:
        tilde, target = match.groups()
        short = target.rsplit(".", 1)[-1]
        shown = short if tilde else target
        if short in public and (target == short or target.startswith("jlocalmap.")):
            return f"[`{shown}`][{public[short]}]"
        return f"`{shown}`"
    return _ROLE.sub(replace, text).replace("`\\ ", "`")


_EXAMPLE_HEADER = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)


def convert_example_header(text: str) -> str:
    """``Example:`` section headers renamed ``Examples:`` (griffe's examples section)."""
    return _EXAMPLE_HEADER.sub(r"\1Examples:", text)


def _public_names() -> dict[str, str]:
    # The public names are read from the package itself, so they cannot drift: the
    # top level's, then its namespaces' (jlocalmap.inspect.regions, ...).
    import jlocalmap
    public = {n: f"jlocalmap.{n}" for n in jlocalmap.__all__}
    for namespace in (jlocalmap.inspect, jlocalmap.strategies):
        public.update({n: f"{namespace.__name__}.{n}" for n in namespace.__all__
                       if n not in public})
    return public


class MarkdownDocstrings(griffe.Extension):
    """Rewrite every jlocalmap docstring (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._public: dict[str, str] | None = None

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is None or not obj.path.startswith("jlocalmap"):
            return
        if self._public is None:
            self._public = _public_names()
        obj.docstring.value = convert_example_header(
            convert_roles(obj.docstring.value, self._public))
