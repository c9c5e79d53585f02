"""``choose="measure"``: time each alternative's compiled program on the
devices, and keep the times in a JSON file so that no signature is measured twice.

The file is ``$JLOCALMAP_CACHE_DIR/strategies.json`` when that variable is set,
else ``~/.cache/jlocalmap/strategies.json`` (``cache_dir=`` of
:func:`jlocalmap.strategies.strategy_region` overrides both). Its keys name the region,
the call's signature (shapes, dtypes, placements), the mesh (axis names and
sizes, device kind and count), what was timed (forward or training step) and the
alternatives' names; its values are seconds per call, by alternative. Delete the
file (or the entry) to measure again. In a multi-process job every process
takes process 0's choice (:func:`agreed`).

Example:
    >>> import tempfile
    >>> from jlocalmap.strategies.measure import MeasureCache
    >>> cache = MeasureCache(tempfile.mkdtemp())
    >>> cache.put("key", {"tp": 0.002, "fsdp": 0.001})
    >>> MeasureCache(cache.path.parent).get("key") == {"tp": 0.002, "fsdp": 0.001}
    True
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

import jax
import numpy as np

CACHE_FILE = "strategies.json"


def default_cache_dir() -> pathlib.Path:
    """``$JLOCALMAP_CACHE_DIR``, else ``~/.cache/jlocalmap``."""
    env = os.environ.get("JLOCALMAP_CACHE_DIR")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "jlocalmap"


def mesh_key(mesh: jax.sharding.Mesh) -> str:
    devices = mesh.devices.reshape(-1)
    sizes = ",".join(f"{a}={n}" for a, n in zip(mesh.axis_names, mesh.devices.shape, strict=True))
    return f"mesh({sizes}) {len(devices)} x {devices[0].device_kind} ({devices[0].platform})"


class MeasureCache:
    """The measured seconds per alternative, by key, in one JSON file."""

    def __init__(self, cache_dir: Optional[Any] = None):
        self.path = pathlib.Path(cache_dir or default_cache_dir()) / CACHE_FILE

    def _load(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def get(self, key: str) -> Optional[dict]:
        return self._load().get(key)

    def put(self, key: str, seconds: dict) -> None:
        entries = self._load()
        entries[key] = seconds
        self.path.parent.mkdir(parents=True, exist_ok=True)
        scratch = self.path.with_suffix(f".{os.getpid()}.tmp")
        scratch.write_text(json.dumps(entries, indent=1, sort_keys=True))
        scratch.replace(self.path)  # atomic: a concurrent reader sees old or new


def agreed(chosen: str, names: Sequence[str]) -> str:
    """Process 0's choice, on every process of a multi-process job: each
    process times its own devices (and reads its own cache file), and
    processes that chose differently would run different collectives and hang.

    Example:
        >>> from jlocalmap.strategies.measure import agreed
        >>> agreed("fsdp", ["tp", "fsdp"])     # one process: its own choice
        'fsdp'
    """
    index = from_process_0(np.array([list(names).index(chosen)], np.int32))
    return names[int(index[0])]


def from_process_0(values: np.ndarray) -> np.ndarray:
    """Process 0's ``values`` on every process of a multi-process job (one
    process: its own), so that every process runs the same collectives.

    Example:
        >>> import numpy as np
        >>> from jlocalmap.strategies.measure import from_process_0
        >>> from_process_0(np.array([3, 5], np.int32))
        array([3, 5], dtype=int32)
    """
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils   # multi-process jobs only
    return np.asarray(multihost_utils.broadcast_one_to_all(values))


def time_programs(programs: dict[str, Callable], args: Sequence[Any], rounds: int = 7,
                  min_round_s: float = 0.05) -> dict[str, float]:
    """Median seconds per call of each compiled program on ``args``, the
    programs interleaved round by round (drift on a shared machine hits all)."""
    for program in programs.values():  # warm up: the first run allocates
        jax.block_until_ready(program(*args))
    iters = {}
    for name, program in programs.items():
        start = time.perf_counter()
        jax.block_until_ready(program(*args))
        iters[name] = max(1, min(100, round(min_round_s / max(time.perf_counter() - start,
                                                               1e-6))))
    # Each process calls each program the same number of times: programs with
    # collectives hang (or gloo aborts) when one process runs more calls.
    counts = from_process_0(np.array(list(iters.values()), np.int32))
    iters = dict(zip(iters, counts.tolist(), strict=True))
    times: dict[str, list] = {name: [] for name in programs}
    for _ in range(rounds):
        for name, program in programs.items():
            start = time.perf_counter()
            for _ in range(iters[name]):
                jax.block_until_ready(program(*args))
            times[name].append((time.perf_counter() - start) / iters[name])
    return {name: statistics.median(t) for name, t in times.items()}
