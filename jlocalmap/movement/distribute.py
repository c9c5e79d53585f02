"""DTensor's layout calls: ``distribute_tensor`` (lay a global value out),
``redistribute`` (change a distributed value's placements) and ``full_tensor``
(the global value, replicated). Eager or under ``jax.jit`` alike.

Example:
    >>> import jax, numpy as np, jlocalmap as jlm
    >>> mesh = jax.make_mesh((2,), ("dp",))
    >>> x = jlm.distribute_tensor(np.arange(4.0), mesh, [jlm.Shard(0)])
    >>> np.asarray(jlm.full_tensor(jlm.redistribute(x, mesh, [jlm.Replicate()]))).tolist()
    [0.0, 1.0, 2.0, 3.0]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jlocalmap.errors import PlacementTypeError
from jlocalmap.layouts.dtypes import dtype_of
from jlocalmap.layouts.layout import Layout
from jlocalmap.layouts.meshes import AnyMesh, check_mesh
from jlocalmap.layouts.placements import Placement
from jlocalmap.layouts.uneven import UnevenArray, pad, unpad
from jlocalmap.layouts.value_layout import mesh_of, require_layout
from jlocalmap.movement.relayout import run_relayout


def distribute_tensor(x: Any, device_mesh: AnyMesh,
                      placements: Sequence[Placement]) -> jax.Array:
    """Lay the global value ``x`` (host array, number or jax.Array) out on
    ``device_mesh`` with ``placements``; works eagerly and under ``jax.jit``.

    ``Partial('sum')`` splits the value (each device holds ``x / n``), as DTensor does.
    Shards that do not divide evenly give an :class:`~jlocalmap.layouts.uneven.UnevenArray`
    with DTensor's chunk sizes (see docs/uneven.md).

    Example:
        >>> import jax, numpy as np, jlocalmap as jlm
        >>> mesh = jax.make_mesh((1,), ("dp",))
        >>> x = jlm.distribute_tensor(np.arange(6.0).reshape(3, 2), mesh, [jlm.Shard(1)])
        >>> x.shape, x.sharding.spec
        ((3, 2), P(None, 'dp'))
    """
    layout = Layout.of(check_mesh(device_mesh), placements, np.shape(x), dtype_of(x))
    return place(full_tensor(x) if mesh_of(x) is not None else x, layout)


def place(x: Any, layout: Layout) -> Any:
    """Global value ``x`` stored by ``layout`` (an UnevenArray where it is uneven)."""
    if layout.is_uneven:
        padded = pad(jnp.asarray(x), layout)
        return UnevenArray(run_relayout(padded, None, layout.storage()), layout)
    return run_relayout(x, None, layout)


def redistribute(x: Any, device_mesh: Optional[AnyMesh],
                 placements: Sequence[Placement]) -> jax.Array:
    """Change the layout of distributed ``x`` to ``placements`` on its mesh:
    Partial -> Replicate is an all-reduce, Partial -> Shard a reduce-scatter,
    Shard -> Replicate an all-gather, Replicate -> Shard a local slice.

    Example:
        >>> import jax, numpy as np, jlocalmap as jlm
        >>> mesh = jax.make_mesh((1,), ("dp",))
        >>> x = jlm.distribute_tensor(np.ones((2, 2)), mesh, [jlm.Shard(0)])
        >>> jlm.placements_of(jlm.redistribute(x, mesh, [jlm.Replicate()]))
        (Replicate(),)
    """
    src = require_layout(x, device_mesh)
    return move(x, src, src.with_placements(placements))


def move(x: Any, src: Layout, dst: Layout) -> Any:
    """Distributed ``x``, laid out by ``src``, laid out by ``dst`` (same mesh)."""
    if isinstance(x, UnevenArray) or dst.is_uneven:
        if isinstance(x, UnevenArray) and src.same_storage(dst):
            return x
        return place(gather(x, src), dst)
    return run_relayout(x, src, dst)


def full_tensor(x: Any) -> jax.Array:
    """The global value of ``x``, replicated on its mesh: Partial axes are reduced,
    shards gathered. Host values are returned as jax arrays unchanged.

    Example:
        >>> import jax, numpy as np, jlocalmap as jlm
        >>> mesh = jax.make_mesh((1,), ("dp",))
        >>> x = jlm.distribute_tensor(np.arange(4.0), mesh, [jlm.Partial()])
        >>> np.asarray(jlm.full_tensor(x)).tolist()
        [0.0, 1.0, 2.0, 3.0]
    """
    if mesh_of(x) is None:
        if not isinstance(x, (jax.Array, np.ndarray, np.generic, int, float, complex, bool)):
            raise PlacementTypeError(
                f"x: expected an array, found {type(x).__name__}; full_tensor takes "
                f"what local_map or distribute_tensor returned.")
        return jnp.asarray(x)
    return gather(x, require_layout(x))


def gather(x: Any, src: Layout) -> jax.Array:
    """The global value of distributed ``x``, laid out by ``src``, replicated."""
    if isinstance(x, UnevenArray):
        storage = x.layout.storage()
        return unpad(run_relayout(x.padded, storage, storage.replicated()), x.layout)
    return run_relayout(x, src, src.replicated())
