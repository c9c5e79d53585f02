"""Strategy regions (jlocalmap.strategies.strategy_region): the cost model's ranking on
cases with a known answer, verification refusing a wrong alternative, the
measure cache, the choice under jax.jit, and gradients through the chosen
alternative against the unsharded computation."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlocalmap as jlm
from jlocalmap import Partial, Replicate, Shard

MESH = jax.make_mesh((8,), ("tp",))
# Communication only: compute and memory free, so bytes moved decide.
BYTES_ONLY = jlm.strategies.CostModel(flops_per_s=1e18, memory_bytes_per_s=1e18,
                           default_link=jlm.strategies.Link(bandwidth=1e9, latency=0.0))


def gather_activations(mesh=MESH):
    """x (tokens) gathered: moves tokens * d bytes; w stays column-sharded."""
    return jlm.local_map(lambda x, w: x @ w, [Shard(1)], ([Replicate()], [Shard(1)]),
                         in_grad_placements=([Partial()], [Shard(1)]), device_mesh=mesh)


def gather_weight(mesh=MESH):
    """w gathered in the body: moves d * f bytes, whatever the tokens."""
    return jlm.local_map(lambda x, w: x @ jax.lax.all_gather(w, "tp", axis=1, tiled=True),
                         [Shard(0)], ([Shard(0)], [Shard(1)]), device_mesh=mesh)


def matmul_region(**settings):
    return jlm.strategies.strategy_region({"gather-activations": gather_activations(),
                                "gather-weight": gather_weight()}, **settings)


def operands(tokens, d=16, f=512, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, d)).astype(np.float32)
    w = rng.standard_normal((d, f)).astype(np.float32)
    return (x, w), (jlm.distribute_tensor(x, MESH, [Shard(0)]),
                    jlm.distribute_tensor(w, MESH, [Shard(1)]))


def test_gathering_a_large_weight_loses_for_few_tokens_and_wins_for_many():
    region = matmul_region(cost_model=BYTES_ONLY, verify=False)
    few = region.choice(*operands(8)[1])
    many = region.choice(*operands(4096)[1])
    assert few.chosen == "gather-activations", str(few)
    assert many.chosen == "gather-weight", str(many)
    # The weight's bytes do not depend on the tokens; the activations' do.
    assert few.row("gather-weight").estimate.body_bytes == \
        many.row("gather-weight").estimate.body_bytes > 0
    assert many.row("gather-activations").estimate.layout_bytes > \
        100 * few.row("gather-activations").estimate.layout_bytes


def test_latency_counts_per_collective():
    """Bytes free, latency dear: the alternative with fewer collectives wins."""
    latency_only = jlm.strategies.CostModel(1e18, 1e18, default_link=jlm.strategies.Link(1e18, 1e-3))
    choice = matmul_region(cost_model=latency_only, verify=False).choice(*operands(4096)[1])
    rows = {r.name: r.estimate for r in choice.rows}
    assert choice.chosen == min(rows, key=lambda n: rows[n].collectives)
    assert rows[choice.chosen].comm_s == pytest.approx(1e-3 * rows[choice.chosen].collectives)
    assert latency_only.collective_seconds("all-reduce", 1e6, 1, ()) == 0.0  # one device


def test_per_axis_links_price_the_axis_a_collective_spans():
    """On a (dp, tp) mesh, a slow dp link makes the alternative that communicates
    over dp lose, though it moves fewer bytes."""
    mesh = jax.make_mesh((2, 4), ("dp", "tp"))
    over_tp = jlm.local_map(lambda x: jlm.collectives.all_gather_tensor(x, 0, "tp"),
                            [Replicate(), Replicate()], ([Replicate(), Shard(0)],),
                            device_mesh=mesh)
    over_dp = jlm.local_map(lambda x: jlm.collectives.all_gather_tensor(x, 0, "dp"),
                            [Replicate(), Replicate()], ([Shard(0), Replicate()],),
                            device_mesh=mesh)
    x = jlm.distribute_tensor(np.ones((64, 4), np.float32), mesh, [Replicate(), Replicate()])
    fast_dp = BYTES_ONLY.with_links(tp=jlm.strategies.Link(1e9, 0.0), dp=jlm.strategies.Link(1e12, 0.0))
    slow_dp = BYTES_ONLY.with_links(tp=jlm.strategies.Link(1e12, 0.0), dp=jlm.strategies.Link(1e9, 0.0))
    alternatives = {"over-tp": over_tp, "over-dp": over_dp}
    for model, winner in ((fast_dp, "over-dp"), (slow_dp, "over-tp")):
        region = jlm.strategies.strategy_region(alternatives, cost_model=model, train=False)
        assert region.choice(x).chosen == winner, str(region.choice(x))


def test_verification_refuses_a_wrong_value_by_name():
    wrong = jlm.local_map(lambda x, w: 2 * x @ w, [Shard(0)], ([Shard(0)], [Replicate()]),
                          device_mesh=MESH)
    region = jlm.strategies.strategy_region({"right": gather_weight(), "doubled": wrong})
    with pytest.raises(jlm.LocalMapValueError, match="alternative 'doubled' does not "
                                                      "compute what 'right' computes: value") as err:
        region(*operands(64)[1])
    assert err.type is jlm.LocalMapValueError   # not a placement error: its body is wrong


def test_verification_refuses_a_wrong_gradient_declaration():
    """x is used replicated, so its gradient is a partial sum; declaring it
    Replicate (with the typing check off, as for a custom kernel) skips the
    reduction: the values agree, the gradient of x does not."""
    silent = jlm.local_map(lambda x, w: x @ w, [Shard(1)], ([Replicate()], [Shard(1)]),
                           in_grad_placements=([Replicate()], [Shard(1)]), device_mesh=MESH,
                           check_vma=False)
    region = jlm.strategies.strategy_region({"weight": gather_weight(), "silent": silent})
    with pytest.raises(jlm.LocalMapValueError, match="'silent'.*gradient of argument 0"):
        region.choice(*operands(64)[1])


def test_gradients_through_the_chosen_alternative_match_unsharded():
    region = matmul_region()
    (x, w), (xs, ws) = operands(64)
    dy = np.random.default_rng(1).standard_normal((64, 512)).astype(np.float32)

    def loss(f):
        return lambda x, w: jnp.sum(f(x, w) * dy)
    with jax.set_mesh(MESH):
        value, grads = jax.jit(jax.value_and_grad(loss(region), argnums=(0, 1)))(xs, ws)
    ref_value, ref_grads = jax.value_and_grad(loss(jnp.matmul), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-4)
    for got, ref in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(np.asarray(jlm.full_tensor(got)), ref, rtol=1e-4, atol=1e-4)
    assert jlm.placements_of(grads[0]) == (Shard(0),)  # back in the inputs' own layouts
    assert jlm.placements_of(grads[1]) == (Shard(1),)
    np.testing.assert_allclose(np.asarray(region(xs, ws)), x @ w, rtol=1e-4, atol=1e-4)


def test_inputs_and_outputs_move_as_local_map_moves_them():
    """Alternatives' inputs are moved by their own call and out_placements is read
    as local_map reads it: here a prefix of a dict output (the region's own
    mover took one list per leaf only)."""
    def body(x, w):
        y = x @ w
        return {"y": y, "norm": jax.lax.psum(jnp.sum(y * y), "tp")}
    rows = jlm.local_map(body, {"y": [Shard(0)], "norm": [Replicate()]},
                         ([Shard(0)], [Replicate()]), device_mesh=MESH)
    cols = jlm.local_map(lambda x, w: {"y": x @ w, "norm": jax.lax.psum(
        jnp.sum((x @ w) ** 2), "tp")}, {"y": [Shard(1)], "norm": [Replicate()]},
        ([Replicate()], [Shard(1)]), device_mesh=MESH)
    region = jlm.strategies.strategy_region(
        {"rows": rows, "cols": cols}, out_placements={"y": [Replicate()], "norm": [Replicate()]})
    (x, w), (xs, ws) = operands(64)
    for chosen in ("rows", "cols"):
        out = region.alternative(chosen)(xs, ws)
        assert jlm.placements_of(out["y"]) == (Replicate(),), chosen
        np.testing.assert_allclose(np.asarray(out["y"]), x @ w, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(float(out["norm"]), np.sum((x @ w) ** 2), rtol=1e-4)


def test_measure_writes_the_cache_and_a_new_region_reads_it(tmp_path, monkeypatch):
    monkeypatch.setenv("JLOCALMAP_CACHE_DIR", str(tmp_path))
    args = operands(64)[1]
    first = matmul_region(choose="measure", verify=False, name="mm").choice(*args)
    entries = json.loads((tmp_path / "strategies.json").read_text())
    (key, seconds), = entries.items()
    assert key.startswith("mm | ") and "mesh(tp=8) 8 x cpu" in key and \
        "gather-activations,gather-weight" in key
    assert set(seconds) == {"gather-activations", "gather-weight"}
    assert {r.name: r.measured_s for r in first.rows} == seconds
    # Fake the cached times so the other alternative wins: a new region (same
    # name, signature, mesh and alternatives) must take them, not re-measure.
    loser = max(seconds, key=seconds.get)
    entries[key] = {name: (1e-6 if name == loser else 1.0) for name in seconds}
    (tmp_path / "strategies.json").write_text(json.dumps(entries))
    again = matmul_region(choose="measure", verify=False, name="mm").choice(*args)
    assert again.chosen == loser and again.by == "measure"
    other_size = matmul_region(choose="measure", verify=False, name="mm")
    other_size.choice(*operands(128)[1])
    assert len(json.loads((tmp_path / "strategies.json").read_text())) == 2


def test_a_new_signature_under_jit_is_decided_at_trace_time_once(tmp_path):
    region = matmul_region(choose="measure", cache_dir=tmp_path, verify=False)
    step = jax.jit(lambda x, w: jnp.sum(region(x, w)))
    (x, w), args = operands(32)
    with jax.set_mesh(MESH):
        assert float(step(*args)) == pytest.approx(float(np.sum(x @ w)), rel=1e-4)
        step(*args)
    assert len(json.loads((tmp_path / "strategies.json").read_text())) == 1
    assert "chosen: " in region.describe(*args)


def test_describe_prints_the_cost_table_and_the_reason():
    region = matmul_region(cost_model=BYTES_ONLY, verify=False, name="mm")
    text = region.describe(*operands(8)[1])
    lines = text.splitlines()
    assert lines[0] == "strategy region 'mm'"
    assert lines[1] == "signature: f32[8,16]{S(0)}, f32[16,512]{S(1)}"
    assert any(line.startswith("* gather-activations") for line in lines)
    assert any(line.startswith("  gather-weight") for line in lines)
    assert lines[-1].startswith("chosen: gather-activations (by cost: lowest predicted time")


@pytest.mark.parametrize("alternatives, match", [
    ({"plain": lambda x: x}, "made by jlocalmap.local_map"),
    ({"no-mesh": jlm.local_map(lambda x: x, [Shard(0)], ([Shard(0)],))}, "device_mesh=mesh"),
    ({"a": gather_weight(), "b": gather_weight(jax.make_mesh((4,), ("tp",)))},
     "same device_mesh"),
    ([], "one or more alternatives"),
])
def test_bad_alternatives_are_refused(alternatives, match):
    with pytest.raises(jlm.LocalMapError, match=match):
        jlm.strategies.strategy_region(alternatives)


def test_bad_settings_and_calls_are_refused():
    with pytest.raises(jlm.LocalMapValueError, match="choose: expected one of"):
        matmul_region(choose="fastest")
    with pytest.raises(jlm.LocalMapTypeError, match="cost_model: expected"):
        matmul_region(cost_model="h200")
    region = matmul_region(verify=False)
    with pytest.raises(jlm.PlacementValueError, match="2 entries, the call has 1"):
        region(operands(8)[1][0])
    with pytest.raises(jlm.LocalMapTypeError, match="positional arguments only"):
        region(*operands(8)[1], scale=2)
    with pytest.raises(jlm.LocalMapValueError, match="name: expected one of"):
        region.alternative("tp")
