"""Uneven shards: DTensor's ``torch.chunk`` layouts, which JAX cannot hold.

JAX refuses a sharding whose mesh axes do not divide the dim. jlocalmap holds an
uneven value as an :class:`UnevenArray`: its logical shape and placements, and a
*padded* ``jax.Array`` laid out evenly, in which every device's chunk along an
uneven dim is padded at its end to the largest chunk's length. The chunk sizes
are DTensor's: ``torch.chunk`` order, ceil-sized chunks, the last ones smaller or
empty, nested in mesh order when several axes split the dim.

What a body sees for an uneven input: the padded local chunk, valid rows first,
padding rows after them (zeros). Its outputs are mapped back by dropping the
padding rows, so a body may compute row by row along an uneven dim; a body that
mixes rows (a sum over that dim, say) must mask with :func:`local_valid_size`.
jlocalmap checks this when it compiles: it runs the region on random data with
two different paddings and refuses a body whose outputs change.

Example:
    >>> import jax, numpy as np, jlocalmap as jlm
    >>> from jlocalmap.uneven import chunk_bounds
    >>> chunk_bounds(5, [2])          # 5 rows over 2 devices: 3 + 2
    [(0, 3), (3, 2)]
    >>> chunk_bounds(9, [2, 2])       # nested: 5 -> 3 + 2, 4 -> 2 + 2
    [(0, 3), (3, 2), (5, 2), (7, 2)]
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlocalmap.errors import PlacementValueError
from jlocalmap.placements import Placement, PlacementList
from jlocalmap.specs import AnyMesh, axis_sizes, normalize_dim


def chunk_bounds(size: int, splits: Sequence[int]) -> list[tuple[int, int]]:
    """(start, length) of each chunk when ``size`` is split by ``torch.chunk``
    into ``splits[0]`` parts, each of them into ``splits[1]`` parts, and so on;
    chunks are listed in row-major order of the splits (mesh order).

    Example:
        >>> from jlocalmap.uneven import chunk_bounds
        >>> chunk_bounds(9, [4])
        [(0, 3), (3, 3), (6, 3), (9, 0)]
    """
    pieces = [(0, size)]
    for n in splits:
        nxt = []
        for start, length in pieces:
            step = -(-length // n) if length else 0
            for i in range(n):
                lo = min(i * step, length)
                nxt.append((start + lo, min(step, length - lo)))
        pieces = nxt
    return pieces


def dim_splits(placements: Sequence[Placement], mesh: AnyMesh, ndim: int
               ) -> dict[int, tuple[tuple[str, ...], tuple[int, ...]]]:
    """For each sharded dim: the mesh axes splitting it and their sizes, in mesh order."""
    sizes = axis_sizes(mesh)
    out: dict[int, tuple[tuple[str, ...], tuple[int, ...]]] = {}
    for axis, p in zip(mesh.axis_names, placements):
        if p.is_shard():
            d = normalize_dim(p.dim, ndim, "placements")
            axes, ns = out.get(d, ((), ()))
            out[d] = (axes + (axis,), ns + (sizes[axis],))
    return out


def uneven_dims(shape: Sequence[int], placements: Sequence[Placement], mesh: AnyMesh,
                what: str = "placements"
                ) -> tuple[tuple[int, int, tuple[str, ...], tuple[int, ...]], ...]:
    """(dim, logical size, axes, axis sizes) of every dim that ``placements``
    split unevenly: where any chunk is shorter than the first. ``what`` names
    the argument in errors."""
    found = []
    for d, (axes, ns) in sorted(dim_splits(placements, mesh, len(shape)).items()):
        if jax.export.is_symbolic_dim(shape[d]):  # jax.export's shape polymorphism
            rest = shape[d] % math.prod(ns)
            if isinstance(rest, (int, np.integer)) and rest == 0:
                continue  # provably even
            raise PlacementValueError(
                f"{what}: dim {d} of symbolic size {shape[d]} (shape {tuple(shape)}) "
                f"is split {math.prod(ns)} ways over mesh axes {axes}, which does not "
                f"provably divide it, and uneven shards need concrete sizes. Export with "
                f"a size the split divides (a multiple of {math.prod(ns)}), or "
                f"Replicate() the dim over {axes}.")
        if shape[d] % math.prod(ns) or any(
                length != shape[d] // math.prod(ns) for _, length in chunk_bounds(shape[d], ns)):
            found.append((d, shape[d], axes, ns))
    return tuple(found)


def padded_shape(shape: Sequence[int], placements: Sequence[Placement],
                 mesh: AnyMesh, what: str = "placements") -> tuple[int, ...]:
    """The shape of the padded layout of a value of ``shape``."""
    out = list(shape)
    for d, size, _, splits in uneven_dims(shape, placements, mesh, what):
        out[d] = len(padding_index(size, splits)[0])
    return tuple(out)


@functools.lru_cache(maxsize=256)
def padding_index(size: int, splits: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(gather, valid): ``gather[p]`` is the logical row at padded position p
    (``size`` for padding); ``valid`` lists the padded positions of rows 0..size-1."""
    bounds = chunk_bounds(size, splits)
    width = max(length for _, length in bounds)
    gather = np.full(width * len(bounds), size, dtype=np.int32)
    for k, (start, length) in enumerate(bounds):
        gather[k * width:k * width + length] = np.arange(start, start + length)
    valid = np.nonzero(gather < size)[0].astype(np.int32)
    return gather, valid


