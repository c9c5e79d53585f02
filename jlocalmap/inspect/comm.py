"""Communication accounting: the counterpart of torch's ``CommDebugMode``.

Torch counts collectives as its dispatcher runs them; JAX compiles a whole
program first, and XLA then fuses, combines or removes collectives. So this
module reads the compiled HLO: what it counts is what the devices will run.

Bytes are per device and count each collective's whole buffer, as nccl-tests'
"size" does: an all-gather's gathered result, a reduce-scatter's unscattered
operand, and the operand (= result) of the others. Tuple-shaped collectives (XLA
combines several arrays into one op, and emits all-to-all as one array per
peer) count the sum of their elements. Asynchronous pairs (``all-gather-start``
... ``all-gather-done``) count once, with the ``-done``'s result.

To count a training step rather than the forward pass, count the gradient
function: ``count_collectives(jax.value_and_grad(loss), params, batch)``.

Example:
    >>> import jax, numpy as np, jlocalmap as jlm
    >>> from jlocalmap import Replicate, Shard
    >>> mesh = jax.make_mesh((2,), ("tp",))
    >>> mm = jlm.local_map(lambda x, w: jlm.collectives.all_reduce(x @ w, "sum", mesh),
    ...                    [Replicate()], ([Shard(1)], [Shard(0)]), device_mesh=mesh)
    >>> x, w = np.ones((8, 16), np.float32), np.ones((16, 4), np.float32)
    >>> comms = jlm.inspect.count_collectives(mm, x, w)
    >>> comms.counts["all-reduce"], comms.bytes["all-reduce"]
    (1, 128)
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jlocalmap.errors import LocalMapTypeError, LocalMapValueError

KINDS: tuple[str, ...] = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                          "collective-permute")

# `%name = TYPE opcode(operands), attributes`; a TYPE never holds ` word(`.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,<=]*)\]")
_OPERAND = re.compile(r"%([\w.\-]+)")
_COMPUTATION = re.compile(r"^\s*(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_CALLEES = re.compile(r"\b(body|condition|calls|to_apply|branch_computations|"
                      r"true_computation|false_computation)=(\{[^}]*\}|%[\w.\-]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_ARRAY_TYPES = (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct)


def _bits(dtype: str) -> int:
    if dtype == "pred":
        return 8  # XLA stores a bool in a byte
    digits = re.search(r"\d+", dtype)
    return int(digits.group()) if digits else 0  # token[] carries no data


def _type_bytes(hlo_type: str) -> int:
    """Bytes of an HLO type: an array, or a tuple of arrays summed."""
    total = 0
    for dtype, dims in _ARRAY.findall(hlo_type):
        elements = math.prod(int(d.lstrip("<=")) for d in dims.split(",") if d)
        total += math.ceil(elements * _bits(dtype) / 8)
    return total


def _operand_names(rest: str) -> list[str]:
    """The names inside the opcode's parentheses (``rest`` starts after the '(')."""
    depth = 1
    for end, char in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            return _OPERAND.findall(rest[:end])
    return _OPERAND.findall(rest)


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective of a compiled program: its kind, HLO instruction name, and
    the bytes of its operands and result on each device.

    Example:
        >>> from jlocalmap.inspect import Collective
        >>> Collective("all-gather", "ag", operand_bytes=16, result_bytes=64).bytes
        64
    """

    kind: str
    name: str
    operand_bytes: int
    result_bytes: int
    executions: int = 1  # times one call runs it: the trip counts of enclosing loops

    @property
    def bytes(self) -> int:
        """The collective's whole buffer: the larger of operand and result."""
        return max(self.operand_bytes, self.result_bytes)


@dataclasses.dataclass(frozen=True)
class CommCounts:
    """The collectives of a compiled program; ``counts`` and ``bytes`` map each
    kind (``"all-reduce"``, ``"all-gather"``, ``"reduce-scatter"``,
    ``"all-to-all"``, ``"collective-permute"``) to a number, and ``str()`` is a table.

    Example:
        >>> from jlocalmap.inspect import Collective, CommCounts
        >>> comms = CommCounts((Collective("all-reduce", "ar", 384, 384),))
        >>> comms.counts["all-reduce"], comms.total_bytes
        (1, 384)
    """

    ops: tuple[Collective, ...]

    @property
    def counts(self) -> dict[str, int]:
        """Number of collectives of each kind (every kind present, 0 included)."""
        return {k: sum(op.kind == k for op in self.ops) for k in KINDS}

    @property
    def bytes(self) -> dict[str, int]:
        """Bytes per device moved by the collectives of each kind."""
        return {k: sum(op.bytes for op in self.ops if op.kind == k) for k in KINDS}

    @property
    def total_bytes(self) -> int:
        """Bytes per device over all collectives."""
        return sum(op.bytes for op in self.ops)

    @property
    def executed(self) -> dict[str, int]:
        """Collectives of each kind that one call runs: an op inside a loop of
        known trip count n counts n times (a microbatch loop, a scan over layers)."""
        return {k: sum(op.executions for op in self.ops if op.kind == k) for k in KINDS}

    @property
    def executed_bytes(self) -> dict[str, int]:
        """Bytes per device that one call moves with collectives of each kind."""
        return {k: sum(op.bytes * op.executions for op in self.ops if op.kind == k)
                for k in KINDS}

    def __str__(self) -> str:
        counts, sizes = self.counts, self.bytes
        rows = [(k, counts[k], sizes[k]) for k in KINDS]
        rows.append(("total", len(self.ops), self.total_bytes))
        lines = [f"{'collective':<20}{'count':>7}{'bytes':>14}"]
        lines += [f"{k:<20}{c:>7}{b:>14,}" for k, c, b in rows]
        if any(op.executions != 1 for op in self.ops):
            runs, moved = self.executed, self.executed_bytes
            lines[0] += f"{'runs/call':>11}{'bytes/call':>14}"
            for i, k in enumerate(KINDS, start=1):
                lines[i] += f"{runs[k]:>11}{moved[k]:>14,}"
            lines[-1] += (f"{sum(runs.values()):>11}"
                          f"{sum(moved.values()):>14,}")
        lines.append("(bytes per device; all-gather: result, reduce-scatter: operand)")
        return "\n".join(lines)


def collectives_in_hlo(hlo_text: str) -> CommCounts:
    """The collectives of a compiled HLO module's text (``compiled.as_text()``,
    or an XLA dump from another machine).

    Example:
        >>> from jlocalmap.inspect import collectives_in_hlo
        >>> hlo = '''
        ... %p = f32[4,8]{1,0} parameter(0)
        ... %ag = (f32[4,8]{1,0}, f32[16,8]{1,0}) all-gather-start(%p), dimensions={0}
        ... ROOT %done = f32[16,8]{1,0} all-gather-done(%ag)
        ... '''
        >>> collectives_in_hlo(hlo).ops
        (Collective(kind='all-gather', name='ag', operand_bytes=128, result_bytes=512, executions=1),)
    """
    if not isinstance(hlo_text, str):
        raise LocalMapTypeError(
            f"hlo_text: expected the text of an HLO module (a str), found "
            f"{type(hlo_text).__name__}; pass jax.jit(f).lower(*args).compile().as_text().")
    instructions: dict[str, tuple[str, str, list[str]]] = {}
    computation_of: dict[str, Any] = {}
    calls: dict[Any, list[tuple[str, int]]] = {}
    computation, entry = None, None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            computation = header.group(2)
            entry = computation if header.group(1) else entry
            continue
        match = _INSTRUCTION.match(line)
        if match:
            name, hlo_type, opcode, rest = match.groups()
            instructions[name] = (hlo_type, opcode, _operand_names(rest))
            computation_of[name] = computation
            trips = _TRIP_COUNT.search(rest) if opcode == "while" else None
            for attribute, callees in _CALLEES.findall(rest):
                times = int(trips.group(1)) if trips and attribute == "body" else 1
                for callee in _OPERAND.findall(callees):
                    calls.setdefault(computation, []).append((callee, times))
    runs = _runs_per_call(calls, entry)
    done_types = {operands[0]: hlo_type for hlo_type, opcode, operands in instructions.values()
                  if opcode.endswith("-done") and operands}
    ops = []
    for name, (hlo_type, opcode, operands) in instructions.items():
        kind = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
        if kind not in KINDS:
            continue
        result_type = done_types.get(name, hlo_type) if opcode != kind else hlo_type
        operand_bytes = sum(_type_bytes(instructions[o][0]) for o in operands if o in instructions)
        ops.append(Collective(kind, name, operand_bytes, _type_bytes(result_type),
                              runs.get(computation_of[name], 1)))
    return CommCounts(tuple(ops))


def _runs_per_call(calls: dict, entry) -> dict:
    """How often one call of the entry computation runs each computation."""
    runs: dict = {}

    def visit(computation, times, depth=0):
        runs[computation] = runs.get(computation, 0) + times
        if depth < 64:  # HLO call graphs are acyclic; the bound only guards the parse
            for callee, n in calls.get(computation, ()):
                visit(callee, times * n, depth + 1)

    if entry is not None:
        visit(entry, 1)
    return runs


def compiled_text(compiled: jax.stages.Compiled) -> str:
    """The HLO module text of a compiled program (JAX types ``as_text()`` as
    optional: a backend may keep no text)."""
    text = compiled.as_text()
    if text is None:
        raise LocalMapValueError(
            "compiled: expected a program whose backend keeps its HLO text, found "
            "none (as_text() is None); count collectives on a CPU or GPU backend.")
    return text


def count_collectives(fn: Callable, *args: Any, **kwargs: Any) -> CommCounts:
    """Compile ``jax.jit(fn)`` for these arguments and account its collectives
    (see :func:`collectives_in_hlo`). Nothing runs on the devices. Array leaves
    (``jax.Array``, numpy arrays, ``jax.ShapeDtypeStruct``) are traced; other
    leaves (strings, numbers, meshes) reach ``fn`` as they are.

    Example:
        >>> import jax, numpy as np, jlocalmap as jlm
        >>> from jlocalmap import Replicate, Shard
        >>> mesh = jax.make_mesh((4,), ("tp",))
        >>> gather = jlm.local_map(lambda x: jlm.collectives.all_gather_tensor(x, 0, mesh),
        ...                        [Replicate()], ([Shard(0)],), device_mesh=mesh)
        >>> print(jlm.inspect.count_collectives(gather, np.ones((8, 2), np.float32)))
        collective            count         bytes
        all-reduce                0             0
        all-gather                1            64
        reduce-scatter            0             0
        all-to-all                0             0
        collective-permute        0             0
        total                     1            64
        (bytes per device; all-gather: result, reduce-scatter: operand)
    """
    if not callable(fn):
        raise LocalMapTypeError(
            f"fn: expected a function to compile, found {type(fn).__name__}; pass "
            f"the function and its arguments: count_collectives(f, x, w).")
    leaves, tree = jax.tree_util.tree_flatten((args, kwargs))
    dynamic = [isinstance(leaf, _ARRAY_TYPES) for leaf in leaves]

    def call(*arrays):
        fed = iter(arrays)
        args, kwargs = jax.tree_util.tree_unflatten(
            tree, [next(fed) if d else leaf for leaf, d in zip(leaves, dynamic, strict=True)])
        return fn(*args, **kwargs)

    lowered = jax.jit(call).lower(*[leaf for leaf, d in zip(leaves, dynamic, strict=True) if d])
    return collectives_in_hlo(compiled_text(lowered.compile()))
