"""Gradients through local_map equal the unsharded ones (several compared with
jlocalmap.testing.assert_matches_unsharded); in_grad_placements."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlocalmap as jlm
from helpers import assert_close, randn
from jlocalmap import Partial, Replicate, Shard
from jlocalmap.testing import assert_matches_unsharded


def grads(mesh, f, *args):
    with jax.set_mesh(mesh):
        return jax.jit(jax.grad(f, argnums=tuple(range(len(args)))))(*args)


def unsharded_grads(f, *args):
    return jax.grad(f, argnums=tuple(range(len(args))))(*args)


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("in_grad", [None, ([Shard(0)], [Partial()])], ids=["default", "declared"])
@pytest.mark.parametrize("redistribute", [False, True])
def test_reference_grad_placements(n, in_grad, redistribute, rng):
    """REFERENCE s3: X Shard(0) (grad Shard(0)), W Replicate (grad Partial)."""
    mesh = jax.make_mesh((n,), ("tp",))
    X, W = randn(rng, 8, 6), randn(rng, 6, 8)
    # with redistribution the inputs arrive in other layouts than in_placements
    x = jlm.distribute_tensor(X, mesh, [Replicate() if redistribute else Shard(0)])
    w = jlm.distribute_tensor(W, mesh, [Shard(1) if redistribute else Replicate()])
    f = jlm.local_map(lambda x, w: jnp.sin(x @ w), [Shard(0)], ([Shard(0)], [Replicate()]),
                      in_grad, mesh, redistribute_inputs=redistribute)
    gx, gw = grads(mesh, lambda x, w: (f(x, w) ** 2).sum(), x, w)
    rx, rw = unsharded_grads(lambda x, w: (jnp.sin(x @ w) ** 2).sum(), X, W)
    assert_close(gx, rx)
    assert_close(gw, rw)
    # gradients come back in the inputs' own layouts
    assert jlm.placements_of(gx) == jlm.placements_of(x)
    assert jlm.placements_of(gw) == jlm.placements_of(w)


@pytest.mark.parametrize("n", [2, 4])
def test_megatron_mlp_as_pytorch_documents_it(n, rng):
    """Local matmuls, psum in the body, Replicate out: no doubled gradient."""
    mesh = jax.make_mesh((n,), ("tp",))
    placements = ([Replicate()], [Shard(1)], [Shard(0)])

    @jlm.local_map(out_placements=[Replicate()], in_placements=placements, device_mesh=mesh)
    def mlp(x, w1, w2):
        return jax.lax.psum(jax.nn.relu(x @ w1) @ w2, "tp")

    def ref(x, w1, w2):
        return jax.nn.relu(x @ w1) @ w2

    assert_matches_unsharded(mlp, ref, randn(rng, 4, 8), randn(rng, 8, 16), randn(rng, 16, 8),
                             mesh=mesh, placements=placements, rtol=1e-4)


def test_avg_gradient_declaration_is_refused_with_the_reason(mesh1, rng):
    """A replicated input's gradient is the sum of its local cotangents: a declared
    Partial('avg') would divide it by the axis size (it used to, silently)."""
    X, W = randn(rng, 8, 6), randn(rng, 6, 5)
    x = jlm.distribute_tensor(X, mesh1, [Shard(0)])
    w = jlm.distribute_tensor(W, mesh1, [Replicate()])
    f = jlm.local_map(lambda x, w: x @ w, [Shard(0)], ([Shard(0)], [Replicate()]),
                      ([Shard(0)], [Partial("avg")]))
    with pytest.raises(jlm.PlacementValueError,
                       match=r"in_grad_placements\[1\]: Partial\(avg\) on mesh axis 'tp'.*sum of its "
                             r"local cotangents.*would divide it by the axis size.*Declare Partial\(\)"):
        grads(mesh1, lambda x, w: f(x, w).sum(), x, w)


# -- verification of declarations against JAX's typing (issue: gradients you can trust)
def dp_inputs(mesh, rng):
    X, W = randn(rng, 8, 6), randn(rng, 6, 6)
    x = jlm.distribute_tensor(X, mesh, [Shard(0)])
    w = jlm.distribute_tensor(W, mesh, [Replicate()])
    return X, W, x, w


BODIES_WHERE_W_MEETS_SHARDED_DATA = {
    "matmul": lambda x, w: x @ w,
    "inside_jit": lambda x, w: jax.jit(lambda a, b: jnp.tanh(a @ b))(x, w),
    "inside_scan": lambda x, w: jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=2)[0],
    "inside_cond": lambda x, w: jax.lax.cond(True, lambda a: a @ w, lambda a: a @ w.T, x),
    "via_carry": lambda x, w: jax.lax.fori_loop(0, 2, lambda i, c: (c[0] @ c[1], c[1] * 1.0), (x, w))[0],
}


@pytest.mark.parametrize("body", BODIES_WHERE_W_MEETS_SHARDED_DATA.values(), ids=BODIES_WHERE_W_MEETS_SHARDED_DATA)
def test_replicate_declared_for_a_partial_gradient_is_an_error(mesh1, rng, body):
    """PyTorch's silent bug class: declaring Replicate() skips the all-reduce."""
    _, _, x, w = dp_inputs(mesh1, rng)
    f = jlm.local_map(body, [Shard(0)], ([Shard(0)], [Replicate()]), ([Shard(0)], [Replicate()]))
    with pytest.raises(jlm.PlacementValueError,
                       match=r"in_grad_placements\[1\]: declares the gradient Replicate\(\) on mesh axis 'tp'.*true gradient is Partial\(\).*skip the all-reduce"):
        f(x, w)


