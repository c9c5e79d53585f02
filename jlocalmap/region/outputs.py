"""Outputs of a local_map body: which leaves are arrays, the layout each one
becomes (its declared placements as stored, its logical global shape with
uneven dims), and what the region returns. Runs inside the body's trace.

Example:
    >>> import jax, jax.numpy as jnp, jlocalmap as jlm
    >>> from jlocalmap.region.outputs import to_out_layout
    >>> mesh = jax.make_mesh((2,), ("dp",))
    >>> f = jax.shard_map(lambda x: to_out_layout(x, (jlm.Partial("avg"),), mesh, 0)[0],
    ...                   mesh=mesh, in_specs=jax.P("dp"), out_specs=jax.P(None, unreduced={"dp"}))
    >>> x = jax.device_put(jnp.arange(4.0).reshape(2, 2), jax.NamedSharding(mesh, jax.P("dp")))
    >>> jlm.full_tensor(f(x)).tolist()   # the mean of the two rows
    [[1.0, 2.0]]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp

from jlocalmap._jax_compat import scalar_like, varying_axes
from jlocalmap.collectives.functional import extremum
from jlocalmap.errors import PlacementTypeError, PlacementValueError
from jlocalmap.layouts.chunks import dim_splits
from jlocalmap.layouts.dtypes import check_partial_dtype
from jlocalmap.layouts.entries import assign_placements, is_array, is_none
from jlocalmap.layouts.layout import Layout, is_empty
from jlocalmap.layouts.meshes import AnyMesh, axis_sizes
from jlocalmap.layouts.placements import Partial, Placement, PlacementList, Replicate
from jlocalmap.layouts.specs import as_placement_list, normalize_placements
from jlocalmap.layouts.uneven import UnevenArray
from jlocalmap.region.gradients import with_scaled_cotangent


@dataclasses.dataclass(frozen=True)
class Output:
    """One array output: its leaf index, its layout (logical global shape,
    placements as stored) and the local value's shape and dtype."""
    index: int
    layout: Layout
    local: tuple

    @property
    def in_region(self) -> bool:
        """Empty values carry no data: they are made outside the region."""
        return not self.layout.is_empty


@dataclasses.dataclass(frozen=True, eq=False)
class OutputFacts:
    """What tracing the body found out about its outputs."""
    tree: Any
    statics: tuple            # (leaf index, value) of non-array outputs
    arrays: tuple             # Output per array leaf, in leaf order

    @property
    def region_outputs(self) -> tuple:
        return tuple(o for o in self.arrays if o.in_region)

    @property
    def out_specs(self) -> tuple:
        return tuple(o.layout.spec for o in self.region_outputs)

    def matches(self, other: "OutputFacts") -> bool:
        """Whether a new trace of the body found the same (a body may read state)."""
        try:
            return (self.tree == other.tree and self.arrays == other.arrays
                    and len(self.statics) == len(other.statics)
                    and all(i == j and type(a) is type(b) and bool(a == b)
                            for (i, a), (j, b) in zip(self.statics, other.statics, strict=True)))
        except Exception:  # statics without a truth value: trace again
            return False


def finish_outputs(out: Any, out_placements: Any, mesh: AnyMesh, inputs: Sequence,
                   marked: Mapping[str, Sequence[int]], checked: bool = True
                   ) -> tuple[tuple, OutputFacts]:
    """The body's outputs ``out`` laid out by ``out_placements``: the local
    values the region returns, and the facts. ``inputs`` are the call's input
    plans (uneven outputs follow uneven inputs); ``marked`` maps mesh axes to
    the inputs varying over them because of their gradient declarations."""
    leaves, tree = jax.tree_util.tree_flatten(out, is_leaf=is_none)
    entries = ([None] * len(leaves) if out_placements is None else assign_placements(
        out_placements, out, len(leaves), mesh, "out_placements", "outputs"))
    statics, arrays, values = [], [], []
    for j, (leaf, entry) in enumerate(zip(leaves, entries, strict=True)):
        if not _is_array_output(j, leaf, entry, mesh):
            statics.append((j, leaf))
            continue
        value, output = _array_output(j, jnp.asarray(leaf), entry, mesh, inputs, marked,
                                      checked)
        arrays.append(output)
        if output.in_region:
            values.append(value)
    return tuple(values), OutputFacts(tree, tuple(statics), tuple(arrays))


