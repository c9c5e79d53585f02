"""``Settings``: the arguments of one ``local_map(...)``, checked once when it
is built and read by every stage of a call.

Example:
    >>> import jax, jlocalmap as jlm
    >>> from jlocalmap.call.settings import Settings
    >>> Settings.of(abs, [jlm.Replicate()], None, None, None, False, True).func_name
    'abs'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Optional

import numpy as np

from jlocalmap.errors import LocalMapTypeError
from jlocalmap.layouts.meshes import AnyMesh, check_mesh


@dataclasses.dataclass(frozen=True, eq=False)
class Settings:
    """What ``local_map`` was given (placement arguments as the user wrote them)."""
    func: Callable
    out_placements: Any
    in_placements: Any
    in_grad_placements: Any
    device_mesh: Optional[AnyMesh]
    redistribute_inputs: bool
    check_vma: bool
    name: Optional[str] = None      # the region's name; None: the function's
    check_padding: bool = False     # also run the body on two paddings (call.padding.check)

    @classmethod
    def of(cls, func: Any, out_placements: Any, in_placements: Any, in_grad_placements: Any,
           device_mesh: Any, redistribute_inputs: Any, check_vma: Any,
           name: Optional[str] = None, check_padding: Any = False) -> "Settings":
        """Check the arguments that need no call to check."""
        if not callable(func):
            raise LocalMapTypeError(
                f"func: expected a callable to run on local shards, found "
                f"{type(func).__name__}; pass a function, or call local_map without "
                f"func to get a decorator.")
        if device_mesh is not None:
            check_mesh(device_mesh)
        for what, flag in (("redistribute_inputs", redistribute_inputs),
                           ("check_vma", check_vma), ("check_padding", check_padding)):
            if not isinstance(flag, (bool, np.bool_)):
                raise LocalMapTypeError(
                    f"{what}: expected True or False, found {flag!r} of type "
                    f"{type(flag).__name__}; pass a bool.")
        if name is not None and (not isinstance(name, str) or not name or
                                 set(name) & set("[]()#")):
            raise LocalMapTypeError(
                f"name: expected a non-empty str without brackets or '#' to name the region, "
                f"found {name!r}; pass e.g. name=\"attention\", or leave it out to use the "
                f"function's name.")
        return cls(func, out_placements, in_placements, in_grad_placements, device_mesh,
                   bool(redistribute_inputs), bool(check_vma), name, bool(check_padding))

    @property
    def func_name(self) -> str:
        """The region's name: ``name`` where given, else the function's."""
        if self.name is not None:
            return self.name
        return getattr(self.func, "__name__", type(self.func).__name__)
