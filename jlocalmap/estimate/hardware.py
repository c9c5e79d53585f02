"""The target hardware of an estimate: one accelerator's compute, memory and
links, with the source of every number; a mesh axis's link from its place in
the mesh.

Mesh axis ``i`` runs inside a node when the product of the sizes of axes
``i..last`` fits in ``gpus_per_node``: the last mesh axis varies fastest over
the devices (``jax.make_mesh``'s order), so the trailing axes stay within a
node. Other axes cross the network: a group along such an axis that has ``k``
GPUs in each node (``gpus_per_node`` over the product of the later axes'
sizes) crosses it on ``k`` NICs at once, as NCCL runs one ring per NIC
through the node's GPUs (a rail-optimised DGX/HGX fabric), up to NVLink's
bandwidth; with one GPU a node, on its own NIC.

Example:
    >>> from jlocalmap.estimate.hardware import Hardware
    >>> h100 = Hardware.preset("h100-sxm")
    >>> h100.axis_links({"dp": 64, "tp": 8})["dp"] == h100.network, h100.hbm_bytes / 2**30
    (True, 80.0)
    >>> h100.axis_links({"fsdp": 64})["fsdp"].bandwidth / 1e9   # 8 NICs a node, NVLink-bound
    360.0
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from jlocalmap.errors import LocalMapTypeError, LocalMapValueError
from jlocalmap.strategies.cost_model import CostModel, Link

_DTYPE_KEYS = {"bfloat16": "bf16", "float16": "bf16", "float8_e4m3fn": "fp8",
               "float8_e5m2": "fp8", "float32": "f32", "float64": "f32"}

_NVIDIA_H100 = "NVIDIA H100 Tensor Core GPU datasheet (SXM5 80 GB)"
_NVIDIA_H200 = "NVIDIA H200 Tensor Core GPU datasheet (SXM 141 GB)"
_NCCL = ("NVLink 4: 900 GB/s per GPU both directions (datasheet); 360 GB/s is the bus "
         "bandwidth nccl-tests reach on 8 H100/H200 (the figure of "
         "jlocalmap.strategies.CostModel.h200_nvlink)")
_IB = ("400 Gb/s InfiniBand NDR, one NIC per GPU (DGX H100/H200): 50 GB/s per direction; "
       "latency 20 us per collective across nodes (NCCL's ring start-up over IB); a group "
       "with k GPUs in each node uses k NICs at once (NCCL builds a ring per NIC, "
       "nccl-tests' bus bandwidth across nodes is the node's NICs' sum), at most NVLink's")
_MATMUL = ("measured here: one H200, jax 0.11.2, the five bf16 matmuls of the TP-MLP "
           "step at T=8192, d=4096, ffn=14336 reach 674 TFLOP/s = 0.68 of 989 "
           "(/work/shared/REFERENCE.md section 8, docs/benchmarks.md)")


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One device of the target cluster, and its links.

    ``peak_flops``: dense peak FLOP/s by kind (``"bf16"``, ``"fp8"``, ``"f32"``);
    ``matmul_efficiency``: the fraction of peak a large matmul reaches
    (calibrated); ``hbm_bytes`` / ``hbm_bandwidth``: device memory and its
    bytes/s; ``gpus_per_node``; ``nvlink`` / ``network``: the intra- and
    inter-node :class:`~jlocalmap.strategies.Link` (per-device bandwidth, one direction, and
    latency per collective); ``sources``: where each number comes from, by field.

    Example:
        >>> import jlocalmap as jlm
        >>> h200 = jlm.Hardware.preset("h200").replace(matmul_efficiency=0.7)
        >>> h200.matmul_flops_per_s("bfloat16") / 1e12
        692.3
    """
    name: str
    peak_flops: Mapping[str, float]
    matmul_efficiency: float
    hbm_bytes: float
    hbm_bandwidth: float
    gpus_per_node: int
    nvlink: Link
    network: Link
    sources: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not 0 < self.matmul_efficiency <= 1:
            raise LocalMapValueError(
                f"Hardware.matmul_efficiency: expected a fraction in (0, 1], found "
                f"{self.matmul_efficiency!r}; pass e.g. 0.68 (measured / datasheet peak).")
        if self.gpus_per_node < 1 or "bf16" not in self.peak_flops:
            raise LocalMapValueError(
                f"Hardware: expected gpus_per_node >= 1 and a 'bf16' peak, found "
                f"gpus_per_node={self.gpus_per_node!r}, peak_flops keys "
                f"{sorted(self.peak_flops)}; see Hardware.preset('h100-sxm').")

    @classmethod
    def preset(cls, name: str) -> "Hardware":
        """``"h100-sxm"``, ``"h200"`` (datasheets; matmul efficiency measured
        here) or ``"cpu"`` (this host's simulated devices, for self-checks)."""
        presets = {"h100-sxm": _h100, "h200": _h200, "cpu": _cpu}
        if not isinstance(name, str) or name not in presets:
            raise LocalMapValueError(
                f"Hardware.preset: expected one of {sorted(presets)}, found {name!r}; "
                f"build another with Hardware(...) or preset(...).replace(...).")
        return presets[name]()

    def replace(self, **changes: Any) -> "Hardware":
        """This hardware with fields replaced (a calibration), e.g.
        ``replace(matmul_efficiency=0.72)``."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise LocalMapTypeError(
                f"Hardware.replace: unknown fields {sorted(unknown)}; the fields are "
                f"{[f.name for f in dataclasses.fields(self)]}.")
        return dataclasses.replace(self, **changes)

    def matmul_flops_per_s(self, dtype: Any) -> float:
        """Calibrated matmul FLOP/s for operands of ``dtype`` (bf16's peak for
        dtypes without their own entry)."""
        key = _DTYPE_KEYS.get(str(dtype), "bf16")
        return self.peak_flops.get(key, self.peak_flops["bf16"]) * self.matmul_efficiency

    def axis_links(self, axis_sizes: Mapping[str, int]) -> dict[str, Link]:
        """Each mesh axis's link: NVLink when it and the axes after it fit in a
        node, else the network, on as many NICs at once as a group along the
        axis has GPUs in each node (NCCL's rings, one per NIC, each through
        the node's GPUs over NVLink), up to NVLink's own bandwidth."""
        names, links = list(axis_sizes), {}
        for i, a in enumerate(names):
            inner = math.prod(axis_sizes[b] for b in names[i + 1:])
            rails = min(axis_sizes[a], self.gpus_per_node // inner)
            links[a] = (self.nvlink if inner * axis_sizes[a] <= self.gpus_per_node
                        else self.network if rails <= 1 else dataclasses.replace(
                            self.network, bandwidth=min(rails * self.network.bandwidth,
                                                        self.nvlink.bandwidth)))
        return links

    def cost_model(self, axis_sizes: Mapping[str, int]) -> CostModel:
        """The strategies' :class:`~jlocalmap.strategies.CostModel` for this hardware on a
        mesh of ``axis_sizes``: one pricing of collectives for both."""
        return CostModel(flops_per_s=self.matmul_flops_per_s("bfloat16"),
                         memory_bytes_per_s=self.hbm_bandwidth, default_link=self.network,
                         links=self.axis_links(axis_sizes), name=self.name)


def _h100() -> Hardware:
    return Hardware(
        "h100-sxm", {"bf16": 989e12, "fp8": 1979e12, "f32": 494.5e12}, 0.68,
        80 * 2**30, 3.35e12, 8, Link(3.6e11, 8e-6), Link(5e10, 2e-5),
        {"peak_flops": f"{_NVIDIA_H100}: dense BF16 989 TFLOP/s, FP8 1979, TF32 494.5 "
                       f"(JAX's default f32 matmul precision on GPUs uses TF32)",
         "matmul_efficiency": _MATMUL, "hbm_bytes": f"{_NVIDIA_H100}: 80 GB HBM3",
         "hbm_bandwidth": f"{_NVIDIA_H100}: 3.35 TB/s", "gpus_per_node": "DGX/HGX H100: 8",
         "nvlink": _NCCL, "network": _IB})


def _h200() -> Hardware:
    h100 = _h100()
    return dataclasses.replace(
        h100, name="h200", hbm_bytes=141e9, hbm_bandwidth=4.8e12,
        sources={**h100.sources,
                 "peak_flops": f"{_NVIDIA_H200}: the H100's compute (989 TFLOP/s BF16 dense)",
                 "hbm_bytes": f"{_NVIDIA_H200}: 141 GB HBM3e",
                 "hbm_bandwidth": f"{_NVIDIA_H200}: 4.8 TB/s", "gpus_per_node": "HGX H200: 8"})


def _cpu() -> Hardware:
    cpu = CostModel.cpu_simulated()
    return Hardware(
        "cpu", {"bf16": cpu.flops_per_s, "f32": cpu.flops_per_s}, 1.0, 2.0**34,
        cpu.memory_bytes_per_s, 1 << 20, cpu.default_link, cpu.default_link,
        {**{f: "jlocalmap.strategies.CostModel.cpu_simulated (fitted to examples/choose_strategy.py "
               "on this 2-core host; docs/strategies.md)"
            for f in ("peak_flops", "hbm_bandwidth", "nvlink", "network")},
         "matmul_efficiency": "1: cpu_simulated's rate is already a measured one",
         "hbm_bytes": "16 GiB: a nominal host, for self-checks only",
         "gpus_per_node": "every simulated device shares one host"})
