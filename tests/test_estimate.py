"""jlm.estimate on cases with a known answer: a matmul's FLOPs, a psum's bytes
per axis, a region's saved activations, the partitioner's collectives of
Explicit-axis types, the time model, the hardware's links, and a strategy
region choosing differently for two hardware presets."""

import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jlocalmap as jlm
from jlocalmap import Partial, Replicate, Shard

H100 = jlm.Hardware.preset("h100-sxm")


def abstract_mesh(sizes, names):
    return AbstractMesh(tuple(sizes), tuple(names), axis_types=(AxisType.Explicit,) * len(names))


def spec(shape, mesh, *entries, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P(*entries)))


def test_matmul_flops_are_exact_per_device():
    mesh = abstract_mesh((8,), ("dp",))
    x, w = spec((512, 256), mesh, "dp"), spec((256, 128), mesh)
    est = jlm.estimate(jnp.matmul, x, w, hardware=H100)
    assert est.matmul_flops == 2 * (512 // 8) * 256 * 128
    assert est.collectives() == {}


def test_convolution_flops_are_exact():
    x = jax.ShapeDtypeStruct((2, 3, 16, 16), jnp.float32)
    k = jax.ShapeDtypeStruct((8, 3, 3, 3), jnp.float32)
    conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME")  # noqa: E731
    est = jlm.estimate(conv, x, k, hardware=H100)
    assert est.matmul_flops == 2 * (2 * 8 * 16 * 16) * (3 * 3 * 3)


def test_a_psum_is_one_all_reduce_of_the_local_bytes_on_its_axis(mesh2x4, rng):
    body = lambda x: jax.lax.psum(x, "tp")  # noqa: E731
    f = jlm.local_map(body, [Shard(0), Replicate()], ([Shard(0), Shard(1)],),
                      device_mesh=mesh2x4)
    x = jlm.distribute_tensor(rng.standard_normal((8, 16)).astype(np.float32), mesh2x4,
                              [Shard(0), Shard(1)])
    est = jlm.estimate(f, x, hardware=H100)
    assert est.collectives() == {"tp": {"all-reduce": {"count": 1, "bytes": 4 * 4 * 4}}}
    assert est.collectives("outside") == {}
    compiled = jlm.inspect.count_collectives(f, x)
    assert compiled.counts["all-reduce"] == 1 and compiled.bytes["all-reduce"] == 64
    # priced by the strategies' cost model: latency + 2(n-1)/n bytes / bandwidth on NVLink
    link = H100.nvlink
    [row] = est.comms
    assert row.seconds == pytest.approx(link.latency + 2 * 3 / 4 * 64 / link.bandwidth)


def test_a_psum_scatter_is_one_reduce_scatter_of_its_operand_on_its_axis(mesh2x4, rng):
    body = lambda x: jax.lax.psum_scatter(x, "tp", scatter_dimension=0, tiled=True)  # noqa: E731
    f = jlm.local_map(body, [Shard(0), Shard(0)], ([Shard(0), Replicate()],),
                      device_mesh=mesh2x4)
    x = jlm.distribute_tensor(rng.standard_normal((8, 16)).astype(np.float32), mesh2x4,
                              [Shard(0), Replicate()])
    est = jlm.estimate(f, x, hardware=H100)
    # count_collectives' convention: the operand, the whole local (4, 16) block
    assert est.collectives() == {"tp": {"reduce-scatter": {"count": 1, "bytes": 4 * 16 * 4}}}
    compiled = jlm.inspect.count_collectives(f, x)
    assert compiled.counts["reduce-scatter"] == 1 and compiled.bytes["reduce-scatter"] == 256
    # a ring reduce-scatter sends (n-1)/n of its operand: half an all-reduce's bytes
    link = H100.nvlink
    [row] = est.comms
    assert row.seconds == pytest.approx(link.latency + 3 / 4 * 256 / link.bandwidth)


def test_a_regions_saved_activations_are_its_residuals():
    mesh = abstract_mesh((4,), ("tp",))
    f = jlm.local_map(jnp.exp, [Shard(0)], ([Shard(0)],), device_mesh=mesh)
    loss = lambda x: f(x).sum()  # noqa: E731
    x = spec((64, 32), mesh, "tp")
    est = jlm.estimate(jax.grad(loss), x, hardware=H100)
    [region] = jlm.inspect.regions(jax.grad(loss), x)
    residual_bytes = sum(np.prod(r.shape) * r.dtype.itemsize for r in region.residuals)
    assert est.memory.saved_inside == residual_bytes == 16 * 32 * 4
    assert est.memory.arguments == 16 * 32 * 4


def test_explicit_axis_types_give_the_partitioners_collectives():
    mesh = abstract_mesh((2, 8), ("dp", "tp"))
    x, w = spec((64, 256), mesh, "dp", "tp"), spec((256, 32), mesh, "tp")

    def step(x, w):
        y = jnp.matmul(x, w, out_sharding=P("dp"))     # contraction split over tp
        return jax.sharding.reshard(y, P())              # gathered over dp

    est = jlm.estimate(step, x, w, hardware=H100)
    assert est.collectives("outside") == {
        "tp": {"all-reduce": {"count": 1, "bytes": 32 * 32 * 4}},
        "dp": {"all-gather": {"count": 1, "bytes": 64 * 32 * 4}}}


def test_a_reshard_of_a_partial_onto_a_split_is_a_reduce_scatter():
    mesh = abstract_mesh((8,), ("tp",))
    x, w = spec((64, 256), mesh, None, "tp"), spec((256, 32), mesh, "tp")
    step = lambda x, w: jnp.matmul(x, w, out_sharding=P("tp"))  # noqa: E731
    est = jlm.estimate(step, x, w, hardware=H100)
    assert est.collectives() == {"tp": {"reduce-scatter": {"count": 1, "bytes": 64 * 32 * 4}}}


def test_time_is_the_calibrated_matmul_rate_and_outside_comm_overlaps():
    mesh = abstract_mesh((4,), ("dp",))
    x, w = spec((4096, 8192), mesh, "dp", dtype=jnp.bfloat16), spec((8192, 8192), mesh,
                                                                     dtype=jnp.bfloat16)
    step = lambda x, w: jax.sharding.reshard(x @ w, P())  # noqa: E731
    est = jlm.estimate(step, x, w, hardware=H100, model_flops=2 * 4096 * 8192**2,
                       tokens_per_step=4096)
    compute = 2 * 1024 * 8192**2 / (989e12 * 0.68)
    assert est.times.compute_s == pytest.approx(compute)
    # the product's gather: nothing computes with it (overlapped), shorter than compute
    assert 0 < est.times.overlapped_s < compute and est.times.exposed_s == 0
    assert est.step_time_s == pytest.approx(compute + est.times.memory_s)
    assert est.mfu == pytest.approx(0.68 * compute / est.step_time_s)
    assert est.tokens_per_s_per_device == pytest.approx(4096 / est.step_time_s / 4)
    json.dumps(est.to_dict())  # every figure serialises


def test_weights_gathers_overlap_and_activation_reductions_are_exposed():
    """A scan over layers: each layer all-gathers its weight over fsdp (ready
    early: prefetched) and all-reduces its product over tp for the next layer's
    matmul (waited for); the backward reduce-scatters the weight gradients
    (nothing waits: they trail) and all-reduces the activations' gradients."""
    mesh = abstract_mesh((4, 2), ("fsdp", "tp"))

    def body(x, w):  # row-parallel: this tp rank's input columns times its weight rows
        w = jax.lax.all_gather(w, "fsdp", axis=1, tiled=True)
        rows = jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index("tp") * w.shape[0],
                                            w.shape[0], axis=1)
        return jnp.tanh(jax.lax.psum(rows @ w, "tp"))

    layer = jlm.local_map(body, [Shard(0), Replicate()],
                          ([Shard(0), Replicate()], [Shard(1), Shard(0)]),
                          in_grad_placements=([Shard(0), Partial()], None), device_mesh=mesh)

    def loss(ws, x):
        x, _ = jax.lax.scan(lambda x, w: (layer(x, w), None), x, ws)
        return jnp.sum(x)

    ws = spec((3, 64, 64), mesh, None, "tp", "fsdp")  # (layer, in, out)
    x = spec((32, 64), mesh, "fsdp")
    est = jlm.estimate(jax.grad(loss), ws, x, hardware=H100)
    rows = {(r.axes, r.kind): r for r in est.comms}
    assert rows[("fsdp", "all-gather")].exposed_s == 0
    assert rows[("fsdp", "reduce-scatter")].exposed_s == 0
    assert rows[("tp", "all-reduce")].exposed_s == rows[("tp", "all-reduce")].seconds > 0


