"""Trace + lower time of a deep model with two local_map regions per layer.

Each layer has a context-parallel attention region and a tensor-parallel MLP
region, on a (dp, tp, cp) = (2, 2, 2) mesh of 8 devices (8 simulated CPU
devices when no accelerator is present). For 4 and 32 layers it times a fresh
``jax.jit(...).lower(...)`` of the forward and of ``jax.value_and_grad`` (best
of 5 with the garbage collector off, as timeit does; the first, cold trace is
printed too), and the same model written with raw ``jax.shard_map`` (the
baseline, in the same process, interleaved round by round), then
``jlocalmap.inspect.regions`` on the gradient over an abstract 256-device mesh (no
devices needed). Prints time per region, the 32/4-layer ratio (8.0 is
linear), and jlocalmap's ratio to the raw baseline (target: at most 1.2 at 32
layers, forward and value_and_grad).

Run: python benchmarks/trace_scale.py
"""
import gc
import os
import pathlib
import sys
import time

if "XLA_FLAGS" not in os.environ and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # a checkout works too

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec as P

import jlocalmap as jlm
from jlocalmap import Replicate as R, Shard as S

MESH = jax.make_mesh((2, 2, 2), ("dp", "tp", "cp"), axis_types=(AxisType.Explicit,) * 3,
                     devices=jax.devices()[:8])
ABSTRACT = AbstractMesh((8, 8, 4), ("dp", "tp", "cp"), axis_types=(AxisType.Explicit,) * 3)
B, T, H, D = 8, 16, 16, 6
E = H * D
QKV_IN = ([S(0), S(1), S(2)], [S(0), S(1), R()], [S(0), S(1), R()])
MLP_IN = ([S(0), R(), S(1)], [R(), S(1), R()], [R(), S(0), R()])


def attention_body(q, k, v):
    chunk = q.shape[2]
    rows = jax.lax.axis_index("cp") * chunk + jnp.arange(chunk)[:, None]
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(q.shape[-1])
    scores = jnp.where(rows >= jnp.arange(k.shape[2])[None, :], scores, -jnp.inf)
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(scores, -1), v)


def mlp_body(x, w1, w2):
    return jax.lax.psum(jax.nn.relu(x @ w1) @ w2, "tp")


def local_map_regions(mesh=MESH):
    attention = jlm.local_map(attention_body, [S(0), S(1), S(2)], QKV_IN,
                              device_mesh=mesh, redistribute_inputs=True)
    mlp = jlm.local_map(mlp_body, [S(0), R(), S(1)], MLP_IN, device_mesh=mesh,
                        redistribute_inputs=True)
    return attention, mlp


def raw_regions():
    """The baseline: the same bodies on jax.shard_map, inputs resharded by hand."""
    def region(body, in_specs, out_spec):
        mapped = jax.shard_map(body, mesh=MESH, in_specs=in_specs, out_specs=out_spec)

        def call(*args):
            return mapped(*(jax.reshard(a, NamedSharding(MESH, s))
                            for a, s in zip(args, in_specs, strict=True)))
        return call
    qkv = (P("dp", "tp", "cp"), P("dp", "tp"), P("dp", "tp"))
    mlp = (P("dp", "cp"), P(None, "tp"), P("tp"))
    return (region(attention_body, qkv, P("dp", "tp", "cp")),
            region(mlp_body, mlp, P("dp", "cp")))


def model(layers, regions):
    attention, mlp = regions

    def forward(params, x):
        for p in params[:layers]:
            def heads(w, x=x):
                return jnp.transpose((x @ w).reshape(B, T, H, D), (0, 2, 1, 3))
            o = attention(heads(p["wq"]), heads(p["wk"]), heads(p["wv"]))
            x = x + jnp.transpose(o, (0, 2, 1, 3)).reshape(B, T, E) @ p["wo"]
            x = x + mlp(x, p["w1"], p["w2"])
        return x
    return forward


def inputs(layers, mesh=MESH):
    def spec(shape, p):
        return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, p))
    layer = dict(wq=spec((E, E), P()), wk=spec((E, E), P()), wv=spec((E, E), P()),
                 wo=spec((E, E), P()), w1=spec((E, 4 * E), P(None, "tp")),
                 w2=spec((4 * E, E), P("tp")))
    return [layer] * layers, spec((B, T, E), P("dp", "cp"))


def timed(fn):
    """Seconds of one call, with the garbage collector off (as timeit does): a
    collection landing in one program's trace and not the other's is noise."""
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    finally:
        gc.enable()


def programs(layers, regions):
    """Trace + lower of the forward and of value_and_grad, each in a fresh jax.jit
    (jit caches traces per function)."""
    params, x = inputs(layers)

    def fwd():
        jax.jit(model(layers, regions)).lower(params, x)

    def grad():
        jax.jit(jax.value_and_grad(lambda p, x: model(layers, regions)(p, x).sum())).lower(params, x)
    return fwd, grad


def trace_times(layers, ours, raw, repeat=5):
    """{(impl, what): (first, best)} seconds, jlocalmap and raw shard_map
    interleaved round by round so that the machine's load falls on both."""
    progs = {"ours": programs(layers, ours), "raw": programs(layers, raw)}
    times: dict = {}
    for _ in range(repeat):
        for impl, pair in progs.items():
            for what, fn in zip(("forward", "value_and_grad"), pair, strict=True):
                times.setdefault((impl, what), []).append(timed(fn))
    return {k: (v[0], min(v)) for k, v in times.items()}


def analysis_time(layers):
    """jlm.inspect.regions on the gradient over the abstract 256-device mesh."""
    params, x = inputs(layers, ABSTRACT)
    forward = model(layers, local_map_regions(ABSTRACT))
    start = time.perf_counter()
    found = jlm.inspect.regions(jax.value_and_grad(lambda p, x: forward(p, x).sum()), params, x)
    assert len(found) == 2 * layers and all(r.differentiated for r in found)
    return time.perf_counter() - start


def main():
    raw = raw_regions()
    trace_times(1, local_map_regions(), raw, repeat=1)  # warm JAX's own caches (imports, rules)
    ratios = {}
    for layers in (4, 32):
        n = 2 * layers
        times = trace_times(layers, local_map_regions(), raw)  # new local_maps: a cold start
        for what in ("forward", "value_and_grad"):
            (cold, best), (_, raw_best) = times["ours", what], times["raw", what]
            ratios[layers, what] = best / raw_best
            print(f"{layers:2d} layers, {n} regions, {what:>14}: {best * 1e3:7.1f} ms "
                  f"({best / n * 1e3:.2f} ms/region), raw shard_map {raw_best * 1e3:7.1f} ms, "
                  f"ratio {best / raw_best:.2f}x (first trace {cold / raw_best:.2f}x)")
        print(f"{layers:2d} layers: regions() on a 256-device abstract mesh "
              f"{analysis_time(layers) * 1e3:.1f} ms including its trace")
    ok = all(ratios[32, w] <= 1.2 for w in ("forward", "value_and_grad"))
    print(f"32-layer trace + lower ratio to raw shard_map: forward "
          f"{ratios[32, 'forward']:.2f}x, value_and_grad {ratios[32, 'value_and_grad']:.2f}x "
          f"(target <= 1.2: {'pass' if ok else 'FAIL'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
