"""``expect_collectives``: assert the collectives of compiled programs, the
counterpart of a test with PyTorch's ``CommDebugMode``.

Counts are read from the compiled HLO (``jlm.inspect.count_collectives``): what XLA
will run, after it fused, combined or removed collectives. Each kind is a
keyword with ``-`` written ``_`` (``all_reduce``, ``all_gather``,
``reduce_scatter``, ``all_to_all``, ``collective_permute``); a kind not named
is expected to be absent (0), and ``None`` means "any number". ``executed=True``
counts what one call runs (a collective in a loop of n iterations counts n
times) instead of the program's collectives.

A ``with`` block cannot see what ``jax.jit`` compiles inside it (JAX offers no
public hook that hands over compiled programs), so the block counts the
programs it is shown: ``rec.run(fn, *args)`` counts ``jax.jit(fn)`` for these
arguments, then calls ``fn`` and returns its result; ``rec.count(fn, *args)``
only counts. At the end of the block the counts of every program shown, added
(as ``CommDebugMode`` adds every collective run in its block), must be the
expected ones, and at least one program must have been shown.

Example:
    >>> import jax, numpy as np, jlocalmap as jlm
    >>> from jlocalmap import Replicate, Shard
    >>> from jlocalmap.testing import expect_collectives
    >>> mesh = jax.make_mesh((2,), ("tp",))
    >>> mm = jlm.local_map(lambda x, w: jax.lax.psum(x @ w, "tp"), [Replicate()],
    ...                    ([Shard(1)], [Shard(0)]), device_mesh=mesh)
    >>> x, w = np.ones((4, 8), np.float32), np.ones((8, 2), np.float32)
    >>> expect_collectives(mm, x, w, all_reduce=1).counts["all-reduce"]
    1
    >>> with expect_collectives(all_reduce=2) as rec:
    ...     y = rec.run(mm, x, w)
    ...     y = rec.run(mm, x, w)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional, overload

import jax
import numpy as np

import jlocalmap as jlm

_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


class CollectiveRecorder:
    """The ``with expect_collectives(...) as rec:`` block: counts the programs
    shown to it with :meth:`run` or :meth:`count`, and checks their total when
    the block ends.

    Example:
        >>> import jax, numpy as np, jlocalmap as jlm
        >>> from jlocalmap.testing import expect_collectives
        >>> mesh = jax.make_mesh((2,), ("dp",))
        >>> x = jlm.distribute_tensor(np.ones((4, 2), np.float32), mesh, [jlm.Shard(0)])
        >>> with expect_collectives(all_gather=1) as rec:
        ...     full = rec.run(jlm.full_tensor, x)
        >>> [name for name, _ in rec.programs]
        ['full_tensor(float32[4,2])']
    """

    def __init__(self, expected: dict[str, Optional[int]], executed: bool = False):
        self.expected = expected
        self.executed = executed
        self.programs: list[tuple[str, jlm.inspect.CommCounts]] = []

    def count(self, fn: Callable, *args: Any, **kwargs: Any) -> jlm.inspect.CommCounts:
        """Count the collectives of ``jax.jit(fn)`` for these arguments (nothing
        runs) and add them to the block's total.

        Example:
            >>> import jax.numpy as jnp, numpy as np
            >>> from jlocalmap.testing import expect_collectives
            >>> with expect_collectives() as rec:
            ...     print(rec.count(jnp.sin, np.ones(3)).total_bytes)
            0
        """
        comms = jlm.inspect.count_collectives(fn, *args, **kwargs)
        self.programs.append((_program_name(fn, args), comms))
        return comms

    def run(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """Count ``jax.jit(fn)`` for these arguments, then call ``fn(*args, **kwargs)``
        and return its result.

        Example:
            >>> import jax.numpy as jnp
            >>> from jlocalmap.testing import expect_collectives
            >>> with expect_collectives() as rec:
            ...     print(rec.run(jnp.add, 1.0, 2.0))
            3.0
        """
        self.count(fn, *args, **kwargs)
        return fn(*args, **kwargs)

    def __enter__(self) -> "CollectiveRecorder":
        return self

    def __exit__(self, kind: Optional[type], value: Optional[BaseException],
                 traceback: Any) -> None:
        if kind is not None:
            return  # the block's own error is the one to see
        if not self.programs:
            raise AssertionError(
                "expect_collectives: no program was counted in the block; show it the "
                "programs to count with rec.run(fn, *args) or rec.count(fn, *args).")
        check_counts(self.expected, self.programs, self.executed)


@overload
def expect_collectives(fn: Callable, *args: Any, all_reduce: Optional[int] = 0,
                       all_gather: Optional[int] = 0, reduce_scatter: Optional[int] = 0,
                       all_to_all: Optional[int] = 0, collective_permute: Optional[int] = 0,
                       executed: bool = False) -> jlm.inspect.CommCounts: ...


@overload
def expect_collectives(*, all_reduce: Optional[int] = 0, all_gather: Optional[int] = 0,
                       reduce_scatter: Optional[int] = 0, all_to_all: Optional[int] = 0,
                       collective_permute: Optional[int] = 0,
                       executed: bool = False) -> CollectiveRecorder: ...


def expect_collectives(fn: Optional[Callable] = None, *args: Any,
                       all_reduce: Optional[int] = 0, all_gather: Optional[int] = 0,
                       reduce_scatter: Optional[int] = 0, all_to_all: Optional[int] = 0,
                       collective_permute: Optional[int] = 0, executed: bool = False) -> Any:
    """Assert that ``jax.jit(fn)`` compiled for ``args`` has these collectives, and
    return its :class:`~jlocalmap.inspect.CommCounts`; without ``fn``, a
    :class:`CollectiveRecorder` for a ``with`` block. A kind not named must be
    absent; ``None``: any number. ``fn``'s keyword arguments: bind them first
    (``functools.partial``). The ``AssertionError`` lists expected and found per
    kind and each program's table of collectives.

    Example:
        >>> import jax, numpy as np, jlocalmap as jlm
        >>> from jlocalmap.testing import expect_collectives
        >>> mesh = jax.make_mesh((4,), ("tp",))
        >>> x = jlm.distribute_tensor(np.ones((8, 2), np.float32), mesh, [jlm.Shard(0)])
        >>> try:
        ...     expect_collectives(jlm.full_tensor, x, all_reduce=1)
        ... except AssertionError as e:
        ...     print("\\n".join(str(e).splitlines()[:4]))
        expected collectives differ from the compiled program's (full_tensor(float32[8,2])):
        kind                expected   found
        all-reduce                 1       0   <- differs
        all-gather                 0       1   <- differs
    """
    expected = dict(zip(_KINDS, (all_reduce, all_gather, reduce_scatter, all_to_all,
                                 collective_permute), strict=True))
    for kind, n in expected.items():
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise jlm.LocalMapTypeError(
                f"{kind.replace('-', '_')}: expected a count (an int >= 0) or None (any "
                f"number), found {n!r}.")
    recorder = CollectiveRecorder(expected, executed)
    if fn is None:
        if args:
            raise jlm.LocalMapTypeError(
                "fn: expected the function to count before its arguments, found None.")
        return recorder
    comms = recorder.count(fn, *args)
    check_counts(expected, recorder.programs, executed)
    return comms


def check_counts(expected: dict[str, Optional[int]],
                 programs: list[tuple[str, jlm.inspect.CommCounts]], executed: bool = False) -> None:
    """Raise ``AssertionError`` unless the programs' collectives, added, are the
    expected ones (``None``: any number).

    Example:
        >>> from jlocalmap.testing.expect import check_counts
        >>> check_counts({"all-reduce": None}, [])
    """
    found = {k: sum((c.executed if executed else c.counts)[k] for _, c in programs)
             for k in _KINDS}
    if all(n is None or found[k] == n for k, n in expected.items()):
        return
    what = "runs per call" if executed else "collectives"
    whose = "compiled programs'" if len(programs) > 1 else "compiled program's"
    lines = [f"expected {what} differ from the {whose} ({', '.join(n for n, _ in programs)}):",
             f"{'kind':<20}{'expected':>8}{'found':>8}"]
    for k in _KINDS:
        want = expected.get(k, 0)
        mark = "" if want is None or want == found[k] else "   <- differs"
        lines.append(f"{k:<20}{'any' if want is None else want:>8}{found[k]:>8}{mark}")
    for name, comms in programs:
        lines += ["", f"{name}:", str(comms)]
    raise AssertionError("\n".join(lines))


def _program_name(fn: Callable, args: tuple) -> str:
    """``name(float32[8,16], ...)``: the function and its array arguments' types."""
    def shown(leaf: Any) -> str:
        if isinstance(leaf, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct)):
            return f"{np.dtype(leaf.dtype).name}[{','.join(map(str, np.shape(leaf)))}]"
        return type(leaf).__name__
    name = getattr(fn, "__name__", None) or type(fn).__name__
    return f"{name}({', '.join(shown(leaf) for leaf in jax.tree.leaves(args))})"
