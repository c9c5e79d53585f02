"""Old public names kept for one release after a move or a rename: a module's
``__getattr__`` (PEP 562) serves each with a ``DeprecationWarning`` that names its
new spelling.

Example:
    >>> import warnings, jlocalmap as jlm
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     count = jlm.count_collectives
    >>> count is jlm.inspect.count_collectives, str(caught[0].message).split(";")[0]
    (True, 'jlocalmap.count_collectives is deprecated: use jlocalmap.inspect.count_collectives')
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any


def deprecated_names(module: str, new_spellings: Mapping[str, str]) -> Callable[[str], Any]:
    """The ``__getattr__`` of ``module``: ``new_spellings`` maps each old name to the
    dotted path of its new spelling (``"jlocalmap.inspect.regions"``)."""
    def __getattr__(name: str) -> Any:
        if name not in new_spellings:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        new = new_spellings[name]
        warnings.warn(f"{module}.{name} is deprecated: use {new}; the old name goes away "
                      f"in the next release.", DeprecationWarning, stacklevel=2)
        where, _, attribute = new.rpartition(".")
        return getattr(importlib.import_module(where), attribute)
    return __getattr__
