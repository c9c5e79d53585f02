"""Functional collectives for ``local_map`` bodies: the counterpart of torch's
``torch.distributed._functional_collectives``, on ``jax.lax``.

Each takes a local array and a ``group`` (see :mod:`jlocalmap.groups`) and must
run inside a ``local_map`` body (or ``jax.shard_map``). The values follow torch:
every device contributes its own local value, so a value that is invariant
(the same on every device of the group) counts once per device, e.g.
``all_reduce(x, "sum", group)`` of a replicated ``x`` is ``n * x``.

Gradients follow JAX's varying-axes typing, not torch's autograd formulas, and
equal the unsharded computation: the backward of ``all_reduce`` does not
all-reduce again (torch's does, giving 2x gradients in the Megatron MLP), and
``all_gather_tensor`` returns a replicated (invariant) value whose backward
takes each device's slice instead of torch's reduce-scatter.

``all_gather_matmul`` and ``matmul_reduce_scatter`` are the tensor-parallel
collective fused with its matmul, as a ring of ``ppermute`` steps that overlap
the transfers with the chunked matmul (docs/collectives.md compares them with
XLA's own windowed einsum).

Example:
    >>> import jax, numpy as np, jlocalmap as jlm
    >>> from jlocalmap import Replicate, Shard, collectives
    >>> mesh = jax.make_mesh((2,), ("tp",))
    >>> f = jlm.local_map(lambda x: collectives.all_reduce(x, "sum", mesh),
    ...                   [Replicate()], ([Shard(0)],), device_mesh=mesh)
    >>> np.asarray(f(np.array([1.0, 2.0, 3.0, 4.0]))).tolist()
    [4.0, 6.0]
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jlocalmap._jax_compat import varying_axes
from jlocalmap.errors import PlacementTypeError, PlacementValueError
from jlocalmap.groups import GroupLike, manual_group_axes
from jlocalmap.specs import axis_sizes

REDUCE_OPS: tuple[str, ...] = ("sum", "avg", "max", "min")


def _array(x: Any) -> jax.Array:
    if not isinstance(x, (jax.Array, np.ndarray, np.generic, int, float, complex)):
        raise PlacementTypeError(
            f"x: expected the local array of a local_map body, found "
            f"{type(x).__name__}; pass an array.")
    return jnp.asarray(x)


def _reduce_op(reduce_op: Any) -> str:
    op = reduce_op.lower() if isinstance(reduce_op, str) else reduce_op
    if op in REDUCE_OPS:
        return op
    hint = ("JAX has no product all-reduce (jax.lax has psum, pmean, pmax and pmin); "
            "gather with all_gather_tensor and take jnp.prod over the gathered dim"
            if op == "product" else f"write e.g. {REDUCE_OPS[0]!r}")
    raise PlacementValueError(
        f"reduce_op: expected one of {REDUCE_OPS}, found {reduce_op!r}; {hint}.")


def _dim(x: jax.Array, dim: Any, what: str) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.ndim <= dim < x.ndim:
        raise PlacementValueError(
            f"{what}: expected a dim of the local array of shape {x.shape} (an int "
            f"in {-x.ndim}..{x.ndim - 1}), found {dim!r}; pick an existing dim.")
    return dim % x.ndim


def _group_size(axes: tuple[str, ...]) -> int:
    sizes = axis_sizes(jax.sharding.get_abstract_mesh())
    return math.prod(sizes[a] for a in axes)


def _divisible(x: jax.Array, dim: int, n: int, what: str) -> None:
    if x.shape[dim] % n:
        raise PlacementValueError(
            f"{what}: dim {dim} of the local array of shape {x.shape} has size "
            f"{x.shape[dim]}, which does not split into {n} equal chunks, one per "
            f"device of the group; pad it to a multiple of {n}.")


def _per_device(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """``x`` typed as varying over ``axes``: an invariant value then counts once
    per device (torch's semantics), and its cotangent is summed over them."""
    invariant = tuple(a for a in axes if a not in varying_axes(x))
    return jax.lax.pcast(x, invariant, to="varying") if invariant else x


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _extremum(op: str, axes: tuple[str, ...], x: jax.Array) -> jax.Array:
    return (jax.lax.pmax if op == "max" else jax.lax.pmin)(x, axes)


@_extremum.defjvp
def _extremum_jvp(op, axes, primals, tangents):
    # JAX has no derivative of pmax/pmin: the tangent comes from the devices that
    # hold the extremum, shared equally between ties, as jnp.max does locally.
    (x,), (t,) = primals, tangents
    y = _extremum(op, axes, x)
    holders = x == y
    count = jax.lax.psum(holders.astype(t.dtype), axes)
    return y, jax.lax.psum(jnp.where(holders, t, jnp.zeros_like(t)), axes) / count


def _reduce(x: jax.Array, op: str, axes: tuple[str, ...]) -> jax.Array:
    if op == "sum":
        return jax.lax.psum(x, axes)
    if op == "avg":
        return jax.lax.pmean(x, axes)
    return _extremum(op, axes, x)


def all_reduce(x: Any, reduce_op: str, group: GroupLike) -> jax.Array:
    """Reduce the local values of every device in ``group`` with ``reduce_op``
    (``"sum"``, ``"avg"``, ``"max"`` or ``"min"``); every device gets the result,
    which is invariant (replicated) over the group. ``psum``/``pmean``/``pmax``/
    ``pmin``. Torch's ``"product"`` has no JAX collective and raises.

    Example:
        >>> import jax, numpy as np, jlocalmap as jlm
        >>> from jlocalmap import Replicate, Shard
        >>> mesh = jax.make_mesh((2, 4), ("dp", "tp"))
        >>> f = jlm.local_map(lambda x: jlm.collectives.all_reduce(x, "max", (mesh, "tp")),
        ...                   [Shard(0), Replicate()], ([Shard(0), Shard(0)],), device_mesh=mesh)
        >>> np.asarray(f(np.arange(8.0))).tolist()
        [3.0, 7.0]
    """
    op = _reduce_op(reduce_op)
    axes = manual_group_axes(group)
    return _reduce(_per_device(_array(x), axes), op, axes)


def all_gather_tensor(x: Any, gather_dim: int, group: GroupLike) -> jax.Array:
    """Concatenate the local values of the devices in ``group`` along
    ``gather_dim``, in group rank order; every device gets the result, invariant
    over the group (``jax.lax.all_gather(tiled=True, to="invarying")``). Its
    backward takes each device's slice of the cotangent.

    Example:
        >>> import jax, numpy as np, jlocalmap as jlm
        >>> from jlocalmap import Replicate, Shard
        >>> mesh = jax.make_mesh((4,), ("tp",))
        >>> f = jlm.local_map(lambda x: jlm.collectives.all_gather_tensor(x, 1, mesh),
        ...                   [Replicate()], ([Shard(0)],), device_mesh=mesh)
        >>> np.asarray(f(np.arange(8.0).reshape(4, 2))).tolist()
        [[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]]
    """
    x = _array(x)
    dim = _dim(x, gather_dim, "gather_dim")
    axes = manual_group_axes(group)
    return jax.lax.all_gather(_per_device(x, axes), axes, axis=dim, tiled=True, to="invarying")


def reduce_scatter_tensor(x: Any, reduce_op: str, scatter_dim: int,
                          group: GroupLike) -> jax.Array:
    """Reduce the local values of the devices in ``group`` with ``reduce_op``
    and give device ``r`` (its rank in the group) the ``r``-th of ``n`` equal
    chunks along ``scatter_dim``. Sum and avg are a ``psum_scatter``; max and min
    have no JAX reduce-scatter, so they all-reduce and slice.

    Example:
        >>> import jax, numpy as np, jlocalmap as jlm
        >>> from jlocalmap import Shard
        >>> mesh = jax.make_mesh((2,), ("tp",))
        >>> f = jlm.local_map(lambda x: jlm.collectives.reduce_scatter_tensor(x, "sum", 1, mesh),
        ...                   [Shard(1)], ([Shard(0)],), device_mesh=mesh)
        >>> np.asarray(f(np.arange(8.0).reshape(2, 4))).tolist()
        [[4.0, 6.0, 8.0, 10.0]]
    """
    op = _reduce_op(reduce_op)
    x = _array(x)
    dim = _dim(x, scatter_dim, "scatter_dim")
    axes = manual_group_axes(group)
    n = _group_size(axes)
    _divisible(x, dim, n, "scatter_dim")
    x = _per_device(x, axes)
    if op in ("sum", "avg"):
        y = jax.lax.psum_scatter(x, axes, scatter_dimension=dim, tiled=True)
        return y / jnp.asarray(n, y.dtype) if op == "avg" else y
    size = x.shape[dim] // n
    return jax.lax.dynamic_slice_in_dim(_reduce(x, op, axes),
                                        jax.lax.axis_index(axes) * size, size, dim)


def all_to_all_single(x: Any, split_dim: int, concat_dim: int,
                      group: GroupLike) -> jax.Array:
    """Split the local value into ``n`` equal chunks along ``split_dim``, send
    chunk ``j`` to the device of rank ``j`` in ``group``, and concatenate the
    chunks received along ``concat_dim`` in sender rank order
    (``jax.lax.all_to_all(tiled=True)``). Torch's ``all_to_all_single`` with
    equal splits is ``split_dim=0, concat_dim=0``; other dims reshard in one step,
    e.g. ``Shard(0) -> Shard(1)`` is ``split_dim=1, concat_dim=0``.

    Example:
        >>> import jax, numpy as np, jlocalmap as jlm
        >>> from jlocalmap import Shard
        >>> mesh = jax.make_mesh((2,), ("tp",))
        >>> f = jlm.local_map(lambda x: jlm.collectives.all_to_all_single(x, 1, 0, mesh),
        ...                   [Shard(1)], ([Shard(0)],), device_mesh=mesh)
        >>> x = np.arange(8.0).reshape(2, 4)
        >>> bool((np.asarray(f(x)) == x).all())
        True
    """
    x = _array(x)
    split = _dim(x, split_dim, "split_dim")
    concat = _dim(x, concat_dim, "concat_dim")
    axes = manual_group_axes(group)
    _divisible(x, split, _group_size(axes), "split_dim")
    return jax.lax.all_to_all(_per_device(x, axes), axes, split, concat, tiled=True)


def permute(x: Any, shift: int, group: GroupLike) -> jax.Array:
    """Ring shift: the device of rank ``i`` in ``group`` sends its local value to
    rank ``(i + shift) % n``, so rank ``r`` receives rank ``r - shift``'s
    (``jax.lax.ppermute``; torch's ``permute_tensor`` with that ring).

    Example:
        >>> import jax, numpy as np, jlocalmap as jlm
        >>> from jlocalmap import Shard
        >>> mesh = jax.make_mesh((4,), ("tp",))
        >>> f = jlm.local_map(lambda x: jlm.collectives.permute(x, 1, mesh),
        ...                   [Shard(0)], ([Shard(0)],), device_mesh=mesh)
        >>> np.asarray(f(np.arange(4.0))).tolist()
        [3.0, 0.0, 1.0, 2.0]
    """
    if isinstance(shift, bool) or not isinstance(shift, int):
        raise PlacementTypeError(
            f"shift: expected an int number of ranks to send along the ring, found "
            f"{shift!r}; write e.g. permute(x, 1, group).")
    x = _array(x)
    axes = manual_group_axes(group)
    return _ring_shift(_per_device(x, axes), shift, axes)


def _ring_shift(x: jax.Array, shift: int, axes: tuple[str, ...]) -> jax.Array:
    """Rank ``i`` of the group over ``axes`` sends ``x`` to rank ``(i + shift) % n``."""
    mesh = jax.sharding.get_abstract_mesh()
    # jax.lax.ppermute numbers the devices of several axes in mesh order whatever
    # the order of the axes given (jax 0.10; axis_index and all_gather use the
    # given order), so rank i is renumbered, and the axes passed in mesh order.
    in_mesh_order = tuple(sorted(axes, key=mesh.axis_names.index))
    sizes = axis_sizes(mesh)
    n = _group_size(axes)

    def renumber(rank: int) -> int:
        coords = dict(zip(axes, np.unravel_index(rank, [sizes[a] for a in axes])))
        return int(np.ravel_multi_index([coords[a] for a in in_mesh_order],
                                        [sizes[a] for a in in_mesh_order]))

    return jax.lax.ppermute(x, in_mesh_order,
                            [(renumber(i), renumber((i + shift) % n)) for i in range(n)])


# -- collective matmuls: the collective decomposed into a ring of ppermutes, each
# step's transfer overlapping the matmul of the chunk already at hand ---------------
def _matmul_operands(x: Any, w: Any, what: str) -> tuple[jax.Array, jax.Array]:
    x, w = _array(x), _array(w)
    if w.ndim != 2 or x.ndim < 1 or x.shape[-1] != w.shape[0]:
        raise PlacementValueError(
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
        raise PlacementTypeError(
            f"bidirectional: expected True, False or None (automatic), found "
            f"{bidirectional!r}; pass a bool.")
    if bidirectional and chunk % 2:
        raise PlacementValueError(
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
    dim = _dim(x, gather_dim, "gather_dim")
    if dim == x.ndim - 1:
        raise PlacementValueError(
            f"gather_dim: expected a dim of x other than its last, which x @ w "
            f"contracts, found {gather_dim!r} of x's {x.ndim} dims; gather a row dim, "
            f"or all_gather_tensor first and multiply after.")
    axes = manual_group_axes(group)
    n, size = _group_size(axes), x.shape[dim]
    if n == 1:
        return jnp.matmul(x, w)
    two_way = _use_bidirectional(bidirectional, n, size, "x")
    rank = jax.lax.axis_index(axes)
    x = _per_device(x, axes)
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
                moved.append((_ring_shift(chunk, direction, axes), direction, offset))
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
        raise PlacementValueError(
            f"scatter_dim: expected a dim of the product x @ w of shape "
            f"{x.shape[:-1] + (w.shape[1],)} (an int in {-out_ndim}..{out_ndim - 1}), "
            f"found {scatter_dim!r}; pick an existing dim.")
    dim = scatter_dim % out_ndim
    axes = manual_group_axes(group)
    n = _group_size(axes)
    full = x.shape[:-1] + (w.shape[1],)
    if full[dim] % n:
        raise PlacementValueError(
            f"scatter_dim: dim {dim} of the product x @ w of shape {full} has size "
            f"{full[dim]}, which does not split into {n} equal chunks, one per device "
            f"of the group; pad it to a multiple of {n}.")
    if n == 1:
        return jnp.matmul(x, w)
    size = full[dim] // n
    two_way = _use_bidirectional(bidirectional, n, size, "each chunk of the product")
    rank = jax.lax.axis_index(axes)
    x = _per_device(x, axes)
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
            acc = _ring_shift(acc, direction, axes) + summand(
                (rank - direction * (step + 1)) % n, offset, length)
        sums.append(acc)
    return jnp.concatenate(sums, axis=dim) if two_way else sums[0]
