"""Which collectives the compute waits for: the overlap model's dataflow.

A collective is **exposed** when both hold:

- its operand is *late*: computed by a matmul (or from such a value), or
  carried from the previous iteration of a ``scan`` (a layer's activations).
  An operand derived by cheap operations from the step's inputs or a scan's
  per-iteration slices alone (a layer's weights, cast and sliced) is ready
  early: XLA's latency-hiding scheduler issues its collective ahead, as FSDP
  prefetches the next layer's weights;
- its result is *waited for*: a matmul reads it (through any chain of other
  operations), or it is carried to the next iteration of a ``scan`` that
  waits for it there (a layer's activations; not a gradient accumulated over
  microbatches, which only adds up), or a waited output of the program or of
  the enclosing body is made from it. A result only written
  out (a layer's weight gradient reduced and stacked for the optimizer) trails
  behind the compute.

Every other collective overlaps with compute.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jlocalmap.estimate.overlap import late_values, waited_values
    >>> def f(w, x):
    ...     y = jnp.tanh(w) @ x
    ...     return y @ x, y
    >>> args = [jax.ShapeDtypeStruct((8, 8), jnp.float32)] * 2
    >>> jaxpr = jax.make_jaxpr(f)(*args).jaxpr
    >>> tanh, dot, _ = jaxpr.eqns
    >>> tanh.outvars[0] in late_values(jaxpr, ()), dot.outvars[0] in late_values(jaxpr, ())
    (False, True)
    >>> dot.outvars[0] in waited_values(jaxpr, {1})   # read by the second matmul
    True
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
from typing import Any

from jax.extend import core as jcore

from jlocalmap._jax_compat import aligned_sub_jaxprs, scan_counts, sub_jaxprs

MATMULS = frozenset(("dot_general", "conv_general_dilated", "ragged_dot_general",
                     "ragged_dot"))


def has_matmul(jaxpr: Any) -> bool:
    """Whether ``jaxpr`` (or a body inside it) multiplies matrices."""
    return any(e.primitive.name in MATMULS or any(has_matmul(s) for s in sub_jaxprs(e))
               for e in jaxpr.eqns)


def _vars(values: Iterable[Any]) -> list:
    return [v for v in values if isinstance(v, jcore.Var)]


def body_inputs(eqn: Any) -> list[tuple[Any, list[int], list[int]]]:
    """Each body of ``eqn`` with, per body input, the index of the equation's
    operand it receives (-1 for none), and per body output the equation's
    output index it becomes (-1: a scan's carry, read by the next iteration)."""
    found = []
    for body, positions in aligned_sub_jaxprs(eqn):
        n_in, n_out = len(body.invars), len(body.outvars)
        ins = [-1] * n_in if positions is None else positions
        outs = list(range(n_out)) if n_out == len(eqn.outvars) else [-1] * n_out
        if eqn.primitive.name == "scan":
            carry = scan_counts(eqn)[1]
            outs = [-1] * carry + list(range(carry, n_out))
        elif eqn.primitive.name in ("while", "cond") and n_out != len(eqn.outvars):
            outs = [-1] * n_out
        found.append((body, ins, outs))
    return found


def late_inputs(eqn: Any, late: set) -> list[tuple[Any, set]]:
    """Each body of ``eqn`` and the indices of its inputs that are late."""
    found = []
    for body, ins, _ in body_inputs(eqn):
        marked = {k for k, i in enumerate(ins)
                  if 0 <= i and isinstance(eqn.invars[i], jcore.Var) and eqn.invars[i] in late}
        if eqn.primitive.name == "scan":  # the carry: the previous iteration's result
            start, carry = scan_counts(eqn)
            marked |= set(range(start, start + carry))
        if eqn.primitive.name == "while":
            marked = set(range(len(body.invars)))
        found.append((body, marked))
    return found


def late_values(jaxpr: Any, late_in: Sequence[int] | AbstractSet[int]) -> set:
    """The late values of ``jaxpr`` (``late_in``: indices of its late inputs)."""
    late = {v for k, v in enumerate(jaxpr.invars) if k in set(late_in)}
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in MATMULS or any(v in late for v in _vars(eqn.invars)) or \
                any(has_matmul(b) for b in sub_jaxprs(eqn)):
            late.update(eqn.outvars)
    return late


def waited_inputs(eqn: Any, waited: set) -> tuple[set, list[tuple[Any, set]]]:
    """(operand indices of ``eqn`` waited for, each body with its waited outputs)."""
    if eqn.primitive.name in MATMULS:
        return set(range(len(eqn.invars))), []
    outs_waited = {j for j, v in enumerate(eqn.outvars) if v in waited}
    bodies, needed = [], set()
    for body, ins, outs in body_inputs(eqn):
        marked = {k for k, j in enumerate(outs) if j < 0 or j in outs_waited}
        if eqn.primitive.name == "scan":
            marked = _waited_carry(eqn, body, outs_waited)
        bodies.append((body, marked))
        inner = waited_values(body, marked)
        needed |= {ins[k] for k, v in enumerate(body.invars) if v in inner and ins[k] >= 0}
    if not bodies and outs_waited:
        needed = set(range(len(eqn.invars)))
    return needed, bodies


def _waited_carry(eqn: Any, body: Any, marked: set) -> set:
    """A scan body's waited outputs: those of the scan's ``marked`` outputs
    (a body's outputs are the scan's, in order), and each carry the next
    iteration waits for (its carry input reaches what is waited: a layer's
    activations, not an accumulated gradient that only adds up)."""
    start, carry = scan_counts(eqn)   # a scan's outputs: its carry, then its stacked ys
    while True:
        inner = waited_values(body, marked)
        more = {k for k in range(carry) if body.invars[start + k] in inner} - marked
        if not more:
            return marked
        marked = marked | more


def waited_values(jaxpr: Any, waited_out: Sequence[int] | AbstractSet[int]) -> set:
    """The values of ``jaxpr`` something waits for (``waited_out``: indices of
    its outputs that are waited for)."""
    waited = {v for j, v in enumerate(jaxpr.outvars) if j in set(waited_out)
              and isinstance(v, jcore.Var)}
    for eqn in reversed(jaxpr.eqns):
        needed, _ = waited_inputs(eqn, waited)
        waited.update(v for i, v in enumerate(eqn.invars) if i in needed
                      and isinstance(v, jcore.Var))
    return waited
