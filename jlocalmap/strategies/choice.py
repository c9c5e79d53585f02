"""A region's choice for one signature: the cost table (one row per
alternative: its predicted cost and its parts, and its measured time where it
was timed), which alternative won, and why.

Example:
    >>> from jlocalmap.strategies import Choice, CostEstimate, TableRow
    >>> rows = (TableRow("tp", CostEstimate(1e9, 1e6, 2, 0, 4096, 1e-3, 1e-4, 5e-4)),
    ...         TableRow("fsdp", CostEstimate(1e9, 1e6, 4, 8192, 0, 1e-3, 1e-4, 9e-4)))
    >>> Choice("tp", "cost", "f32[8,8]{R}", "custom", rows).reason
    'lowest predicted time: 1.600 ms (next: fsdp, 2.000 ms, 1.25x)'
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from jlocalmap.strategies.cost_model import CostEstimate


@dataclasses.dataclass(frozen=True)
class TableRow:
    """One alternative's line of the cost table: its predicted cost and, where
    the region measured, its time.

    Example:
        >>> from jlocalmap.strategies import CostEstimate, TableRow
        >>> TableRow("tp", CostEstimate(1e9, 1e6, 2, 0, 4096, 1e-3, 1e-4, 5e-4), 6e-4).measured_s
        0.0006
    """
    name: str
    estimate: CostEstimate
    measured_s: Optional[float] = None


def _ms(seconds: Optional[float]) -> str:
    return f"{seconds * 1e3:10.3f}" if seconds is not None else f"{'-':>10s}"


@dataclasses.dataclass(frozen=True)
class Choice:
    """Which alternative a region runs for one signature (``chosen``), chosen
    ``by`` ``"cost"`` or ``"measure"``, and the table behind it
    (``StrategyRegion.choice`` returns it).

    Example:
        >>> from jlocalmap.strategies import Choice, CostEstimate, TableRow
        >>> row = TableRow("tp", CostEstimate(1e9, 1e6, 2, 0, 4096, 1e-3, 1e-4, 5e-4))
        >>> Choice("tp", "cost", "f32[8,8]{R}", "custom", (row,)).predicted
        'tp'
    """
    chosen: str
    by: str
    signature: str
    model: str
    rows: tuple

    def row(self, name: str) -> TableRow:
        return next(r for r in self.rows if r.name == name)

    @property
    def predicted(self) -> str:
        """The alternative the cost model ranks first."""
        return min(self.rows, key=lambda r: r.estimate.seconds).name

    @property
    def reason(self) -> str:
        if self.by == "measure":
            key = lambda r: r.measured_s  # noqa: E731
            what = "fastest measured"
        else:
            key = lambda r: r.estimate.seconds  # noqa: E731
            what = "lowest predicted time"
        ranked = sorted(self.rows, key=key)
        text = f"{what}: {key(ranked[0]) * 1e3:.3f} ms"
        if len(ranked) > 1:
            ratio = f", {key(ranked[1]) / key(ranked[0]):.2f}x" if key(ranked[0]) > 0 else ""
            text += f" (next: {ranked[1].name}, {key(ranked[1]) * 1e3:.3f} ms{ratio})"
        if self.by == "measure" and self.predicted != self.chosen:
            text += f"; the cost model ranked {self.predicted} first"
        return text

    def table(self) -> str:
        """The cost table, one line per alternative (times in ms; bytes per device)."""
        name_width = max(11, *(len(r.name) for r in self.rows))
        head = (f"  {'alternative':<{name_width}} {'MFLOP':>9} {'colls':>5} {'body MB':>8} "
                f"{'layout MB':>9} {'compute':>10} {'memory':>10} {'comm':>10} "
                f"{'predicted':>10} {'measured':>10}")
        lines = [head]
        for r in self.rows:
            e = r.estimate
            mark = "*" if r.name == self.chosen else " "
            lines.append(
                f"{mark} {r.name:<{name_width}} {e.flops / 1e6:9.1f} {e.collectives:5d} "
                f"{e.body_bytes / 1e6:8.3f} {e.layout_bytes / 1e6:9.3f} {_ms(e.compute_s)} "
                f"{_ms(e.memory_s)} {_ms(e.comm_s)} {_ms(e.seconds)} {_ms(r.measured_s)}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return (f"signature: {self.signature}\ncost model: {self.model}\n{self.table()}\n"
                f"chosen: {self.chosen} (by {self.by}: {self.reason})")