def test_a_gradient_accumulated_over_microbatches_is_not_waited_for():
    """A scan over microbatches carries the summed gradient: the next
    microbatch only adds to it, so its reduce-scatter overlaps; the layer
    scan's carried activations stay waited for."""
    mesh = abstract_mesh((4,), ("fsdp",))
    layer = jlm.local_map(lambda x, w: jnp.tanh(x @ jax.lax.all_gather(w, "fsdp", tiled=True)),
                          [Shard(0)], ([Shard(0)], [Shard(0)]), device_mesh=mesh)
    grad = jax.grad(lambda w, x: jnp.sum(layer(layer(x, w), w)))

    def accumulated(w, xs):
        return jax.lax.scan(lambda total, x: (total + grad(w, x), None), jnp.zeros_like(w),
                            xs)[0]

    w, xs = spec((64, 64), mesh, "fsdp"), spec((8, 32, 64), mesh, None, "fsdp")
    rows = {(r.axes, r.kind): r for r in jlm.estimate(accumulated, w, xs, hardware=H100).comms}
    assert rows[("fsdp", "reduce-scatter")].count == 8 * 2
    assert rows[("fsdp", "reduce-scatter")].exposed_s == 0


def test_hardware_links_follow_the_mesh_order_and_numbers_cite_sources():
    links = H100.axis_links({"dp": 2, "fsdp": 4, "tp": 2})
    assert links == {"dp": H100.network, "fsdp": H100.nvlink, "tp": H100.nvlink}
    # a group with 8 GPUs in each node crosses nodes on their 8 NICs (NVLink-bound);
    # one with 4, on 4; one with 1 (the others inside the node), on its own NIC
    links = H100.axis_links({"dp": 16, "fsdp": 128})
    assert links["fsdp"].bandwidth == H100.nvlink.bandwidth and links["dp"] == H100.network
    links = H100.axis_links({"fsdp": 64, "tp": 2})
    assert links["fsdp"].bandwidth == 4 * H100.network.bandwidth
    for name in ("h100-sxm", "h200", "cpu"):
        hw = jlm.Hardware.preset(name)
        numbers = {f.name for f in dataclasses.fields(hw)} - {"name", "sources"}
        assert set(hw.sources) == numbers, name
    h200 = jlm.Hardware.preset("h200").replace(matmul_efficiency=0.5)
    assert h200.matmul_flops_per_s("bfloat16") == 0.5 * 989e12
    assert h200.cost_model({"tp": 8}).link("tp") == h200.nvlink


