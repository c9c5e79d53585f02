"""The estimate of one step, per device: what :func:`jlocalmap.estimate`
returns. ``print(est)`` gives the table, ``est.to_dict()`` every figure.

Example:
    >>> import jax, jax.numpy as jnp, jlocalmap as jlm
    >>> x = jax.ShapeDtypeStruct((1024, 1024), jnp.bfloat16)
    >>> est = jlm.estimate(lambda x: x @ x, x, hardware=jlm.Hardware.preset("h100-sxm"))
    >>> est.to_dict()["flops"]["matmul"] == 2 * 1024**3, est.fits
    (True, True)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Optional

from jlocalmap.estimate.hardware import Hardware
from jlocalmap.estimate.memory import Memory
from jlocalmap.estimate.timing import Times, axes_text
from jlocalmap.estimate.walk import Tally


@dataclasses.dataclass(frozen=True)
class CommRow:
    """The collectives of one kind on one group of mesh axes, inside regions
    or outside: runs per step, bytes per device per step, seconds, and the
    seconds the compute waits for (exposed; the rest overlaps)."""
    axes: str
    link: str
    kind: str
    where: str
    count: int
    bytes: int
    seconds: float
    exposed_s: float


@dataclasses.dataclass(frozen=True)
class StrategyRow:
    """A strategy region's choice for the target, and the runner-up's cost."""
    region: str
    chosen: str
    seconds: float
    runner_up: Optional[str]
    runner_up_seconds: Optional[float]


def _size(n: float) -> str:
    """Bytes in the largest binary unit that keeps the figure >= 1."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:10.3f} {unit}"
    return f"{n:10.0f} B  "


