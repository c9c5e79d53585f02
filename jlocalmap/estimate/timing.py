"""Time of one step from a walk's tally, on a target's hardware and mesh.

- **compute**: each matmul at the calibrated matmul rate of its operands'
  dtype, or at HBM bandwidth where its operands and result take longer to move
  (a roofline per matmul);
- **memory**: the bytes the memory-bound operations move, at HBM bandwidth
  (their own FLOPs are not timed: elementwise work is bandwidth-bound);
- **communication**: each collective priced by the strategies' cost model
  (:meth:`jlocalmap.CostModel.collective_seconds`: latency plus the ring
  algorithm's factor times bytes over the link's bandwidth, the link of each
  mesh axis from :meth:`~jlocalmap.estimate.hardware.Hardware.axis_links`).

**Overlap model** (:mod:`jlocalmap.estimate.overlap`). A collective whose
operand is ready early (a weight, gathered ahead as FSDP prefetches it) or
whose result nothing computes with until the step's end (a weight gradient's
reduction) overlaps with compute, as XLA's latency-hiding scheduler places it;
the others (a layer's activations gathered or reduced for the next matmul)
are exposed: ``step = max(compute + memory, overlapped) + exposed``.

Example:
    >>> from jlocalmap.estimate.timing import Times
    >>> t = Times(compute_s=1.0, memory_s=0.25, exposed_s=0.5, overlapped_s=2.0, by_axis={})
    >>> t.step_s, t.unhidden_s
    (2.5, 0.75)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from jlocalmap.estimate.hardware import Hardware
from jlocalmap.estimate.walk import Tally
from jlocalmap.strategies.cost_model import CostModel


@dataclasses.dataclass(frozen=True)
class Times:
    """Seconds per step by part; ``by_axis``: communication seconds per mesh
    axis group (``"dp"``, ``"dp,tp"``), exposed and overlapped together."""
    compute_s: float
    memory_s: float
    exposed_s: float
    overlapped_s: float
    by_axis: Mapping[str, float]

    @property
    def unhidden_s(self) -> float:
        """The part of the overlapped communication that compute does not hide."""
        return max(0.0, self.overlapped_s - self.compute_s - self.memory_s)

    @property
    def step_s(self) -> float:
        return max(self.compute_s + self.memory_s, self.overlapped_s) + self.exposed_s


def axes_text(axes: tuple) -> str:
    return ",".join(axes) if axes else "-"


def comm_seconds(tally: Tally, model: CostModel) -> tuple[float, float, dict]:
    """(exposed, overlapped, by axis) seconds of the tally's collectives."""
    exposed = overlapped = 0.0
    by_axis: dict = {}
    for (_, op, waits), runs in tally.comms.items():
        seconds = runs * model.collective_seconds(op.kind, op.bytes, op.group, op.axes)
        by_axis[axes_text(op.axes)] = by_axis.get(axes_text(op.axes), 0.0) + seconds
        if waits:
            exposed += seconds
        else:
            overlapped += seconds
    return exposed, overlapped, by_axis


def times(tally: Tally, hardware: Hardware, axis_sizes: Mapping[str, int]) -> Times:
    """The :class:`Times` of a tally on ``hardware`` over a mesh of ``axis_sizes``."""
    compute = 0.0
    for (dtype, flops, nbytes), runs in tally.matmuls.items():
        compute += runs * max(flops / hardware.matmul_flops_per_s(dtype),
                              nbytes / hardware.hbm_bandwidth)
    exposed, overlapped, by_axis = comm_seconds(tally, hardware.cost_model(axis_sizes))
    return Times(compute, tally.memory_bytes / hardware.hbm_bandwidth, exposed, overlapped,
                 by_axis)
