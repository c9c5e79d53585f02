"""jlocalmap.collectives inside local_map bodies: values against a numpy model of
torch's functional collectives (every device contributes its own local value),
gradients against the unsharded computation, on 1-, 2- and 3-axis meshes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlocalmap as jlm
from helpers import assert_close, count_collectives, randn
from jlocalmap import Replicate, Shard
from jlocalmap import collectives as C

REDUCE = {"sum": jnp.sum, "avg": jnp.mean, "max": jnp.max, "min": jnp.min}


# -- a model of the collectives: per-device locals, grouped as torch groups them --
def local_of(X, mesh, placements, coords):
    """Device ``coords``' local value of global ``X`` (mesh-order nested splits)."""
    for axis, p in zip(mesh.axis_names, placements, strict=True):
        if p.is_shard():
            X = jnp.split(X, dict(mesh.shape)[axis], p.dim)[coords[axis]]
    return X


def groups(mesh, axes):
    """For each device in mesh order: its group's devices' coords in rank order, and its rank."""
    sizes = dict(mesh.shape)
    out = []
    for idx in np.ndindex(*mesh.axis_sizes):
        coords = dict(zip(mesh.axis_names, idx, strict=True))
        members = [{**coords, **dict(zip(axes, g, strict=True))} for g in np.ndindex(*[sizes[a] for a in axes])]
        rank = int(np.ravel_multi_index([coords[a] for a in axes], [sizes[a] for a in axes]))
        out.append((members, rank))
    return out


def model_all_reduce(op):
    return lambda xs, r: REDUCE[op](jnp.stack(xs), 0)


def model_all_gather(dim):
    return lambda xs, r: jnp.concatenate(xs, dim)


def model_reduce_scatter(op, dim):
    return lambda xs, r: jnp.split(REDUCE[op](jnp.stack(xs), 0), len(xs), dim)[r]


def model_all_to_all(split, concat):
    return lambda xs, r: jnp.concatenate([jnp.split(x, len(xs), split)[r] for x in xs], concat)


def model_permute(shift):
    return lambda xs, r: xs[(r - shift) % len(xs)]


def check(mesh, group, axes, placements, body, model, X, rng):
    """Run ``body`` per device via local_map; compare the per-device outputs and
    the gradient of a random linear loss with the model's, in one compile."""
    stacked = [Shard(0)] * len(mesh.axis_names)
    f = jlm.local_map(lambda x: body(x, group)[None], stacked, (placements,), device_mesh=mesh)

    def reference(X):
        return jnp.stack([model([local_of(X, mesh, placements, m) for m in members], rank)
                          for members, rank in groups(mesh, axes)])

    R = randn(rng, *jax.eval_shape(reference, X).shape)

    def loss_and_out(f, x):
        out = f(x)
        return jnp.sum(out * R), out

    (_, expected), expected_grad = jax.jit(jax.value_and_grad(
        lambda X: loss_and_out(reference, X), has_aux=True))(X)
    with jax.set_mesh(mesh):
        x = jlm.distribute_tensor(X, mesh, placements)
        (_, out), grad = jax.jit(jax.value_and_grad(
            lambda x: loss_and_out(f, x), has_aux=True))(x)
    assert_close(out, expected, rtol=1e-5)
    assert_close(grad, expected_grad, rtol=1e-5)


