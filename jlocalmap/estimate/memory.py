"""Per-device memory of a traced step: its arguments, its outputs, the
activations its forward pass saves for its backward pass, and the peak of the
temporaries, by a liveness pass over the program in its traced order.

A value occupies memory from the operation that writes it to its last reader;
fused elementwise values (see :mod:`jlocalmap.estimate.walk`) never do. A
body (``scan``, ``shard_map``, ``jit``) adds its own peak while it runs; a
``scan``'s stacked outputs are whole from its start. The outputs are held
from their writing to the end, and their buffers hold temporaries until then,
as XLA assigns them: the peak beside the arguments is the larger of the
outputs and the liveness peak (an input donated to ``jax.jit`` gives its
buffer to an output of its size). Saved activations are the values the forward equations
write and the backward ones (JAX's ``transpose(...)`` of them) read: a region's
own (inside regions) or the rest of the program's (outside).

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jlocalmap.estimate.memory import memory_of
    >>> x = jax.ShapeDtypeStruct((256, 256), jnp.float32)
    >>> loss = lambda x: jnp.sum(jnp.exp(x @ x))
    >>> mem = memory_of(jax.make_jaxpr(jax.grad(loss))(x).jaxpr)
    >>> mem.saved_outside // 2**10   # KiB: exp(x @ x), its own derivative
    256
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from jax.extend import core as jcore

from jlocalmap._jax_compat import (
    jit_parts,
    name_stack,
    shard_map_out_specs,
    shard_map_parts,
    sub_jaxprs,
    transposed,
)
from jlocalmap.estimate.shapes import entries, local_bytes
from jlocalmap.estimate.walk import live_eqns, materialized, region_of
from jlocalmap.layouts.meshes import axis_sizes


@dataclasses.dataclass(frozen=True)
class Memory:
    """Per-device bytes of one step: ``arguments``, ``outputs`` (less what
    donated arguments give back), ``temporaries`` (the peak of what lives
    beside them, less the outputs' buffers, which hold temporaries until the
    outputs are written), activations saved for the backward pass, inside
    regions and outside them."""
    arguments: int
    outputs: int
    temporaries: int
    saved_inside: int
    saved_outside: int

    @property
    def peak(self) -> int:
        return self.arguments + self.outputs + self.temporaries


def var_bytes(eqn: Any, index: int) -> int:
    """Per-device bytes of output ``index`` of ``eqn`` (a ``shard_map``'s from
    its ``out_specs``, which Auto axes leave out of the type)."""
    aval = eqn.outvars[index].aval
    specs = shard_map_out_specs(eqn)
    if specs is None or not hasattr(aval, "shape"):
        return local_bytes(aval)
    mesh, _, _ = shard_map_parts(eqn)
    return local_bytes(aval, entries(specs[index], len(aval.shape)), axis_sizes(mesh))


def inner_peak(eqn: Any) -> int:
    """The peak bytes of an equation's bodies while it runs."""
    subs = sub_jaxprs(eqn)
    if not subs:
        return 0
    if eqn.primitive.name == "cond":
        return max(peak_of(s) for s in subs)
    return sum(peak_of(s) for s in subs) if eqn.primitive.name == "while" else peak_of(subs[0])


def _while_running(eqn: Any, written: int) -> int:
    """Bytes an equation adds while it runs: its results and its bodies' peak
    (a body's own results are the equation's, except a scan's: one
    iteration's slice of its stacked results)."""
    inner = inner_peak(eqn)
    return written + inner if eqn.primitive.name in ("scan", "while") else max(written, inner)


def _last_reads(eqns: Sequence[Any]) -> dict:
    last: dict = {}
    for i, eqn in enumerate(eqns):
        for v in eqn.invars:
            if isinstance(v, jcore.Var):
                last[v] = i
    return last


def peak_of(jaxpr: Any) -> int:
    """Peak bytes of the values ``jaxpr`` writes (its inputs not counted; its
    outputs held to the end)."""
    eqns = live_eqns(jaxpr)
    kept, last = materialized(jaxpr), _last_reads(eqns)
    held = {v for v in jaxpr.outvars if isinstance(v, jcore.Var)}
    live, peak, sizes = 0, 0, {}
    for i, eqn in enumerate(eqns):
        written = {v: var_bytes(eqn, j) for j, v in enumerate(eqn.outvars) if v in kept}
        peak = max(peak, live + _while_running(eqn, sum(written.values())))
        sizes.update(written)
        live += sum(written.values())
        for v in {v for v in eqn.invars if isinstance(v, jcore.Var)}:
            if last.get(v) == i and v in sizes and v not in held:
                live -= sizes.pop(v)
    return peak


def _is_backward(eqn: Any) -> bool:
    return transposed(name_stack(eqn))


def _from_region(eqn: Any, index: int) -> bool:
    """Whether output ``index`` of ``eqn`` is written by a local_map region
    (looking into scan and jit bodies)."""
    if eqn.primitive.name == "shard_map":
        return region_of(eqn) is not None
    subs = sub_jaxprs(eqn)
    if not subs or eqn.primitive.name in ("cond", "while"):
        return False
    body = subs[0]
    offset = len(body.outvars) - len(eqn.outvars)  # a scan's body also returns its carry
    var = body.outvars[index + offset] if 0 <= index + offset < len(body.outvars) else None
    producer = next((e for e in body.eqns if var in e.outvars), None)
    return producer is not None and _from_region(producer, producer.outvars.index(var))


def saved(jaxpr: Any) -> tuple[int, int]:
    """(inside regions, outside) bytes of the forward values the backward reads."""
    eqns = live_eqns(jaxpr)
    producers = {v: (eqn, j) for eqn in eqns if not _is_backward(eqn)
                 for j, v in enumerate(eqn.outvars)}
    inside = outside = 0
    seen: set = set()
    for eqn in eqns:
        if not _is_backward(eqn):
            continue
        for v in eqn.invars:
            if isinstance(v, jcore.Var) and v in producers and v not in seen:
                seen.add(v)
                source, j = producers[v]
                size = var_bytes(source, j)
                if _from_region(source, j):
                    inside += size
                else:
                    outside += size
    return inside, outside


def step_body(jaxpr: Any) -> tuple[Any, tuple]:
    """The program's body and the donated flags of its inputs: a jitted step
    traces as one ``jit`` equation, whose body is the step."""
    parts = jit_parts(jaxpr.eqns[0]) if len(jaxpr.eqns) == 1 else None
    return (jaxpr, ()) if parts is None else parts


def memory_of(jaxpr: Any, argument_bytes: Sequence[int] = ()) -> Memory:
    """The :class:`Memory` of a traced step (``argument_bytes``: per-device
    bytes of each input, where the caller knows them from the inputs' own
    shardings; else read from the types)."""
    body, donated = step_body(jaxpr)
    args = list(argument_bytes) or [local_bytes(v.aval) for v in body.invars]
    outs = [local_bytes(v.aval) for v in body.outvars if isinstance(v, jcore.Var)]
    given_back = sorted((b for b, d in zip(args, donated, strict=False) if d), reverse=True)
    out_total = sum(outs)
    for size in sorted(outs, reverse=True):  # a donated buffer serves an output of its size
        if size in given_back:
            given_back.remove(size)
            out_total -= size
    inside, outside = saved(body)
    # XLA places temporaries in an output's buffer until the output is written
    # (a step's outputs, the updated parameters, come last): the outputs are a
    # floor of what lives beside the arguments, not an addition to it.
    temporaries = max(0, peak_of(body) - sum(outs))
    return Memory(sum(args), out_total, temporaries, inside, outside)
