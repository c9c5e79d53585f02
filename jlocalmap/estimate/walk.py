"""The program walk: one pass over a traced program (its jaxpr) that tallies,
per device, the matmul FLOPs (exact, from shapes), the other FLOPs
(approximate: one per output element, one per reduced element), the bytes the
memory-bound operations move through HBM, and the collectives, per mesh axis,
inside ``local_map`` regions and outside them. A ``scan`` body is walked once
and counted ``length`` times; of a ``cond`` the costliest branch counts.

Equations whose results nothing uses are left out, as XLA removes them.
Memory-bound bytes follow a fusion rule: an elementwise value that only
elementwise operations and reductions read is fused into them (XLA's loop and
input fusion, duplicating a cheap producer into each reader) and never reaches
HBM; every other value (a matmul's or a collective's operand or result, a
reduction's result, a body's input or output) is written once and read once
per reader.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jlocalmap.estimate.walk import walk
    >>> x = jax.ShapeDtypeStruct((64, 128), jnp.float32)
    >>> w = jax.ShapeDtypeStruct((128, 32), jnp.float32)
    >>> tally = walk(jax.make_jaxpr(lambda x, w: jnp.tanh(x @ w))(x, w).jaxpr)
    >>> tally.matmul_flops, tally.other_flops
    (524288.0, 2048.0)
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from jax.extend import core as jcore

from jlocalmap._jax_compat import name_stack, sub_jaxprs
from jlocalmap.estimate.comm import (
    REDUCTIONS,
    CommOp,
    collective_ops,
    explicit_ops,
    is_collective,
)
from jlocalmap.estimate.overlap import (
    MATMULS,
    late_inputs,
    late_values,
    waited_inputs,
    waited_values,
)
from jlocalmap.estimate.shapes import local_bytes, local_shape, mesh_sizes
from jlocalmap.region.names import PREFIX, name_in
from jlocalmap.region.marker import marker_of, region_p

# Changes of a value's type only (unreduced / reduced / varying), by jax version.
FREE_CASTS = ("vary_unreduced_cast_p", "reduced_vary_cast_p", "vary_unreduced_cast",
              "reduced_vary_cast", "preduced")
# Operations XLA fuses into their readers (elementwise, and layout-only ones).
ELEMENTWISE = frozenset((
    "add", "add_any", "sub", "mul", "div", "neg", "abs", "sign", "exp", "exp2", "log",
    "log1p", "expm1", "tanh", "logistic", "sin", "cos", "tan", "sqrt", "rsqrt", "cbrt",
    "pow", "integer_pow", "square", "max", "min", "select_n", "convert_element_type",
    "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "not", "xor", "erf", "erfc",
    "erf_inv", "stop_gradient", "floor", "ceil", "round", "clamp", "is_finite", "atan2",
    "rem", "nextafter", "reduce_precision", "copy", "copy_p", "pvary", "pcast",
    "broadcast_in_dim", "reshape", "squeeze", "expand_dims", "iota", "transpose",
    "shift_left", "shift_right_logical", "shift_right_arithmetic", "population_count",
    "imag", "real", "conj", "random_bits", "random_wrap", "random_unwrap", "random_seed",
    "threefry2x32", "name", "optimization_barrier", "axis_index")) | frozenset(FREE_CASTS)
# Readers that take an elementwise producer into their own fusion (XLA's loop
# and input fusion; a producer read by several is duplicated into each).
FUSING = ELEMENTWISE | frozenset(REDUCTIONS)
# No arithmetic (types, casts between layouts of the same bytes).
FREE = frozenset(("reshape", "squeeze", "expand_dims", "pvary", "pcast", "stop_gradient",
                  "name", "optimization_barrier", "axis_index",
                  "broadcast_in_dim", region_p.name)) | frozenset(FREE_CASTS)


@dataclasses.dataclass
class Tally:
    """Per-device totals of a walk. ``matmuls``: (dtype, flops, bytes) ->
    runs; ``comms``: (where, :class:`~jlocalmap.estimate.comm.CommOp`,
    exposed) -> runs, ``where`` a region's name or ``"outside"``, ``exposed``
    whether the compute waits for it (:mod:`jlocalmap.estimate.overlap`);
    ``notes``: what the walk could not see or only approximated."""
    matmuls: Counter = dataclasses.field(default_factory=Counter)
    other_flops: float = 0.0
    memory_bytes: float = 0.0
    comms: Counter = dataclasses.field(default_factory=Counter)
    notes: set = dataclasses.field(default_factory=set)

    @property
    def matmul_flops(self) -> float:
        return float(sum(f * n for (_, f, _), n in self.matmuls.items()))

    def add(self, other: "Tally", times: int = 1) -> None:
        for key, n in other.matmuls.items():
            self.matmuls[key] += n * times
        for key, n in other.comms.items():
            self.comms[key] += n * times
        self.other_flops += other.other_flops * times
        self.memory_bytes += other.memory_bytes * times
        self.notes |= other.notes


def matmul_flops(eqn: Any) -> float:
    """2 x (output elements) x (contracted elements per output), per device."""
    out = eqn.outvars[0].aval
    if eqn.primitive.name == "conv_general_dilated":
        rhs = local_shape(eqn.invars[1].aval)
        spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, spatial...)
        window = math.prod(rhs[d] for d in spec[2:]) * rhs[spec[1]]
        return 2.0 * math.prod(local_shape(out)) * window
    if eqn.primitive.name.startswith("ragged_dot"):
        lhs = local_shape(eqn.invars[0].aval)
        return 2.0 * math.prod(local_shape(out)) * lhs[-1]
    (lhs_c, _), _ = eqn.params["dimension_numbers"]
    lhs = local_shape(eqn.invars[0].aval)
    return 2.0 * math.prod(local_shape(out)) * math.prod(lhs[d] for d in lhs_c)


def live_eqns(jaxpr: Any) -> list:
    """The equations whose results are used (XLA removes the others): those
    with effects, or an output that the program returns or a live one reads."""
    used = {v for v in jaxpr.outvars if isinstance(v, jcore.Var)}
    live = []
    for eqn in reversed(jaxpr.eqns):
        if eqn.effects or any(v in used for v in eqn.outvars if isinstance(v, jcore.Var)):
            live.append(eqn)
            used.update(v for v in eqn.invars if isinstance(v, jcore.Var))
    return live[::-1]


def materialized(jaxpr: Any) -> set:
    """The values of ``jaxpr`` that reach memory (see the module docstring)."""
    readers: dict = {}
    for eqn in live_eqns(jaxpr):
        for v in eqn.invars:
            if isinstance(v, jcore.Var):
                readers.setdefault(v, []).append(eqn.primitive.name)
    kept = {v for v in jaxpr.outvars if isinstance(v, jcore.Var)} | set(jaxpr.invars)
    for eqn in live_eqns(jaxpr):
        fusable = eqn.primitive.name in ELEMENTWISE
        for v in eqn.outvars:
            read_by = readers.get(v, [])
            if not fusable or any(r not in FUSING for r in read_by):
                kept.add(v)
    return kept


def traffic(eqns: Sequence[Any], kept: set) -> float:
    """HBM bytes the memory-bound operations of one jaxpr level move: each
    stored value written once by its (non-matmul) producer, and read once by
    the fusion of its elementwise and reducing readers and once by each other
    reader (matmuls read their operands in their own time; collectives and
    bodies are priced apart)."""
    total = 0.0
    fused_read: set = set()
    for eqn in eqns:
        name = eqn.primitive.name
        if name in FREE or name in MATMULS or sub_jaxprs(eqn) or is_collective(eqn):
            continue
        total += sum(local_bytes(v.aval) for v in eqn.outvars if v in kept)
        for v in eqn.invars:
            if not isinstance(v, jcore.Var) or v not in kept:
                continue
            if name not in FUSING:
                total += local_bytes(v.aval)
            elif v not in fused_read:
                fused_read.add(v)
                total += local_bytes(v.aval)
    return total


def region_of(eqn: Any) -> Optional[str]:
    """The name of the ``local_map`` region a ``shard_map`` equation is (its
    forward, or JAX's transpose of it), or None for another ``shard_map``."""
    marker = marker_of(eqn)
    if marker is not None:
        return marker.settings.func_name
    name = name_in(name_stack(eqn))
    return name[len(PREFIX):name.find("]", len(PREFIX))] if name else None


@dataclasses.dataclass(frozen=True)
class Context:
    """Where a jaxpr is walked: the region it is in (or ``"outside"``), the
    axis sizes of the enclosing ``shard_map``'s mesh (None outside every body,
    where Explicit-axis types say what the partitioner must communicate), and
    which of its inputs are late and outputs waited for (the overlap model,
    :mod:`jlocalmap.estimate.overlap`)."""
    where: str = "outside"
    sizes: Optional[Mapping[str, int]] = None
    late_in: frozenset = frozenset()
    waited_out: frozenset = frozenset()


def _primitive(eqn: Any, tally: Tally, ctx: Context, exposed: bool) -> None:
    name = eqn.primitive.name
    if name in MATMULS:
        nbytes = sum(local_bytes(v.aval) for v in (*eqn.invars, *eqn.outvars))
        tally.matmuls[(str(eqn.invars[0].aval.dtype), matmul_flops(eqn), nbytes)] += 1
    elif name in REDUCTIONS:
        tally.other_flops += sum(math.prod(local_shape(v.aval)) for v in eqn.invars)
    elif name not in FREE:
        tally.other_flops += sum(math.prod(local_shape(v.aval)) for v in eqn.outvars
                                 if hasattr(v.aval, "shape"))
    ops: list[CommOp] = (collective_ops(eqn, ctx.sizes) if ctx.sizes is not None
                         else explicit_ops(eqn))
    for op in ops:
        tally.comms[(ctx.where, op, exposed)] += 1


def _bodies(eqn: Any, ctx: Context, late: set, waited: set) -> list[tuple[Any, Context]]:
    """Each body of a call equation with the context it runs in."""
    where, sizes = ctx.where, ctx.sizes
    if eqn.primitive.name == "shard_map":
        region = region_of(eqn)
        where = region if where == "outside" and region is not None else where
        sizes = dict(eqn.params["mesh"].shape)
    _, waits = waited_inputs(eqn, waited)
    return [(body, Context(where, sizes, frozenset(late_in), frozenset(waited_out)))
            for (body, late_in), (_, waited_out) in
            zip(late_inputs(eqn, late), waits, strict=True)]


def _call(eqn: Any, tally: Tally, bodies: list[tuple[Any, Context]]) -> None:
    name = eqn.primitive.name
    if name == "scan":
        [(body, ctx)] = bodies
        tally.add(walk(body, ctx), int(eqn.params["length"]))
    elif name == "cond":
        branches = [walk(b, ctx) for b, ctx in bodies]
        tally.add(max(branches, key=lambda t: t.matmul_flops + t.other_flops))
    else:  # jit, remat, shard_map, custom_vjp/jvp: their body, once; while: one trip
        for body, ctx in bodies:
            tally.add(walk(body, ctx))
        if name == "while":
            tally.notes.add("a while loop counts one trip (its trip count is a value); "
                            "write fixed-length loops with jax.lax.scan")


def walk(jaxpr: Any, ctx: Context = Context()) -> Tally:
    """Walk ``jaxpr`` (open) in the context ``ctx``."""
    tally, eqns = Tally(), live_eqns(jaxpr)
    tally.memory_bytes = traffic(eqns, materialized(jaxpr))
    late, waited = late_values(jaxpr, ctx.late_in), waited_values(jaxpr, ctx.waited_out)
    for eqn in eqns:
        if sub_jaxprs(eqn):
            _call(eqn, tally, _bodies(eqn, ctx, late, waited))
        else:
            exposed = any(v in late for v in eqn.invars if isinstance(v, jcore.Var)) and \
                any(v in waited for v in eqn.outvars if isinstance(v, jcore.Var))
            _primitive(eqn, tally, ctx, exposed)
    return tally


def auto_axes(jaxpr: Any) -> tuple:
    """Mesh axes of the program's inputs that are Auto (their communication
    is the partitioner's choice, unseen here)."""
    found: dict = {}
    for v in jaxpr.invars:
        sharding = getattr(v.aval, "sharding", None)
        mesh = getattr(sharding, "mesh", None)
        for axis, kind in zip(getattr(mesh, "axis_names", ()), getattr(mesh, "axis_types", ()),
                              strict=False):
            if "Auto" in str(kind) and mesh_sizes(v.aval).get(axis, 1) > 1:
                found[axis] = True
    return tuple(found)
