"""``Layout``: a value of this logical shape and dtype, placed so on this mesh.

The one place where a placement list given by a user is validated against a
mesh and a shape (DTensor's ``DTensorSpec``). Everything jlocalmap derives from
(mesh, placements, shape) is a property of the layout: its ``PartitionSpec``,
local and padded shapes, uneven dims and chunks, Partial axes, and the
placements as stored (``Partial('avg')`` is stored as its sums, a Partial on an
axis of size 1 is the replicated value).

Example:
    >>> import jax, jlocalmap as jlm
    >>> mesh = jax.sharding.AbstractMesh((2, 4), ("dp", "tp"))
    >>> layout = jlm.Layout.of(mesh, [jlm.Shard(0), jlm.Shard(-1)], (5, 8), "float32")
    >>> print(layout)
    f32[5,8] S(0)S(1) on (dp=2, tp=4)
    >>> layout.spec, layout.local_shape, layout.padded_shape
    (P('dp', 'tp'), (3, 2), (6, 8))
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import PartitionSpec

from jlocalmap._caches import LRU
from jlocalmap.layouts.chunks import UnevenDim, dim_splits, padded_shape, uneven_dims
from jlocalmap.layouts.dtypes import as_dtype, check_partial_dtype
from jlocalmap.layouts.meshes import AnyMesh, axis_sizes, check_mesh
from jlocalmap.layouts.placements import Partial, PlacementList, Replicate, compact
from jlocalmap.layouts.specs import (
    as_placement_list,
    local_shape,
    normalize_placements,
    placements_to_spec,
)

_VALIDATED: LRU = LRU(4096)   # (mesh, placements, shape, dtype) -> Layout, valid ones only


def _key(mesh: Any, placements: Any, shape: Sequence[Any], dtype: Any) -> Optional[tuple]:
    """A cache key of a layout's inputs, or None where they are not hashable."""
    try:
        key = (mesh, tuple(placements) if isinstance(placements, (list, tuple)) else placements,
               tuple(shape), None if dtype is None else as_dtype(dtype))
        hash(key)
        return key
    except TypeError:
        return None


def is_empty(shape: Sequence[Any]) -> bool:
    """Whether a value of ``shape`` has no elements (symbolic dims are not 0)."""
    return any(isinstance(n, (int, np.integer)) and n == 0 for n in shape)


