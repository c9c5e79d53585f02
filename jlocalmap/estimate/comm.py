"""The collectives of one equation, per mesh axis, in
:func:`jlocalmap.inspect.count_collectives`'s convention (bytes per device of the whole
buffer: an all-gather's result, a reduce-scatter's operand, the operand of the
others).

Inside a ``shard_map`` body they are the collective primitives themselves
(``psum``, ``all_gather``, ``psum_scatter``, ``all_to_all``, ``ppermute``,
``pmax``/``pmin``). Outside, on Explicit axes, they are what XLA's partitioner
must insert for the types JAX gives: a ``reshard`` (all-gather, all-to-all, or
the all-reduce / reduce-scatter of an unreduced value), a ``dot_general`` whose
contracting dim is split (one all-reduce per such dim, or a reduce-scatter
where the output is split on that axis) and a reduction over a split dim.

Example:
    >>> from jlocalmap.estimate.comm import CommOp
    >>> CommOp("all-gather", ("tp",), 8, 4096).group
    8
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Optional

from jlocalmap._jax_compat import UNREDUCED_ALL_REDUCE_PER_AXIS, collective_axes
from jlocalmap.estimate.shapes import (
    local_bytes,
    local_shape,
    mesh_sizes,
    reduced_axes,
    spec_of,
    unreduced_axes,
)

_KINDS = {"psum": "all-reduce", "psum_invariant": "all-reduce", "pmax": "all-reduce",
           "pmin": "all-reduce", "all_gather": "all-gather",
           "all_gather_invariant": "all-gather", "reduce_scatter": "reduce-scatter",
           "psum_scatter": "reduce-scatter", "all_to_all": "all-to-all",
           "ppermute": "collective-permute", "unreduced_psum": "all-reduce",
           "unreduced_pmax": "all-reduce", "unreduced_pmin": "all-reduce",
           "unreduced_reduce_scatter": "reduce-scatter", "pmax_scatter": "reduce-scatter",
           "pmin_scatter": "reduce-scatter", "all_gather_reduced": "all-gather",
           "ragged_all_to_all": "all-to-all"}
REDUCTIONS = ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "argmax", "argmin",
              "reduce_and", "reduce_or")


@dataclasses.dataclass(frozen=True)
class CommOp:
    """One collective: ``kind``, the mesh ``axes`` it spans, the devices in its
    group, and its bytes per device."""
    kind: str
    axes: tuple
    group: int
    bytes: int


def is_collective(eqn: Any) -> bool:
    """Whether ``eqn`` is a collective primitive (of a body)."""
    return eqn.primitive.name in _KINDS


def collective_ops(eqn: Any, sizes: Mapping[str, int]) -> list[CommOp]:
    """The collective of a primitive inside a body (``sizes``: the mesh's axis
    sizes), or [] for any other primitive."""
    kind = _KINDS.get(eqn.primitive.name)
    if kind is None:
        return []
    # Axes of one device take no part (the compiled groups do not span them);
    # a collective over none of more stays in XLA's program, moving nothing.
    axes = tuple(a for a in collective_axes(eqn) if sizes.get(a, 1) > 1)
    group = math.prod(sizes[a] for a in axes)
    if kind == "collective-permute":
        group = min(group, 2)
    if kind == "all-gather":
        nbytes = sum(local_bytes(v.aval) for v in eqn.outvars)
    else:
        nbytes = sum(local_bytes(v.aval) for v in eqn.invars if hasattr(v.aval, "shape"))
    return [CommOp(kind, axes, group, nbytes)]


def _group(axes: tuple, sizes: Mapping[str, int]) -> int:
    return math.prod(sizes.get(a, 1) for a in axes)


def _reduce_op(axes: tuple, out_aval: Any, out_spec: tuple, sizes: Mapping[str, int]
               ) -> Optional[CommOp]:
    """The reduction of a partial sum over ``axes`` into ``out_aval`` laid out
    ``out_spec``: none where the result stays unreduced, a reduce-scatter where
    the result is split on those axes, else an all-reduce."""
    axes = tuple(a for a in axes if a not in unreduced_axes(out_aval) and sizes.get(a, 1) > 1)
    if not axes:
        return None
    split = {a for entry in out_spec for a in entry}
    if set(axes) <= split:  # the reduce-scatter's operand: the unscattered result
        whole = local_bytes(out_aval, out_spec) * _group(axes, sizes)
        return CommOp("reduce-scatter", axes, _group(axes, sizes), whole)
    return CommOp("all-reduce", axes, _group(axes, sizes), local_bytes(out_aval, out_spec))


def reshard_ops(eqn: Any) -> list[CommOp]:
    """What moving the operand to ``dst_sharding`` costs: the reduction of its
    unreduced axes, then per dim an all-gather of the axes the dim loses (an
    all-to-all where the axis moves to another dim)."""
    aval, sizes = eqn.invars[0].aval, mesh_sizes(eqn.invars[0].aval)
    dst = eqn.outvars[0].aval
    ops = []
    src_spec, dst_spec = list(spec_of(aval)), spec_of(dst)
    pending = unreduced_axes(aval) - unreduced_axes(dst)
    if pending:
        axes = tuple(a for a in sizes if a in pending)
        op = _reduce_op(axes, dst, dst_spec, sizes)
        if op is not None and op.kind == "all-reduce" and UNREDUCED_ALL_REDUCE_PER_AXIS:
            ops += [CommOp(op.kind, (a,), sizes[a], op.bytes) for a in axes if sizes[a] > 1]
        else:
            ops += [op] if op else []
        # a reduce-scatter leaves the reduced axes where the destination splits
        src_spec = [e + tuple(a for a in d if a in pending and a not in e)
                    for e, d in zip(src_spec, dst_spec, strict=True)]
    kept_everywhere = {a for e in dst_spec for a in e}
    for dim, (src, want) in enumerate(zip(src_spec, dst_spec, strict=True)):
        lost = tuple(a for a in src if a not in want and sizes.get(a, 1) > 1)
        if not lost:
            continue
        moved = all(a in kept_everywhere for a in lost)
        before = local_bytes(aval, tuple(src_spec))
        src_spec[dim] = tuple(a for a in src if a in want)
        after = local_bytes(aval, tuple(src_spec))
        kind = "all-to-all" if moved else "all-gather"
        ops.append(CommOp(kind, lost, _group(lost, sizes), before if moved else after))
    return ops


def dot_ops(eqn: Any) -> list[CommOp]:
    """The partial sums of a ``dot_general`` whose contracting dims are split:
    one reduction per split contracting dim."""
    (lhs_c, rhs_c), _ = eqn.params["dimension_numbers"]
    lhs, rhs, out = eqn.invars[0].aval, eqn.invars[1].aval, eqn.outvars[0].aval
    sizes = mesh_sizes(out) or mesh_sizes(lhs)
    lhs_spec, rhs_spec, out_spec = spec_of(lhs), spec_of(rhs), spec_of(out)
    ops = []
    for i, j in zip(lhs_c, rhs_c, strict=True):
        axes = tuple(dict.fromkeys(lhs_spec[i] + rhs_spec[j]))
        op = _reduce_op(axes, out, out_spec, sizes) if axes else None
        ops += [op] if op else []
    return ops


def reduction_ops(eqn: Any) -> list[CommOp]:
    """A reduction over dims split on some axes: an all-reduce of the result
    per split dim (as the partitioner reduces them, one dim at a time)."""
    aval, out = eqn.invars[0].aval, eqn.outvars[0].aval
    spec, ops = spec_of(aval), []
    for d in eqn.params.get("axes", ()):
        axes = tuple(a for a in spec[d] if a not in reduced_axes(out))
        op = _reduce_op(axes, out, spec_of(out), mesh_sizes(aval)) if axes else None
        ops += [op] if op else []
    return ops


def explicit_ops(eqn: Any) -> list[CommOp]:
    """The partitioner's collectives for an equation outside any body."""
    name = eqn.primitive.name
    if name == "reshard":
        return reshard_ops(eqn)
    if name == "dot_general":
        return dot_ops(eqn)
    if name in REDUCTIONS:
        return reduction_ops(eqn)
    return []


def local_elements(aval: Any) -> int:
    """Elements of the value one device holds."""
    return math.prod(local_shape(aval)) if hasattr(aval, "shape") else 0
