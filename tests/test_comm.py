"""Communication accounting: exact counts (checked with jlocalmap.testing's
expect_collectives) and bytes for known programs, agreement with an opcode-matching
counter, and the HLO forms XLA emits on other backends."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, randn
from jax.sharding import NamedSharding

import jlocalmap as jlm
from jlocalmap import Replicate, Shard
from jlocalmap import collectives as C
from jlocalmap.inspect.comm import Collective, collectives_in_hlo
from jlocalmap.testing import expect_collectives


def helpers_count(fn, *args):
    """An independent oracle: collective opcodes matched in the compiled HLO text."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    kinds = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
    return {c: len(re.findall(rf"\s{c}(?:-start)?\(", text)) for c in kinds}

NONE = dict.fromkeys(("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute"), 0)
F32 = 4


def tp_matmul(mesh, **kwargs):
    return jlm.local_map(lambda x, w: C.all_reduce(x @ w, "sum", mesh), [Replicate()],
                         ([Shard(1)], [Shard(0)]), device_mesh=mesh, **kwargs)


@pytest.mark.parametrize("n", [2, 4])
def test_correctness_program_one_all_reduce(rng, n):
    mesh = jax.make_mesh((n,), ("tp",))
    x = jlm.distribute_tensor(randn(rng, 8, 16), mesh, [Shard(1)])
    w = jlm.distribute_tensor(randn(rng, 16, 12), mesh, [Shard(0)])
    comms = expect_collectives(tp_matmul(mesh), x, w, all_reduce=1)
    assert comms.counts == helpers_count(tp_matmul(mesh), x, w)
    assert comms.bytes == {**NONE, "all-reduce": 8 * 12 * F32}


def test_redistribute_program_two_all_to_all_one_all_reduce(mesh1, rng):
    X, W = randn(rng, 8, 16), randn(rng, 16, 12)
    x = jlm.distribute_tensor(X, mesh1, [Shard(0)])
    w = jlm.distribute_tensor(W, mesh1, [Shard(1)])
    mm = tp_matmul(mesh1, redistribute_inputs=True)
    assert_close(mm(x, w), X @ W, rtol=1e-5)
    comms = expect_collectives(mm, x, w, all_to_all=2, all_reduce=1)
    assert comms.counts == helpers_count(mm, x, w)
    # local X (4, 16) and W (16, 6) each move once; XLA emits one tuple element per peer
    assert sorted(op.bytes for op in comms.ops if op.kind == "all-to-all") == [4 * 16 * F32, 16 * 6 * F32]
    assert comms.total_bytes == (4 * 16 + 16 * 6 + 8 * 12) * F32


def test_all_gather_program(mesh4, rng):
    gather = jlm.local_map(lambda x: C.all_gather_tensor(x, 0, mesh4), [Replicate()], ([Shard(0)],),
                           device_mesh=mesh4)
    x = jlm.distribute_tensor(randn(rng, 8, 2), mesh4, [Shard(0)])
    comms = expect_collectives(gather, x, all_gather=1)
    assert comms.counts == helpers_count(gather, x)
    (op,) = comms.ops
    assert (op.operand_bytes, op.result_bytes, op.bytes) == (2 * 2 * F32, 8 * 2 * F32, 8 * 2 * F32)


# (not bfloat16: XLA:CPU all-reduces it in float32, and the count says so)
@pytest.mark.parametrize("dtype, itemsize", [(jnp.float32, 4), (jnp.float16, 2), (jnp.int8, 1)])
def test_all_reduce_bytes_of_known_shape(mesh2x4, rng, dtype, itemsize):
    f = jlm.local_map(lambda x: C.all_reduce(x, "sum", (mesh2x4, "tp")), [Shard(0), Replicate()],
                      ([Shard(0), Shard(0)],), device_mesh=mesh2x4)
    x = jlm.distribute_tensor(randn(rng, 8 * 3, 5, 7).astype(dtype), mesh2x4, [Shard(0), Shard(0)])
    comms = expect_collectives(f, x, all_reduce=1)
    assert comms.bytes["all-reduce"] == 3 * 5 * 7 * itemsize


def test_reduce_scatter_and_permute(mesh4, rng):
    def body(x):
        return C.permute(C.reduce_scatter_tensor(x, "sum", 0, mesh4), 1, mesh4)

    f = jlm.local_map(body, [Shard(0)], ([Shard(0)],), device_mesh=mesh4)
    x = jlm.distribute_tensor(randn(rng, 32, 3), mesh4, [Shard(0)])
    comms = expect_collectives(f, x, reduce_scatter=1, collective_permute=1)
    assert comms.counts == helpers_count(f, x)
    assert comms.bytes == {**NONE, "reduce-scatter": 8 * 3 * F32, "collective-permute": 2 * 3 * F32}


def test_forward_versus_training_step(mesh1, rng):
    X, W1, W2 = randn(rng, 8, 16), randn(rng, 16, 32), randn(rng, 32, 16)

    @jlm.local_map(out_placements=[Replicate()],
                   in_placements=([Replicate()], [Shard(1)], [Shard(0)]), device_mesh=mesh1)
    def mlp(x, w1, w2):
        return C.all_reduce(jax.nn.relu(x @ w1) @ w2, "sum", mesh1)

    def loss(x, w1, w2):
        return jnp.sum(mlp(x, w1, w2) ** 2)

    args = (jlm.distribute_tensor(X, mesh1, [Replicate()]),
            jlm.distribute_tensor(W1, mesh1, [Shard(1)]),
            jlm.distribute_tensor(W2, mesh1, [Shard(0)]))
    expect_collectives(loss, *args, all_reduce=1)
    with jax.set_mesh(mesh1):
        # backward: the replicated x's gradient is all-reduced once; the forward
        # all-reduce's transpose moves nothing
        step = expect_collectives(jax.value_and_grad(loss, argnums=(0, 1, 2)), *args, all_reduce=2)
    assert step.bytes["all-reduce"] == 2 * 8 * 16 * F32