@dataclasses.dataclass(frozen=True)
class Estimate:
    """One training (or any) step, estimated per device for ``hardware`` on a
    mesh of ``axis_sizes``. Attributes: ``step_time_s``, ``peak_bytes``,
    ``fits``, ``tokens_per_s_per_device``, ``mfu``; ``memory``, ``times``,
    ``comms`` (:class:`CommRow`), ``strategies`` (:class:`StrategyRow`),
    ``notes`` (what the estimate could not see, or approximated).

    Example:
        >>> import jax, jax.numpy as jnp, jlocalmap as jlm
        >>> x = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)
        >>> est = jlm.estimate(lambda x: x @ x, x, hardware=jlm.Hardware.preset("h200"),
        ...                    model_flops=2 * 4096**3)
        >>> round(est.mfu, 2)   # a lone matmul runs at the calibrated efficiency
        0.68
    """
    hardware: Hardware
    axis_sizes: Mapping[str, int]
    memory: Memory
    matmul_flops: float
    other_flops: float
    memory_bytes: float
    times: Times
    comms: tuple[CommRow, ...]
    strategies: tuple[StrategyRow, ...]
    notes: tuple[str, ...]
    model_flops: Optional[float] = None
    tokens_per_step: Optional[float] = None
    elapsed_s: float = 0.0

    @property
    def devices(self) -> int:
        count = 1
        for n in self.axis_sizes.values():
            count *= n
        return count

    @property
    def step_time_s(self) -> float:
        return self.times.step_s

    @property
    def peak_bytes(self) -> int:
        return self.memory.peak

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.hardware.hbm_bytes

    @property
    def tokens_per_s_per_device(self) -> Optional[float]:
        if self.tokens_per_step is None:
            return None
        return self.tokens_per_step / self.step_time_s / self.devices

    @property
    def mfu(self) -> Optional[float]:
        """``model_flops`` over the step's time at the devices' dense bf16 peak."""
        if self.model_flops is None:
            return None
        peak = self.hardware.peak_flops["bf16"] * self.devices
        return self.model_flops / (self.step_time_s * peak)

    def collectives(self, where: Optional[str] = None) -> dict[str, dict[str, dict]]:
        """{axes: {kind: {"count", "bytes"}}} per step and device, inside regions
        and outside together (``where="inside"``/``"outside"``: one side)."""
        found: dict = {}
        for row in self.comms:
            if where is None or row.where == where:
                entry = found.setdefault(row.axes, {}).setdefault(
                    row.kind, {"count": 0, "bytes": 0})
                entry["count"] += row.count
                entry["bytes"] += row.bytes
        return found

    def to_dict(self) -> dict[str, Any]:
        """Every figure, JSON-serialisable."""
        t = self.times
        return {
            "hardware": self.hardware.name, "mesh": dict(self.axis_sizes),
            "devices": self.devices,
            "memory": {**dataclasses.asdict(self.memory), "peak": self.peak_bytes,
                       "capacity": self.hardware.hbm_bytes, "fits": self.fits},
            "flops": {"matmul": self.matmul_flops, "other (approximate)": self.other_flops},
            "memory_bound_bytes": self.memory_bytes,
            "time_s": {"compute": t.compute_s, "memory": t.memory_s,
                       "comm exposed": t.exposed_s, "comm overlapped": t.overlapped_s,
                       "comm overlapped, not hidden": t.unhidden_s,
                       "comm by axis": dict(t.by_axis), "step": self.step_time_s},
            "collectives": [dataclasses.asdict(r) for r in self.comms],
            "strategies": [dataclasses.asdict(r) for r in self.strategies],
            "tokens_per_s_per_device": self.tokens_per_s_per_device, "mfu": self.mfu,
            "model_flops": self.model_flops, "tokens_per_step": self.tokens_per_step,
            "notes": list(self.notes), "estimate_s": self.elapsed_s,
        }

    def __str__(self) -> str:
        mesh = ", ".join(f"{a}={n}" for a, n in self.axis_sizes.items())
        m, t = self.memory, self.times
        lines = [f"estimate: {self.hardware.name} x {self.devices} on ({mesh}), per device",
                 "memory", f"  arguments          {_size(m.arguments)}",
                 f"  outputs            {_size(m.outputs)}",
                 f"  temporaries (peak) {_size(m.temporaries)}",
                 f"    saved for backward, inside regions  {_size(m.saved_inside)}",
                 f"    saved for backward, outside regions {_size(m.saved_outside)}",
                 f"  peak               {_size(self.peak_bytes)} of "
                 f"{self.hardware.hbm_bytes / 2**30:.1f} GiB: "
                 f"{'fits' if self.fits else 'DOES NOT FIT'}",
                 "flops", f"  matmul (exact)     {self.matmul_flops:14.4e}",
                 f"  other (approx.)    {self.other_flops:14.4e}"]
        lines += self._comm_lines()
        lines += ["time (overlap: a collective of weights, or of gradients nothing waits "
                  "for, hides behind compute; the others are exposed)",
                  f"  compute {t.compute_s * 1e3:11.3f} ms   memory-bound {t.memory_s * 1e3:.3f} ms",
                  f"  comm exposed {t.exposed_s * 1e3:.3f} ms, overlapped "
                  f"{t.overlapped_s * 1e3:.3f} ms ({t.unhidden_s * 1e3:.3f} ms not hidden)",
                  f"  step    {self.step_time_s * 1e3:11.3f} ms"]
        if self.tokens_per_s_per_device is not None:
            lines.append(f"  tokens/s per device {self.tokens_per_s_per_device:,.0f}")
        if self.mfu is not None:
            lines.append(f"  MFU {self.mfu:.1%}")
        lines += self._strategy_lines() + [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def _comm_lines(self) -> list[str]:
        lines = [f"collectives per step  {'axes':<10} {'link':<8} {'kind':<19} "
                 f"{'where':<8} {'count':>7} {'bytes':>16} {'ms':>10} {'exposed':>10}"]
        for r in self.comms:
            lines.append(f"                      {r.axes:<10} {r.link:<8} {r.kind:<19} "
                         f"{r.where:<8} {r.count:>7} {r.bytes:>16,} {r.seconds * 1e3:>10.3f} "
                         f"{r.exposed_s * 1e3:>10.3f}")
        return lines if self.comms else ["collectives per step: none"]

    def _strategy_lines(self) -> list[str]:
        lines = []
        for r in self.strategies:
            other = (f"; runner-up {r.runner_up} {r.runner_up_seconds * 1e3:.3f} ms"
                     if r.runner_up is not None and r.runner_up_seconds is not None else "")
            lines.append(f"strategy region {r.region!r}: {r.chosen} "
                         f"({r.seconds * 1e3:.3f} ms){other}")
        return lines


def link_name(hardware: Hardware, axis_sizes: Mapping[str, int], axes: tuple) -> str:
    """"network" where any of ``axes`` crosses nodes, else "nvlink"."""
    links = hardware.axis_links(axis_sizes)
    return "network" if any(links[a] is not hardware.nvlink for a in axes
                            if a in links) else "nvlink"


def comm_rows(tally: Tally, hardware: Hardware, axis_sizes: Mapping[str, int]
              ) -> tuple[CommRow, ...]:
    """The tally's collectives grouped by (axes, kind, inside/outside)."""
    model = hardware.cost_model(axis_sizes)
    rows: dict = {}
    for (where, op, exposed), runs in tally.comms.items():
        key = (op.axes, op.kind, "outside" if where == "outside" else "inside")
        count, nbytes, seconds, waited = rows.get(key, (0, 0, 0.0, 0.0))
        cost = runs * model.collective_seconds(op.kind, op.bytes, op.group, op.axes)
        rows[key] = (count + runs, nbytes + runs * op.bytes, seconds + cost,
                     waited + (cost if exposed else 0.0))
    return tuple(CommRow(axes_text(axes), link_name(hardware, axis_sizes, axes), kind, side,
                         *rows[(axes, kind, side)])
                 for axes, kind, side in sorted(rows))
