"""Collective matmuls: the tensor-parallel all-gather or reduce-scatter fused with its
matmul, as a ring of ``ppermute`` steps (see the package docstring)."""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jlocalmap.collectives.functional import (
    as_array,
    group_size,
    per_device,
    ring_shift,
    tensor_dim,
)
from jlocalmap.collectives.groups import GroupLike, manual_group_axes
from jlocalmap.errors import LocalMapTypeError, LocalMapValueError


# -- collective matmuls: the collective decomposed into a ring of ppermutes, each
# step's transfer overlapping the matmul of the chunk already at hand ---------------
def _matmul_operands(x: Any, w: Any, what: str) -> tuple[jax.Array, jax.Array]:
    x, w = as_array(x), as_array(w)
    if w.ndim != 2 or x.ndim < 1 or x.shape[-1] != w.shape[0]:
        raise LocalMapValueError(
            f"{what}: expected x of shape (..., k) and w of shape (k, m) (the local "
            f"shards, contracted as x @ w), found x {x.shape} and w {w.shape}; pass a "
            f"2-D w whose first dim is x's last.")
    return x, w


def _use_bidirectional(bidirectional: Optional[bool], n: int, chunk: int, what: str) -> bool:
    """Two half-size rings in opposite directions (both directions of every
    link busy at once) pay off from 3 devices; 2 devices already exchange both ways."""
    if bidirectional is None:
        return n > 2 and chunk % 2 == 0
    if not isinstance(bidirectional, (bool, np.bool_)):
        raise LocalMapTypeError(
            f"bidirectional: expected True, False or None (automatic), found "
            f"{bidirectional!r}; pass a bool.")
    if bidirectional and chunk % 2:
        raise LocalMapValueError(
            f"bidirectional: the two rings carry half of each device's chunk, but {what} "
            f"has {chunk} rows per device, an odd number; pad it to an even size or pass "
            f"bidirectional=False.")
    return bool(bidirectional)


def all_gather_matmul(x: Any, w: Any, gather_dim: int, group: GroupLike, *,
                      bidirectional: Optional[bool] = None) -> jax.Array:
    """``all_gather_tensor(x, gather_dim, group) @ w`` with the all-gather
    decomposed into a ring of ``ppermute`` steps: while a device multiplies the
    chunk of ``x`` it holds by ``w``, it passes that chunk to its neighbour, so
    the transfer hides behind the matmul (the tensor-parallel first matmul of
    sequence-parallel Megatron: tokens sharded, ``w`` column-sharded).

    ``x`` is the local ``(..., k)`` shard, ``gather_dim`` one of its dims other
    than the last (contracted) one, ``w`` the local ``(k, m)`` matrix. The
    result is ``x``'s shape with ``gather_dim`` ``n`` times longer and the last
    dim ``m``, rows in group rank order. ``bidirectional`` sends half of each
    chunk each way round the ring (half the bytes per link per step); ``None``
    picks it from 3 devices on when the chunk splits in two. The gradient is
    JAX's derivative of the ring: the ``x`` cotangent is a matmul-reduce-scatter
    ring, ``w``'s needs no communication; both equal the plain version's. The
    result is varying over the group (assembled per device), also where
    ``w`` is replicated.

    Example:
        >>> import jax, numpy as np, jlocalmap as jlm
        >>> from jlocalmap import Shard, collectives as C
        >>> mesh = jax.make_mesh((4,), ("tp",))
        >>> f = jlm.local_map(lambda x, w: C.all_gather_matmul(x, w, 0, "tp"),
        ...                   [Shard(1)], ([Shard(0)], [Shard(1)]), device_mesh=mesh)
        >>> rng = np.random.default_rng(0)
        >>> x, w = rng.standard_normal((8, 3)), rng.standard_normal((3, 8))
        >>> bool(np.allclose(f(x, w), x @ w, atol=1e-5))
        True
    """
    x, w = _matmul_operands(x, w, "all_gather_matmul")
    dim = tensor_dim(x, gather_dim, "gather_dim")
    if dim == x.ndim - 1:
        raise LocalMapValueError(
            f"gather_dim: expected a dim of x other than its last, which x @ w "
            f"contracts, found {gather_dim!r} of x's {x.ndim} dims; gather a row dim, "
            f"or all_gather_tensor first and multiply after.")
    axes = manual_group_axes(group)
    n, size = group_size(axes), x.shape[dim]
    if n == 1:
        return jnp.matmul(x, w)
    two_way = _use_bidirectional(bidirectional, n, size, "x")
    rank = jax.lax.axis_index(axes)
    x = per_device(x, axes)
    out_shape = x.shape[:dim] + (n * size,) + x.shape[dim + 1:-1] + (w.shape[1],)
    out = jnp.zeros(out_shape, jnp.result_type(x, w))
    # Each ring: (chunk held, direction, offset of the chunk's rows in a device's block).
    half = size // 2
    rings = ([(jax.lax.slice_in_dim(x, 0, half, axis=dim), 1, 0),
              (jax.lax.slice_in_dim(x, half, size, axis=dim), -1, half)]
             if two_way else [(x, 1, 0)])
    for step in range(n):
        moved = []
        for chunk, direction, offset in rings:
            if step < n - 1:  # sent before this step's matmul needs nothing of it
                moved.append((ring_shift(chunk, direction, axes), direction, offset))
            source = (rank - direction * step) % n  # whose chunk this is
            out = jax.lax.dynamic_update_slice_in_dim(
                out, jnp.matmul(chunk, w).astype(out.dtype), source * size + offset, dim)
        rings = moved
    return out


