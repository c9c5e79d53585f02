"""Where the padding rows of uneven inputs flow in a body, read from its jaxpr
(nothing runs): the static half of the uneven-padding guarantee.

An uneven input is padded to its even storage before the region; the body sees
the padding rows. Its outputs are right when no valid element of an output
depends on padding content. Each value of the body's jaxpr gets a state:

- a set of ``(dim, tag)`` *row-aligned* dims: padding content reaches only the
  elements at padding positions along those dims (elementwise work, matmuls
  over other dims, transposes...); the empty set: no padding content at all;
- ``MIXED``: a known operation mixes rows along a padded dim (a sum, mean, max
  or matmul contraction over it, a shift, a cumulative op, a collective over
  the axes that split it): valid elements may hold padding content;
- ``UNKNOWN``: an operation this reading does not follow.

Values selected or multiplied by a mask built from ``iota`` (as
``jlocalmap.local_valid_size`` masks are) are taken as masked: their padding
positions hold what the body chose. An output is refused when it is ``MIXED``,
or row-aligned along a dim that is not one of its own uneven dims; ``UNKNOWN``
cannot be decided here (``local_map(..., check_padding=True)`` runs the body).

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jlocalmap.region.row_flow import MIXED, flow
    >>> jaxpr = jax.make_jaxpr(lambda x: (x * 2, x.sum(0)))(jnp.ones((3, 4))).jaxpr
    >>> flow(jaxpr, [frozenset({(0, "rows")})])
    [frozenset({(0, 'rows')}), 'mixed']
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Union

from jax.extend import core as jcore

from jlocalmap._jax_compat import aligned_sub_jaxprs, collective_axes
from jlocalmap.errors import PlacementValueError

MIXED = "mixed"
UNKNOWN = "unknown"
State = Union[frozenset, str]
CLEAN: frozenset = frozenset()

_REDUCTIONS = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and",
               "reduce_or", "reduce_xor", "argmax", "argmin", "reduce_precision_sum"}
_ALONG_AXIS = {"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp", "sort", "rev"}
# Reductions across devices (pvary and pcast only retype a value: elementwise).
_SAME_SHAPE_COLLECTIVES = {"psum", "pmax", "pmin", "psum_invariant", "ppermute"}
_COLLECTIVES = {"all_to_all", "all_gather", "reduce_scatter", "psum_scatter", "all_gather_invariant"}
_NOT_ELEMENTWISE = _COLLECTIVES | _SAME_SHAPE_COLLECTIVES | {"dynamic_update_slice", "scatter", "scatter-add", "scatter_add",
                    "scatter-mul", "scatter-min", "scatter-max", "fft", "while", "scan",
                    "rng_bit_generator", "random_bits", "custom_call", "pure_callback",
                    "io_callback", "conv_general_dilated", "top_k", "select_and_scatter_add",
                    "reduce_window_sum", "reduce_window_max", "reduce_window_min",
                    "reduce_window", "cond"}


def join(*states: State) -> State:
    """The state of a value computed elementwise from values in ``states``."""
    if MIXED in states:
        return MIXED
    if UNKNOWN in states:
        return UNKNOWN
    merged = frozenset().union(*states)
    dims = [d for d, _ in merged]
    return MIXED if len(dims) != len(set(dims)) else merged  # one dim, two paddings


def _moved(state: State, where: dict) -> State:
    """``state`` with its dims renamed by ``where`` (dim -> new dim, or None: mixed)."""
    if not isinstance(state, frozenset):
        return state
    out = set()
    for d, tag in state:
        if where.get(d, d) is None:
            return MIXED
        out.add((where.get(d, d), tag))
    return frozenset(out)


def flow(jaxpr: Any, inputs: Sequence[State], sharded: frozenset = frozenset(),
         mask_inputs: Sequence[int] = ()) -> list:
    """The state of each output of ``jaxpr`` given its inputs' states;
    ``sharded`` is the mesh axes that split padded dims (a collective over one
    of them mixes rows of different devices); ``mask_inputs`` the positions of
    inputs that are masks (built from iota)."""
    env: dict = dict(zip(jaxpr.invars, inputs, strict=True))
    # Values built from iota alone: masks of positions, not content.
    masks: set = {jaxpr.invars[k] for k in mask_inputs}

    def read(v) -> State:
        return env.get(v, CLEAN) if isinstance(v, jcore.Var) else CLEAN
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        from_mask = any(isinstance(v, jcore.Var) and v in masks for v in eqn.invars)
        if eqn.primitive.name == "iota" or (from_mask and all(s == CLEAN for s in ins)):
            masks.update(eqn.outvars)   # positions only: no content flows in
        outs = _rule(eqn, ins, masks, sharded)
        for var, state in zip(eqn.outvars, outs, strict=True):
            env[var] = state
    return [read(v) for v in jaxpr.outvars]


def _rule(eqn, ins: list, masks: set, sharded: frozenset) -> list:
    n_out = len(eqn.outvars)
    if all(s == CLEAN for s in ins):
        return [CLEAN] * n_out
    name, params = eqn.primitive.name, eqn.params
    subs = aligned_sub_jaxprs(eqn)
    if subs and name not in ("while", "scan"):
        results = [flow(sub, [ins[k] for k in idx], sharded,
                        [i for i, k in enumerate(idx) if _is_mask(eqn.invars[k], masks)])
                   for sub, idx in subs if idx is not None and len(sub.outvars) == n_out]
        if results and (name != "cond" or ins[0] == CLEAN):
            return [join(*states) for states in zip(*results, strict=True)]
        return [UNKNOWN] * n_out
    if name in ("select_n", "mul") and _masked(eqn, ins, masks):
        return [CLEAN]
    shaped = _shape_rule(eqn, name, params, ins)
    if shaped is not None:
        return [shaped] * n_out
    across = bool(set(collective_axes(eqn)) & sharded)   # a collective over the padded dims' axes
    if name in _SAME_SHAPE_COLLECTIVES:
        return [MIXED if across else join(*ins)] * n_out
    if name in _COLLECTIVES:
        return [MIXED if across else UNKNOWN] * n_out
    if name not in _NOT_ELEMENTWISE and n_out == 1 and _elementwise(eqn):
        return [join(*ins)]
    return [MIXED if MIXED in ins else UNKNOWN] * n_out   # mixed stays mixed


def _elementwise(eqn) -> bool:
    """Operands of the output's shape (size-1 dims broadcast), or scalars."""
    out = tuple(getattr(eqn.outvars[0].aval, "shape", ()))
    shapes = [tuple(getattr(v.aval, "shape", ())) for v in eqn.invars]
    return all(s == () or (len(s) == len(out) and all(a in (b, 1) for a, b in zip(s, out, strict=True)))
               for s in shapes)


