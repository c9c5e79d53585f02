"""Functional collectives for ``local_map`` bodies (torch's ``_functional_collectives``
on ``jax.lax``); see the package docstring."""


from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlocalmap._jax_compat import scalar_like, varying_axes
from jlocalmap.collectives.groups import GroupLike, manual_group_axes
from jlocalmap.errors import LocalMapTypeError, LocalMapValueError
from jlocalmap.layouts.specs import axis_sizes

REDUCE_OPS: tuple[str, ...] = ("sum", "avg", "max", "min")


def as_array(x: Any) -> jax.Array:
    if not isinstance(x, (jax.Array, np.ndarray, np.generic, int, float, complex)):
        raise LocalMapTypeError(
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
    raise LocalMapValueError(
        f"reduce_op: expected one of {REDUCE_OPS}, found {reduce_op!r}; {hint}.")


def tensor_dim(x: jax.Array, dim: Any, what: str) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.ndim <= dim < x.ndim:
        raise LocalMapValueError(
            f"{what}: expected a dim of the local array of shape {x.shape} (an int "
            f"in {-x.ndim}..{x.ndim - 1}), found {dim!r}; pick an existing dim.")
    return dim % x.ndim


def group_size(axes: tuple[str, ...]) -> int:
    sizes = axis_sizes(jax.sharding.get_abstract_mesh())
    return math.prod(sizes[a] for a in axes)


def _divisible(x: jax.Array, dim: int, n: int, what: str) -> None:
    if x.shape[dim] % n:
        raise LocalMapValueError(
            f"{what}: dim {dim} of the local array of shape {x.shape} has size "
            f"{x.shape[dim]}, which does not split into {n} equal chunks, one per "
            f"device of the group; pad it to a multiple of {n}.")


def per_device(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """``x`` typed as varying over ``axes``: an invariant value then counts once
    per device (torch's semantics), and its cotangent is summed over them."""
    invariant = tuple(a for a in axes if a not in varying_axes(x))
    return jax.lax.pcast(x, invariant, to="varying") if invariant else x


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def extremum(op: str, axes: tuple[str, ...], x: jax.Array) -> jax.Array:
    """``pmax``/``pmin`` of ``x`` over ``axes`` (``op`` ``"max"`` or ``"min"``) as
    ``jnp.max``/``jnp.min`` over the devices: a NaN anywhere gives NaN (XLA's
    all-reduce max/min may drop it), and the gradient goes to the devices
    holding the extremum, shared between ties (JAX has no derivative of
    pmax/pmin). The one implementation behind ``all_reduce``,
    ``reduce_scatter_tensor`` and ``Partial("max"|"min")`` outputs.

    Example:
        >>> import jax, numpy as np, jlocalmap as jlm
        >>> from jlocalmap.collectives.functional import extremum
        >>> mesh = jax.make_mesh((2,), ("tp",))
        >>> f = jlm.local_map(lambda x: extremum("max", ("tp",), x), [jlm.Replicate()],
        ...                   ([jlm.Shard(0)],), device_mesh=mesh)
        >>> np.asarray(f(np.array([1.0, np.nan, 3.0, 2.0], np.float32))).tolist()  # (1, nan), (3, 2)
        [3.0, nan]
    """
    reduce = jax.lax.pmax if op == "max" else jax.lax.pmin
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return reduce(x, axes)
    # One all-reduce of (x, a NaN flag signed so that op keeps it): no second collective.
    flag = jnp.isnan(x).astype(x.dtype) * (1 if op == "max" else -1)
    reduced, any_nan = reduce((x, flag), axes)
    return jnp.where(any_nan != 0, jnp.asarray(jnp.nan, x.dtype), reduced)


@extremum.defjvp
def _extremum_jvp(op, axes, primals, tangents):
    # The tangent comes from the devices that hold the extremum, shared equally
    # between ties, as jnp.max's does locally.
    (x,), (t,) = primals, tangents
    y = extremum(op, axes, x)
    holders = x == y
    count = jax.lax.psum(holders.astype(t.dtype), axes)
    return y, jax.lax.psum(jnp.where(holders, t, jnp.zeros_like(t)), axes) / count


def _reduce(x: jax.Array, op: str, axes: tuple[str, ...]) -> jax.Array:
    if op == "sum":
        return jax.lax.psum(x, axes)
    if op == "avg":
        return jax.lax.pmean(x, axes)
    return extremum(op, axes, x)


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
    return _reduce(per_device(as_array(x), axes), op, axes)


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
    x = as_array(x)
    dim = tensor_dim(x, gather_dim, "gather_dim")
    axes = manual_group_axes(group)
    return jax.lax.all_gather(per_device(x, axes), axes, axis=dim, tiled=True, to="invarying")


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
    x = as_array(x)
    dim = tensor_dim(x, scatter_dim, "scatter_dim")
    axes = manual_group_axes(group)
    n = group_size(axes)
    _divisible(x, dim, n, "scatter_dim")
    x = per_device(x, axes)
    if op in ("sum", "avg"):
        y = jax.lax.psum_scatter(x, axes, scatter_dimension=dim, tiled=True)
        return y / scalar_like(n, y) if op == "avg" else y
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
    x = as_array(x)
    split = tensor_dim(x, split_dim, "split_dim")
    concat = tensor_dim(x, concat_dim, "concat_dim")
    axes = manual_group_axes(group)
    _divisible(x, split, group_size(axes), "split_dim")
    return jax.lax.all_to_all(per_device(x, axes), axes, split, concat, tiled=True)


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
        raise LocalMapTypeError(
            f"shift: expected an int number of ranks to send along the ring, found "
            f"{shift!r}; write e.g. permute(x, 1, group).")
    x = as_array(x)
    axes = manual_group_axes(group)
    return ring_shift(per_device(x, axes), shift, axes)


def ring_shift(x: jax.Array, shift: int, axes: tuple[str, ...]) -> jax.Array:
    """Rank ``i`` of the group over ``axes`` sends ``x`` to rank ``(i + shift) % n``."""
    mesh = jax.sharding.get_abstract_mesh()
    # jax.lax.ppermute numbers the devices of several axes in mesh order whatever
    # the order of the axes given (jax 0.10; axis_index and all_gather use the
    # given order), so rank i is renumbered, and the axes passed in mesh order.
    in_mesh_order = tuple(sorted(axes, key=mesh.axis_names.index))
    sizes = axis_sizes(mesh)
    n = group_size(axes)

    def renumber(rank: int) -> int:
        coords = dict(zip(axes, np.unravel_index(rank, [sizes[a] for a in axes]), strict=True))
        return int(np.ravel_multi_index([coords[a] for a in in_mesh_order],
                                        [sizes[a] for a in in_mesh_order]))

    return jax.lax.ppermute(x, in_mesh_order,
                            [(renumber(i), renumber((i + shift) % n)) for i in range(n)])
