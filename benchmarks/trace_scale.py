"""Trace time of a deep model with two local_map regions per layer, on an
abstract 256-device mesh (dp=8, tp=8, cp=4): nothing runs, no devices needed.

Each layer has a context-parallel attention region and a tensor-parallel MLP
region. For 4 and 32 layers it times ``jax.make_jaxpr`` of the forward and of
``jax.value_and_grad`` (best of 5), and the same model written with raw
``jax.shard_map`` (the baseline, same process), then ``jlocalmap.regions`` on the
gradient. Prints time per region, the 32/4-layer ratio (8.0 is linear), and
jlocalmap's ratio to the raw baseline.

Run: python benchmarks/trace_scale.py
"""
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # a checkout works too

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec as P

import jlocalmap as jlm
from jlocalmap import Replicate as R, Shard as S

MESH = AbstractMesh((8, 8, 4), ("dp", "tp", "cp"), axis_types=(AxisType.Explicit,) * 3)
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


def local_map_regions():
    attention = jlm.local_map(attention_body, [S(0), S(1), S(2)], QKV_IN,
                              device_mesh=MESH, redistribute_inputs=True)
    mlp = jlm.local_map(mlp_body, [S(0), R(), S(1)], MLP_IN, device_mesh=MESH,
                        redistribute_inputs=True)
    return attention, mlp


def raw_regions():
    """The baseline: the same bodies on jax.shard_map, inputs resharded by hand."""
    def region(body, in_specs, out_spec):
        mapped = jax.shard_map(body, mesh=MESH, in_specs=in_specs, out_specs=out_spec)

        def call(*args):
            return mapped(*(jax.reshard(a, NamedSharding(MESH, s))
                            for a, s in zip(args, in_specs)))
        return call
    qkv = (P("dp", "tp", "cp"), P("dp", "tp"), P("dp", "tp"))
    mlp = (P("dp", "cp"), P(None, "tp"), P("tp"))
    return (region(attention_body, qkv, P("dp", "tp", "cp")),
            region(mlp_body, mlp, P("dp", "cp")))


def model(layers, regions):
    attention, mlp = regions

    def forward(params, x):
        for p in params[:layers]:
            def heads(w):
                return jnp.transpose((x @ w).reshape(B, T, H, D), (0, 2, 1, 3))
            o = attention(heads(p["wq"]), heads(p["wk"]), heads(p["wv"]))
            x = x + jnp.transpose(o, (0, 2, 1, 3)).reshape(B, T, E) @ p["wo"]
            x = x + mlp(x, p["w1"], p["w2"])
        return x
    return forward


def inputs(layers):
    def spec(shape, p):
        return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(MESH, p))
    layer = dict(wq=spec((E, E), P()), wk=spec((E, E), P()), wv=spec((E, E), P()),
                 wo=spec((E, E), P()), w1=spec((E, 4 * E), P(None, "tp")),
                 w2=spec((4 * E, E), P("tp")))
    return [layer] * layers, spec((B, T, E), P("dp", "cp"))


def best_of(fn, repeat=5):
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def trace_times(layers, regions):
    """Best-of-5 make_jaxpr times; a fresh function each time, as make_jaxpr
    caches traces per function."""
    params, x = inputs(layers)
    with jax.sharding.use_abstract_mesh(MESH):
        fwd = best_of(lambda: jax.make_jaxpr(model(layers, regions))(params, x))
        grad = best_of(lambda: jax.make_jaxpr(jax.value_and_grad(
            lambda p, x: model(layers, regions)(p, x).sum()))(params, x))
    return fwd, grad


def main():
    ours, raw = local_map_regions(), raw_regions()
    trace_times(1, ours)  # warm JAX's own caches (imports, primitive rules)
    trace_times(1, raw)
    rows = {}
    for layers in (4, 32):
        rows[layers] = trace_times(layers, ours), trace_times(layers, raw)
        params, x = inputs(layers)
        forward = model(layers, ours)
        start = time.perf_counter()
        found = jlm.regions(jax.value_and_grad(lambda p, x: forward(p, x).sum()), params, x)
        analysis = time.perf_counter() - start
        assert len(found) == 2 * layers and all(r.differentiated for r in found)
        n = 2 * layers
        (fwd, grad), (raw_fwd, raw_grad) = rows[layers]
        print(f"{layers:2d} layers, {n} regions: forward {fwd * 1e3:7.1f} ms "
              f"({fwd / n * 1e3:.2f} ms/region, {fwd / raw_fwd:.2f}x raw shard_map); "
              f"value_and_grad {grad * 1e3:7.1f} ms ({grad / n * 1e3:.2f} ms/region, "
              f"{grad / raw_grad:.2f}x raw); regions() {analysis * 1e3:.1f} ms "
              f"including its trace")
    (f4, g4), _ = rows[4]
    (f32, g32), _ = rows[32]
    print(f"32 layers / 4 layers: forward {f32 / f4:.2f}x, value_and_grad {g32 / g4:.2f}x "
          f"(8.00x is linear)")


if __name__ == "__main__":
    main()
