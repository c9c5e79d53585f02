"""Timing for the harness: competitors interleaved round by round, statistics
over rounds, and a progress bar. No JAX or torch import: callers pass ``block``,
the function that waits for a call's result (``jax.block_until_ready``, or a
torch synchronize).

Example:
    >>> from benchmarks.timing import Row, run_rounds, summarize
    >>> rows = [Row("a/x", lambda: 1), Row("a/y", lambda: 2, baseline="a/x")]
    >>> run_rounds(rows, rounds=3, iters=2, block=lambda out: out)
    >>> len(rows[0].times), sorted(summarize([1.0, 2.0, 3.0]).items())[:2]
    (3, [('max', 3.0), ('median', 2.0)])
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional, TextIO


@dataclasses.dataclass
class Row:
    """One competitor: ``call()`` runs one step (or one tiny call) and returns
    what ``block`` waits for; ``flops`` is the floating-point work of one call on
    one device; ``baseline`` names the row its ratio is taken against."""
    name: str
    call: Callable[[], Any]
    baseline: Optional[str] = None
    flops: Optional[float] = None
    note: str = ""
    times: list = dataclasses.field(default_factory=list)

    @property
    def group(self) -> str:
        return self.name.split("/")[0]


def time_calls(call: Callable[[], Any], iters: int, block: Callable[[Any], Any],
               sync_each: bool) -> float:
    """Seconds per call over ``iters`` back-to-back calls. ``sync_each`` waits for
    every call (simulated CPU devices share one small thread pool, and queued
    collectives can starve each other); otherwise calls queue as a training loop
    queues its steps, and only the last is waited for."""
    start = time.perf_counter()
    out = None
    for _ in range(iters):
        out = call()
        if sync_each:
            block(out)
    block(out)
    return (time.perf_counter() - start) / iters


def calibrate(rows: Sequence[Row], block: Callable[[Any], Any], round_s: float,
              max_iters: int = 1000) -> int:
    """One number of calls per round for every row of a group (so each round
    weighs the rows alike): about ``round_s`` seconds for the median row. Each row
    is called twice first (compilation, caches)."""
    singles = []
    for row in rows:
        block(row.call())
        start = time.perf_counter()
        block(row.call())
        singles.append(time.perf_counter() - start)
    return max(1, min(max_iters, round(round_s / max(statistics.median(singles), 1e-9))))


def run_rounds(rows: Sequence[Row], rounds: int, iters: int, block: Callable[[Any], Any],
               sync_each: bool = True, progress: Optional["Progress"] = None) -> None:
    """``rounds`` rounds; each times every row once (``iters`` calls), in an order
    rotated by one each round so that no row always follows the same one."""
    rows = list(rows)
    for r in range(rounds):
        k = r % len(rows)
        for row in rows[k:] + rows[:k]:
            row.times.append(time_calls(row.call, iters, block, sync_each))
            if progress is not None:
                progress.advance(f"{row.name} round {r + 1}/{rounds}")


def summarize(times: Sequence[float]) -> dict:
    """Median, quartiles, extremes, and the spread: the interquartile range over
    the median."""
    ordered = sorted(times)
    median = statistics.median(ordered)
    if len(ordered) >= 4:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1, q3 = ordered[0], ordered[-1]
    return {"median": median, "q1": q1, "q3": q3, "min": ordered[0], "max": ordered[-1],
            "spread": (q3 - q1) / median if median else 0.0, "rounds": len(ordered)}


class Progress:
    """A progress bar on stderr: redrawn in place on a terminal, a line every
    ``every_s`` seconds otherwise (CI logs)."""

    def __init__(self, total: int, stream: TextIO = sys.stderr, width: int = 30,
                 every_s: float = 10.0, enabled: bool = True):
        self.total, self.done, self.stream, self.width = max(total, 1), 0, stream, width
        self.every_s, self.enabled = every_s, enabled
        self.tty = enabled and hasattr(stream, "isatty") and stream.isatty()
        self.start = self.last = time.perf_counter()

    def advance(self, label: str, n: int = 1) -> None:
        finished = self.done >= self.total
        self.done = min(self.total, self.done + n)
        if not self.enabled or finished:  # the last line is drawn once
            return
        now = time.perf_counter()
        if not self.tty and now - self.last < self.every_s and self.done < self.total:
            return
        self.last = now
        filled = self.width * self.done // self.total
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] "
                f"{100 * self.done // self.total:3d}% {now - self.start:6.1f}s  {label}")
        if self.tty:
            self.stream.write("\r" + line[:110].ljust(110))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