@pytest.mark.parametrize("body", BODIES_WHERE_W_MEETS_SHARDED_DATA.values(), ids=BODIES_WHERE_W_MEETS_SHARDED_DATA)
def test_partial_declared_for_a_partial_gradient_is_correct(mesh1, rng, body):
    _, _, x, w = dp_inputs(mesh1, rng)
    f = jlm.local_map(body, [Shard(0)], ([Shard(0)], [Replicate()]), ([Shard(0)], [Partial()]))
    assert_matches_unsharded(f, lambda x, w: jnp.concatenate([body(x[:4], w), body(x[4:], w)]),
                             x, w, mesh=mesh1, rtol=1e-4)


def test_partial_declared_for_a_reduced_gradient_is_an_error(mesh1, rng):
    """The other direction: a duplicated all-reduce (an n-times gradient)."""
    _, _, x, w = dp_inputs(mesh1, rng)
    f = jlm.local_map(lambda x, w: x * jnp.sum(w), [Shard(0)], ([Shard(0)], [Replicate()]),
                      ([Shard(0)], [Partial()]))
    # f really is Partial: sum(w) is invariant, but the product with x varies.
    # g uses w only invariantly, so its cotangent is already reduced:
    g = jlm.local_map(lambda x, w: (x, jnp.tanh(w)), ([Shard(0)], [Replicate()]),
                      ([Shard(0)], [Replicate()]), ([Shard(0)], [Partial()]))
    with pytest.raises(jlm.PlacementValueError,
                       match=r"in_grad_placements\[1\]: declares the gradient Partial\(sum\) on mesh axis 'tp'.*already reduced.*2x"):
        g(x, w)
    f(x, w)  # the partial one is accepted


def test_replicate_declared_for_a_reduced_gradient_is_correct(mesh1, rng):
    _, _, x, w = dp_inputs(mesh1, rng)
    f = jlm.local_map(lambda x, w: (x * 2, jnp.tanh(w)), ([Shard(0)], [Replicate()]),
                      ([Shard(0)], [Replicate()]), ([Shard(0)], [Replicate()]))
    assert_matches_unsharded(f, lambda x, w: (2 * x, jnp.tanh(w)), x, w, mesh=mesh1, rtol=1e-4)


def test_replicate_output_that_varies_is_an_error(mesh1, rng):
    _, _, x, w = dp_inputs(mesh1, rng)
    f = jlm.local_map(lambda x, w: (x @ w).sum(0), [Replicate()], ([Shard(0)], [Replicate()]))
    with pytest.raises(jlm.PlacementValueError,
                       match=r"out_placements\[0\]: output 0 is declared Replicate\(\) on mesh axis 'tp'.*jax.lax.psum\(y, 'tp'\).*Partial\(\)"):
        f(x, w)
    fixed = jlm.local_map(lambda x, w: jax.lax.psum((x @ w).sum(0), "tp"), [Replicate()], ([Shard(0)], [Replicate()]))
    assert_close(fixed(x, w), (np.asarray(jlm.full_tensor(x)) @ np.asarray(w)).sum(0), rtol=1e-5)