COLLECTIVES = {
    "all_reduce-sum": (lambda x, g: C.all_reduce(x, "sum", g), model_all_reduce("sum")),
    "all_reduce-avg": (lambda x, g: C.all_reduce(x, "avg", g), model_all_reduce("avg")),
    "all_reduce-max": (lambda x, g: C.all_reduce(x, "max", g), model_all_reduce("max")),
    "all_reduce-min": (lambda x, g: C.all_reduce(x, "min", g), model_all_reduce("min")),
    "all_gather-0": (lambda x, g: C.all_gather_tensor(x, 0, g), model_all_gather(0)),
    "all_gather-1": (lambda x, g: C.all_gather_tensor(x, -1, g), model_all_gather(1)),
    "reduce_scatter-sum-1": (lambda x, g: C.reduce_scatter_tensor(x, "sum", 1, g),
                             model_reduce_scatter("sum", 1)),
    "reduce_scatter-avg-0": (lambda x, g: C.reduce_scatter_tensor(x, "avg", 0, g),
                             model_reduce_scatter("avg", 0)),
    "reduce_scatter-max-1": (lambda x, g: C.reduce_scatter_tensor(x, "max", 1, g),
                             model_reduce_scatter("max", 1)),
    "all_to_all-1-0": (lambda x, g: C.all_to_all_single(x, 1, 0, g), model_all_to_all(1, 0)),
    "all_to_all-0-0": (lambda x, g: C.all_to_all_single(x, 0, 0, g), model_all_to_all(0, 0)),
    "permute+1": (lambda x, g: C.permute(x, 1, g), model_permute(1)),
    "permute-3": (lambda x, g: C.permute(x, -3, g), model_permute(-3)),
}

# (mesh fixture, group given as a function of the mesh, the axes it names)
GROUPS = {
    "1d-mesh": ("mesh1", lambda m: m, ("tp",)),
    "2d-mesh": ("mesh2x2", lambda m: m, ("dp", "tp")),
    "2d-(mesh,1)": ("mesh2x2", lambda m: (m, 1), ("tp",)),
    "3d-name": ("mesh3d", lambda m: "cp", ("cp",)),
    "3d-(mesh,'dp')": ("mesh3d", lambda m: (m, "dp"), ("dp",)),
    "3d-mesh": ("mesh3d", lambda m: m, ("dp", "tp", "cp")),
}


def _rotated_cases():
    # Every collective on every group would be 78 compiles; rotating the groups
    # through the collectives covers each of both.
    names = list(GROUPS)
    return [pytest.param(c, names[i % len(names)], id=f"{c}-{names[i % len(names)]}")
            for i, c in enumerate(COLLECTIVES)]


@pytest.mark.parametrize("collective, group_name", _rotated_cases())
def test_collective_values_and_gradients(request, rng, collective, group_name):
    fixture, make_group, axes = GROUPS[group_name]
    mesh = request.getfixturevalue(fixture)
    body, model = COLLECTIVES[collective]
    n_dev = mesh.devices.size
    X = randn(rng, n_dev * 8, 8)
    check(mesh, make_group(mesh), axes, [Shard(0)] * len(mesh.axis_names), body, model, X, rng)


@pytest.mark.parametrize("collective", ["all_gather-0", "reduce_scatter-sum-1", "all_to_all-0-0",
                                        "permute+1"])
def test_group_axes_out_of_mesh_order(mesh3d, rng, collective):
    """('cp', 'dp') on a (dp, tp, cp) mesh: cp is the major rank axis (the
    collectives whose result depends on the rank order)."""
    body, model = COLLECTIVES[collective]
    check(mesh3d, ("cp", "dp"), ("cp", "dp"), [Shard(0)] * 3, body, model, randn(rng, 64, 8), rng)


@pytest.mark.parametrize("collective", ["all_reduce-sum", "all_gather-1", "reduce_scatter-sum-1",
                                        "all_to_all-1-0", "permute+1", "all_reduce-max"])
def test_invariant_inputs_count_once_per_device(mesh2x2, rng, collective):
    """A value replicated over a group axis is every device's own copy, as in torch:
    all_reduce(x, 'sum') of a replicated x is n * x. Here x varies over dp only."""
    body, model = COLLECTIVES[collective]
    check(mesh2x2, mesh2x2, ("dp", "tp"), [Shard(0), Replicate()], body, model,
          randn(rng, 16, 8), rng)


def test_all_reduce_of_replicated_value_is_n_times(mesh2x4, rng):
    X = randn(rng, 3, 5)
    f = jlm.local_map(lambda x: C.all_reduce(x, "sum", mesh2x4), [Replicate(), Replicate()],
                      ([Replicate(), Replicate()],), device_mesh=mesh2x4)
    assert_close(f(X), 8 * X, rtol=1e-5)


