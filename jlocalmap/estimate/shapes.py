"""What one device holds of a traced value: its local shape and bytes, read
from the value's type (the sharding of Explicit axes outside regions; inside a
``shard_map`` body the type is already local).

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec as P
    >>> from jlocalmap.estimate.shapes import local_bytes
    >>> mesh = AbstractMesh((2, 4), ("dp", "tp"), axis_types=(AxisType.Explicit,) * 2)
    >>> x = jax.ShapeDtypeStruct((8, 16), jnp.float32, sharding=NamedSharding(mesh, P("dp", "tp")))
    >>> [eqn] = jax.make_jaxpr(jnp.sin)(x).jaxpr.eqns
    >>> local_bytes(eqn.outvars[0].aval)
    64
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np


def _partitions(spec: Any) -> tuple:
    """A PartitionSpec's entries (iterating one with unreduced axes is refused)."""
    parts = getattr(spec, "partitions", None)
    return tuple(parts() if callable(parts) else parts if parts is not None else spec)


def entries(spec: Any, ndim: int) -> tuple:
    """A PartitionSpec as one tuple of axis names per dim (None: none)."""
    found = [() if e is None else (e,) if isinstance(e, str) else tuple(e)
             for e in (_partitions(spec) if spec is not None else ())]
    return tuple(found + [()] * (ndim - len(found)))


def spec_of(aval: Any) -> tuple:
    """The value's PartitionSpec entries as tuples of axis names, one per dim
    (empty where the type says nothing: Auto axes, no sharding)."""
    spec = getattr(getattr(aval, "sharding", None), "spec", None)
    return entries(spec, len(getattr(aval, "shape", ())))


def mesh_sizes(aval: Any) -> dict[str, int]:
    """Axis sizes of the mesh the value's type names ({} for none)."""
    mesh = getattr(getattr(aval, "sharding", None), "mesh", None)
    return dict(getattr(mesh, "shape", {}) or {})


def unreduced_axes(aval: Any) -> frozenset:
    """Mesh axes over which the value is an unreduced (Partial) sum."""
    spec = getattr(getattr(aval, "sharding", None), "spec", None)
    return frozenset(getattr(spec, "unreduced", ()) or ())


def reduced_axes(aval: Any) -> frozenset:
    """Mesh axes over which the value is replicated with a Partial gradient."""
    spec = getattr(getattr(aval, "sharding", None), "spec", None)
    return frozenset(getattr(spec, "reduced", ()) or ())


def local_shape(aval: Any, spec: Sequence[tuple] = (),
                sizes: Optional[Mapping[str, int]] = None) -> tuple:
    """One device's shape of the value (``spec``: entries to use instead of its
    own; ``sizes``: the mesh's axis sizes, where the type names no mesh)."""
    sizes = sizes or mesh_sizes(aval)
    entries = spec or spec_of(aval)
    return tuple(-(-int(d) // math.prod(sizes.get(a, 1) for a in axes))
                 for d, axes in zip(aval.shape, entries, strict=True))


def itemsize(aval: Any) -> int:
    """Bytes of one element (a bool: one byte; a token or a ref: none)."""
    dtype = getattr(aval, "dtype", None)
    if dtype is None:
        return 0
    try:
        return max(1, np.dtype(dtype).itemsize)
    except TypeError:  # extended dtypes (PRNG keys): their base array's
        return 0


def local_bytes(aval: Any, spec: Sequence[tuple] = (),
                sizes: Optional[Mapping[str, int]] = None) -> int:
    """One device's bytes of the value (arguments as :func:`local_shape`'s)."""
    if not hasattr(aval, "shape"):
        return 0
    return math.prod(local_shape(aval, spec, sizes)) * itemsize(aval)