def test_opt_out_for_bodies_the_typing_cannot_see(mesh1, rng):
    """check_vma=False: a host callback with its own local backward. JAX's unchecked
    transpose still sums the replicated weight's local cotangents."""
    X, W, x, w = dp_inputs(mesh1, rng)

    def host_matmul(a, b):
        return jax.pure_callback(lambda a, b: np.asarray(a) @ np.asarray(b),
                                 jax.ShapeDtypeStruct((a.shape[0], b.shape[1]), a.dtype), a, b)

    @jax.custom_vjp
    def matmul(a, b):
        return host_matmul(a, b)

    matmul.defvjp(lambda a, b: (host_matmul(a, b), (a, b)),
                  lambda res, ct: (host_matmul(ct, res[1].T), host_matmul(res[0].T, ct)))

    rx, rw = unsharded_grads(lambda x, w: ((x @ w) ** 2).sum(), X, W)
    for in_grad in [None, ([Shard(0)], [Partial()])]:
        f = jlm.local_map(matmul, [Shard(0)], ([Shard(0)], [Replicate()]), in_grad, check_vma=False)
        gx, gw = grads(mesh1, lambda x, w, f=f: (f(x, w) ** 2).sum(), x, w)
        assert_close(gx, rx, rtol=1e-4)
        assert_close(gw, rw, rtol=1e-4)


def test_gradient_through_partial_values(mesh2x2, rng):
    X, W = randn(rng, 4, 8), randn(rng, 8, 6)
    x = jlm.distribute_tensor(X, mesh2x2, [Shard(0), Shard(1)])
    w = jlm.distribute_tensor(W, mesh2x2, [Replicate(), Shard(0)])
    mm = jlm.local_map(lambda x, w: x @ w, [Shard(0), Partial()], ([Shard(0), Shard(1)], [Replicate(), Shard(0)]))
    act = jlm.local_map(jnp.tanh, [Shard(0), Replicate()], ([Shard(0), Replicate()],), redistribute_inputs=True)
    scale = jlm.local_map(lambda p: 3 * p, [Shard(0), Partial()], ([Shard(0), Partial()],))

    def loss(x, w):
        return (act(scale(mm(x, w))) ** 2).sum()

    g = grads(mesh2x2, loss, x, w)
    r = unsharded_grads(lambda x, w: (jnp.tanh(3 * (x @ w)) ** 2).sum(), X, W)
    for a, b in zip(g, r, strict=True):
        assert_close(a, b, rtol=1e-4)


@pytest.mark.parametrize("policy", [None, jax.checkpoint_policies.dots_saveable,
                                    jax.checkpoint_policies.nothing_saveable])
@pytest.mark.parametrize("in_grad", [None, ([Shard(0)], [Partial()])], ids=["default", "declared"])
def test_checkpoint_policies(mesh1, rng, policy, in_grad):
    X, W = randn(rng, 8, 6), randn(rng, 6, 6)
    x = jlm.distribute_tensor(X, mesh1, [Shard(0)])
    w = jlm.distribute_tensor(W, mesh1, [Replicate()])
    f = jlm.local_map(lambda x, w: jnp.tanh(jnp.tanh(x @ w) @ w), [Shard(0)],
                      ([Shard(0)], [Replicate()]), in_grad)
    loss = jax.checkpoint(lambda x, w: (f(x, w) ** 2).sum(), policy=policy)
    g = grads(mesh1, loss, x, w)
    r = unsharded_grads(lambda x, w: (jnp.tanh(jnp.tanh(x @ w) @ w) ** 2).sum(), X, W)
    for a, b in zip(g, r, strict=True):
        assert_close(a, b, rtol=1e-4)


@pytest.mark.parametrize("grad, match", [
    ([Shard(1)], r"in_grad_placements\[0\]: gradient placement Shard\(dim=1\) on mesh axis 'tp' does not fit an input placed Shard\(dim=0\)"),
    ([Partial("max")], r"in_grad_placements\[0\]: .*Shard\(dim=0\)"),
])
def test_gradient_placements_that_do_not_fit(mesh1, rng, grad, match):
    x = jlm.distribute_tensor(randn(rng, 4, 4), mesh1, [Shard(0)])
    f = jlm.local_map(lambda x: x, [Shard(0)], ([Shard(0)],), (grad,))
    with pytest.raises(jlm.PlacementValueError, match=match):
        f(x)


def test_max_is_not_a_gradient_reduction(mesh1, rng):
    w = jlm.distribute_tensor(randn(rng, 4), mesh1, [Replicate()])
    f = jlm.local_map(lambda w: w, [Replicate()], ([Replicate()],), ([Partial("max")],))
    with pytest.raises(jlm.PlacementValueError, match=r"Partial\(max\) .* is not a gradient reduction"):
        f(w)


