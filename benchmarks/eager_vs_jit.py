"""Eager local_map calls against the same call under jax.jit, and raw eager
jax.shard_map, in one process. Prints per-call times and ratios to the jitted call.

Run: python benchmarks/eager_vs_jit.py   (8 simulated CPU devices, or your GPUs)
"""
import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # a checkout works too

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

import jlocalmap as jlm
from jlocalmap import Replicate, Shard


def per_call(fn, *args, repeat=200):
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeat):
            # one call in flight at a time: simulated CPU devices share a small
            # thread pool, and many queued collectives can starve each other
            jax.block_until_ready(fn(*args))
        best = min(best, (time.perf_counter() - start) / repeat)
    return best


def main():
    n = len(jax.devices())
    mesh = jax.make_mesh((n,), ("tp",))
    rng = np.random.default_rng(0)
    x = jlm.distribute_tensor(rng.standard_normal((64, 16 * n)).astype(np.float32), mesh, [Shard(1)])
    w = jlm.distribute_tensor(rng.standard_normal((16 * n, 32)).astype(np.float32), mesh, [Shard(0)])

    def body(x, w):
        return jax.lax.psum(x @ w, "tp")

    mapped = jlm.local_map(body, [Replicate()], ([Shard(1)], [Shard(0)]), device_mesh=mesh)
    jitted = jax.jit(mapped)
    raw = jax.shard_map(body, mesh=mesh, in_specs=(P(None, "tp"), P("tp")), out_specs=P())
    t_jit = per_call(jitted, x, w)
    t_eager = per_call(mapped, x, w)
    t_raw = per_call(raw, x, w, repeat=5)
    print(f"devices: {n} x {jax.devices()[0].platform}")
    print(f"jax.jit(local_map(...))      {t_jit * 1e6:10.1f} us/call   1.00x")
    print(f"local_map(...) eager         {t_eager * 1e6:10.1f} us/call   {t_eager / t_jit:.2f}x")
    print(f"jax.shard_map(...) eager     {t_raw * 1e6:10.1f} us/call   {t_raw / t_jit:.2f}x")


if __name__ == "__main__":
    main()
