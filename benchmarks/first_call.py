"""What a local_map's first calls cost beyond the body: the XLA compiles of the
first call with an even and with an uneven input (eager and under ``jax.jit``),
and what the caches hold after many distinct call signatures.

It reads only the public API and the containers it finds, so it runs on any
commit of the package (the core refactor's before/after figures in
docs/benchmarks.md come from it):

    python benchmarks/first_call.py                      # 10,000 signatures
    python benchmarks/first_call.py --signatures 2000
    PYTHONPATH=/path/to/old/checkout python benchmarks/first_call.py

The last line is ``max |sharded - unsharded| = ...`` over the first calls'
results; the exit status is 1 when it is not below 1e-5.
"""

from __future__ import annotations

import argparse
import collections
import gc
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jlocalmap as jlm  # noqa: E402


def first_call_compiles(mesh, rows: int, jit: bool) -> tuple[int, float]:
    """(XLA compiles, max |result - unsharded|) of a fresh local_map's first call
    on ``rows`` rows sharded over the mesh."""
    events = []

    def listen(name, secs, **kwargs):
        if name.endswith("backend_compile_duration"):
            events.append(name)
    X = np.random.default_rng(rows).standard_normal((rows, 3)).astype(np.float32)
    x = jlm.distribute_tensor(X, mesh, [jlm.Shard(0)])
    jax.block_until_ready(jax.tree_util.tree_leaves(x))
    f = jlm.local_map(lambda v: jnp.sin(v) * 2, [jlm.Shard(0)], ([jlm.Shard(0)],),
                      device_mesh=mesh)
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        y = jax.block_until_ready(jax.jit(f)(x) if jit else f(x))
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    diff = float(np.max(np.abs(np.asarray(jlm.full_tensor(y)) - np.sin(X) * 2)))
    return len(events), diff


def _sized(value) -> int | None:
    """The entries a cache-like container holds, or None for other values."""
    if hasattr(value, "cache_info"):            # functools.lru_cache (or jlocalmap's cached)
        return value.cache_info().currsize
    cache = getattr(value, "cache", None)       # jlocalmap._caches.cached
    if cache is not None and hasattr(cache, "keys") and hasattr(cache, "__len__"):
        return len(cache)
    if isinstance(value, (dict, set, list, collections.OrderedDict)) or \
            type(value).__name__ == "LRU":
        return len(value)
    return None


def containers(owner_objects: dict) -> dict:
    """name -> entries of every container among jlocalmap's module globals and
    the attributes of ``owner_objects`` (name -> object)."""
    found = {}
    for name, module in list(sys.modules.items()):
        if name.startswith("jlocalmap") and module is not None:
            for attr, value in list(vars(module).items()):
                size = _sized(value)
                if size is not None:
                    found[f"{name}.{attr}"] = size
    for owner, obj in owner_objects.items():
        for attr, value in list(vars(obj).items()):
            size = _sized(value)
            if size is not None:
                found[f"{owner}.{attr}"] = size
        region = vars(obj).get("_region")
        for attr, value in (list(vars(region).items()) if region is not None else []):
            size = _sized(value)
            if size is not None:
                found[f"{owner}._region.{attr}"] = size
    return found


def signatures(mesh, count: int, eager: bool) -> dict:
    """Call one local_map at ``count`` distinct signatures: eagerly with a number
    laid out by its entry (its value is part of the signature, not of the
    program), or traced with a static number that changes. Returns the Python
    objects grown, the seconds, and the containers that grew, with their sizes."""
    entry = [jlm.Replicate()] if eager else None
    f = jlm.local_map(lambda x, k: x * k, [jlm.Shard(0)], ([jlm.Shard(0)], entry),
                      device_mesh=mesh)
    x = jlm.distribute_tensor(np.ones(8, np.float32), mesh, [jlm.Shard(0)])
    spec = jax.ShapeDtypeStruct((8,), jnp.float32)

    def call(k: float):
        return f(x, k) if eager else jax.eval_shape(lambda v: f(v, k), spec)
    held = containers({"f": f})
    call(-1.0)   # the first call's one-time objects
    gc.collect()
    objects = len(gc.get_objects())
    start = time.perf_counter()
    for i in range(count):
        call(float(i))
    seconds = time.perf_counter() - start
    gc.collect()
    grown = {k: v for k, v in containers({"f": f}).items() if v > held.get(k, 0)}
    return {"objects": len(gc.get_objects()) - objects, "seconds": seconds, "grown": grown}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--signatures", type=int, default=10_000,
                        help="distinct call signatures traced (default 10,000)")
    args = parser.parse_args(argv)
    mesh = jax.make_mesh((4,), ("tp",), devices=jax.devices()[:4])
    print(f"jlocalmap from {os.path.dirname(jlm.__file__)}; jax {jax.__version__}")
    worst = 0.0
    for jit in (False, True):
        even, d1 = first_call_compiles(mesh, 8 + 4 * jit, jit)
        uneven, d2 = first_call_compiles(mesh, 7 + 4 * jit, jit)
        worst = max(worst, d1, d2)
        print(f"first call {'under jax.jit' if jit else 'eager':13}: XLA compiles even {even}, "
              f"uneven {uneven}")
    for eager in (True, False):
        found = signatures(mesh, args.signatures, eager)
        print(f"{args.signatures} distinct {'eager' if eager else 'traced'} signatures: "
              f"{found['seconds']:.1f} s, {found['objects']:+d} Python objects")
        for name, size in sorted(found["grown"].items()):
            print(f"  grew: {name} holds {size}")
    print(f"max |sharded - unsharded| = {worst:.3g}")
    return 0 if worst < 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