def _is_array_output(j: int, leaf: Any, entry: Any, mesh: AnyMesh) -> bool:
    what = f"out_placements[{j}]"
    if entry is None:
        if isinstance(leaf, jax.Array):
            raise PlacementValueError(
                f"{what}: output {j} is an array, so it needs placements to "
                f"become a distributed value, found None; give e.g. "
                f"{[Replicate()] * len(mesh.axis_names)}.")
        return False
    if not is_array(leaf):
        raise PlacementValueError(
            f"{what}: output {j} is a {type(leaf).__name__}, not an array, so "
            f"its entry must be None; found {entry!r}.")
    return True


def _array_output(j: int, value: jax.Array, entry: Any, mesh: AnyMesh, inputs: Sequence,
                  marked: Mapping, checked: bool) -> tuple[jax.Array, Output]:
    what = f"out_placements[{j}]"
    placements = normalize_placements(as_placement_list(entry, mesh, what), value.ndim, what)
    if is_empty(value.shape):  # no summands: stored replicated
        placements = tuple(Replicate() if p.is_partial() else p for p in placements)
    else:
        value, placements = to_out_layout(value, placements, mesh, j, marked, checked)
    padded = padded_global(value.shape, placements, mesh)
    logical = list(padded)
    for d, size, _, _ in uneven_output_dims(value.shape, placements, mesh, inputs, j):
        logical[d] = size
    layout = Layout.of(mesh, placements, logical, value.dtype, what=what)
    return value, Output(j, layout, tuple(value.shape))


def padded_global(local: Sequence[int], placements: Sequence, mesh: AnyMesh) -> tuple:
    """The padded global shape whose shards under ``placements`` are ``local``."""
    shape = list(local)
    for d, (_, splits) in dim_splits(placements, mesh, len(shape)).items():
        shape[d] *= math.prod(splits)
    return tuple(shape)


def uneven_output_dims(local: Sequence[int], placements: PlacementList, mesh: AnyMesh,
                        inputs: Sequence, j: int) -> tuple:
    """The uneven dims of output ``j``: a dim split over the same axes as an
    uneven input dim, whose local length is that input's padded chunk length and
    no even input's, has that input's logical size; another length on axes that
    split an uneven input is refused. (Taking an output for even when it came
    from an uneven input shows up in the padding check.)"""
    known: dict = {}
    for plan in inputs:
        for axes, width, size in plan.dst.chunks:
            known.setdefault((axes, width), set()).add(size)
    uneven_axes = {axes for (axes, _), sizes in known.items() if sizes - {None}}
    dims = []
    for d, (axes, splits) in sorted(dim_splits(placements, mesh, len(local)).items()):
        matches = known.get((axes, local[d]), set())
        if None in matches and len(matches) > 1:
            raise PlacementValueError(
                f"out_placements[{j}]: output {j}'s dim {d}, split over {axes} in chunks of "
                f"{local[d]}, could be an even input's rows or an uneven input's (of "
                f"{sorted(m for m in matches if m is not None)} rows) padded to the same "
                f"chunk length, so jlocalmap cannot tell whether it has padding rows. "
                f"Return it from a separate local_map, or Replicate() it over {axes}.")
        if None in matches or (not matches and axes not in uneven_axes):
            continue
        if len(matches) == 1:
            (size,) = matches
            dims.append((d, size, axes, splits))
        else:
            raise PlacementValueError(
                f"out_placements[{j}]: output {j} is sharded over {axes} on dim {d} like "
                f"an uneven input, but its local length {local[d]} "
                f"{'matches several uneven inputs of different sizes' if matches else 'matches no uneven input'} "
                f"(padded chunk lengths: {sorted(w for a, w in known if a == axes)}), so "
                f"jlocalmap cannot tell its padding rows from its rows. Keep uneven dims "
                f"row for row, or Replicate() the output over {axes} (reduce in the body).")
    return tuple(dims)


