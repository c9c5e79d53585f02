"""jlocalmap.inspect.inspection (jlm.inspect.regions): regions as one named shard_map equation, global shapes
outside and local inside (on a 256-device abstract mesh too), forward/backward
bodies and residuals under checkpoint policies, trace-time count errors."""

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec as P

import jlocalmap as jlm
from helpers import assert_close, randn

S, R, Partial = jlm.Shard, jlm.Replicate, jlm.Partial


# -- one region, one named shard_map equation ----------------------------------
def _shard_maps(jaxpr):
    """Every shard_map equation at any depth, with its name stack."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "shard_map":
            found.append((str(eqn.source_info.name_stack), eqn))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
                    inner = sub if hasattr(sub, "eqns") else sub.jaxpr
                    if eqn.primitive.name != "shard_map":
                        found += _shard_maps(inner)
    return found


def test_region_is_one_shard_map_equation_named_with_its_placements(mesh2x4, rng):
    def matmul(x, w):
        return jax.lax.psum(x @ w, "tp")
    f = jlm.local_map(matmul, [S(0), R()], ([S(0), S(1)], [R(), S(0)]), device_mesh=mesh2x4)
    x, w = randn(rng, 8, 16), randn(rng, 16, 4)
    jaxpr = jax.make_jaxpr(f)(x, w).jaxpr
    maps = _shard_maps(jaxpr)
    assert [name for name, _ in maps] == ["local_map[matmul](S(0)S(1), RS(0) -> S(0)R)"]
    eqn = maps[0][1]
    # Global shapes outside, local shapes inside.
    assert [v.aval.shape for v in eqn.invars] == [(8, 16), (16, 4)]
    assert [v.aval.shape for v in eqn.params["jaxpr"].invars] == [(4, 4), (4, 4)]
    assert eqn.outvars[0].aval.shape == (8, 4)
    assert_close(f(x, w), x @ w)
    # Tools walking the jaxpr read the settings back from the equation.
    settings = jlm.inspect.region_settings(eqn)
    assert settings.func_name == "matmul" and dict(settings.mesh.shape) == {"dp": 2, "tp": 4}
    assert [op.placements for op in settings.inputs] == [(S(0), S(1)), (R(), S(0))]
    assert [op.placements for op in settings.outputs] == [(S(0), R())]
    assert [jlm.inspect.region_settings(e) for e in jaxpr.eqns if e is not eqn] == \
        [None] * (len(jaxpr.eqns) - 1)
    # The name prefixes the compiled program's op metadata inside the region
    # (and only there).
    hlo = f.lower(x, w).compile().as_text()
    names = re.findall(r' (dot|all-reduce)\(.*op_name="([^"]*)"', hlo)
    assert names and all(n.startswith(
        "jit(matmul)/local_map[matmul](S(0)S(1), RS(0) -> S(0)R)/") for _, n in names)


def test_region_names_are_unique_per_settings_and_survive_jit_and_grad(mesh2x4, rng):
    def body(x):
        return jnp.sin(x)
    a = jlm.local_map(body, [S(0), R()], ([S(0), R()],), device_mesh=mesh2x4)
    b = jlm.local_map(body, [R(), R()], ([R(), R()],), device_mesh=mesh2x4)
    x, y = randn(rng, 8, 8), randn(rng, 8, 8)
    loss = jax.jit(lambda x, y: (a(x) * b(y)).sum())
    grad = jax.grad(loss, (0, 1))
    names = [name for name, _ in _shard_maps(jax.make_jaxpr(grad)(x, y).jaxpr)]
    assert len(names) == 4
    assert sum("local_map[body](S(0)R -> S(0)R)" in n for n in names) == 2  # fwd, bwd
    assert sum("local_map[body](RR -> RR)" in n for n in names) == 2
    want = jax.grad(lambda x, y: (jnp.sin(x) * jnp.sin(y)).sum(), (0, 1))(x, y)
    with jax.set_mesh(mesh2x4):
        got = grad(x, y)
    for g, expected in zip(got, want, strict=True):
        assert_close(g, expected)


def test_in_grad_placements_appear_in_the_name(mesh2x4):
    f = jlm.local_map(lambda x: x * 2, [S(0), R()], ([S(0), R()],),
                      in_grad_placements=([S(0), R()],), device_mesh=mesh2x4)
    [r] = jlm.inspect.regions(f, jax.ShapeDtypeStruct((8, 4), jnp.float32))
    assert r.name == "local_map[<lambda>](S(0)R -> S(0)R; grad S(0)R)"
    assert r.inputs[0].grad_placements == (S(0), R())


# -- regions(): records --------------------------------------------------------
def _mlp(x, w1, w2):
    h = checkpoint_name(x @ w1, "h")
    return jax.lax.psum(jnp.sin(h) @ w2, "tp")


MLP_IN = ([S(0), R()], [R(), S(1)], [R(), S(0)])
MLP_GRADS = ([S(0), Partial()], [Partial(), S(1)], [Partial(), S(0)])


def _mlp_args(mesh, rng=None):
    specs = [P("dp", None), P(None, "tp"), P("tp", None)]
    shapes = [(8, 16), (16, 32), (32, 16)]
    if rng is None:
        return [jax.ShapeDtypeStruct(s, jnp.float32, sharding=NamedSharding(mesh, p))
                for s, p in zip(shapes, specs, strict=True)]
    return [jax.device_put(randn(rng, *s), NamedSharding(mesh, p))
            for s, p in zip(shapes, specs, strict=True)]


def test_regions_records_settings_shapes_and_body(mesh2x4):
    f = jlm.local_map(_mlp, [S(0), R()], MLP_IN, device_mesh=mesh2x4)
    [r] = jlm.inspect.regions(f, *_mlp_args(mesh2x4))
    assert r.func_name == "_mlp" and dict(r.mesh.shape) == {"dp": 2, "tp": 4}
    assert [op.placements for op in r.inputs] == [tuple(p) for p in MLP_IN]
    assert [op.global_shape for op in r.inputs] == [(8, 16), (16, 32), (32, 16)]
    assert [op.local_shape for op in r.inputs] == [(4, 16), (16, 8), (8, 16)]
    assert [(op.global_shape, op.local_shape) for op in r.outputs] == [((8, 16), (4, 16))]
    assert [e.primitive.name for e in r.jaxpr.eqns].count("dot_general") == 2
    assert not r.differentiated and r.residuals is None
    text = str(r)
    assert "local_map[_mlp](S(0)R, RS(1), RS(0) -> S(0)R) on mesh (dp=2, tp=4)" in text
    assert "input  [1] f32[16,32] RS(1) -> local f32[16,8]" in text


def test_regions_of_a_gradient_report_forward_backward_and_residuals(mesh2x4, rng):
    f = jlm.local_map(_mlp, [S(0), R()], MLP_IN, device_mesh=mesh2x4)
    loss = jax.jit(lambda *a: f(*a).sum())
    [r] = jlm.inspect.regions(jax.grad(loss, argnums=(0, 1, 2)), *_mlp_args(mesh2x4))
    assert r.differentiated and r.forward is r.jaxpr and r.recompute is None
    # Saved for the backward: the three inputs, sin(h) for w2's gradient and
    # cos(h) for the chain rule through sin.
    assert collections.Counter(res.producer for res in r.residuals) == collections.Counter(
        ["input 0", "input 1", "input 2", "sin", "cos"])
    assert {res.shape for res in r.residuals if res.producer in ("sin", "cos")} == {(4, 8)}
    # The backward body computes the three input cotangents at local shapes.
    assert [v.aval.shape for v in r.backward.outvars] == [(4, 16), (16, 8), (8, 16)]
    assert "backward:" in str(r) and "residuals (5):" in str(r)
    assert "backward jaxpr:" in r.pretty()
    _check_mlp_grads(mesh2x4, rng, jax.grad(loss, argnums=(0, 1, 2)))


def _check_mlp_grads(mesh, rng, grad, rtol=1e-5):
    args = _mlp_args(mesh, rng)
    want = jax.grad(lambda *a: _unsharded_mlp(*a).sum(), argnums=(0, 1, 2))(
        *map(np.asarray, args))
    with jax.set_mesh(mesh):
        got = grad(*args)
    for g, expected in zip(got, want, strict=True):
        assert_close(g, expected, rtol=rtol)


def _unsharded_mlp(x, w1, w2):
    return jnp.sin(x @ w1) @ w2


def test_regions_pairs_each_call_with_its_own_backward(mesh2x4, rng):
    """Two calls of one local_map function: each forward finds its backward by
    the residuals that flow between them."""
    f = jlm.local_map(lambda x: jnp.exp(x), [S(0), R()], ([S(0), R()],), device_mesh=mesh2x4)
    x = jax.ShapeDtypeStruct((8, 4), jnp.float32)
    y = jax.ShapeDtypeStruct((16, 4), jnp.float32)
    rs = jlm.inspect.regions(jax.grad(lambda x, y: f(x).sum() + f(y).sum(), (0, 1)), x, y)
    assert [r.inputs[0].global_shape for r in rs] == [(8, 4), (16, 4)]
    assert [[res.shape for res in r.residuals] for r in rs] == [[(4, 4)], [(8, 4)]]
    assert [r.backward.outvars[0].aval.shape for r in rs] == [(4, 4), (8, 4)]


def test_regions_inside_scan_are_reported_once_like_the_body(mesh2x4):
    f = jlm.local_map(jnp.tanh, [S(0), R()], ([S(0), R()],), device_mesh=mesh2x4)

    def loss(x):
        out, _ = jax.lax.scan(lambda c, _: (f(c), None), x, None, length=5)
        return out.sum()
    [r] = jlm.inspect.regions(jax.grad(loss), jax.ShapeDtypeStruct((8, 4), jnp.float32))
    assert r.differentiated and r.transform == "jvp()"
    assert [op.local_shape for op in r.inputs] == [(4, 4)]
    # What tanh's derivative saves is JAX's choice (tanh and 1 - tanh**2 on jax
    # 0.10, one_minus_square on 0.11): local-shaped values computed in the body.
    assert r.residuals and all(res.shape == (4, 4) and res.producer in (
        "tanh", "sub", "one_minus_square") for res in r.residuals)


# -- REFERENCE section 4: context-parallel attention on 256 abstract devices -----
B, T, H, D = 8, 16, 16, 6
E = H * D
CP_MESH = AbstractMesh((8, 8, 4), ("dp", "tp", "cp"), axis_types=(AxisType.Explicit,) * 3)


@jlm.local_map(out_placements=[S(0), S(1), S(2)],
               in_placements=([S(0), S(1), S(2)], [S(0), S(1), R()], [S(0), S(1), R()]),
               device_mesh=CP_MESH, redistribute_inputs=True)
def cp_attention(q, k, v):
    """Causal attention of a sequence chunk of queries against all keys."""
    chunk = q.shape[2]
    first = jax.lax.axis_index("cp") * chunk
    rows = first + jnp.arange(chunk)[:, None]
    mask = rows >= jnp.arange(k.shape[2])[None, :]
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(q.shape[-1])
    scores = jnp.where(mask, scores, -jnp.inf)
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(scores, -1), v)


def transformer_block(p, x, attention):
    def heads(w):
        return jnp.transpose((x @ w).reshape(B, T, H, D), (0, 2, 1, 3))
    o = attention(heads(p["wq"]), heads(p["wk"]), heads(p["wv"]))
    x = x + jnp.transpose(o, (0, 2, 1, 3)).reshape(B, T, E) @ p["wo"]
    return x + jax.nn.relu(x @ p["w1"]) @ p["w2"]


def _block_args(mesh, make):
    shapes = dict(wq=(E, E), wk=(E, E), wv=(E, E), wo=(E, E), w1=(E, 4 * E), w2=(4 * E, E))
    return {k: make(s, P()) for k, s in shapes.items()}, make((B, T, E), P("dp"))


def test_transformer_block_on_256_abstract_devices():
    def spec(shape, p):
        return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(CP_MESH, p))
    params, x = _block_args(CP_MESH, spec)
    loss = jax.jit(lambda p, x: transformer_block(p, x, cp_attention).sum())
    [r] = jlm.inspect.regions(jax.value_and_grad(loss), params, x)
    assert r.mesh == CP_MESH
    assert r.name == "local_map[cp_attention](S(0)S(1)S(2), S(0)S(1)R, S(0)S(1)R -> S(0)S(1)S(2))"
    assert [op.global_shape for op in r.inputs] == [(8, 16, 16, 6)] * 3
    assert [op.local_shape for op in r.inputs] == [(1, 2, 4, 6), (1, 2, 16, 6), (1, 2, 16, 6)]
    assert [v.aval.shape for v in r.jaxpr.invars] == [(1, 2, 4, 6), (1, 2, 16, 6), (1, 2, 16, 6)]
    assert r.outputs[0].global_shape == (8, 16, 16, 6)
    assert r.outputs[0].local_shape == (1, 2, 4, 6)
    assert r.differentiated
    assert [v.aval.shape for v in r.backward.outvars] == [(1, 2, 4, 6), (1, 2, 16, 6),
                                                         (1, 2, 16, 6)]
    saved = {res.producer: res.shape for res in r.residuals}
    assert saved["input 0"] == (1, 2, 4, 6) and saved["input 1"] == (1, 2, 16, 6)
    # The local chunk of the attention weights (this device's 4 queries against all
    # 16 keys) is saved with its local shape. Which JAX operation produced it is
    # JAX's choice (softmax's exp on jax 0.10, its normalized output on 0.12).
    weights = [res for res in r.residuals if not res.producer.startswith("input")
               and res.shape == (1, 2, 4, 16)]
    assert weights, r.residuals
    assert all(res.shape != (8, 16, 16, 16) for res in r.residuals)  # never the global one
    # Outside the region the program keeps global shapes.
    outer = jax.make_jaxpr(jax.value_and_grad(loss))(params, x)
    value, *grads = [v.aval.shape for v in outer.jaxpr.outvars]
    assert value == ()
    assert grads == [v.shape for v in jax.tree_util.tree_leaves(params)]


def test_cp_attention_values_match_unsharded(rng):
    """The same block on 8 real CPU devices (dp=2, tp=2, cp=2): forward and
    gradients equal the unsharded causal attention."""
    mesh = jax.make_mesh((2, 2, 2), ("dp", "tp", "cp"))
    attention = jlm.local_map(cp_attention.func, cp_attention.out_placements,
                              cp_attention.in_placements, device_mesh=mesh,
                              redistribute_inputs=True)

    def dense(q, k, v):
        mask = jnp.tril(jnp.ones((T, T), bool))
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(D)
        return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(jnp.where(mask, scores, -jnp.inf)), v)
    params, x = _block_args(mesh, lambda s, p: randn(rng, *s) * 0.2)
    x_sharded = jax.device_put(x, NamedSharding(mesh, P("dp")))
    params_sharded = jax.device_put(params, NamedSharding(mesh, P()))
    with jax.set_mesh(mesh):
        got = jax.jit(jax.value_and_grad(
            lambda p, x: transformer_block(p, x, attention).sum()))(params_sharded, x_sharded)
    want = jax.value_and_grad(lambda p, x: transformer_block(p, x, dense).sum())(params, x)
    assert_close(got[0], want[0], rtol=1e-4)
    for k in params:
        assert_close(got[1][k], want[1][k], rtol=1e-4, atol=1e-4)


# -- selective activation checkpointing ----------------------------------------
POLICIES = {
    "dots": (jax.checkpoint_policies.dots_saveable, ["dot_general"]),
    "names": (jax.checkpoint_policies.save_only_these_names("h"), ["checkpoint_name:h"]),
    "nothing": (jax.checkpoint_policies.nothing_saveable, []),
}


@pytest.mark.parametrize("declare_grads", [False, True], ids=["plain", "in_grad_placements"])
@pytest.mark.parametrize("where", ["around", "inside"])
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_checkpoint_policy_decides_the_residuals(mesh2x4, rng, policy, where, declare_grads):
    """Saved: what the policy saves, plus the checkpointed function's inputs
    (here the region's); everything else is recomputed in the backward pass."""
    saveable, saved = POLICIES[policy]
    grads = MLP_GRADS if declare_grads else None
    if where == "around":
        f = jax.checkpoint(jlm.local_map(_mlp, [S(0), R()], MLP_IN, grads, mesh2x4),
                           policy=saveable)
    else:
        f = jlm.local_map(jax.checkpoint(_mlp, policy=saveable), [S(0), R()], MLP_IN,
                          grads, mesh2x4)
    grad = jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2))
    [r] = jlm.inspect.regions(grad, *_mlp_args(mesh2x4))
    assert collections.Counter(res.producer for res in r.residuals) == collections.Counter(
        saved + ["input 0", "input 1", "input 2"])
    assert all(res.shape == (4, 8) for res in r.residuals if not res.producer.startswith("input"))
    if where == "around":
        assert r.recompute is not None  # the rest is rerun in the backward pass
    _check_mlp_grads(mesh2x4, rng, grad, rtol=1e-4)


