"""Public names that were renamed keep working under their old spelling, with
a ``DeprecationWarning`` that names the new one.

Example:
    >>> import warnings, jlocalmap as jlm
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     old = jlm.RegionCall
    >>> old is jlm.RegionSettings, str(caught[0].message)
    (True, 'jlocalmap.RegionCall is deprecated: use jlocalmap.RegionSettings.')
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any


def deprecated_aliases(module: str, namespace: dict, renamed: dict[str, str]
                       ) -> Callable[[str], Any]:
    """A module ``__getattr__`` that answers each old name of ``renamed``
    (old -> new) with ``namespace[new]``, warning that the name moved."""
    def __getattr__(name: str) -> Any:
        if name in renamed:
            new = renamed[name]
            warnings.warn(f"{module}.{name} is deprecated: use {module}.{new}.",
                          DeprecationWarning, stacklevel=2)
            return namespace[new]
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    return __getattr__