def _is_mask(v, masks: set) -> bool:
    return isinstance(v, jcore.Var) and v in masks


def _masked(eqn, ins: list, masks: set) -> bool:
    """``where(mask, x, clean)`` or ``x * mask``: positions chosen by an iota mask."""
    mask_args = [k for k, v in enumerate(eqn.invars)
                 if isinstance(v, jcore.Var) and v in masks]
    if eqn.primitive.name == "select_n":
        return 0 in mask_args and any(s == CLEAN for s in ins[1:])
    return bool(mask_args)


def _shape_rule(eqn, name: str, params: dict, ins: list):
    """The state of shape-changing operations (None: not one of them)."""
    x = ins[0]
    shape = tuple(getattr(eqn.invars[0].aval, "shape", ()))
    if name in _REDUCTIONS:
        axes = params["axes"]
        return _moved(x, {d: None if d in axes else d - sum(a < d for a in axes)
                          for d in range(len(shape))})
    if name in _ALONG_AXIS:
        axes = (params["axis"],) if "axis" in params else tuple(
            params.get("dimensions", (params.get("dimension", 0),)))
        return _moved(x, {d: None for d in axes})
    if name == "broadcast_in_dim":
        return _moved(x, dict(enumerate(params["broadcast_dimensions"])))
    if name == "transpose":
        perm = params["permutation"]
        return _moved(x, {d: perm.index(d) for d in range(len(shape))})
    if name == "squeeze":
        gone = params["dimensions"]
        return _moved(x, {d: d - sum(a < d for a in gone) for d in range(len(shape))})
    if name == "reshape":
        return _moved(x, _reshaped(shape, tuple(params["new_sizes"])))
    if name in ("slice", "dynamic_slice", "pad"):
        kept = _whole_dims(eqn, name, params, shape)
        return join(_moved(x, {d: d if d in kept else None for d in range(len(shape))}),
                    *ins[1:])
    if name == "concatenate":
        dim = params["dimension"]
        return join(*(_moved(s, {dim: None}) for s in ins))
    if name == "dot_general":
        return _dot(params["dimension_numbers"], ins, eqn)
    if name == "gather":
        return _gather(params["dimension_numbers"], ins, eqn)
    return None


