"""Inputs distributed on another mesh than the local_map's: re-expressed on
the local_map mesh where both meshes hold the same devices (no data moves),
else moved whole with ``redistribute_inputs=True``, else refused.

An input's ``in_placements`` entry is read on the local_map mesh; an entry
whose length matches the input's own mesh and not the local_map mesh is read
on the input's own mesh, as PyTorch reads it (see docs/local_map.md).

Example (an input on a line of 4 devices, its entry read on its own mesh, then
re-expressed on a 2 x 2 grid of the same devices):
    >>> import jax, numpy as np, jlocalmap as jlm
    >>> line = jax.make_mesh((4,), ("x",), devices=jax.devices()[:4])
    >>> grid = jax.make_mesh((2, 2), ("a", "b"), devices=jax.devices()[:4])
    >>> x = jlm.distribute_tensor(np.ones((8, 16)), line, [jlm.Shard(1)])
    >>> f = jlm.local_map(lambda a: 2 * a, [jlm.Shard(1), jlm.Shard(1)], ([jlm.Shard(1)],),
    ...                   device_mesh=grid)
    >>> y = f(x)
    >>> jlm.placements_of(y), float(jlm.full_tensor(y).sum())
    ((Shard(dim=1), Shard(dim=1)), 256.0)
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding

from jlocalmap.call.arguments import Leaf
from jlocalmap.errors import PlacementValueError
from jlocalmap.layouts.layout import Layout
from jlocalmap.layouts.meshes import AnyMesh, describe_mesh
from jlocalmap.layouts.placements import Placement, Replicate
from jlocalmap.layouts.specs import as_placement_list
from jlocalmap.layouts.value_layout import reexpress
from jlocalmap.movement.distribute import gather, move


def _own_mesh_entry(entry: Any, leaf_mesh: AnyMesh, mesh: AnyMesh) -> bool:
    """Whether ``entry`` is a placement list for the input's own mesh only."""
    if isinstance(entry, Placement) or not isinstance(entry, (list, tuple)):
        return False
    own, here = len(leaf_mesh.axis_names), len(mesh.axis_names)
    return len(entry) == own != here


def to_mesh(leaf: Leaf, entry: Any, mesh: AnyMesh, i: int, *,
            redistribute: bool) -> tuple[Leaf, Any]:
    """``leaf`` (distributed on another mesh) on ``mesh``, and its entry read on
    ``mesh``; raises where it cannot get there."""
    what = f"in_placements[{i}]"
    own = leaf.mesh
    assert own is not None, "to_mesh moves values distributed on a mesh"
    if _own_mesh_entry(entry, own, mesh):
        src = leaf.known_layout()
        wanted = Layout.of(own, entry, src.shape, src.dtype, what=what)
        if src.stored != wanted.stored:
            _check_may_move(i, src.placements, wanted.placements, redistribute)
            leaf = Leaf.placed(move(leaf.value, src, wanted), wanted)
        entry = None
    moved = reexpress(leaf.value, mesh,
                      None if entry is None else as_placement_list(entry, mesh, what))
    if moved is not None:
        value, layout = moved
        return Leaf.placed(value, layout), layout.placements if entry is None else entry
    if redistribute and isinstance(mesh, Mesh) and not leaf.traced:
        src = leaf.known_layout()
        whole = Layout.of(mesh, [Replicate()] * len(mesh.axis_names), src.shape, src.dtype)
        value = jax.device_put(gather(leaf.value, src), NamedSharding(mesh, whole.spec))
        return Leaf.placed(value, whole), entry
    raise PlacementValueError(_unreachable(leaf, own, mesh, i))


def _check_may_move(i: int, src, dst, redistribute: bool) -> None:
    if not redistribute:
        raise PlacementValueError(
            f"in_placements[{i}]: input {i} has placements {list(src)} on its own mesh, "
            f"but the local_map requires {list(dst)} there; set redistribute_inputs=True "
            f"to redistribute it, or call jlocalmap.redistribute(x, its_mesh, "
            f"{list(dst)}) first.")


def _unreachable(leaf: Leaf, own: AnyMesh, mesh: AnyMesh, i: int) -> str:
    where = (f"input {i} lives on {describe_mesh(own)}, but this local_map runs on "
             f"{describe_mesh(mesh)}")
    if leaf.traced:
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