def test_without_checkpoint_more_is_saved_than_with_any_policy(mesh2x4):
    f = jlm.local_map(_mlp, [S(0), R()], MLP_IN, device_mesh=mesh2x4)
    [r] = jlm.inspect.regions(jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2)), *_mlp_args(mesh2x4))
    assert len(r.residuals) == 5 > len(POLICIES["dots"][1]) + 3


# -- trace-time count errors -----------------------------------------------------
def test_count_errors_are_raised_at_trace_time_on_an_abstract_mesh():
    mesh = AbstractMesh((16, 16), ("dp", "tp"))
    x = jax.ShapeDtypeStruct((32, 32), jnp.float32)
    two_in = jlm.local_map(lambda x: x, [S(0), R()], ([S(0), R()], [R(), R()]), device_mesh=mesh)
    with pytest.raises(jlm.PlacementValueError,
                       match=r"Expecting 2 inputs to local_map function based on placements, "
                             r"but found 1\."):
        jlm.inspect.regions(two_in, x)
    two_out = jlm.local_map(lambda x: (x, x), [S(0), R()], ([S(0), R()],), device_mesh=mesh)
    with pytest.raises(jlm.PlacementValueError,
                       match=r"Expecting 1 outputs to local_map function based on placements, "
                             r"but found 2\."):
        jax.eval_shape(two_out, x)


