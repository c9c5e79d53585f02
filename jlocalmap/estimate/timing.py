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

**Overlap model.** Collectives inside ``local_map`` regions are exposed: the
region's code waits for them (tensor and context parallelism, written where
torchtitan and MaxText write per-device code). Collectives outside regions
(the partitioner's parameter all-gathers and gradient reductions of FSDP and
data parallelism) overlap with compute, as XLA's latency-hiding scheduler
places them, and cost time only where they exceed it:
``step = max(compute + memory, outside) + inside``.

Example:
    >>> from jlocalmap.estimate.timing import Times
    >>> t = Times(compute_s=1.0, memory_s=0.25, inside_s=0.5, outside_s=2.0, by_axis={})
    >>> t.step_s, t.exposed_outside_s
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
    axis group (``"dp"``, ``"dp,tp"``)."""
    compute_s: float
    memory_s: float
    inside_s: float
    outside_s: float
    by_axis: Mapping[str, float]

    @property
    def exposed_outside_s(self) -> float:
        """The part of the outside-region communication compute does not hide."""
        return max(0.0, self.outside_s - self.compute_s - self.memory_s)

    @property
    def step_s(self) -> float:
        return max(self.compute_s + self.memory_s, self.outside_s) + self.inside_s


def axes_text(axes: tuple) -> str:
    return ",".join(axes) if axes else "-"


def comm_seconds(tally: Tally, model: CostModel) -> tuple[float, float, dict]:
    """(inside regions, outside, by axis) seconds of the tally's collectives."""
    inside = outside = 0.0
    by_axis: dict = {}
    for (where, op), runs in tally.comms.items():
        seconds = runs * model.collective_seconds(op.kind, op.bytes, op.group, op.axes)
        by_axis[axes_text(op.axes)] = by_axis.get(axes_text(op.axes), 0.0) + seconds
        if where == "outside":
            outside += seconds
        else:
            inside += seconds
    return inside, outside, by_axis


def times(tally: Tally, hardware: Hardware, axis_sizes: Mapping[str, int]) -> Times:
    """The :class:`Times` of a tally on ``hardware`` over a mesh of ``axis_sizes``."""
    compute = 0.0
    for (dtype, flops, nbytes), runs in tally.matmuls.items():
        compute += runs * max(flops / hardware.matmul_flops_per_s(dtype),
                              nbytes / hardware.hbm_bandwidth)
    inside, outside, by_axis = comm_seconds(tally, hardware.cost_model(axis_sizes))
    return Times(compute, tally.memory_bytes / hardware.hbm_bandwidth, inside, outside, by_axis)