def _reshaped(old: tuple, new: tuple) -> dict:
    """old dim -> new dim where a reshape keeps it whole (same size, same elements before)."""
    where: dict = {}
    for d, size in enumerate(old):
        before = math.prod(old[:d])
        where[d] = next((j for j in range(len(new))
                         if math.prod(new[:j]) == before and new[j] == size), None)
    return where


def _whole_dims(eqn, name: str, params: dict, shape: tuple) -> set:
    """The dims a slice, dynamic slice or pad leaves whole and in place."""
    if name == "slice":
        strides = params.get("strides") or (1,) * len(shape)
        return {d for d in range(len(shape)) if params["start_indices"][d] == 0 and
                params["limit_indices"][d] == shape[d] and strides[d] == 1}
    if name == "dynamic_slice":
        return {d for d in range(len(shape)) if params["slice_sizes"][d] == shape[d]}
    return {d for d, (lo, hi, inner) in enumerate(params["padding_config"])
            if lo == hi == inner == 0}


def _dot(numbers, ins: list, eqn) -> State:
    (lc, rc), (lb, rb) = numbers
    ranks = [len(v.aval.shape) for v in eqn.invars[:2]]
    lfree = [d for d in range(ranks[0]) if d not in lc and d not in lb]
    rfree = [d for d in range(ranks[1]) if d not in rc and d not in rb]
    nb = len(lb)
    lhs = {d: lb.index(d) if d in lb else None if d in lc else nb + lfree.index(d)
           for d in range(ranks[0])}
    rhs = {d: rb.index(d) if d in rb else None if d in rc else nb + len(lfree) + rfree.index(d)
           for d in range(ranks[1])}
    return join(_moved(ins[0], lhs), _moved(ins[1], rhs))


def _gather(numbers, ins: list, eqn) -> State:
    """A lookup (an embedding): rows of clean tables chosen by row-aligned indices."""
    if ins[0] != CLEAN:
        return UNKNOWN
    rank = len(eqn.outvars[0].aval.shape)
    batch_out = [j for j in range(rank) if j not in numbers.offset_dims]
    index_rank = len(eqn.invars[1].aval.shape)
    vector = index_rank - 1    # JAX's gathers keep the index vector last
    batch_in = [k for k in range(index_rank) if k != vector]
    where: dict[int, Union[int, None]] = {k: batch_out[i] for i, k in enumerate(batch_in) if i < len(batch_out)}
    where[vector] = None
    return _moved(ins[1], where)


def check_padding_rows(body: Any, plan: Any, facts: Any) -> bool:
    """Refuse a body whose outputs can hold padding content of its uneven
    inputs, read from its jaxpr ``body`` (inputs: ``plan.operands``' local
    values; outputs: ``facts.region_outputs``). Returns False where some output
    could not be decided (an operation this reading does not follow)."""
    states: list = []
    sharded: set = set()
    for p in plan.operands:
        shift = 1 if p.dst.partial_axes else 0   # a Partial input's stacked summands
        states.append(frozenset((d + shift, (size, tuple(axes)))
                                for d, size, axes, _ in p.dst.uneven))
        sharded.update(a for _, _, axes, _ in p.dst.uneven for a in axes)
    decided = True
    for o, state in zip(facts.region_outputs, flow(body, states, frozenset(sharded)), strict=True):
        own = {(d, (size, tuple(axes))) for d, size, axes, _ in o.layout.uneven}
        if state == UNKNOWN:
            decided = False
        elif state == MIXED or not state <= own:
            uneven = [p.index for p in plan.inputs if p.dst.is_uneven]
            raise PlacementValueError(
                f"out_placements[{o.index}]: output {o.index} changes with the padding of "
                f"the uneven inputs {uneven}: the body mixes rows along an uneven dim (a "
                f"sum, mean, max, matmul contraction, shift or collective over it; read from "
                f"the body's jaxpr). Mask the padding rows with "
                f"jlocalmap.local_valid_size(size, axes), or give that input Replicate() "
                f"along the dim.")
    return decided