def test_regions_on_concrete_arrays_with_ints_statics_and_kwargs(mesh2x4, rng):
    def body(x, n, label, scale=1.0):
        assert label == "static"
        return x * scale, n + 1
    f = jlm.local_map(body, ([S(0), R()], [R(), R()]), ([S(0), R()], [R(), R()], None),
                      device_mesh=mesh2x4)
    x = jlm.distribute_tensor(randn(rng, 8, 3), mesh2x4, [S(0), R()])
    n = np.arange(4, dtype=np.int32)
    [r] = jlm.inspect.regions(lambda x, n: f(x, n, "static", scale=2.0), x, n)
    assert [(op.index, op.dtype, op.local_shape) for op in r.inputs] == [
        (0, np.float32, (4, 3)), (1, np.int32, (4,))]
    assert [(op.index, op.dtype) for op in r.outputs] == [(0, np.float32), (1, np.int32)]
    assert r.name == "local_map[body](S(0)R, RR -> S(0)R, RR)"  # array leaves only


def test_regions_inside_cond_and_while(mesh2x4):
    f = jlm.local_map(jnp.cos, [S(0), R()], ([S(0), R()],), device_mesh=mesh2x4)
    x = jax.ShapeDtypeStruct((8, 4), jnp.float32)
    [loop] = jlm.inspect.regions(lambda x: jax.lax.fori_loop(0, 3, lambda i, c: f(c), x), x)
    assert not loop.differentiated and loop.inputs[0].local_shape == (4, 4)
    [cond] = jlm.inspect.regions(jax.grad(lambda x: jax.lax.cond(True, f, lambda c: c, x).sum()), x)
    assert [(res.producer, res.shape) for res in cond.residuals] == [("sin", (4, 4))]


