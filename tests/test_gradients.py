"""Gradients through local_map equal the unsharded ones; in_grad_placements."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlocalmap as jlm
from helpers import assert_close, randn
from jlocalmap import Partial, Replicate, Shard


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
    X, W1, W2 = randn(rng, 4, 8), randn(rng, 8, 16), randn(rng, 16, 8)
    x = jlm.distribute_tensor(X, mesh, [Replicate()])
    w1 = jlm.distribute_tensor(W1, mesh, [Shard(1)])
    w2 = jlm.distribute_tensor(W2, mesh, [Shard(0)])

    @jlm.local_map(out_placements=[Replicate()],
                   in_placements=([Replicate()], [Shard(1)], [Shard(0)]), device_mesh=mesh)
    def mlp(x, w1, w2):
        return jax.lax.psum(jax.nn.relu(x @ w1) @ w2, "tp")

    def ref(x, w1, w2):
        return jax.nn.relu(x @ w1) @ w2

    g = grads(mesh, lambda *a: (mlp(*a) ** 2).sum(), x, w1, w2)
    r = unsharded_grads(lambda *a: (ref(*a) ** 2).sum(), X, W1, W2)
    for a, b in zip(g, r):
        assert_close(a, b, rtol=1e-4)


def test_avg_gradient_declaration_takes_the_mean(mesh1, rng):
    X, W = randn(rng, 8, 6), randn(rng, 6, 5)
    x = jlm.distribute_tensor(X, mesh1, [Shard(0)])
    w = jlm.distribute_tensor(W, mesh1, [Replicate()])
    f = jlm.local_map(lambda x, w: x @ w, [Shard(0)], ([Shard(0)], [Replicate()]),
                      ([Shard(0)], [Partial("avg")]))
    _, gw = grads(mesh1, lambda x, w: f(x, w).sum(), x, w)
    _, rw = unsharded_grads(lambda x, w: (x @ w).sum(), X, W)
    assert_close(gw, rw / 2)


def test_replicate_declaration_cannot_drop_the_all_reduce(mesh1, rng):
    """PyTorch's bug class: declaring Replicate() for a Partial gradient."""
    X, W = randn(rng, 8, 6), randn(rng, 6, 5)
    x = jlm.distribute_tensor(X, mesh1, [Shard(0)])
    w = jlm.distribute_tensor(W, mesh1, [Replicate()])
    f = jlm.local_map(lambda x, w: x @ w, [Shard(0)], ([Shard(0)], [Replicate()]),
                      ([Shard(0)], [Replicate()]))
    _, gw = grads(mesh1, lambda x, w: (f(x, w) ** 2).sum(), x, w)
    _, rw = unsharded_grads(lambda x, w: ((x @ w) ** 2).sum(), X, W)
    assert_close(gw, rw)


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
    for a, b in zip(g, r):
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
    for a, b in zip(g, r):
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