def test_kwargs_reach_the_function(mesh1, rng):
    f = jlm.local_map(lambda x, *, op: C.all_reduce(x, op, mesh1), [Replicate()], ([Shard(0)],),
                      device_mesh=mesh1)
    x = jlm.distribute_tensor(randn(rng, 4, 3), mesh1, [Shard(0)])
    assert jlm.inspect.count_collectives(f, x, op="max").counts == {**NONE, "all-reduce": 1}


def test_shapes_without_data(mesh4):
    def struct(shape, placements):
        spec = jlm.placements_to_spec(placements, mesh4, len(shape))
        return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh4, spec))

    comms = expect_collectives(tp_matmul(mesh4), struct((8, 16), [Shard(1)]), struct((16, 12), [Shard(0)]),
                               all_reduce=1)
    assert comms.total_bytes == 8 * 12 * F32


def test_table(mesh1, rng):
    x = jlm.distribute_tensor(randn(rng, 8, 16), mesh1, [Shard(1)])
    w = jlm.distribute_tensor(randn(rng, 16, 12), mesh1, [Shard(0)])
    lines = str(jlm.inspect.count_collectives(tp_matmul(mesh1), x, w)).splitlines()
    assert lines[0].split() == ["collective", "count", "bytes"]
    assert lines[1].split() == ["all-reduce", "1", "384"]
    assert lines[6].split() == ["total", "1", "384"]


# -- HLO forms of other backends (GPU/TPU emit async pairs and combined ops) ------------
ASYNC_HLO = """
HloModule m, entry_computation_layout={(f32[4,8]{1,0})->f32[16,8]{1,0}}

%wrapped_all_to_all (param_0: bf16[4,6]) -> bf16[4,6] {
  %param_0 = bf16[4,6]{1,0} parameter(0)
  ROOT %all-to-all.1 = bf16[4,6]{1,0} all-to-all(%param_0), dimensions={0}
}

ENTRY %main (p: f32[4,8]) -> f32[16,8] {
  %p = f32[4,8]{1,0} parameter(0)
  %q = bf16[4,6]{1,0} parameter(1)
  %a = f32[2]{0} parameter(2)
  %b = pred[3]{0} parameter(3)
  %ags = (f32[4,8]{1,0}, f32[16,8]{1,0}) all-gather-start(%p), channel_id=1, dimensions={0}
  %agd = f32[16,8]{1,0} all-gather-done(%ags)
  %ars = f32[4,8]{1,0} all-reduce-start(%p), to_apply=%add
  %ard = f32[4,8]{1,0} all-reduce-done(%ars)
  %cps = (f32[4,8]{1,0}, f32[4,8]{1,0}, u32[], u32[]) collective-permute-start(%p), source_target_pairs={{0,1},{1,0}}
  %cpd = f32[4,8]{1,0} collective-permute-done(%cps)
  %combined = (f32[2]{0}, pred[3]{0}) all-reduce(%a, %b), to_apply=%or
  %a2as = ((bf16[4,6]{1,0}), bf16[4,6]{1,0}) async-start(%q), calls=%wrapped_all_to_all
  %a2ad = bf16[4,6]{1,0} async-done(%a2as)
  ROOT %rs = f32[1,8]{1,0} reduce-scatter(%p), dimensions={0}, to_apply=%add
}
"""


def test_async_pairs_count_once_with_done_result():
    comms = collectives_in_hlo(ASYNC_HLO)
    assert comms.counts == {"all-reduce": 2, "all-gather": 1, "reduce-scatter": 1, "all-to-all": 1,
                            "collective-permute": 1}
    by_name = {op.name: op for op in comms.ops}
    assert by_name["ags"] == Collective("all-gather", "ags", 128, 512)
    assert by_name["ars"] == Collective("all-reduce", "ars", 128, 128)
    assert by_name["cps"] == Collective("collective-permute", "cps", 128, 128)
    assert by_name["combined"] == Collective("all-reduce", "combined", 2 * 4 + 3, 2 * 4 + 3)
    assert by_name["all-to-all.1"] == Collective("all-to-all", "all-to-all.1", 48, 48)
    assert by_name["rs"].bytes == 128


def test_errors_name_the_argument():
    with pytest.raises(jlm.LocalMapTypeError, match=r"fn: expected a function to compile, found int"):
        jlm.inspect.count_collectives(3, np.ones(2))
    with pytest.raises(jlm.LocalMapTypeError, match=r"hlo_text: expected the text of an HLO module"):
        collectives_in_hlo(b"HloModule m")


def test_collectives_in_loops_count_once_per_iteration(mesh1):
    def body(carry, _):
        return carry + jax.lax.psum(carry, "tp"), None

    looped = jax.shard_map(lambda x: jax.lax.scan(body, x, None, length=3)[0], mesh=mesh1,
                           in_specs=jax.P("tp"), out_specs=jax.P("tp"))
    x = jax.device_put(np.arange(8, dtype=np.float32), jax.NamedSharding(mesh1, jax.P("tp")))
    comms = expect_collectives(looped, x, all_reduce=1)
    expect_collectives(looped, x, all_reduce=3, executed=True)
    assert comms.executed_bytes["all-reduce"] == 3 * comms.bytes["all-reduce"] == 3 * 16
    assert "runs/call" in str(comms)