# -- records stay right in harder programs (found by review) ----------------------
def test_same_name_on_two_meshes_and_uneven_next_to_even():
    """Records are keyed by name, mesh and operands: calls that share a name
    report their own local shapes (and an uneven operand its logical size)."""
    wide = AbstractMesh((2, 4), ("dp", "tp"), axis_types=(AxisType.Explicit,) * 2)
    tall = AbstractMesh((4, 2), ("dp", "tp"), axis_types=(AxisType.Explicit,) * 2)
    x = jax.ShapeDtypeStruct((8, 8), jnp.float32)
    for mesh, local in ((wide, (4, 2)), (tall, (2, 4))):
        f = jlm.local_map(jnp.sin, [S(0), S(1)], ([S(0), S(1)],), device_mesh=mesh)
        [r] = jlm.inspect.regions(f, x)
        assert r.inputs[0].local_shape == local == r.jaxpr.invars[0].aval.shape
        assert r.mesh == mesh
    mesh = jax.make_mesh((2,), ("dp",))
    g = jlm.local_map(jnp.sin, [S(0)], ([S(0)],), device_mesh=mesh)
    rs = jlm.inspect.regions(lambda a, b: (g(a), g(b)), np.ones((7, 4), np.float32),
                     np.ones((8, 4), np.float32))
    assert [r.inputs[0].global_shape for r in rs] == [(7, 4), (8, 4)]
    assert [r.inputs[0].local_shape for r in rs] == [(4, 4), (4, 4)]
    assert rs[0].name == "local_map[sin](S(0)[7,4] -> S(0)[7,4])"