# -- Partial end to end -------------------------------------------------------------
@pytest.mark.parametrize("op", ["sum", "avg"])
@pytest.mark.parametrize("target, kind", [([Replicate()], "all-reduce"), ([Shard(0)], "reduce-scatter")])
def test_partial_output_redistributed_with_one_collective(mesh4, rng, op, target, kind):
    X, W = randn(rng, 8, 16), randn(rng, 16, 4)
    x = jlm.distribute_tensor(X, mesh4, [Shard(1)])
    w = jlm.distribute_tensor(W, mesh4, [Shard(0)])
    scale = 4 if op == "avg" else 1  # avg: the value is the mean of the local products
    mm = jlm.local_map(lambda x, w: x @ w * scale, [Partial(op)], ([Shard(1)], [Shard(0)]))

    def forward(x, w):
        return jlm.redistribute(mm(x, w), mesh4, target)

    with jax.set_mesh(mesh4):
        y = jax.jit(forward)(x, w)
        counts = jlm.inspect.count_collectives(forward, x, w).counts
        g = jax.jit(jax.grad(lambda x, w: (jlm.full_tensor(forward(x, w)) ** 2).sum(), argnums=(0, 1)))(x, w)
    assert jlm.placements_of(y) == tuple(target)
    assert_close(y, X @ W, rtol=1e-5)
    assert counts[kind] == 1 and sum(counts.values()) == 1
    r = unsharded_grads(lambda x, w: ((x @ w) ** 2).sum(), X, W)
    for a, b in zip(g, r, strict=True):
        assert_close(a, b, rtol=1e-4)


# -- one reduction per step ---------------------------------------------------------
@pytest.mark.parametrize("k", [2, 4])
def test_partial_gradients_reduced_once_per_step(mesh4, rng, k):
    """Data parallelism with k microbatches: accumulate the weight's gradient while
    it is Partial and all-reduce once, instead of once per microbatch."""
    W, X, Y = randn(rng, 6, 3), randn(rng, k, 8, 6), randn(rng, k, 8, 3)

    def loss(w, x, y):
        return jnp.sum((jnp.tanh(x @ w) - y) ** 2)

    @jlm.local_map(out_placements=[Partial()], in_placements=([Replicate()], [Shard(0)], [Shard(0)]),
                   device_mesh=mesh4)
    def local_grad(w, x, y):
        return jax.grad(loss)(jax.lax.pcast(w, "tp", to="varying"), x, y)

    def reduce_once(w, xs, ys):
        first = local_grad(w, xs[0], ys[0])
        acc, _ = jax.lax.scan(lambda a, b: (a + local_grad(w, *b), None), first, (xs[1:], ys[1:]))
        return jlm.redistribute(acc, mesh4, [Replicate()])

    def reduce_every(w, xs, ys):
        acc, _ = jax.lax.scan(lambda a, b: (a + jlm.redistribute(local_grad(w, *b), mesh4, [Replicate()]), None),
                              jnp.zeros(w.shape, w.dtype), (xs, ys))
        return acc

    w = jlm.distribute_tensor(W, mesh4, [Replicate()])
    xs, ys = (jlm.distribute_tensor(a, mesh4, [Shard(1)]) for a in (X, Y))
    reference = sum(jax.grad(loss)(W, X[i], Y[i]) for i in range(k))
    with jax.set_mesh(mesh4):
        once, every = jax.jit(reduce_once)(w, xs, ys), jax.jit(reduce_every)(w, xs, ys)
        runs_once = jlm.inspect.count_collectives(reduce_once, w, xs, ys).executed["all-reduce"]
        runs_every = jlm.inspect.count_collectives(reduce_every, w, xs, ys).executed["all-reduce"]
    assert (runs_once, runs_every) == (1, k)
    assert_close(once, reference, rtol=1e-4)
    assert_close(once, every, rtol=1e-5)


@pytest.mark.parametrize("loop, carries", [
    (lambda x, w: jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=2)[0], 1),
    (lambda x, w: jax.lax.fori_loop(0, 2, lambda i, c: (c[0] @ c[1], c[1] * 1.0), (x, w))[0], 3),
    (lambda x, w: jax.lax.scan(lambda c, xs: (c + xs @ w, c.sum()), x, jnp.stack([x, x]))[0], 1),
    (lambda x, w: jax.lax.while_loop(lambda c: c[1] < 2, lambda c: (c[0] @ w, c[1] + 1),
                                     (x, 0))[0], 2),
])
def test_loop_carry_gives_the_carries_on_every_jax_version(loop, carries):
    """jax versions describe a scan's (consts, carry) split differently
    (parameters up to 0.11, flat input trees after): _jax_compat reads both."""
    from jlocalmap._jax_compat import loop_carry

    jaxpr = jax.make_jaxpr(loop)(jnp.ones((4, 4)), jnp.ones((4, 4)))
    [eqn] = [e for e in jaxpr.jaxpr.eqns if e.primitive.name in ("scan", "while")]
    sub = eqn.params["jaxpr" if eqn.primitive.name == "scan" else "body_jaxpr"].jaxpr
    start, count = loop_carry(eqn, sub)
    assert count == carries
    for k in range(count):  # each carry keeps its type through the body
        assert sub.invars[start + k].aval == sub.outvars[k].aval
    if "num_consts" in eqn.params:
        assert (start, count) == (eqn.params["num_consts"], eqn.params["num_carry"])


