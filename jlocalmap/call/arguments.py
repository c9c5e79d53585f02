"""Reading a call's arguments: the flattened leaves (an ``UnevenArray`` is one
leaf), the cheap signature an eager or traced call is cached by, and each
leaf read once into a :class:`Leaf` (its mesh and layout) where a call is planned.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Optional

import jax
import numpy as np

from jlocalmap.layouts.entries import is_none
from jlocalmap.layouts.layout import Layout
from jlocalmap.layouts.meshes import AnyMesh
from jlocalmap.layouts.uneven import UnevenArray
from jlocalmap.layouts.value_layout import layout_of, mesh_of, require_layout


def is_input_leaf(x: Any) -> bool:
    return x is None or isinstance(x, UnevenArray)


@dataclasses.dataclass(frozen=True, eq=False)
class Leaf:
    """One input leaf of a call, read once where the call is planned: the value,
    the mesh it is distributed on (None: a host or single-device value) and its
    layout there (None where JAX does not track it: Auto axes under ``jax.jit``).
    The later stages read these fields, never the value's sharding again.

    Example:
        >>> import jax, numpy as np, jlocalmap as jlm
        >>> from jlocalmap.call.arguments import Leaf
        >>> mesh = jax.make_mesh((1,), ("dp",))
        >>> leaf = Leaf.read(jlm.distribute_tensor(np.ones(4, np.float32), mesh, [jlm.Shard(0)]))
        >>> print(leaf.layout), leaf.traced, Leaf.read(np.ones(2)).mesh
        f32[4] S(0) on (dp=1)
        (None, False, None)
    """

    value: Any
    mesh: Optional[AnyMesh]
    layout: Optional[Layout]

    @classmethod
    def read(cls, value: Any) -> "Leaf":
        """The record of ``value``, read from its type and sharding."""
        mesh = mesh_of(value)
        return cls(value, mesh, None if mesh is None else layout_of(value, mesh))

    @classmethod
    def placed(cls, value: Any, layout: Layout) -> "Leaf":
        """The record of a value just laid out by ``layout`` (nothing to read)."""
        return cls(value, layout.mesh, layout)

    @property
    def traced(self) -> bool:
        return isinstance(self.value, jax.core.Tracer)

    @property
    def uneven(self) -> bool:
        return isinstance(self.value, UnevenArray)

    def layout_on(self, mesh: AnyMesh) -> Optional[Layout]:
        """Its layout with ``mesh`` (the same mesh as its own, perhaps another object)."""
        if self.layout is None or self.uneven or self.layout.mesh is mesh:
            return self.layout
        return Layout.of(mesh, self.layout.placements, self.layout.shape, self.layout.dtype)

    def known_layout(self) -> Layout:
        """Its layout, raising where JAX does not track it (Auto axes under
        ``jax.jit``) or it has none (no mesh)."""
        if self.layout is None:
            return require_layout(self.value)   # raises, saying which
        return self.layout


def call_signature(leaves: Sequence[Any], in_tree, kwargs) -> Optional[tuple]:
    """A cheap key of an eager call (tree, and each leaf's type, shape, dtype and
    sharding, or value when static), or None when a leaf is a tracer or unhashable."""
    return _signature(leaves, in_tree, kwargs, traced=False)


def traced_signature(leaves: Sequence[Any], in_tree, kwargs) -> Optional[tuple]:
    """:func:`call_signature` for a call under a trace: tracers by their abstract
    value (shape, dtype, sharding, varying axes), with the trace's mesh context;
    None where a leaf is unhashable."""
    return _signature(leaves, in_tree, kwargs, traced=True)


def _leaf_key(x: Any, traced: bool) -> Optional[tuple]:
    if isinstance(x, jax.core.Tracer):
        return ("traced", jax.typeof(x)) if traced else None
    if isinstance(x, UnevenArray):
        padded = _leaf_key(x.padded, traced)
        return None if padded is None else (UnevenArray, x.layout, padded)
    if isinstance(x, jax.Array):
        return (x.shape, x.dtype, x.sharding)
    if isinstance(x, np.ndarray):
        return (np.ndarray, x.shape, x.dtype)
    return (type(x), x)


def _signature(leaves: Sequence[Any], in_tree, kwargs, traced: bool) -> Optional[tuple]:
    keys = [_leaf_key(leaf, traced) for leaf in leaves]
    if any(k is None for k in keys):
        return None
    kw_leaves, kw_tree = jax.tree_util.tree_flatten(kwargs, is_leaf=is_none)
    kw_keys = tuple(("traced", jax.typeof(v)) if traced and isinstance(v, jax.core.Tracer)
                    else (type(v), v) for v in kw_leaves)
    context = ("traced", jax.sharding.get_abstract_mesh()) if traced else ("signature",)
    key = (context, in_tree, tuple(keys), kw_tree, kw_keys)
    try:
        hash(key)
    except TypeError:  # an unhashable static leaf or keyword value (a tracer, eagerly)
        return None
    return key