def test_regions_in_a_custom_vjp_forward_and_backward(mesh2x4, rng):
    """A hand-written backward (ring attention, all-to-all expert dispatch)
    calls regions of its own: each call is a region, none is taken for JAX's
    backward of another."""
    tanh = jlm.local_map(jnp.tanh, [S(0), R()], ([S(0), R()],), device_mesh=mesh2x4)
    tanh_grad = jlm.local_map(lambda t, g: g * (1 - t * t), [S(0), R()],
                              ([S(0), R()], [S(0), R()]), device_mesh=mesh2x4)

    @jax.custom_vjp
    def act(x):
        return tanh(x)
    def act_fwd(x):
        t = tanh(x)
        return t, t
    act.defvjp(act_fwd, lambda t, g: (tanh_grad(t, g),))
    grad = jax.grad(lambda x: act(x).sum())
    rs = jlm.inspect.regions(grad, jax.ShapeDtypeStruct((8, 4), jnp.float32))
    assert [(r.func_name, r.differentiated) for r in rs] == [("tanh", False), ("<lambda>", False)]
    x = randn(rng, 8, 4)
    with jax.set_mesh(mesh2x4):
        assert_close(grad(x), 1 - np.tanh(x) ** 2, rtol=1e-5)


def test_each_backward_pairs_with_its_own_forward_without_residuals(mesh2x4):
    f = jlm.local_map(lambda x: -x, [S(0), R()], ([S(0), R()],), device_mesh=mesh2x4)
    shapes = [(8, 4), (16, 4), (24, 4)]
    rs = jlm.inspect.regions(jax.grad(lambda *xs: sum(f(x).sum() for x in xs), (0, 1, 2)),
                     *[jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes])
    assert [r.backward.outvars[0].aval.shape for r in rs] == [(4, 4), (8, 4), (12, 4)]
    assert all(r.residuals == () for r in rs)


