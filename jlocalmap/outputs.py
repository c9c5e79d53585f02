"""Outputs of a local_map body: the storage of their declared placements, and
which of their dims are uneven.

Example:
    >>> import jax, jax.numpy as jnp, jlocalmap as jlm
    >>> from jlocalmap.outputs import to_out_layout
    >>> mesh = jax.make_mesh((2,), ("dp",))
    >>> f = jax.shard_map(lambda x: to_out_layout(x, (jlm.Partial("avg"),), mesh, 0)[0],
    ...                   mesh=mesh, in_specs=jax.P("dp"), out_specs=jax.P(None, unreduced={"dp"}))
    >>> x = jax.device_put(jnp.arange(4.0).reshape(2, 2), jax.NamedSharding(mesh, jax.P("dp")))
    >>> jlm.full_tensor(f(x)).tolist()   # the mean of the two rows
    [[1.0, 2.0]]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional

import jax
import jax.numpy as jnp

from jlocalmap._jax_compat import varying_axes
from jlocalmap.errors import PlacementTypeError, PlacementValueError
from jlocalmap.placements import Partial, PlacementList, Replicate
from jlocalmap.specs import AnyMesh, axis_sizes
from jlocalmap.uneven import dim_splits


def uneven_output_dims(local: Sequence[int], placements: PlacementList, mesh: AnyMesh,
                        inputs: Sequence, j: int) -> tuple:
    """The uneven dims of output ``j``: a dim split over the same axes as an
    uneven input dim, whose local length is that input's padded chunk length and
    no even input's, has that input's logical size; another length on axes that
    split an uneven input is refused. (Taking an output for even when it came
    from an uneven input shows up in the padding check.)"""
    known: dict = {}
    for plan in inputs:
        for axes, width, size in plan.chunks:
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


def _reduce_extreme(v: jax.Array, op: str, axis: str) -> jax.Array:
    """pmax/pmin that propagate NaN like jnp.max (XLA's all-reduce max/min may not)."""
    reduced = (jax.lax.pmax if op == "max" else jax.lax.pmin)(v, axis)
    if not jnp.issubdtype(v.dtype, jnp.floating):
        return reduced
    any_nan = jax.lax.pmax(jnp.isnan(v).astype(jnp.int32), axis)
    return jnp.where(any_nan > 0, jnp.asarray(jnp.nan, v.dtype), reduced)


def to_out_layout(v: jax.Array, placements: PlacementList, mesh: AnyMesh,
                   j: int, marked_varying: Optional[Mapping[str, Sequence[int]]] = None
                   ) -> tuple[jax.Array, PlacementList]:
    """The local output ``v`` as the storage of its declared placements:
    avg-partials are stored as sums, max/min partials are reduced here.
    ``marked_varying`` maps mesh axes to the inputs the body sees as varying
    over them because their gradients are declared Partial there (for errors)."""
    varying = varying_axes(v)
    sizes = axis_sizes(mesh)
    stored, summed, scale = [], [], 1
    for axis, p in zip(mesh.axis_names, placements):
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
        elif p.is_partial():
            if axis not in varying:
                v = jax.lax.pcast(v, axis, to="varying")
            _check_partial_dtype(v.dtype, p, axis, j)
            if p.reduce_op in ("max", "min"):
                v = _reduce_extreme(v, p.reduce_op, axis)
                stored.append(Replicate())
                continue
            scale *= sizes[axis] if p.reduce_op == "avg" else 1
            summed.append(axis)
            stored.append(Partial("sum"))
        else:
            stored.append(p)
    if summed:  # divide before the cast: JAX has no division of unreduced values
        v = v / jnp.asarray(scale, v.dtype) if scale != 1 else v
        v = jax.lax.pcast(v, tuple(summed), to="unreduced")
    return v, tuple(stored)