# -- no-gradient paths: integers, stop_gradient, unused inputs; custom_vjp bodies ------
def maybe_jit(fn, jit):
    return jax.jit(fn) if jit else fn


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("declared", [False, True], ids=["default", "declared"])
def test_no_gradient_paths_are_filtered(mesh2x2, rng, declared, jit):
    """Integer inputs and outputs, a stop_gradient output and an input the loss
    ignores pass through jax.value_and_grad; gradients equal the unsharded ones:
    float0 for integers, zeros for the ignored input, as jax gives them."""
    X, W, U = randn(rng, 8, 6), randn(rng, 6, 4), randn(rng, 5)
    I = rng.integers(0, 5, (8, 6)).astype(np.int32)
    K = rng.integers(1, 4, (4,)).astype(np.int32)
    x = jlm.distribute_tensor(X, mesh2x2, [Shard(0), Shard(1)])
    w = jlm.distribute_tensor(W, mesh2x2, [Replicate(), Shard(0)])
    i = jlm.distribute_tensor(I, mesh2x2, [Shard(0), Shard(1)])
    k = jlm.distribute_tensor(K, mesh2x2, [Replicate(), Replicate()])
    u = jlm.distribute_tensor(U, mesh2x2, [Replicate(), Replicate()])

    def body(x, w, i, k, u):
        p = jax.lax.psum((x * i) @ w, "tp") * k  # int i and k
        return p, (i > 2).sum(), jax.lax.stop_gradient(p), i > 2, jnp.tanh(u)

    in_pl = ([Shard(0), Shard(1)], [Replicate(), Shard(0)], [Shard(0), Shard(1)],
             [Replicate(), Replicate()], [Replicate(), Replicate()])
    # declared: the int k's adapter reduces over 'dp' (it meets data varying there),
    # u is used only invariantly (Replicate), the int i has no declaration
    in_grad = ([Shard(0), Shard(1)], [Partial(), Shard(0)], None, [Partial(), Replicate()],
               [Replicate(), Replicate()]) if declared else None
    out_pl = ([Shard(0), Replicate()], [Partial(), Partial()], [Shard(0), Replicate()],
              [Shard(0), Shard(1)], [Replicate(), Replicate()])
    f = jlm.local_map(body, out_pl, in_pl, in_grad)

    def loss(x, w, i, k, u):
        p, count, s, mask, _ = f(x, w, i, k, u)  # the tanh(u) output is ignored
        return (jnp.tanh(p) ** 2).sum() + 0.1 * (s * p).sum(), (jlm.full_tensor(count), mask)

    def reference(x, w, i, k, u):
        p = (x * i) @ w * k
        s = jax.lax.stop_gradient(p)
        return (jnp.tanh(p) ** 2).sum() + 0.1 * (s * p).sum(), (jnp.sum(i > 2), i > 2)

    argnums = (0, 1, 2, 3, 4)
    with jax.set_mesh(mesh2x2):
        (val, (count, mask)), g = maybe_jit(jax.value_and_grad(
            loss, argnums, has_aux=True, allow_int=True), jit)(x, w, i, k, u)
        # and with only the float inputs differentiated (eager jax.grad through a
        # shard_map compiles op by op: once is enough)
        g_float = jax.jit(jax.grad(lambda *a: loss(*a)[0], (0, 1, 4)))(x, w, i, k, u)
    (rval, (rcount, rmask)), r = jax.value_and_grad(
        reference, argnums, has_aux=True, allow_int=True)(X, W, I, K, U)
    assert_close(val, rval, rtol=1e-4)
    assert int(count) == int(rcount)
    np.testing.assert_array_equal(np.asarray(mask), np.asarray(rmask))
    for a, b in zip(g, r, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
    assert g[2].dtype == jax.dtypes.float0 and g[3].dtype == jax.dtypes.float0
    for a, b in zip([g[0], g[1], g[4]], [r[0], r[1], r[4]], strict=True):
        assert_close(a, b, rtol=1e-4)
    for a, b in zip(g_float, [r[0], r[1], r[4]], strict=True):
        assert_close(a, b, rtol=1e-4)
    assert not np.any(np.asarray(g[4])) and not np.any(np.asarray(g_float[2]))


@jax.custom_vjp
def clip_gradient(v):
    """The identity, whose backward clips the cotangent: not what autodiff gives."""
    return v


clip_gradient.defvjp(lambda v: (v, None), lambda _, ct: (jnp.clip(ct, -0.05, 0.05),))


CLIPPED = {  # where: (local_map body, the unsharded computation)
    "replicate": (lambda x, w: jnp.tanh(jax.lax.psum(x @ clip_gradient(w), "tp")),
                  lambda x, w: jnp.tanh(x @ clip_gradient(w))),
    "shard": (lambda x, w: jnp.tanh(jax.lax.psum(clip_gradient(x) @ w, "tp")),
              lambda x, w: jnp.tanh(clip_gradient(x) @ w)),
}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("where, in_grad", [
    ("replicate", None), ("shard", None),
    ("shard", ([Shard(0), Shard(1)], [Partial(), Shard(0)])),
], ids=["replicate", "shard", "shard-declared"])
def test_custom_vjp_in_the_body_keeps_its_backward(mesh2x2, rng, where, in_grad, jit):
    """The body's own custom_vjp runs in the backward pass, on the cotangent the
    unsharded computation gives it: for the replicated w, after JAX's all-reduce
    over 'dp' (clipping before the reduction would give another result). Declaring
    w's gradient Partial() is left out for the clip on w: its adapter marks w varying
    at the body's entry, so a backward applied to w itself runs on each device's
    unreduced cotangent (PyTorch's reading of that declaration)."""
    X, W = randn(rng, 8, 6), randn(rng, 6, 4)
    x = jlm.distribute_tensor(X, mesh2x2, [Shard(0), Shard(1)])
    w = jlm.distribute_tensor(W, mesh2x2, [Replicate(), Shard(0)])
    body, unsharded = CLIPPED[where]
    f = jlm.local_map(body, [Shard(0), Replicate()], ([Shard(0), Shard(1)], [Replicate(), Shard(0)]),
                      in_grad)
    with jax.set_mesh(mesh2x2):
        g = maybe_jit(jax.grad(lambda x, w: (f(x, w) ** 2).sum(), (0, 1)), jit)(x, w)
    r = unsharded_grads(lambda x, w: (unsharded(x, w) ** 2).sum(), X, W)
    plain = unsharded_grads(lambda x, w: (jnp.tanh(x @ w) ** 2).sum(), X, W)
    for a, b in zip(g, r, strict=True):
        assert_close(a, b, rtol=1e-4)
    k = 1 if where == "replicate" else 0  # the clipped input
    assert np.abs(np.asarray(g[k]) - plain[k]).max() > 0.1  # the clipping mattered
    assert np.abs(np.asarray(g[k])).max() <= 0.05 + 1e-6


def test_declared_partial_gradient_marks_the_input_varying_and_says_so(mesh2x2):
    """The adapter behind a Partial() gradient declaration makes the input vary
    in the body: an output computed from it alone cannot be Replicate(), and
    the error names the input and the declaration."""
    f = jlm.local_map(lambda x, w: (x @ w, jnp.tanh(w).sum()), ([Shard(0), Replicate()],
                      [Replicate(), Replicate()]),
                      ([Shard(0), Replicate()], [Replicate(), Replicate()]),
                      in_grad_placements=([Shard(0), Replicate()], [Partial(), Replicate()]),
                      device_mesh=mesh2x2)
    with pytest.raises(jlm.PlacementValueError,
                       match=r"out_placements\[1\]: output 1 is declared Replicate\(\) on mesh "
                             r"axis 'dp'.*Inputs \[1\] vary over 'dp' in the body because "
                             r"in_grad_placements declares their gradients Partial\(\)"):
        f(np.ones((4, 3), np.float32), np.ones((3, 3), np.float32))


def test_gradients_of_mesh_less_traced_values(mesh2x4, rng):
    """A traced value with no mesh (a numpy argument of jax.jit, a scan carry
    that starts as one) is laid out for a region by reshard, whose transpose
    gives its cotangent its own type: used under two layouts, or carried
    through a scan, its gradient equals the unsharded one."""
    a = jlm.local_map(jnp.sin, [Shard(0), Replicate()], ([Shard(0), Replicate()],),
                      device_mesh=mesh2x4)
    b = jlm.local_map(jnp.cos, [Replicate(), Replicate()], ([Replicate(), Replicate()],),
                      device_mesh=mesh2x4)
    x = randn(rng, 8, 8)
    got = jax.jit(jax.grad(lambda x: (a(x) * b(x)).sum()))(x)
    assert_close(got, jax.grad(lambda x: (jnp.sin(x) * jnp.cos(x)).sum())(x))

    layer = jlm.local_map(lambda x, w: jnp.sin(jax.lax.psum(x @ w, "tp")),
                          [Shard(0), Replicate()], ([Shard(0), Shard(1)], [Replicate(), Shard(0)]),
                          device_mesh=mesh2x4)

    def loss(layer, x, w):
        return jax.lax.scan(lambda c, _: (layer(c, w), None), x, None, length=3)[0].sum()
    X, W = randn(rng, 8, 16), randn(rng, 16, 16) * 0.2
    got = jax.jit(jax.grad(lambda x, w: loss(layer, x, w), (0, 1)))(X, W)
    want = jax.grad(lambda x, w: loss(lambda c, w: jnp.sin(c @ w), x, w), (0, 1))(X, W)
    for g, expected in zip(got, want, strict=True):
        assert_close(g, expected, rtol=1e-4, atol=1e-5)


# -- declarations under every transformation (issue 11) ------------------------------------
def dp_matmul(mesh, grad, **kwargs):
    return jlm.local_map(lambda x, w: jnp.tanh(x @ w), [Shard(0)], ([Shard(0)], [Replicate()]),
                         grad, mesh, **kwargs)


@pytest.mark.parametrize("grad", [None, ([Shard(0)], [Partial()])], ids=["default", "declared"])
def test_forward_mode_with_and_without_declarations(mesh1, rng, grad):
    """A declaration changes how the cotangent is reduced and nothing else:
    jvp, linearize, jacfwd, hessian and grad-of-grad equal the unsharded ones."""
    X, W, T = randn(rng, 4, 3), randn(rng, 3, 2), randn(rng, 3, 2)
    x = jlm.distribute_tensor(X, mesh1, [Shard(0)])
    f = dp_matmul(mesh1, grad)

    def loss(w, f=f, x=x):
        return (f(x, w) ** 2).sum()

    def ref(w):
        return (jnp.tanh(X @ w) ** 2).sum()
    with jax.set_mesh(mesh1):
        w, t = (jlm.distribute_tensor(v, mesh1, [Replicate()]) for v in (W, T))
        assert_close(jax.jvp(loss, (w,), (t,))[1], jax.jvp(ref, (W,), (T,))[1], rtol=1e-4)
        assert_close(jax.jit(lambda w, t: jax.jvp(loss, (w,), (t,))[1])(w, t),
                     jax.jvp(ref, (W,), (T,))[1], rtol=1e-4)
        assert_close(jax.linearize(loss, w)[1](t), jax.linearize(ref, W)[1](T), rtol=1e-4)
        assert_close(jax.jacfwd(loss)(w), jax.jacfwd(ref)(W), rtol=1e-4)
        assert_close(jax.jit(jax.hessian(loss))(w), jax.hessian(ref)(W), rtol=1e-4)
        assert_close(jax.grad(lambda w: jax.grad(loss)(w).sum())(w),
                     jax.grad(lambda w: jax.grad(ref)(w).sum())(W), rtol=1e-4)


@jax.custom_vjp
def reducing_matmul(x, w):
    return x @ w


def _reducing_fwd(x, w):
    return x @ w, (x, w)


def _reducing_bwd(res, g):  # PyTorch's test: the weight's gradient is all-reduced here
    x, w = res
    return g @ w.T, jax.lax.psum(x.T @ g, "tp")


reducing_matmul.defvjp(_reducing_fwd, _reducing_bwd)


@pytest.mark.parametrize("check_vma", [True, False])
def test_custom_rule_that_reduces_with_a_replicate_declaration(mesh1, rng, check_vma):
    """The body's own backward all-reduces w's gradient and declares Replicate():
    the verification trusts the rule (it reads only the forward), and an
    unchecked body no longer sums it a second time (it was 2x)."""
    X, W = randn(rng, 4, 3), randn(rng, 3, 2)
    x = jlm.distribute_tensor(X, mesh1, [Shard(0)])
    w = jlm.distribute_tensor(W, mesh1, [Replicate()])
    f = jlm.local_map(reducing_matmul, [Shard(0)], ([Shard(0)], [Replicate()]),
                      ([Shard(0)], [Replicate()]), mesh1, check_vma=check_vma)
    gx, gw = grads(mesh1, lambda x, w: (f(x, w) ** 2).sum(), x, w)
    rx, rw = unsharded_grads(lambda x, w: ((x @ w) ** 2).sum(), X, W)
    assert_close(gx, rx, rtol=1e-4)
    assert_close(gw, rw, rtol=1e-4)


def test_unchecked_body_with_partial_declaration_is_unchanged(mesh1, rng):
    X, W = randn(rng, 4, 3), randn(rng, 3, 2)
    x = jlm.distribute_tensor(X, mesh1, [Shard(0)])
    w = jlm.distribute_tensor(W, mesh1, [Replicate()])
    f = dp_matmul(mesh1, ([Shard(0)], [Partial()]), check_vma=False)
    _, gw = grads(mesh1, lambda x, w: (f(x, w) ** 2).sum(), x, w)
    _, rw = unsharded_grads(lambda x, w: (jnp.tanh(x @ w) ** 2).sum(), X, W)
    assert_close(gw, rw, rtol=1e-4)


@pytest.mark.parametrize("axis_name", [None, "i"])
def test_vmap_over_host_inputs(mesh1, rng, axis_name):
    X = randn(rng, 3, 4, 2)
    f = jlm.local_map(lambda x: jnp.sin(x) * 2, [Shard(0)], ([Shard(0)],), device_mesh=mesh1)
    y = jax.vmap(f, axis_name=axis_name)(X)
    assert_close(jlm.full_tensor(y), np.sin(X) * 2)


def test_disable_jit_runs_the_body_on_concrete_local_values(mesh1, rng):
    """The way to debug a body: under jax.disable_jit() it runs eagerly, as raw
    shard_map does, on each device's concrete local values."""
    X = randn(rng, 4, 2)
    seen = []

    def body(x):
        seen.append(str(x))  # concrete: the text of each device's values
        return x * 2
    f = jlm.local_map(body, [Shard(0)], ([Shard(0)],), device_mesh=mesh1)
    with jax.disable_jit():
        y = f(X)
    assert_close(jlm.full_tensor(y), 2 * X)
    assert "Traced" not in seen[-1] and "mesh coordinates" in seen[-1]
    assert str(X[0, 0])[:5] in seen[-1] and str(X[2, 0])[:5] in seen[-1]  # both devices' rows


def test_declarations_on_values_with_no_gradient_path(mesh1, rng):
    """An integer input (routing counts) and a float input reached only through
    stop_gradient have no cotangent: Replicate() is accepted there."""
    X = randn(rng, 4, 2)
    x = jlm.distribute_tensor(X, mesh1, [Shard(0)])
    scale = jlm.local_map(lambda x, n: x * n, [Shard(0)], ([Shard(0)], [Replicate()]),
                          ([Shard(0)], [Replicate()]), mesh1)
    assert_close(scale(x, np.int32(3)), 3 * X)
    frozen = jlm.local_map(lambda x, w: x * jax.lax.stop_gradient(w), [Shard(0)],
                           ([Shard(0)], [Replicate()]), ([Shard(0)], [Replicate()]), mesh1)
    w = jlm.distribute_tensor(np.float32(2.0), mesh1, [Replicate()])
    gx, gw = grads(mesh1, lambda x, w: frozen(x, w).sum(), x, w)
    assert_close(gx, 2 * np.ones_like(X))
    assert_close(gw, 0.0)


def test_callback_error_points_at_check_vma(mesh1, rng):
    X, W = randn(rng, 4, 3), randn(rng, 3, 2)

    def body(x, w):
        same = jax.pure_callback(lambda a: a, jax.ShapeDtypeStruct(w.shape, w.dtype), w)
        return x @ same
    f = jlm.local_map(body, [Shard(0)], ([Shard(0)], [Replicate()]),
                      ([Shard(0)], [Replicate()]), mesh1)
    with pytest.raises(jlm.PlacementValueError,
                       match=r"in_grad_placements\[1\].*host callback.*check_vma=False"):
        f(X, W)


def test_verification_reads_the_declared_input_when_the_body_closes_over_arrays(mesh1, rng):
    """A body closing over a numpy array gets it as a leading constant input of
    the region's jaxpr: the verification must follow the declared input, not it."""
    X, W = randn(rng, 4, 3), randn(rng, 3, 2)
    scale = np.arange(3, dtype=np.float32)        # a closed-over constant
    x = jlm.distribute_tensor(X, mesh1, [Shard(0)])
    w = jlm.distribute_tensor(W, mesh1, [Replicate()])
    wrong = jlm.local_map(lambda x, w: (x * scale) @ w, [Shard(0)], ([Shard(0)], [Replicate()]),
                          ([Shard(0)], [Replicate()]), mesh1)
    with pytest.raises(jlm.PlacementValueError, match=r"in_grad_placements\[1\]: declares the "
                                                      r"gradient Replicate\(\).*skip the all-reduce"):
        wrong(x, w)
    right = jlm.local_map(lambda x, w: (x * scale) @ w, [Shard(0)], ([Shard(0)], [Replicate()]),
                          ([Shard(0)], [Partial()]), mesh1)
    _, gw = grads(mesh1, lambda x, w: (right(x, w) ** 2).sum(), x, w)
    _, rw = unsharded_grads(lambda x, w: (((x * scale) @ w) ** 2).sum(), X, W)
    assert_close(gw, rw, rtol=1e-4)