def test_scan_over_layers_with_a_closed_over_weight(mesh2x4):
    """Partial evaluation hoists the loop-invariant part of the region out of the
    scan: still one region, with the call's operands, and what the hoisted part
    saves counts among its residuals."""
    f = jlm.local_map(lambda x, w: jax.lax.psum(jnp.sin(x @ w), "tp"), [S(0), R()],
                      ([S(0), S(1)], [R(), S(0)]), device_mesh=mesh2x4,
                      redistribute_inputs=True)

    def loss(x, w):
        return jax.lax.scan(lambda c, _: (f(c, w), None), x, None, length=3)[0].sum()
    def spec(shape, p):
        return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh2x4, p))
    [r] = jlm.inspect.regions(jax.grad(loss, (0, 1)), spec((8, 16), P("dp")), spec((16, 16), P()))
    assert [(op.index, op.local_shape) for op in r.inputs] == [(0, (4, 4)), (1, (4, 16))]
    # Saved: x's shard, cos(x @ w), and w's shard, which the hoisted part passes.
    assert sorted((res.producer, res.shape) for res in r.residuals) == [
        ("cos", (4, 16)), ("input 0", (4, 4)), ("loop-invariant input", (4, 16))]


@pytest.mark.parametrize("branch", [0, 1, 2])
def test_residuals_of_a_region_in_any_branch(mesh2x4, branch):
    f = jlm.local_map(jnp.sin, [S(0), R()], ([S(0), R()],), device_mesh=mesh2x4)
    branches = [lambda c: c * 2.0, lambda c: c + 1.0, lambda c: c - 3.0]
    branches[branch] = f
    [r] = jlm.inspect.regions(jax.grad(lambda x: jax.lax.switch(branch, branches, x).sum()),
                      jax.ShapeDtypeStruct((8, 4), jnp.float32))
    assert [(res.producer, res.shape) for res in r.residuals] == [("cos", (4, 4))]


