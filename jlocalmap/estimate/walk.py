"""The program walk: one pass over a traced program (its jaxpr) that tallies,
per device, the matmul FLOPs (exact, from shapes), the other FLOPs
(approximate: one per output element, one per reduced element), the bytes the
memory-bound operations move through HBM, and the collectives, per mesh axis,
inside ``local_map`` regions and outside them. A ``scan`` body is walked once
and counted ``length`` times; of a ``cond`` the costliest branch counts.

Equations whose results nothing uses are left out, as XLA removes them.
Memory-bound bytes follow a fusion rule: an elementwise value that only one
elementwise operation reads is fused into it (XLA's loop fusion) and never
reaches HBM; every other value is written once and read once per reader.

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
from collections.abc import Mapping
from typing import Any, Optional

from jax.extend import core as jcore

from jlocalmap._jax_compat import sub_jaxprs
from jlocalmap.estimate.comm import REDUCTIONS, CommOp, collective_ops, explicit_ops
from jlocalmap.estimate.shapes import local_bytes, local_shape, mesh_sizes
from jlocalmap.region.names import PREFIX, name_in
from jlocalmap.region.record import region_settings

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
# No arithmetic (types, casts between layouts of the same bytes).
FREE = frozenset(("reshape", "squeeze", "expand_dims", "pvary", "pcast", "stop_gradient",
                  "name", "optimization_barrier", "axis_index",
                  "broadcast_in_dim")) | frozenset(FREE_CASTS)
MATMULS = frozenset(("dot_general", "conv_general_dilated", "ragged_dot_general",
                     "ragged_dot"))
CALLS = frozenset(("scan", "while", "cond", "shard_map"))


@dataclasses.dataclass
class Tally:
    """Per-device totals of a walk. ``matmuls``: (dtype, flops, bytes) ->
    runs; ``comms``: (where, :class:`~jlocalmap.estimate.comm.CommOp`) -> runs,
    ``where`` a region's name or ``"outside"``; ``notes``: what the walk could
    not see or only approximated."""
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
            if not fusable or len(read_by) > 1 or any(r not in ELEMENTWISE for r in read_by):
                kept.add(v)
    return kept


def _memory_bytes(eqn: Any, kept: set) -> float:
    if eqn.primitive.name in FREE:
        return 0.0
    written = sum(local_bytes(v.aval) for v in eqn.outvars if v in kept)
    read = sum(local_bytes(v.aval) for v in eqn.invars if isinstance(v, jcore.Var) and v in kept)
    return float(written + read)


def region_of(eqn: Any) -> Optional[str]:
    """The name of the ``local_map`` region a ``shard_map`` equation is (its
    forward, or JAX's transpose of it), or None for another ``shard_map``."""
    settings = region_settings(eqn)
    if settings is not None:
        return settings.func_name
    name = name_in(str(eqn.source_info.name_stack))
    return name[len(PREFIX):name.find("]", len(PREFIX))] if name else None


def _primitive(eqn: Any, tally: Tally, kept: set, where: str,
               sizes: Optional[Mapping[str, int]]) -> None:
    name = eqn.primitive.name
    if name in MATMULS:
        nbytes = sum(local_bytes(v.aval) for v in (*eqn.invars, *eqn.outvars))
        tally.matmuls[(str(eqn.invars[0].aval.dtype), matmul_flops(eqn), nbytes)] += 1
    elif name in REDUCTIONS:
        tally.other_flops += sum(math.prod(local_shape(v.aval)) for v in eqn.invars)
    elif name not in FREE:
        tally.other_flops += sum(math.prod(local_shape(v.aval)) for v in eqn.outvars
                                 if hasattr(v.aval, "shape"))
    if name not in MATMULS:
        tally.memory_bytes += _memory_bytes(eqn, kept)
    ops: list[CommOp] = collective_ops(eqn, sizes) if sizes is not None else explicit_ops(eqn)
    for op in ops:
        tally.comms[(where, op)] += 1


def _call(eqn: Any, tally: Tally, where: str, sizes: Optional[Mapping[str, int]]) -> None:
    name, params = eqn.primitive.name, eqn.params
    if name == "shard_map":
        region = region_of(eqn)
        inner_where = region if where == "outside" and region is not None else where
        body = sub_jaxprs(eqn)[0]
        tally.add(walk(body, inner_where, dict(params["mesh"].shape)))
    elif name == "scan":
        tally.add(walk(sub_jaxprs(eqn)[0], where, sizes), int(params["length"]))
    elif name == "cond":
        branches = [walk(b, where, sizes) for b in sub_jaxprs(eqn)]
        tally.add(max(branches, key=lambda t: t.matmul_flops + t.other_flops))
    else:  # while: its trip count is a value, not a type
        for sub in sub_jaxprs(eqn):
            tally.add(walk(sub, where, sizes))
        tally.notes.add("a while loop counts one trip (its trip count is a value); "
                        "write fixed-length loops with jax.lax.scan")


def walk(jaxpr: Any, where: str = "outside",
         sizes: Optional[Mapping[str, int]] = None) -> Tally:
    """Walk ``jaxpr`` (open): ``where`` names the region it is in (or
    ``"outside"``), ``sizes`` the axis sizes of the enclosing ``shard_map``'s
    mesh (None outside every body, where Explicit-axis types say what the
    partitioner must communicate)."""
    tally, kept = Tally(), materialized(jaxpr)
    for eqn in live_eqns(jaxpr):
        if eqn.primitive.name in CALLS:
            _call(eqn, tally, where, sizes)
        elif sub_jaxprs(eqn):  # jit, remat, custom_vjp/jvp calls: their body, once
            for sub in sub_jaxprs(eqn):
                tally.add(walk(sub, where, sizes))
        else:
            _primitive(eqn, tally, kept, where, sizes)
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