def test_all_gather_result_is_replicated(mesh4, rng):
    X = randn(rng, 8, 3)
    f = jlm.local_map(lambda x: C.all_gather_tensor(x, 0, mesh4), [Replicate()], ([Shard(0)],),
                      device_mesh=mesh4)
    y = f(jlm.distribute_tensor(X, mesh4, [Shard(0)]))
    assert jlm.placements_of(y) == (Replicate(),)
    assert_close(y, X)
    assert count_collectives(f, X)["all-gather"] == 1


@pytest.mark.parametrize("reduce, out", [
    (lambda p, m: C.all_reduce(p, "sum", m), [Replicate()]),
    (lambda p, m: C.reduce_scatter_tensor(p, "sum", 0, m), [Shard(0)]),
])
def test_partial_input_reduced_in_the_body(mesh4, rng, reduce, out):
    """A Partial() input's summands, reduced in the body: the value, and the
    gradient of the unsharded identity."""
    X, R = randn(rng, 8, 3), randn(rng, 8, 3)
    f = jlm.local_map(lambda p: reduce(p, mesh4), out, ([jlm.Partial()],), device_mesh=mesh4)
    x = jlm.distribute_tensor(X, mesh4, [jlm.Partial()])
    with jax.set_mesh(mesh4):
        y, grad = jax.jit(lambda x: (f(x), jax.grad(lambda x: jnp.sum(f(x) * R))(x)))(x)
    assert_close(y, X, rtol=1e-5)
    assert_close(jlm.full_tensor(grad), R)


