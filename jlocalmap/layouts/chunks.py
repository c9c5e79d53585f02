"""The chunk arithmetic of DTensor's uneven shards: ``torch.chunk`` order,
ceil-sized chunks, the last ones smaller or empty, nested in mesh order when
several mesh axes split one dim. Pure functions of shapes and placements.

Example:
    >>> from jlocalmap.layouts.chunks import chunk_bounds
    >>> chunk_bounds(5, [2])          # 5 rows over 2 devices: 3 + 2
    [(0, 3), (3, 2)]
    >>> chunk_bounds(9, [2, 2])       # nested: 5 -> 3 + 2, 4 -> 2 + 2
    [(0, 3), (3, 2), (5, 2), (7, 2)]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np

from jlocalmap._caches import cached
from jlocalmap.errors import PlacementValueError
from jlocalmap.layouts.meshes import AnyMesh, axis_sizes
from jlocalmap.layouts.placements import Placement, Shard
from jlocalmap.layouts.specs import normalize_dim

UnevenDim = tuple  # (dim, logical size, mesh axes, axis sizes)


def chunk_bounds(size: int, splits: Sequence[int]) -> list[tuple[int, int]]:
    """(start, length) of each chunk when ``size`` is split by ``torch.chunk``
    into ``splits[0]`` parts, each of them into ``splits[1]`` parts, and so on;
    chunks are listed in row-major order of the splits (mesh order).

    Example:
        >>> from jlocalmap.layouts.chunks import chunk_bounds
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
    for axis, p in zip(mesh.axis_names, placements, strict=True):
        if isinstance(p, Shard):
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


@cached(256)
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