@dataclasses.dataclass(frozen=True)
class Layout:
    """A validated (mesh, placements, logical shape, dtype); build it with
    :meth:`Layout.of`. Hashable: plans and caches are keyed by layouts.

    Example:
        >>> import jax, jlocalmap as jlm
            >>> mesh = jax.make_mesh((2,), ("tp",))
        >>> jlm.Layout.of(mesh, [jlm.Partial("avg")], (4,)).stored
        (Partial(sum),)
    """

    mesh: AnyMesh
    placements: PlacementList
    shape: tuple
    dtype: Any = None  # a np.dtype, or a JAX extended dtype (typed PRNG keys)

    @classmethod
    def of(cls, mesh: AnyMesh, placements: Any, shape: Sequence[Any], dtype: Any = None,
           *, what: str = "placements") -> "Layout":
        """Validate ``placements`` (one per mesh axis; Shard dims in range, Partial
        kinds JAX can hold, uneven splits of concrete sizes) for a value of
        ``shape``; ``what`` names the argument in errors."""
        key = _key(mesh, placements, shape, dtype)
        known = _VALIDATED.get(key) if key is not None else None
        if known is not None:  # every region call validates the same few layouts
            return known
        layout = cls._validate(mesh, placements, shape, dtype, what)
        if key is not None:
            _VALIDATED.put(key, layout)
        return layout

    @classmethod
    def _validate(cls, mesh: AnyMesh, placements: Any, shape: Sequence[Any], dtype: Any,
                  what: str) -> "Layout":
        mesh = check_mesh(mesh)
        shape = tuple(shape)
        placements = normalize_placements(as_placement_list(placements, mesh, what),
                                          len(shape), what)
        placements_to_spec(placements, mesh, len(shape), what=what)
        uneven = uneven_dims(shape, placements, mesh, what)
        dtype = None if dtype is None else as_dtype(dtype)
        for axis, p in zip(mesh.axis_names, placements, strict=True):
            if p.is_partial():
                check_partial_dtype(dtype, p.reduce_op, axis, what)
        layout = cls(mesh, placements, shape, dtype)
        layout.__dict__["uneven"] = uneven  # validated once, here
        return layout

    def with_placements(self, placements: Any, *, what: str = "placements") -> "Layout":
        """The same value placed otherwise."""
        return Layout.of(self.mesh, placements, self.shape, self.dtype, what=what)

    def storage(self) -> "Layout":
        """The layout of the padded value that stores this one (even)."""
        return self if not self.uneven else Layout.of(
            self.mesh, self.placements, self.padded_shape, self.dtype)

    def replicated(self) -> "Layout":
        """The same value, whole on every device."""
        return self.with_placements([Replicate()] * len(self.mesh.axis_names))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @functools.cached_property
    def spec(self) -> PartitionSpec:
        """The ``PartitionSpec`` of the (padded) stored value."""
        return placements_to_spec(self.stored, self.mesh, self.ndim)

    @functools.cached_property
    def uneven(self) -> tuple[UnevenDim, ...]:
        """(dim, logical size, axes, axis sizes) of each unevenly split dim."""
        return uneven_dims(self.shape, self.placements, self.mesh)

    @property
    def is_uneven(self) -> bool:
        return bool(self.uneven)

    @functools.cached_property
    def splits(self) -> dict:
        """For each sharded dim: the mesh axes splitting it and their sizes."""
        return dim_splits(self.placements, self.mesh, self.ndim)

    @functools.cached_property
    def padded_shape(self) -> tuple:
        """The global shape of the stored value (uneven dims padded)."""
        return padded_shape(self.shape, self.placements, self.mesh)

    @functools.cached_property
    def local_shape(self) -> tuple:
        """What one device holds (the padded chunk along uneven dims)."""
        return local_shape(self.padded_shape, self.placements, self.mesh)

    @functools.cached_property
    def chunks(self) -> tuple:
        """(axes, local length, logical size if the dim is uneven) per sharded dim."""
        sizes = {d: size for d, size, _, _ in self.uneven}
        return tuple((axes, self.padded_shape[d] // math.prod(ns), sizes.get(d))
                     for d, (axes, ns) in self.splits.items())

    @property
    def is_empty(self) -> bool:
        """A value with no elements (it carries no data)."""
        return is_empty(self.shape)

    @functools.cached_property
    def stored(self) -> PlacementList:
        """Placements as stored: ``Partial('avg')`` as ``Partial('sum')``, and a
        Partial on an axis of size 1, or of an empty value, as ``Replicate()``
        (one summand is the value; newer JAX holds no empty unreduced arrays)."""
        sizes = axis_sizes(self.mesh)
        return tuple(Replicate() if p.is_partial() and (sizes[a] == 1 or self.is_empty)
                     else Partial("sum") if p == Partial("avg") else p
                     for a, p in zip(self.mesh.axis_names, self.placements, strict=True))

    @property
    def partial_axes(self) -> tuple[str, ...]:
        """The mesh axes on which the value is stored as Partial, in mesh order."""
        return tuple(a for a, p in zip(self.mesh.axis_names, self.stored, strict=True) if p.is_partial())

    @property
    def avg_scale(self) -> int:
        """How many devices an avg-partial value is averaged over."""
        sizes = axis_sizes(self.mesh)
        return math.prod(sizes[a] for a, p in zip(self.mesh.axis_names, self.placements, strict=True)
                         if p == Partial("avg"))

    def same_storage(self, other: "Layout") -> bool:
        """Whether both layouts store the value alike (no data needs to move)."""
        return self.stored == other.stored and self.shape == other.shape

    def __str__(self) -> str:
        mesh = ", ".join(f"{a}={n}" for a, n in axis_sizes(self.mesh).items())
        dtype = "?" if self.dtype is None else jax.core.ShapedArray(
            (), self.dtype).str_short(short_dtypes=True).removesuffix("[]")
        return f"{dtype}[{','.join(map(str, self.shape))}] {compact(self.placements)} on ({mesh})"