# -- the Megatron MLP as PyTorch documents it (REFERENCE section 2) -----------------
@pytest.mark.parametrize("n", [2, 4], ids=["2dev", "4dev"])
def test_megatron_mlp_gradients_are_unsharded(rng, n):
    mesh = jax.make_mesh((n,), ("tp",))
    X, W1, W2 = randn(rng, 8, 16), randn(rng, 16, 32), randn(rng, 32, 16)

    @jlm.local_map(out_placements=[Replicate()],
                   in_placements=([Replicate()], [Shard(1)], [Shard(0)]), device_mesh=mesh)
    def mlp(x, w1, w2):
        return C.all_reduce(jax.nn.relu(x @ w1) @ w2, "sum", mesh)

    def loss(mlp, x, w1, w2):
        return jnp.sum(jnp.tanh(mlp(x, w1, w2)))

    args = (jlm.distribute_tensor(X, mesh, [Replicate()]),
            jlm.distribute_tensor(W1, mesh, [Shard(1)]),
            jlm.distribute_tensor(W2, mesh, [Shard(0)]))
    with jax.set_mesh(mesh):
        value, grads = jax.jit(jax.value_and_grad(lambda *a: loss(mlp, *a), argnums=(0, 1, 2)))(*args)
    unsharded = lambda x, w1, w2: jax.nn.relu(x @ w1) @ w2
    ref_value, ref_grads = jax.value_and_grad(lambda *a: loss(unsharded, *a), argnums=(0, 1, 2))(X, W1, W2)
    assert_close(value, ref_value, rtol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        assert_close(g, r, rtol=1e-4)
    assert [jlm.placements_of(g) for g in grads] == [(Replicate(),), (Shard(1),), (Shard(0),)]


def test_one_all_reduce_in_the_correctness_program(mesh4, rng):
    mm = jlm.local_map(lambda x, w: C.all_reduce(x @ w, "sum", (mesh4, 0)), [Replicate()],
                       ([Shard(1)], [Shard(0)]), device_mesh=mesh4)
    X, W = randn(rng, 8, 16), randn(rng, 16, 12)
    x, w = jlm.distribute_tensor(X, mesh4, [Shard(1)]), jlm.distribute_tensor(W, mesh4, [Shard(0)])
    assert_close(mm(x, w), X @ W, rtol=1e-5)
    assert count_collectives(mm, x, w) == {"all-reduce": 1, "all-gather": 0, "reduce-scatter": 0,
                                           "all-to-all": 0, "collective-permute": 0}


# -- errors ---------------------------------------------------------------------------
def _run_body(mesh, body, X):
    pl = [Shard(0)] * len(mesh.axis_names)
    return jlm.local_map(body, pl, (pl,), device_mesh=mesh)(X)


@pytest.mark.parametrize("body, match", [
    (lambda x, m: C.all_reduce(x, "product", m),
     r"reduce_op: .*found 'product'.*no product all-reduce.*jnp\.prod"),
    (lambda x, m: C.all_reduce(x, "mean", m),
     r"reduce_op: expected one of \('sum', 'avg', 'max', 'min'\), found 'mean'"),
    (lambda x, m: C.all_gather_tensor(x, 2, m), r"gather_dim: .*shape \(4, 3\).*found 2"),
    (lambda x, m: C.reduce_scatter_tensor(x, "sum", 1, m),
     r"scatter_dim: dim 1 .* size 3, .* 2 equal chunks.*pad"),
    (lambda x, m: C.all_to_all_single(x, 1, 0, m), r"split_dim: dim 1 .*size 3"),
    (lambda x, m: C.all_reduce(x, "sum", "dp"),
     r"group: .*axes \['dp'\] that are not.*manual axes here are \('tp',\)"),
    (lambda x, m: C.all_reduce(x, "sum", (m, 1)),
     r"group: \(mesh, mesh_dim\) expected mesh_dim .* found 1"),
    (lambda x, m: C.all_reduce(x, "sum", [0, 1]),
     r"group: expected a Mesh .*found \[0, 1\].*name the mesh axes"),
    (lambda x, m: C.all_reduce(x, "sum", ("tp", "tp")), r"group: expected distinct mesh axis names"),
    (lambda x, m: C.all_reduce(x, "sum", jax.make_mesh((4,), ("tp",))),
     r"group: the mesh given has axis sizes \{'tp': 4\}.*sizes \{'tp': 2\}"),
    (lambda x, m: C.permute(x, 1.0, m), r"shift: expected an int"),
    (lambda x, m: C.all_reduce("x", "sum", m), r"x: expected the local array"),
])
def test_errors_name_argument_and_fix(mesh1, rng, body, match):
    with pytest.raises((jlm.LocalMapValueError, jlm.LocalMapTypeError), match=match):
        _run_body(mesh1, lambda x: body(x, mesh1), randn(rng, 8, 3))


def test_outside_a_body_is_an_error(mesh1, rng):
    with pytest.raises(jlm.LocalMapValueError,
                       match="no mesh axis is manual here.*inside the body of a jlocalmap.local_map"):
        C.all_reduce(randn(rng, 2), "sum", mesh1)


# -- collective matmuls: rings of ppermutes equal the plain collective + matmul -------
def _ring_mesh(n):
    return jax.make_mesh((n,), ("tp",), devices=jax.devices()[:n])


def _check_against_unsharded(mesh, f, unsharded, X, W, in_pl, out_pl, rng):
    """Value and both gradients of a random linear loss, against the unsharded math."""
    R = randn(rng, *jax.eval_shape(unsharded, X, W).shape)
    g = jlm.local_map(f, out_pl, in_pl, device_mesh=mesh)

    def loss(x, w):
        out = g(x, w)
        return jnp.sum(out * R), out
    with jax.set_mesh(mesh):  # one compile: the output rides along as aux
        (value, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1),
                                                         has_aux=True))(X, W)
    ref_value, ref_grads = jax.value_and_grad(lambda x, w: jnp.sum(unsharded(x, w) * R),
                                              argnums=(0, 1))(X, W)
    assert_close(jlm.full_tensor(out), unsharded(X, W), rtol=1e-4, atol=1e-4)
    assert_close(value, ref_value, rtol=1e-4, atol=1e-3)
    for got, ref in zip(grads, ref_grads, strict=True):
        assert_close(jlm.full_tensor(got), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n, bidirectional", [(2, None), (3, None), (4, False), (4, True),
                                              (8, None)])
