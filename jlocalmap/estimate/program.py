"""``jlm.estimate``: a step's memory, FLOPs, collectives and time per device on
hardware and a mesh this machine does not have, from the traced program alone
(``jax.make_jaxpr``: nothing compiles or runs for the target). Strategy
regions traced meanwhile choose for the target.

Example:
    >>> import jax, jax.numpy as jnp, jlocalmap as jlm
    >>> from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec as P
    >>> mesh = AbstractMesh((2048, 8), ("dp", "tp"), axis_types=(AxisType.Explicit,) * 2)
    >>> x = jax.ShapeDtypeStruct((2048 * 4, 8192), jnp.bfloat16,
    ...                          sharding=NamedSharding(mesh, P("dp", "tp")))
    >>> w = jax.ShapeDtypeStruct((8192, 8192), jnp.bfloat16, sharding=NamedSharding(mesh, P("tp")))
    >>> matmul = lambda x, w: jnp.matmul(x, w, out_sharding=P("dp"))
    >>> est = jlm.estimate(matmul, x, w, hardware=jlm.Hardware.preset("h100-sxm"))
    >>> est.collectives()["tp"]["all-reduce"]   # the partial sums of the split contraction
    {'count': 1, 'bytes': 65536}
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import jax

from jlocalmap.errors import LocalMapTypeError, PlacementValueError
from jlocalmap.estimate.hardware import Hardware
from jlocalmap.estimate.memory import memory_of
from jlocalmap.estimate.report import Estimate, StrategyRow, comm_rows
from jlocalmap.estimate.timing import times
from jlocalmap.estimate.walk import Tally, auto_axes, walk
from jlocalmap.layouts.meshes import axis_sizes
from jlocalmap.strategies.choice import Choice
from jlocalmap.strategies.cost_model import CostEstimate as Cost
from jlocalmap.strategies.target import Target, pricing_for

_ARRAYS = (jax.Array, jax.ShapeDtypeStruct)
ALWAYS = ("collectives are counted as the program issues them; XLA may combine "
          "independent ones of a kind and group into one (the same bytes, fewer latencies)",
          "FLOPs other than matmuls and convolutions are approximate (one per element)")


def _is_array(leaf: Any) -> bool:
    return isinstance(leaf, _ARRAYS) or (hasattr(leaf, "shape") and hasattr(leaf, "dtype"))


def _abstract(mesh: Any) -> Any:
    return mesh.abstract_mesh if isinstance(mesh, jax.sharding.Mesh) else mesh


def mesh_of_args(leaves: list) -> Any:
    """The one mesh the array arguments' shardings name (a concrete mesh and
    its abstract mesh are one: ``jax.eval_shape`` gives the latter)."""
    meshes = {getattr(getattr(leaf, "sharding", None), "mesh", None) for leaf in leaves}
    meshes.discard(None)
    if len({_abstract(m) for m in meshes}) > 1:
        raise PlacementValueError(
            f"args: expected arrays on one mesh, found {len(meshes)} meshes "
            f"({sorted(map(str, meshes))[:2]}...); lay every argument out on the same mesh.")
    concrete = [m for m in meshes if isinstance(m, jax.sharding.Mesh)]
    return concrete[0] if concrete else (meshes.pop() if meshes else None)


def _mesh_scope(mesh: Any) -> contextlib.AbstractContextManager:
    if mesh is None:
        return contextlib.nullcontext()
    if isinstance(mesh, jax.sharding.Mesh):
        return jax.set_mesh(mesh)
    return jax.sharding.use_abstract_mesh(mesh)


def argument_bytes(leaf: Any) -> int:
    """One device's bytes of an argument, from its own sharding."""
    sharding = getattr(leaf, "sharding", None)
    shape = tuple(leaf.shape)
    if sharding is not None and hasattr(sharding, "shard_shape"):
        shape = tuple(sharding.shard_shape(shape))
    return math.prod(shape) * jax.numpy.dtype(leaf.dtype).itemsize


def price(fn: Callable, abstract: Sequence[Any], hardware: Hardware,
          axis_sizes: Mapping[str, int]) -> Cost:
    """A strategy alternative's cost on the target: its traced program walked
    and timed as an estimate's (the strategies' :class:`~jlocalmap.strategies.CostModel`
    row, with no compile)."""
    tally = walk(jax.make_jaxpr(fn)(*abstract).jaxpr)
    t = times(tally, hardware, axis_sizes)
    inside = sum(op.bytes * n for (where, op, _), n in tally.comms.items()
                 if where != "outside")
    outside = sum(op.bytes * n for (where, op, _), n in tally.comms.items()
                  if where == "outside")
    return Cost(tally.matmul_flops + tally.other_flops, tally.memory_bytes,
                sum(tally.comms.values()), inside, outside, t.compute_s, t.memory_s,
                t.exposed_s + t.overlapped_s)