def test_strategy_regions_choose_for_the_estimated_hardware():
    """One matmul computed whole on every device, or split over tp and gathered:
    compute is dear on the CPU preset (split wins), latency dominates on the H100
    (whole wins). Nothing runs: the mesh is abstract."""
    mesh = abstract_mesh((8,), ("tp",))
    whole = jlm.local_map(jnp.matmul, [Replicate()], ([Replicate()], [Replicate()]),
                          device_mesh=mesh)
    split = jlm.local_map(jnp.matmul, [Shard(1)], ([Replicate()], [Shard(1)]),
                          device_mesh=mesh)
    region = jlm.strategies.strategy_region({"whole": whole, "split": split}, out_placements=[Replicate()])
    x, w = spec((256, 256), mesh), spec((256, 256), mesh)
    chosen = {}
    for name in ("cpu", "h100-sxm"):
        [row] = jlm.estimate(region, x, w, hardware=jlm.Hardware.preset(name)).strategies
        chosen[name] = row.chosen
        assert row.runner_up_seconds > row.seconds
    assert chosen == {"cpu": "split", "h100-sxm": "whole"}
    with pytest.raises(jlm.LocalMapValueError, match="AbstractMesh"):
        region.choice(x, w)  # outside an estimate there is no device to choose for


def test_16384_abstract_devices_estimate_in_well_under_a_second():
    mesh = abstract_mesh((2048, 8), ("dp", "tp"))
    x, w = spec((2048 * 4, 8192), mesh, "dp"), spec((8192, 8192), mesh, None, "tp")
    start = time.perf_counter()
    est = jlm.estimate(jax.grad(lambda x, w: jnp.sum(jnp.tanh(x @ w)), argnums=1), x, w,
                       hardware=H100)
    assert time.perf_counter() - start < 5
    assert est.devices == 16384 and est.collectives()["dp"]["all-reduce"]["count"] == 1


def test_errors_name_the_argument():
    x = jax.ShapeDtypeStruct((4,), jnp.float32)
    with pytest.raises(jlm.LocalMapTypeError, match="hardware: expected a jlm.Hardware"):
        jlm.estimate(jnp.sin, x, hardware="h100")
    with pytest.raises(jlm.LocalMapValueError, match="Hardware.preset: expected one of"):
        jlm.Hardware.preset("a100")
    with pytest.raises(jlm.LocalMapTypeError, match="unknown fields"):
        H100.replace(flops=1)
    one, two = abstract_mesh((2,), ("a",)), abstract_mesh((4,), ("a",))
    with pytest.raises(jlm.PlacementValueError, match="arrays on one mesh"):
        jlm.estimate(jnp.add, spec((4,), one), spec((4,), two), hardware=H100)
