"""Per-device memory of a traced step: its arguments, its outputs, the
activations its forward pass saves for its backward pass, and the peak of the
temporaries, by a liveness pass over the program in its traced order.

A value occupies memory from the operation that writes it to its last reader;
fused elementwise values (see :mod:`jlocalmap.estimate.walk`) never do. A
body (``scan``, ``shard_map``, ``jit``) adds its own peak while it runs; a
``scan``'s stacked outputs are whole from its start. The step's outputs are
buffers of their own, as XLA assigns them: an input donated to ``jax.jit``
gives its buffer to an output of its size, written in place (the updated
parameters and optimizer state); the other outputs' buffers host, until the
output is written, temporaries that fit (largest first, one at a time, into
the smallest buffer that is free for the temporary's whole life: XLA's
``BufferAssigner`` reusing a live-out allocation). Every other temporary, the
saved activations and the gradients among them, adds to the peak beside the
arguments and outputs. Saved activations are the values the forward equations
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
    beside them outside the outputs' buffers: saved activations, gradients,
    the backward's work space), activations saved for the backward pass,
    inside regions and outside them (part of the temporaries)."""
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


def lifetimes(jaxpr: Any, eqns: Sequence[Any], in_place: frozenset = frozenset()) -> dict:
    """{value: (bytes, index of its writer, index of its last reader)} of the
    values of ``jaxpr`` that reach memory; its outputs live to the end, and
    ``in_place`` (outputs written into a donated input's buffer) not at all."""
    kept, last = materialized(jaxpr) - in_place, _last_reads(eqns)
    held = {v for v in jaxpr.outvars if isinstance(v, jcore.Var)}
    return {v: (var_bytes(eqn, j), i, len(eqns) if v in held else last.get(v, i))
            for i, eqn in enumerate(eqns) for j, v in enumerate(eqn.outvars) if v in kept}


def in_output_buffers(lives: dict, outputs: Sequence[Any]) -> set:
    """The temporaries that XLA's buffer assignment places in the outputs'
    buffers: largest first, each into the smallest output buffer of at least
    its size that no value assigned there, nor the output itself (from its
    writing on), uses during its life."""
    busy = sorted(([lives[v][0], [(lives[v][1], lives[v][2])]] for v in outputs if v in lives),
                  key=lambda slot: slot[0])
    placed = set()
    for v, (size, first, last) in sorted(lives.items(), key=lambda kv: -kv[1][0]):
        if v in outputs:
            continue
        for slot_size, used in busy:
            if slot_size >= size and all(last < a or first > b for a, b in used):
                used.append((first, last))
                placed.add(v)
                break
    return placed


def peak_of(jaxpr: Any, in_place: frozenset = frozenset(), outputs_apart: bool = False) -> int:
    """Peak bytes of the values ``jaxpr`` writes (its inputs not counted; its
    outputs held to the end; ``in_place``: outputs written into a donated
    input's buffer, counted with the inputs). With ``outputs_apart`` the
    outputs and the temporaries their buffers host are left out (the step's
    own outputs, counted apart)."""
    eqns = live_eqns(jaxpr)
    lives = lifetimes(jaxpr, eqns, in_place)
    if outputs_apart:
        outputs = [v for v in jaxpr.outvars if isinstance(v, jcore.Var)]
        for v in in_output_buffers(lives, outputs) | set(outputs):
            lives.pop(v, None)
    delta = [0] * (len(eqns) + 2)   # live bytes before each equation, as differences
    written = [0] * len(eqns)
    for size, first, last in lives.values():
        delta[first + 1] += size
        delta[last + 1] -= size
        written[first] += size
    live, peak = 0, 0
    for i, eqn in enumerate(eqns):
        live += delta[i]
        peak = max(peak, live + _while_running(eqn, written[i]))
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
    """(inside regions, outside) bytes of the forward values the backward reads
    (where a forward and its backward both run inside a body, gradient
    accumulation's scan over microbatches: one run's)."""
    eqns = live_eqns(jaxpr)
    producers = {v: (eqn, j) for eqn in eqns if not _is_backward(eqn)
                 for j, v in enumerate(eqn.outvars)}
    inside = outside = 0
    seen: set = set()
    for eqn in eqns:
        if not _is_backward(eqn):
            for body in sub_jaxprs(eqn)[:1]:
                if any(_is_backward(e) for e in body.eqns):
                    inside, outside = (a + b for a, b in zip((inside, outside), saved(body),
                                                             strict=True))
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
    given_back = sorted((b for b, d in zip(args, donated, strict=False) if d), reverse=True)
    in_place = set()
    for v in body.outvars:  # a donated buffer serves an output of its size
        size = local_bytes(v.aval)
        if isinstance(v, jcore.Var) and size in given_back and v not in in_place:
            given_back.remove(size)
            in_place.add(v)
    out_total = sum(local_bytes(v.aval) for v in set(body.outvars) - in_place
                    if isinstance(v, jcore.Var))
    inside, outside = saved(body)
    temporaries = peak_of(body, frozenset(in_place), outputs_apart=True)
    return Memory(sum(args), out_total, temporaries, inside, outside)
