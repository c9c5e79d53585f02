"""Where an eager ``local_map`` call spends its time, against the jitted
hand-written ``jax.shard_map`` call it should cost about as much as.

Calls are paired: each iteration calls every program once, in a rotating
order, and waits for each result before the next call (simulated CPU devices
deadlock when many collectives are queued), so the load of a shared machine
falls on all of them alike. Per call it records the time until the call returns
("dispatch": Python, argument checks, enqueueing) and until its result is ready
("total"), and reports medians. Then it times the Python pieces of the eager
path alone (planning a cached call, assembling the result), and ends with a
cProfile of many eager calls, most own time first. Two more rows explain the
gap: the jitted call after 5 us of spinning Python (on XLA:CPU's simulated
devices a little Python before a dispatch costs several times its own time),
and a candidate fast path (an array check, then ``jax.jit`` of the local_map,
whose signature check is C++).

Run: python benchmarks/profile_eager.py [--calls 4000]
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import cProfile  # noqa: E402
import io  # noqa: E402
import pathlib  # noqa: E402
import pstats  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Callable  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import jlocalmap as jlm  # noqa: E402
from jlocalmap import Replicate, Shard  # noqa: E402


def programs(n: int):
    """The tiny psum(x @ w) as: jitted hand-written shard_map, eager local_map,
    jax.jit of the local_map, and the compiled program an eager call runs."""
    mesh = jax.make_mesh((n,), ("tp",))
    rng = np.random.default_rng(0)
    x = jax.device_put(rng.standard_normal((64, 16 * n)).astype(np.float32),
                       NamedSharding(mesh, P(None, "tp")))
    w = jax.device_put(rng.standard_normal((16 * n, 32)).astype(np.float32),
                       NamedSharding(mesh, P("tp")))

    def body(x, w):
        return jax.lax.psum(x @ w, "tp")
    mapped = jlm.local_map(body, [Replicate()], ([Shard(1)], [Shard(0)]), device_mesh=mesh)
    raw = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(None, "tp"), P("tp")),
                                out_specs=P()))
    jitted = jax.jit(mapped)

    def after_python(x, w, spin_s=5e-6):
        """The jitted call after 5 us of Python: what any Python before a
        dispatch costs on this backend."""
        start = time.perf_counter()
        while time.perf_counter() - start < spin_s:
            pass
        return raw(x, w)

    def guarded(*args, **kwargs):
        """A possible eager fast path: all arguments arrays, no keywords -> the
        C++ dispatch of jax.jit(local_map) checks the signature."""
        if not kwargs and all(isinstance(a, jax.Array) for a in args):
            return jitted(*args)
        return mapped(*args, **kwargs)
    fns = {"jit(shard_map)": raw, "jlocalmap eager": mapped, "jit(jlocalmap)": jitted,
           "jlocalmap's compiled program": mapped.lower(x, w).compile(),
           "jit(shard_map) after 5us Python": after_python,
           "array check + jit(jlocalmap)": guarded}
    return fns, mapped, (x, w)


def paired(fns: dict, args: tuple, calls: int) -> dict:
    """Per program: median dispatch and total seconds per call, calls interleaved."""
    names = list(fns)
    dispatch = {n: [] for n in names}
    total = {n: [] for n in names}
    for i in range(calls):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            start = time.perf_counter()
            out = fns[name](*args)
            returned = time.perf_counter()
            jax.block_until_ready(out)
            dispatch[name].append(returned - start)
            total[name].append(time.perf_counter() - start)
    return {n: (statistics.median(dispatch[n]), statistics.median(total[n])) for n in names}


def python_pieces(mapped, args: tuple, calls: int) -> dict:
    """Seconds per call of the eager path's Python alone (no program runs): the
    cached plan lookup (``_prepare``) and the result assembly. Private hooks:
    skipped, with a note, when the library's internals have moved."""
    pieces: dict = {}
    prepare = getattr(mapped, "_prepare", None)
    if prepare is None:
        return {"note": "LocalMapped._prepare not found: library internals changed"}
    pieces["_prepare (cached call: signature, cache hit)"] = _per_call(
        lambda: prepare(args, {}), calls)
    try:
        from jlocalmap.call.arguments import call_signature
        leaves, tree = jax.tree_util.tree_flatten(args)
        pieces["  of which call_signature"] = _per_call(
            lambda: call_signature(leaves, tree, {}), calls)
        pieces["  of which tree_flatten"] = _per_call(lambda: jax.tree_util.tree_flatten(args),
                                                      calls)
    except ImportError:
        pass
    prepared = prepare(args, {})
    arrays, facts = prepared.program(*prepared.dyn) if hasattr(prepared, "program") else (
        None, None)
    assemble = getattr(sys.modules[type(mapped).__module__], "_assemble", None)
    if assemble is not None and facts is not None:
        pieces["_assemble (output tree)"] = _per_call(lambda: assemble(facts, arrays), calls)
    if hasattr(prepared, "program") and hasattr(prepared.program, "jitted"):
        jitted = prepared.program.jitted
        pieces["its jax.jit program, dispatch only*"] = _dispatch(jitted, prepared.dyn, calls)
    return pieces


def _per_call(fn: Callable, calls: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def _dispatch(fn: Callable, args, calls: int) -> float:
    spent = []
    for _ in range(calls):
        start = time.perf_counter()
        out = fn(*args)
        spent.append(time.perf_counter() - start)
        jax.block_until_ready(out)
    return statistics.median(spent)


def profile(fn, args, calls: int, top: int) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        jax.block_until_ready(fn(*args))
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=4000)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    fns, mapped, call_args = programs(len(jax.devices()))
    for fn in fns.values():
        jax.block_until_ready(fn(*call_args))
    results = paired(fns, call_args, args.calls)
    base_dispatch, base_total = results["jit(shard_map)"]
    print(f"devices: {len(jax.devices())} x {jax.devices()[0].platform}; jax {jax.__version__}; "
          f"load average {os.getloadavg()[0]:.1f}; {args.calls} paired calls, medians")
    print(f"{'program':34s} {'total':>9s} {'ratio':>6s} {'dispatch':>9s} {'extra':>9s}")
    for name, (dispatch, total) in results.items():
        print(f"{name:34s} {total * 1e6:7.1f}us {total / base_total:5.2f}x "
              f"{dispatch * 1e6:7.1f}us {(dispatch - base_dispatch) * 1e6:+7.1f}us")
    print("\nthe eager path's Python alone (per call):")
    for name, seconds in python_pieces(mapped, call_args, args.calls).items():
        print(f"  {name:46s} {seconds * 1e6:7.1f}us" if isinstance(seconds, float)
              else f"  {seconds}")
    print("  (* median time until the call returns, its result then waited for)")
    print(f"\ncProfile of {args.calls // 2} eager calls (own time, most first):")
    print(profile(mapped, call_args, args.calls // 2, args.top))


if __name__ == "__main__":
    main()