def test_shared_jit_calls_linearize_and_user_scopes(mesh2x4):
    f = jlm.local_map(jnp.exp, [S(0), R()], ([S(0), R()],), device_mesh=mesh2x4)
    layer = jax.jit(lambda x: f(x) * 0.5)
    x = jax.ShapeDtypeStruct((8, 4), jnp.float32)
    # A jitted function called twice stages its region once and runs it twice.
    rs = jlm.inspect.regions(jax.grad(lambda x: layer(layer(x)).sum()), x)
    assert len(rs) == 2 and all(r.differentiated for r in rs)
    # jax.linearize: one call, not its tangent pass as a second region.
    assert len(jlm.inspect.regions(lambda x: jax.linearize(f, x)[1](x), x)) == 1

    def scoped(x):
        with jax.named_scope("layer3"):
            return f(x).sum()
    [r] = jlm.inspect.regions(jax.grad(scoped), x)
    assert r.transform == "jvp()"
    # JAX's backward equation of a region is not a region.
    eqns = jax.make_jaxpr(jax.grad(lambda x: f(x).sum()))(x).jaxpr.eqns
    settings = [jlm.inspect.region_settings(e) for e in eqns if e.primitive.name == "shard_map"]
    assert [s is not None for s in settings] == [True, False]


def test_a_region_reads_the_same_after_unrelated_traces(mesh2x4):
    """Settings come from the program itself: a call of the same name, mesh and
    operand types staged before with other settings (the static argument in
    another position) does not change what the region says (#28: a process-wide
    registry made the leaf index unknown here)."""
    def body(*args):
        return tuple(a * 2 for a in args if not isinstance(a, str))
    f = jlm.local_map(body, ([S(0), Partial()],), ([S(0), Partial()], None),
                      device_mesh=mesh2x4)
    g = jlm.local_map(body, ([S(0), Partial()],), (None, [S(0), Partial()]),
                      device_mesh=mesh2x4)
    x = jax.ShapeDtypeStruct((8, 4), jnp.float32)
    [fresh] = jlm.inspect.regions(lambda x: g("a", x), x)
    jax.make_jaxpr(lambda x: f(x, "a"))(x)
    [r] = jlm.inspect.regions(lambda x: g("a", x), x)  # same name, mesh and operands
    assert r.settings == fresh.settings
    assert r.name == "local_map[body](S(0)P(sum) -> S(0)P(sum))"
    [op] = r.inputs
    assert (op.index, op.placements, op.global_shape, op.local_shape) == (
        1, (S(0), Partial()), (8, 4), (4, 4))
    assert str(op).startswith("[1] f32[8,4] S(0)P(sum) -> local f32[4,4]")
    assert r.outputs[0].placements == (S(0), Partial())


_FRESH_PROGRAM = """
import jax, jax.numpy as jnp, jlocalmap as jlm
S, R = jlm.Shard, jlm.Replicate
mesh = jax.sharding.AbstractMesh((2, 4), ("dp", "tp"))
attn = jlm.local_map(lambda q, k: jax.lax.psum(jnp.tanh(q @ k.T), "tp"), [S(0), R()],
                     ([S(0), S(1)], [R(), S(1)]), device_mesh=mesh)
x = jax.ShapeDtypeStruct((8, 16), jnp.float32)
for r in jlm.inspect.regions(jax.grad(lambda q, k: attn(q, k).sum(), (0, 1)), x, x):
    print(r)
"""


def test_a_region_reads_the_same_in_a_fresh_process_and_after_other_traces():
    """regions() in a fresh interpreter equals regions() here, after unrelated
    traces of a same-named function with other placements (#28)."""
    import subprocess
    import sys
    fresh = subprocess.run([sys.executable, "-c", _FRESH_PROGRAM], capture_output=True,
                           text=True, check=True, timeout=120).stdout
    mesh = AbstractMesh((2, 4), ("dp", "tp"))
    other = jlm.local_map(lambda q, k: q * k, [R(), S(0)], ([R(), S(0)], [R(), S(0)]),
                          device_mesh=mesh)
    x = jax.ShapeDtypeStruct((8, 16), jnp.float32)
    jax.make_jaxpr(jax.grad(lambda q, k: other(q, k).sum()))(x, x)
    import contextlib
    import io
    namespace: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(_FRESH_PROGRAM, namespace)
    assert "differentiated" in fresh and "residuals" in fresh
    assert out.getvalue() == fresh