def matmul_reduce_scatter(x: Any, w: Any, scatter_dim: int, group: GroupLike, *,
                          bidirectional: Optional[bool] = None) -> jax.Array:
    """``reduce_scatter_tensor(x @ w, "sum", scatter_dim, group)`` with the
    reduce-scatter decomposed into a ring of ``ppermute`` steps: each device
    computes the partial product of one chunk at a time, adds it to the running
    sum it received, and passes the sum on, so the transfer of one chunk hides
    behind the matmul of the next (the tensor-parallel second matmul of
    sequence-parallel Megatron: ``x`` and ``w`` sharded on the contracted dim).

    ``x`` is the local ``(..., k)`` shard and ``w`` the local ``(k, m)``; each
    device's ``x @ w`` is its summand of the whole product, and device ``r`` gets
    the ``r``-th of ``n`` equal chunks of the sum along ``scatter_dim`` (a dim of
    the result, the last one included: then ``w``'s columns are chunked).
    ``bidirectional`` runs two half-size rings in opposite directions; ``None``
    picks it from 3 devices on when the chunk splits in two. The gradient is
    JAX's derivative of the ring (an all-gather-matmul ring for ``x``'s
    cotangent) and equals the plain version's.

    Example:
        >>> import jax, numpy as np, jlocalmap as jlm
        >>> from jlocalmap import Shard, collectives as C
        >>> mesh = jax.make_mesh((4,), ("tp",))
        >>> f = jlm.local_map(lambda h, w: C.matmul_reduce_scatter(h, w, 0, "tp"),
        ...                   [Shard(0)], ([Shard(1)], [Shard(0)]), device_mesh=mesh)
        >>> rng = np.random.default_rng(0)
        >>> h, w = rng.standard_normal((8, 12)), rng.standard_normal((12, 3))
        >>> bool(np.allclose(f(h, w), h @ w, atol=1e-5))
        True
    """
    x, w = _matmul_operands(x, w, "matmul_reduce_scatter")
    out_ndim = x.ndim
    if isinstance(scatter_dim, bool) or not isinstance(scatter_dim, int) \
            or not -out_ndim <= scatter_dim < out_ndim:
        raise LocalMapValueError(
            f"scatter_dim: expected a dim of the product x @ w of shape "
            f"{x.shape[:-1] + (w.shape[1],)} (an int in {-out_ndim}..{out_ndim - 1}), "
            f"found {scatter_dim!r}; pick an existing dim.")
    dim = scatter_dim % out_ndim
    axes = manual_group_axes(group)
    n = group_size(axes)
    full = x.shape[:-1] + (w.shape[1],)
    if full[dim] % n:
        raise LocalMapValueError(
            f"scatter_dim: dim {dim} of the product x @ w of shape {full} has size "
            f"{full[dim]}, which does not split into {n} equal chunks, one per device "
            f"of the group; pad it to a multiple of {n}.")
    if n == 1:
        return jnp.matmul(x, w)
    size = full[dim] // n
    two_way = _use_bidirectional(bidirectional, n, size, "each chunk of the product")
    rank = jax.lax.axis_index(axes)
    x = per_device(x, axes)
    on_columns = dim == out_ndim - 1

    def summand(chunk: jax.Array, offset: int, length: int) -> jax.Array:
        """This device's summand of rows [start, start + length) of chunk ``chunk``."""
        start = chunk * size + offset
        if on_columns:
            return jnp.matmul(x, jax.lax.dynamic_slice_in_dim(w, start, length, 1))
        return jnp.matmul(jax.lax.dynamic_slice_in_dim(x, start, length, dim), w)

    half = size // 2
    rings = [(1, 0, half), (-1, half, size - half)] if two_way else [(1, 0, size)]
    sums = []
    for direction, offset, length in rings:
        # The sum device r holds at step s belongs to chunk r - direction * (s + 1):
        # at the last step, r's own.
        acc = summand((rank - direction) % n, offset, length)
        for step in range(1, n):
            acc = ring_shift(acc, direction, axes) + summand(
                (rank - direction * (step + 1)) % n, offset, length)
        sums.append(acc)
    return jnp.concatenate(sums, axis=dim) if two_way else sums[0]