def test_all_gather_matmul_equals_unsharded(rng, n, bidirectional):
    mesh = _ring_mesh(n)
    X, W = randn(rng, 4 * n, 3, 6), randn(rng, 6, 2 * n)  # rows gathered; w column-sharded
    _check_against_unsharded(
        mesh, lambda x, w: C.all_gather_matmul(x, w, 0, "tp", bidirectional=bidirectional),
        lambda x, w: x @ w, X, W, ([Shard(0)], [Shard(1)]), [Shard(2)], rng)


@pytest.mark.parametrize("n, bidirectional, dim", [(2, None, 0), (3, None, 1), (4, False, 0),
                                                   (4, True, 0), (4, True, 1), (8, None, 0)])
def test_matmul_reduce_scatter_equals_unsharded(rng, n, bidirectional, dim):
    mesh = _ring_mesh(n)
    X, W = randn(rng, 4 * n, 3 * n), randn(rng, 3 * n, 2 * n)  # k sharded: partial sums
    _check_against_unsharded(
        mesh, lambda x, w: C.matmul_reduce_scatter(x, w, dim, "tp", bidirectional=bidirectional),
        lambda x, w: x @ w, X, W, ([Shard(1)], [Shard(0)]), [Shard(dim)], rng)


def test_sequence_parallel_mlp_with_collective_matmuls(mesh2x4, rng):
    """Both rings in one Megatron sequence-parallel MLP on a (dp, tp) mesh, against
    the plain all-gather / reduce-scatter body and the unsharded MLP."""
    X, W1, W2 = randn(rng, 16, 8), randn(rng, 8, 16), randn(rng, 16, 8)
    in_pl = ([Shard(0), Shard(0)], [Replicate(), Shard(1)], [Replicate(), Shard(0)])

    def ring(x, w1, w2):
        return C.matmul_reduce_scatter(jnp.tanh(C.all_gather_matmul(x, w1, 0, "tp")), w2, 0, "tp")

    def plain(x, w1, w2):
        h = jnp.tanh(C.all_gather_tensor(x, 0, "tp") @ w1)
        return C.reduce_scatter_tensor(h @ w2, "sum", 0, "tp")

    def unsharded(x, w1, w2):
        return jnp.tanh(x @ w1) @ w2
    R = randn(rng, 16, 8)
    with jax.set_mesh(mesh2x4):
        results = [jax.jit(jax.value_and_grad(
            lambda *a, body=body: jnp.sum(jlm.local_map(body, [Shard(0), Shard(0)], in_pl,
                                                        device_mesh=mesh2x4)(*a) * R),
            argnums=(0, 1, 2)))(X, W1, W2) for body in (ring, plain)]
    expected = jax.value_and_grad(lambda *a: jnp.sum(unsharded(*a) * R), argnums=(0, 1, 2))(
        X, W1, W2)
    for value, grads in results:
        assert_close(value, expected[0], rtol=1e-4, atol=1e-3)
        for got, ref in zip(grads, expected[1], strict=True):
            assert_close(jlm.full_tensor(got), ref, rtol=1e-4, atol=1e-4)


def test_collective_matmuls_are_rings_of_permutes(mesh4, rng):
    """n - 1 collective-permutes per ring, no all-gather or reduce-scatter left."""
    X, W = randn(rng, 16, 8), randn(rng, 8, 16)
    for bidirectional, permutes in ((False, 3), (True, 6)):
        ring = {"group": mesh4, "bidirectional": bidirectional}
        f = jlm.local_map(lambda x, w, ring=ring: C.all_gather_matmul(x, w, 0, **ring),
                          [Shard(1)], ([Shard(0)], [Shard(1)]), device_mesh=mesh4)
        g = jlm.local_map(lambda x, w, ring=ring: C.matmul_reduce_scatter(x, w, 0, **ring),
                          [Shard(0)], ([Shard(1)], [Shard(0)]), device_mesh=mesh4)
        for fn, args in ((f, (X, W)), (g, (W.T, X.T))):
            counts = count_collectives(fn, *args)
            assert counts["collective-permute"] == permutes
            assert sum(counts.values()) == permutes


