"""Laying a call's global arguments out on a mesh: ``placements`` of
:func:`~jlocalmap.testing.assert_matches_unsharded`.

Example:
    >>> import jax, numpy as np, jlocalmap as jlm
    >>> from jlocalmap.testing.layout_args import lay_out
    >>> mesh = jax.make_mesh((2,), ("tp",))
    >>> x, params = lay_out((np.ones((4, 2)), {"w": np.ones(2), "n": 3}),
    ...                     ([jlm.Shard(0)], [jlm.Replicate()]), mesh)
    >>> jlm.placements_of(x), jlm.placements_of(params["w"]), params["n"]
    ((Shard(dim=0),), (Replicate(),), 3)
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh

import jlocalmap as jlm
from jlocalmap.layouts.entries import is_placement_list

_HOST_OR_DEVICE = (jax.Array, np.ndarray)


def is_uneven(x: Any) -> bool:
    """An :class:`~jlocalmap.UnevenArray` is one value, not a pytree of its storage."""
    return isinstance(x, jlm.UnevenArray)


def _is_entry(p: Any) -> bool:
    return p is None or is_placement_list(p)


def lay_out(args: tuple, placements: Any, mesh: Optional[Mesh]) -> tuple:
    """``args`` with every array leaf distributed by its ``placements`` entry:
    one per argument (a placement list, ``None``: as it is, or a pytree of these
    matching the argument), or one placement list for all. Non-array leaves and
    values distributed already pass as they are."""
    if placements is None:
        return args
    if mesh is None:
        raise jlm.LocalMapValueError(
            "mesh: expected the mesh to lay the arguments out on, found None; pass "
            "mesh=... with placements=...")
    if is_placement_list(placements):
        placements = (placements,) * len(args)
    if not isinstance(placements, (list, tuple)) or len(placements) != len(args):
        count = len(placements) if isinstance(placements, (list, tuple)) else "no sequence"
        raise jlm.PlacementValueError(
            f"placements: expected one entry per argument ({len(args)}), found {count}: "
            f"{placements!r}; give a placement list or None for each argument.")
    try:
        return tuple(jax.tree.map(lambda p, arg: _distribute(arg, p, mesh), tuple(placements),
                                  args, is_leaf=_is_entry))
    except ValueError as e:
        raise jlm.PlacementValueError(
            f"placements: expected, for each argument, a placement list, None or a "
            f"pytree of these matching the argument; {e}") from None


def _distribute(arg: Any, placements: Optional[list], mesh: Mesh) -> Any:
    if placements is None:
        return arg
    return jax.tree.map(
        lambda leaf: (jlm.distribute_tensor(leaf, mesh, placements)
                      if isinstance(leaf, _HOST_OR_DEVICE) else leaf), arg, is_leaf=is_uneven)