def strategy_rows(choices: list[tuple[str, Choice]]) -> tuple[StrategyRow, ...]:
    """Each region's choice and its runner-up (one row per region and signature)."""
    rows, seen = [], set()
    for name, choice in choices:
        if (name, choice.signature) in seen:
            continue
        seen.add((name, choice.signature))
        ranked = sorted(choice.rows, key=lambda r: r.estimate.seconds)
        second = ranked[1] if len(ranked) > 1 else None
        rows.append(StrategyRow(f"{name} [{choice.signature}]", ranked[0].name,
                                ranked[0].estimate.seconds, second and second.name,
                                second and second.estimate.seconds))
    return tuple(rows)


def _trace(fn: Callable, args: tuple, kwargs: dict, target: Target, mesh: Any) -> tuple:
    leaves, tree = jax.tree_util.tree_flatten((args, kwargs))
    dynamic = [_is_array(leaf) for leaf in leaves]

    def call(*arrays):
        fed = iter(arrays)
        a, k = jax.tree_util.tree_unflatten(
            tree, [next(fed) if d else leaf for leaf, d in zip(leaves, dynamic, strict=True)])
        return fn(*a, **k)

    arrays = [leaf for leaf, d in zip(leaves, dynamic, strict=True) if d]
    with pricing_for(target), _mesh_scope(mesh):
        closed = jax.make_jaxpr(call)(*arrays)
    return closed.jaxpr, [argument_bytes(a) for a in arrays]


def estimate(fn: Callable, *args: Any, hardware: Hardware, model_flops: Optional[float] = None,
             tokens_per_step: Optional[float] = None, **kwargs: Any) -> Estimate:
    """Estimate one call of ``fn(*args, **kwargs)`` per device on ``hardware``.

    ``args``: arrays or ``jax.ShapeDtypeStruct``s with ``NamedSharding``s on one
    ``Mesh`` or ``AbstractMesh`` (of any size); other leaves reach ``fn`` as
    they are. ``model_flops``: the step's FLOPs over all devices (for MFU);
    ``tokens_per_step``: its global tokens (for tokens/s per device). The
    program is traced once (``jax.make_jaxpr``) and walked: see
    docs/estimates.md for what is counted, the time and overlap model, and
    what the estimate cannot see.

    Example:
        >>> import jax, jax.numpy as jnp, jlocalmap as jlm
        >>> x = jax.ShapeDtypeStruct((8192, 8192), jnp.bfloat16)
        >>> est = jlm.estimate(jnp.matmul, x, x, hardware=jlm.Hardware.preset("h100-sxm"))
        >>> round(est.step_time_s * 1e3, 3)   # 2 * 8192**3 FLOPs at 0.68 x 989 TFLOP/s
        1.635
    """
    if not callable(fn):
        raise LocalMapTypeError(
            f"fn: expected the function to estimate, found {type(fn).__name__}; pass "
            f"jlm.estimate(step, *args, hardware=jlm.Hardware.preset('h100-sxm')).")
    if not isinstance(hardware, Hardware):
        raise LocalMapTypeError(
            f"hardware: expected a jlm.Hardware, found {type(hardware).__name__}; use "
            f"jlm.Hardware.preset('h100-sxm'), 'h200' or 'cpu'.")
    start = time.perf_counter()
    mesh = mesh_of_args(jax.tree_util.tree_leaves((args, kwargs)))
    sizes = axis_sizes(mesh) if mesh is not None else {}
    target = Target(f"{hardware.name} on ({', '.join(f'{a}={n}' for a, n in sizes.items())})",
                    (repr(hardware), tuple(sizes.items())),
                    lambda f, abstract: price(f, abstract, hardware, sizes))
    jaxpr, arg_bytes = _trace(fn, args, kwargs, target, mesh)
    tally = walk(jaxpr)
    return _report(tally, jaxpr, arg_bytes, hardware, sizes, target,
                   model_flops, tokens_per_step, start)


def _report(tally: Tally, jaxpr: Any, arg_bytes: list, hardware: Hardware,
            axis_sizes: dict, target: Target, model_flops: Optional[float],
            tokens_per_step: Optional[float], start: float) -> Estimate:
    notes = list(ALWAYS) + sorted(tally.notes)
    unseen = auto_axes(jaxpr)
    if unseen:
        notes.append(f"Auto axes {list(unseen)}: the collectives XLA's partitioner adds "
                     f"outside regions on them are not seen (use Explicit axes)")
    return Estimate(hardware, axis_sizes, memory_of(jaxpr, arg_bytes), tally.matmul_flops,
                    tally.other_flops, tally.memory_bytes,
                    times(tally, hardware, axis_sizes), comm_rows(tally, hardware, axis_sizes),
                    strategy_rows(target.choices), tuple(notes), model_flops,
                    tokens_per_step, time.perf_counter() - start)