def pad(x: jax.Array, dims, fill: float = 0.0) -> jax.Array:
    """The padded layout of logical ``x`` for its ``uneven_dims``."""
    for d, size, _, splits in dims:
        gather, _ = padding_index(size, splits)
        filler = jnp.full(x.shape[:d] + (1,) + x.shape[d + 1:], fill, x.dtype)
        x = jnp.take(jnp.concatenate([x, filler], axis=d), jnp.asarray(gather), axis=d)
    return x


def unpad(x: jax.Array, dims) -> jax.Array:
    """The logical value of padded ``x`` (the inverse of :func:`pad`)."""
    for d, size, _, splits in dims:
        _, valid = padding_index(size, splits)
        x = jnp.take(x, jnp.asarray(valid), axis=d)
    return x


def local_valid_size(global_size: int, axes: str | Sequence[str]) -> jax.Array:
    """Inside a local_map body: how many leading rows of this device's chunk of
    a dim of ``global_size``, split over ``axes`` (in mesh order), are real rows;
    the rest is padding. Use it to mask reductions over an uneven dim.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np, jlocalmap as jlm
        >>> from jlocalmap.uneven import local_valid_size
        >>> mesh = jax.make_mesh((2,), ("tp",))
        >>> def total(x):
        ...     rows = jnp.arange(x.shape[0]) < local_valid_size(5, "tp")
        ...     return jax.lax.psum(jnp.where(rows, x, 0).sum(), "tp")
        >>> f = jlm.local_map(total, [jlm.Replicate()], ([jlm.Shard(0)],), device_mesh=mesh)
        >>> float(f(np.arange(5.0, dtype=np.float32)))
        10.0
    """
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    sizes = tuple(jax.lax.axis_size(a) for a in axes)
    lengths = jnp.asarray([length for _, length in chunk_bounds(global_size, sizes)])
    index = 0
    for a, n in zip(axes, sizes):
        index = index * n + jax.lax.axis_index(a)
    return lengths[index]


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class UnevenArray:
    """A value laid out with uneven shards: ``padded`` (an evenly sharded
    ``jax.Array``), its logical ``shape``, ``placements`` and ``mesh``.
    ``jlocalmap.full_tensor`` gives the logical array; ``local_map`` takes and
    returns it. It is a pytree, so it passes through ``jax.jit`` and ``jax.grad``.

    Example:
        >>> import jax, numpy as np, jlocalmap as jlm
        >>> mesh = jax.make_mesh((2,), ("tp",))
        >>> x = jlm.distribute_tensor(np.arange(5.0), mesh, [jlm.Shard(0)])
        >>> x.shape, x.padded.shape
        ((5,), (6,))
    """

    padded: Any
    shape: tuple[int, ...]
    placements: PlacementList
    mesh: Any

    @property
    def dtype(self):
        return self.padded.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dims(self):
        return uneven_dims(self.shape, self.placements, self.mesh)

    def tree_flatten(self):
        return (self.padded,), (self.shape, self.placements, self.mesh)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], *aux)

    def __repr__(self) -> str:
        return (f"UnevenArray(shape={self.shape}, dtype={self.dtype}, "
                f"placements={list(self.placements)}, padded shape={self.padded.shape})")
