"""The cost model: a compiled program's predicted seconds from its FLOPs, the
bytes it reads and writes, and its collectives, each priced on the link of the
mesh axes it spans.

``seconds = flops / flops_per_s + bytes_accessed / memory_bytes_per_s
+ sum over collectives of runs * (latency + factor * bytes / bandwidth)``, where
``bytes`` is the collective's whole buffer per device (as
:func:`jlocalmap.inspect.collectives_in_hlo` counts it) and ``factor`` is what a ring
moves of it over a group of ``n`` devices: ``(n-1)/n`` for all-gather,
reduce-scatter and all-to-all, ``2(n-1)/n`` for all-reduce, 1 for a permute. A
collective over several axes pays the slowest link and the sum of latencies.
The terms add up: the model credits no overlap of communication with compute.

Example:
    >>> from jlocalmap.strategies.cost_model import CostModel, Link
    >>> model = CostModel(flops_per_s=1e12, memory_bytes_per_s=1e12,
    ...                   default_link=Link(bandwidth=1e9, latency=1e-5))
    >>> round(model.collective_seconds("all-gather", 8e6, 8, ("tp",)) * 1e3, 3)
    7.01
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import jax

from jlocalmap.errors import LocalMapValueError
from jlocalmap.inspect.comm import collectives_in_hlo, compiled_text
from jlocalmap.strategies.collective_axes import (
    axes_of_line,
    in_region_body,
    instruction_lines,
)


@dataclasses.dataclass(frozen=True)
class Link:
    """One mesh axis's interconnect: ``bandwidth`` in bytes per second per
    device (one direction, as nccl-tests' bus bandwidth), ``latency`` in seconds
    per collective.

    Example:
        >>> from jlocalmap.strategies import Link
        >>> Link(bandwidth=400e9, latency=8e-6).bandwidth
        400000000000.0
    """
    bandwidth: float
    latency: float

    def __post_init__(self):
        if not self.bandwidth > 0 or not self.latency >= 0:
            raise LocalMapValueError(
                f"Link: expected bandwidth > 0 and latency >= 0, found bandwidth="
                f"{self.bandwidth!r}, latency={self.latency!r}; pass bytes/s and seconds.")


_RING_FACTOR = {"all-gather": lambda n: (n - 1) / n, "reduce-scatter": lambda n: (n - 1) / n,
                "all-to-all": lambda n: (n - 1) / n, "all-reduce": lambda n: 2 * (n - 1) / n,
                "collective-permute": lambda n: 1.0}


@dataclasses.dataclass(frozen=True)
class CostModel:
    """The parameters of the cost model: per-device compute rate (FLOP/s) and
    memory bandwidth (bytes/s), and a :class:`Link` per mesh axis (``links``,
    by axis name; axes not named use ``default_link``). Presets:
    :meth:`cpu_simulated` (simulated CPU devices sharing a host) and
    :meth:`h200_nvlink` (H200 GPUs over NVLink); :meth:`for_devices` picks one.

    Example:
        >>> from jlocalmap.strategies import CostModel, Link
        >>> model = CostModel.h200_nvlink().with_links(dp=Link(50e9, 2e-5))
        >>> model.link("dp").bandwidth, model.link("tp").bandwidth
        (50000000000.0, 360000000000.0)
    """
    flops_per_s: float
    memory_bytes_per_s: float
    default_link: Link
    links: Mapping[str, Link] = dataclasses.field(default_factory=dict)
    name: str = "custom"

    @classmethod
    def cpu_simulated(cls) -> "CostModel":
        """Simulated devices of one host (``--xla_force_host_platform_device_count``):
        a "collective" is a copy between threads, whose cost is mostly its fixed
        synchronisation. Fitted to step times of examples/choose_strategy.py on 8
        simulated devices of a 2-core host (docs/strategies.md)."""
        return cls(flops_per_s=1.5e10, memory_bytes_per_s=4e9,
                   default_link=Link(bandwidth=4e9, latency=1e-4), name="cpu-simulated")

    @classmethod
    def h200_nvlink(cls) -> "CostModel":
        """H200 (bf16 dense, a realistic fraction of peak) over NVLink 4 (NCCL's
        measured bus bandwidth, not the 450 GB/s line rate)."""
        return cls(flops_per_s=6.5e14, memory_bytes_per_s=4.0e12,
                   default_link=Link(bandwidth=3.6e11, latency=8e-6), name="h200-nvlink")

    @classmethod
    def for_devices(cls, devices: Sequence[Any]) -> "CostModel":
        """The preset for these devices: GPUs get :meth:`h200_nvlink`, others
        :meth:`cpu_simulated`."""
        return cls.h200_nvlink() if devices[0].platform == "gpu" else cls.cpu_simulated()

    def with_links(self, **links: Link) -> "CostModel":
        """This model with the links of the named axes replaced."""
        return dataclasses.replace(self, links={**self.links, **links})

    def link(self, axis: str) -> Link:
        return self.links.get(axis, self.default_link)

    def collective_seconds(self, kind: str, nbytes: float, group_size: int,
                           axes: Sequence[str]) -> float:
        """Seconds of one collective of ``kind`` moving a buffer of ``nbytes`` per
        device among ``group_size`` devices spanning mesh ``axes``. A group of
        one device moves nothing (XLA keeps such no-op collectives in a program
        over a mesh of one device)."""
        if group_size <= 1:
            return 0.0
        links = [self.link(a) for a in axes] or [self.default_link]
        bandwidth = min(link.bandwidth for link in links)
        latency = sum(link.latency for link in links)
        return latency + _RING_FACTOR[kind](group_size) * nbytes / bandwidth


@dataclasses.dataclass(frozen=True)
class CostEstimate:
    """The predicted cost of one compiled program, with its parts: FLOPs, bytes
    accessed, collective runs and bytes (of the body, of layout changes around it),
    and the seconds of compute, memory and communication, and in all.

    Example:
        >>> from jlocalmap.strategies import CostEstimate
        >>> CostEstimate(1e9, 1e6, 2, 0, 4096, 1e-3, 1e-4, 5e-4).seconds
        0.0016
    """
    flops: float
    bytes_accessed: float
    collectives: int         # collective runs per call
    body_bytes: int          # collective bytes of the local_map body
    layout_bytes: int        # collective bytes of layout changes around it
    compute_s: float
    memory_s: float
    comm_s: float

    @property
    def seconds(self) -> float:
        return self.compute_s + self.memory_s + self.comm_s


def _first(cost) -> dict:
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return dict(cost or {})


def program_cost(lowered: jax.stages.Lowered,
                 compiled: Optional[jax.stages.Compiled] = None) -> dict:
    """XLA's analysis of the lowered program (the same on every platform); where
    a backend gives none (seen on the GPU with jax 0.11), the compiled program's
    (the GPU's leaves out the matmuls it hands to cuBLAS). ``compiled``: that
    program where the caller has it (else it is compiled here)."""
    cost = _first(lowered.cost_analysis())
    if cost.get("flops"):
        return cost
    return _first((compiled or lowered.compile()).cost_analysis())


def estimate(model: CostModel, lowered: jax.stages.Lowered, compiled: jax.stages.Compiled,
             mesh: jax.sharding.Mesh) -> CostEstimate:
    """Price a program: FLOPs and bytes from XLA's analysis (:func:`program_cost`),
    collectives from the compiled HLO."""
    cost = program_cost(lowered, compiled)
    hlo_text = compiled_text(compiled)
    comms = collectives_in_hlo(hlo_text)
    lines = instruction_lines(hlo_text)
    shape, names = tuple(mesh.devices.shape), tuple(mesh.axis_names)
    comm_s, body, layout = 0.0, 0, 0
    for op in comms.ops:
        line = lines.get(op.name, "")
        axes, size = axes_of_line(line, shape, names)
        comm_s += op.executions * model.collective_seconds(op.kind, op.bytes, size, axes)
        if in_region_body(line):
            body += op.bytes * op.executions
        else:
            layout += op.bytes * op.executions
    flops, accessed = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    return CostEstimate(flops, accessed, sum(op.executions for op in comms.ops), body, layout,
                    flops / model.flops_per_s, accessed / model.memory_bytes_per_s, comm_s)
