"""Where a value lives: its mesh and its layout, read from the value itself
(``placements_of``), and inputs committed on another mesh over the same devices
re-expressed on the local_map mesh without moving data.

Example:
    >>> import jax, numpy as np, jlocalmap as jlm
    >>> mesh = jax.make_mesh((1,), ("dp",))
    >>> x = jlm.distribute_tensor(np.arange(4.0), mesh, [jlm.Shard(0)])
    >>> jlm.placements_of(x)
    (Shard(dim=0),)
"""

from __future__ import annotations

import itertools
from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jlocalmap.errors import PlacementValueError
from jlocalmap.layouts.dtypes import dtype_of
from jlocalmap.layouts.layout import Layout
from jlocalmap.layouts.meshes import AnyMesh, check_mesh, is_explicit, same_mesh
from jlocalmap.layouts.placements import PlacementList, Replicate, Shard
from jlocalmap.layouts.specs import spec_to_placements
from jlocalmap.layouts.uneven import UnevenArray


def mesh_of(x: Any) -> Optional[AnyMesh]:
    """The mesh a distributed value lives on, or None for a host or single-device
    value. Tracers report the abstract mesh of their type."""
    if isinstance(x, UnevenArray):
        return x.mesh
    if isinstance(x, jax.core.Tracer):
        sharding = getattr(jax.typeof(x), "sharding", None)
        mesh = getattr(sharding, "mesh", None)
        return None if mesh is None or mesh.empty else mesh
    if isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding):
        return x.sharding.mesh
    return None


def known_placements(x: Any, mesh: AnyMesh) -> Optional[PlacementList]:
    """The placements of distributed ``x`` where JAX knows them: committed arrays,
    and tracers on Explicit axes. None on Auto axes under ``jax.jit``."""
    if isinstance(x, UnevenArray):
        return x.placements
    if isinstance(x, jax.core.Tracer):
        if not all(is_explicit(mesh, a) for a in mesh.axis_names):
            return None
        return spec_to_placements(jax.typeof(x).sharding.spec, mesh)
    return spec_to_placements(x.sharding.spec, mesh)


def layout_of(x: Any, mesh: Optional[AnyMesh] = None) -> Optional[Layout]:
    """The layout of distributed ``x`` (on ``mesh``, default its own), or None
    where JAX does not track it (Auto axes under ``jax.jit``)."""
    if isinstance(x, UnevenArray):
        return x.layout
    mesh = mesh_of(x) if mesh is None else mesh
    placements = known_placements(x, mesh)
    return None if placements is None else Layout.of(mesh, placements, np.shape(x), dtype_of(x))


def placements_of(x: Any, device_mesh: Optional[AnyMesh] = None) -> PlacementList:
    """The placement list of a distributed value (one entry per mesh axis).

    Unreduced axes read as ``Partial('sum')``. Raises for host values, for values
    on another mesh than ``device_mesh``, and under ``jax.jit`` on Auto axes
    (where JAX does not track shardings in types).

    Example:
        >>> import jax, numpy as np, jlocalmap as jlm
        >>> mesh = jax.make_mesh((1, 1), ("dp", "tp"))
        >>> x = jlm.distribute_tensor(np.ones((2, 2)), mesh, [jlm.Replicate(), jlm.Shard(1)])
        >>> jlm.placements_of(x)
        (Replicate(), Shard(dim=1))
    """
    return require_layout(x, device_mesh).placements


def require_layout(x: Any, device_mesh: Optional[AnyMesh] = None) -> Layout:
    """:func:`layout_of`, raising where ``x`` has none that is known."""
    mesh = mesh_of(x)
    if mesh is None:
        raise PlacementValueError(
            f"x: expected a value distributed on a mesh (a jax.Array with a "
            f"NamedSharding), found {type(x).__name__} with no mesh; place it "
            f"first with jlocalmap.distribute_tensor(x, mesh, placements).")
    if device_mesh is not None and not same_mesh(mesh, check_mesh(device_mesh)):
        raise PlacementValueError(
            f"device_mesh: x lives on {mesh}, not on the given {device_mesh}; "
            f"pass x's own mesh or move x with jax.device_put.")
    layout = layout_of(x, mesh)
    if layout is None:
        raise unknown_layout_error(mesh)
    return layout


def unknown_layout_error(mesh: AnyMesh) -> PlacementValueError:
    """The error for a value whose layout JAX does not track (Auto axes under jit)."""
    return PlacementValueError(
        f"x: its placements on Auto-axis mesh {mesh} are not known under "
        f"jax.jit; use a mesh with Explicit axes (the default of jax.make_mesh).")


def reexpress(x: Any, mesh: AnyMesh,
              preferred: Optional[PlacementList] = None) -> Optional[tuple[jax.Array, Layout]]:
    """``x``, committed on another mesh over the same devices, as an array on
    ``mesh`` with the same device-to-index map (no data moves), and its layout
    there; None when no placement list of ``mesh`` gives that map.
    ``preferred`` is tried first.

    Example:
        >>> import jax, numpy as np, jlocalmap as jlm
        >>> from jlocalmap.layouts.value_layout import reexpress
        >>> line = jax.make_mesh((4,), ("x",), devices=jax.devices()[:4])
        >>> grid = jax.make_mesh((2, 2), ("a", "b"), devices=jax.devices()[:4])
        >>> x = jlm.distribute_tensor(np.ones((8, 32)), line, [jlm.Shard(1)])
        >>> moved, layout = reexpress(x, grid)
        >>> jlm.placements_of(moved), layout.placements == jlm.placements_of(moved)
        ((Shard(dim=1), Shard(dim=1)), True)
    """
    if isinstance(x, (jax.core.Tracer, UnevenArray)) or not isinstance(mesh, Mesh):
        return None  # tracers carry no devices to compare; uneven values move whole
    if set(x.sharding.device_set) != set(mesh.devices.flat) or x.sharding.spec.unreduced:
        return None
    options = [Replicate()] + [Shard(d) for d in range(x.ndim)]
    candidates = itertools.product(options, repeat=len(mesh.axis_names))
    for placements in itertools.chain([preferred] if preferred else [], candidates):
        try:
            layout = Layout.of(mesh, placements, x.shape, x.dtype)
            if layout.is_uneven:
                continue
            sharding = NamedSharding(mesh, layout.spec)
        except PlacementValueError:
            continue
        if sharding.is_equivalent_to(x.sharding, x.ndim):
            return jax.device_put(x, sharding), layout
    return None
