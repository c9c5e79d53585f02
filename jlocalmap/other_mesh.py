"""Inputs distributed on another mesh than the local_map's: re-expressed on
the local_map mesh where both meshes hold the same devices (no data moves),
else moved whole with ``redistribute_inputs=True``, else refused.

An input's ``in_placements`` entry is read on the local_map mesh; an entry
whose length matches the input's own mesh and not the local_map mesh is read
on the input's own mesh, as PyTorch reads it (see docs/local_map.md).

Example:
    >>> import jax, numpy as np, jlocalmap as jlm
    >>> from jlocalmap.other_mesh import to_mesh
    >>> line = jax.make_mesh((4,), ("x",), devices=jax.devices()[:4])
    >>> grid = jax.make_mesh((2, 2), ("a", "b"), devices=jax.devices()[:4])
    >>> x = jlm.distribute_tensor(np.ones((8, 16)), line, [jlm.Shard(1)])
    >>> moved, entry = to_mesh(x, [jlm.Shard(1)], grid, 0, redistribute=False)
    >>> jlm.placements_of(moved), entry
    ((Shard(dim=1), Shard(dim=1)), (Shard(dim=1), Shard(dim=1)))
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jlocalmap.distribute import full_tensor, redistribute as redistribute_value
from jlocalmap.errors import PlacementValueError
from jlocalmap.layout import Layout
from jlocalmap.meshes import AnyMesh, describe_mesh
from jlocalmap.placements import Placement
from jlocalmap.specs import as_placement_list
from jlocalmap.value_layout import mesh_of, placements_of, reexpress, require_layout


def _own_mesh_entry(entry: Any, leaf_mesh: AnyMesh, mesh: AnyMesh) -> bool:
    """Whether ``entry`` is a placement list for the input's own mesh only."""
    if isinstance(entry, Placement) or not isinstance(entry, (list, tuple)):
        return False
    own, here = len(leaf_mesh.axis_names), len(mesh.axis_names)
    return len(entry) == own != here


def to_mesh(leaf: Any, entry: Any, mesh: AnyMesh, i: int, *,
            redistribute: bool) -> tuple[Any, Any]:
    """``leaf`` (distributed on another mesh) on ``mesh``, and its entry read on
    ``mesh``; raises where it cannot get there."""
    what = f"in_placements[{i}]"
    leaf_mesh = mesh_of(leaf)
    if _own_mesh_entry(entry, leaf_mesh, mesh):
        wanted = Layout.of(leaf_mesh, entry, np.shape(leaf), what=what)
        src = require_layout(leaf)
        if src.stored != wanted.stored:
            _check_may_move(i, src.placements, wanted.placements, redistribute)
            leaf = redistribute_value(leaf, leaf_mesh, wanted.placements)
        entry = None
    moved = reexpress(leaf, mesh, None if entry is None else as_placement_list(entry, mesh, what))
    if moved is not None:
        return moved, placements_of(moved) if entry is None else entry
    if redistribute and isinstance(mesh, Mesh) and not isinstance(leaf, jax.core.Tracer):
        return jax.device_put(full_tensor(leaf), NamedSharding(mesh, PartitionSpec())), entry
    raise PlacementValueError(_unreachable(leaf, leaf_mesh, mesh, i))


def _check_may_move(i: int, src, dst, redistribute: bool) -> None:
    if not redistribute:
        raise PlacementValueError(
            f"in_placements[{i}]: input {i} has placements {list(src)} on its own mesh, "
            f"but the local_map requires {list(dst)} there; set redistribute_inputs=True "
            f"to redistribute it, or call jlocalmap.redistribute(x, its_mesh, "
            f"{list(dst)}) first.")


def _unreachable(leaf: Any, leaf_mesh: AnyMesh, mesh: AnyMesh, i: int) -> str:
    where = (f"input {i} lives on {describe_mesh(leaf_mesh)}, but this local_map runs on "
             f"{describe_mesh(mesh)}")
    if isinstance(leaf, jax.core.Tracer):
        return (f"in_placements[{i}]: {where}. Under jax.jit (or any trace) a value "
                f"carries only its abstract mesh, not its devices, so jlocalmap cannot "
                f"tell whether its layout is one of the local_map mesh's; move it before "
                f"the trace with jlocalmap.distribute_tensor(x, mesh, placements), or "
                f"build both on the same mesh.")
    if not isinstance(mesh, Mesh):
        return (f"in_placements[{i}]: {where}, an abstract mesh with no devices to "
                f"match; give the local_map a concrete mesh, or move x there first "
                f"with jlocalmap.distribute_tensor.")
    return (f"in_placements[{i}]: {where}, and its layout is no layout of that mesh's "
            f"devices (no data can stay put); move it with "
            f"jlocalmap.distribute_tensor(x, mesh, placements) or set "
            f"redistribute_inputs=True.")