def _check_partial_dtype(dtype, p: Partial, axis: str, j: int) -> None:
    """Partial reductions that have no meaning for ``dtype`` are refused."""
    if p.reduce_op == "avg" and not jnp.issubdtype(dtype, jnp.inexact):
        raise PlacementTypeError(
            f"out_placements[{j}]: Partial('avg') on mesh axis {axis!r} for an output of "
            f"dtype {dtype}: the mean of integers or bools is no {dtype} value; cast the "
            f"output to a float dtype in the body, or declare Partial('sum').")
    if p.reduce_op in ("max", "min") and jnp.issubdtype(dtype, jnp.complexfloating):
        raise PlacementTypeError(
            f"out_placements[{j}]: Partial({p.reduce_op!r}) on mesh axis {axis!r} for a "
            f"complex output: complex numbers have no order; reduce their abs() or real "
            f"part instead.")
    check_partial_dtype(dtype, p.reduce_op, axis, f"out_placements[{j}]")


def to_out_layout(v: jax.Array, placements: PlacementList, mesh: AnyMesh,
                   j: int, marked_varying: Optional[Mapping[str, Sequence[int]]] = None,
                   checked: bool = True) -> tuple[jax.Array, PlacementList]:
    """The local output ``v`` as the storage of its declared placements:
    avg-partials are stored as sums, max/min partials are reduced here.
    ``marked_varying`` maps mesh axes to the inputs the body sees as varying
    over them because their gradients are declared Partial there (for errors).
    Unchecked bodies (``checked=False``) have no varying-axes types to cast."""
    varying = varying_axes(v)
    sizes = axis_sizes(mesh)
    stored: list[Placement] = []
    summed, scale = [], 1
    for axis, p in zip(mesh.axis_names, placements, strict=True):
        if p.is_replicate() and axis in varying:
            raise PlacementValueError(
                f"out_placements[{j}]: output {j} is declared Replicate() on mesh axis "
                f"{axis!r}, but its value varies over {axis!r} (devices hold different "
                f"values). Reduce it in the body (jax.lax.psum(y, {axis!r})) or "
                f"declare Partial() so that a later redistribute reduces it."
                + (f" Inputs {list(marked_varying[axis])} vary over {axis!r} in the body "
                   f"because in_grad_placements declares their gradients Partial() "
                   f"there; a value computed from them alone varies too (leave those "
                   f"entries None to let JAX reduce their gradients instead)."
                   if marked_varying and axis in marked_varying else ""))
        if p.is_partial() and sizes[axis] == 1:
            # One summand is the value: stored as Replicate (see specs.placements_to_spec).
            v = jax.lax.psum(v, axis) if axis in varying else v
            stored.append(Replicate())
        elif isinstance(p, Partial):
            if axis not in varying and checked:
                v = jax.lax.pcast(v, axis, to="varying")
            _check_partial_dtype(v.dtype, p, axis, j)
            if p.reduce_op in ("max", "min"):
                v = extremum(p.reduce_op, (axis,), v)
                stored.append(Replicate())
                continue
            scale *= sizes[axis] if p.reduce_op == "avg" else 1
            summed.append(axis)
            stored.append(Partial("sum"))
        else:
            stored.append(p)
    if summed:  # divide before the cast: JAX has no division of unreduced values
        v = v / scalar_like(scale, v) if scale != 1 else v
        v = (jax.lax.pcast(v, tuple(summed), to="unreduced") if checked
             else with_scaled_cotangent(v, tuple(summed), 1))
    return v, tuple(stored)


def assemble(facts: OutputFacts, arrays: Sequence[Any]) -> Any:
    """The call's result: the body's output tree, arrays distributed (an
    :class:`~jlocalmap.layouts.uneven.UnevenArray` along uneven dims)."""
    leaves = dict(facts.statics)
    for output, value in zip(facts.arrays, arrays, strict=True):
        leaves[output.index] = UnevenArray(value, output.layout) if output.layout.is_uneven else value
    return jax.tree_util.tree_unflatten(facts.tree, [leaves[j] for j in range(len(leaves))])