@pytest.mark.parametrize("body, match", [
    (lambda x, m: C.all_gather_matmul(x, x[None], 0, m), r"all_gather_matmul: expected x of shape"),
    (lambda x, m: C.all_gather_matmul(x, x.T, 1, m), r"gather_dim: expected a dim of x other"),
    (lambda x, m: C.matmul_reduce_scatter(x, x.T, 2, m), r"scatter_dim: expected a dim of the"),
    (lambda x, m: C.matmul_reduce_scatter(x[:3], x.T[:, :3], 0, m),
     r"scatter_dim: dim 0 .* size 3, .* 2 equal chunks.*pad"),
    (lambda x, m: C.all_gather_matmul(x[:3], x.T, 0, m, bidirectional=True),
     r"bidirectional: .*3 rows per device, an odd number"),
    (lambda x, m: C.all_gather_matmul(x, x.T, 0, m, bidirectional="yes"),
     r"bidirectional: expected True, False or None"),
])
def test_collective_matmul_errors(mesh1, rng, body, match):
    with pytest.raises((jlm.LocalMapValueError, jlm.LocalMapTypeError), match=match):
        _run_body(mesh1, lambda x: body(x, mesh1), randn(rng, 8, 4))


# -- max/min: one implementation (collectives.functional.extremum) ----------------------
MAXMIN = {"max": jnp.max, "min": jnp.min}


@pytest.mark.parametrize("op", ["max", "min"])
def test_grad_of_partial_max_min_output_is_jnp_max_min_grad(mesh4, rng, op):
    X = randn(rng, 8, 5)
    # Each device's column max over its rows, Partial(op) over tp: the max over all rows.
    f = jlm.local_map(lambda x: MAXMIN[op](x, 0), [jlm.Partial(op)], ([Shard(0)],),
                      device_mesh=mesh4)
    x = jlm.distribute_tensor(X, mesh4, [Shard(0)])
    weights = randn(rng, 5)

    def loss(x):
        return (jlm.full_tensor(jlm.redistribute(f(x), mesh4, [Replicate()])) * weights).sum()
    with jax.set_mesh(mesh4):
        value, grad = jax.jit(jax.value_and_grad(loss))(x)
    assert_close(value, (MAXMIN[op](X, 0) * weights).sum())
    assert_close(grad, jax.grad(lambda X: (MAXMIN[op](X, 0) * weights).sum())(X))


@pytest.mark.parametrize("op", ["max", "min"])
@pytest.mark.parametrize("where", ["output", "all_reduce"])
def test_max_min_propagate_nan_and_differentiate_alike(mesh4, rng, op, where):
    X = randn(rng, 8, 3)
    X[5, 1] = np.nan
    if where == "output":
        f = jlm.local_map(lambda x: MAXMIN[op](x, 0), [jlm.Partial(op)], ([Shard(0)],),
                          device_mesh=mesh4)
    else:
        f = jlm.local_map(lambda x: C.all_reduce(MAXMIN[op](x, 0), op, mesh4), [Replicate()],
                          ([Shard(0)],), device_mesh=mesh4)
    x = jlm.distribute_tensor(X, mesh4, [Shard(0)])
    expected = MAXMIN[op](X, 0)

    def total(x):
        return jlm.full_tensor(jlm.redistribute(f(x), mesh4, [Replicate()])).sum()
    with jax.set_mesh(mesh4):
        y = jax.jit(lambda x: jlm.full_tensor(jlm.redistribute(f(x), mesh4, [Replicate()])))(x)
        grad = jax.jit(jax.grad(total))(x)
    np.testing.assert_array_equal(np.isnan(np.asarray(y)), np.isnan(expected))
    assert_close(np.nan_to_num(np.asarray(y)), np.nan_to_num(expected))
    # Compiled, as the region is (XLA folds jnp.max's NaN cotangent alike).
    ref = jax.jit(jax.grad(lambda X: MAXMIN[op](X, 0).sum()))(X)
    np.testing.assert_array_equal(np.isnan(np.asarray(grad)), np.isnan(ref))
    assert_close(np.nan_to_num(np.asarray(grad)), np.nan_to_num(ref))
