"""examples/moe.py at a tiny size: the expert-parallel layer against the unsharded
reference of the same routing (values, every gradient, training), the routing's
capacity rule against a plain loop, and a wrong gradient declaration refused."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlocalmap as jlm
from jlocalmap import Replicate
from tests.helpers import assert_close

_PATH = pathlib.Path(__file__).parents[1] / "examples" / "moe.py"
_spec = importlib.util.spec_from_file_location("moe_example", _PATH)
moe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(moe)

CFG = moe.MoEConfig(experts=4, top_k=2, capacity_factor=1.0)
TOKENS, DIM, HIDDEN = 64, 8, 16


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((2, 4), ("dp", "ep"))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    params = moe.init_params(rng, DIM, HIDDEN, CFG)
    x = rng.standard_normal((TOKENS, DIM)).astype(np.float32)
    target = rng.standard_normal((TOKENS, DIM)).astype(np.float32)
    return params, x, target


def _outputs_and_grads(layer):
    """One jitted program: the layer's outputs and the gradients of a loss of them
    with respect to the parameters and the tokens."""
    def loss(params, x, target):
        y, aux = layer(x, params)
        return jnp.mean((y - target) ** 2) + moe.AUX_WEIGHT * aux, (y, aux)
    return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))


def test_route_keeps_first_choices_first_up_to_capacity(data):
    params, x, _ = data
    tokens = x[:8]
    dispatch, combine, probs, assigned = moe.route(tokens, params["router"], CFG)
    capacity = CFG.capacity(8)
    chosen = np.argsort(-np.asarray(probs), axis=1)[:, :CFG.top_k]
    expected = np.zeros((8, CFG.experts, capacity), np.float32)
    used = [0] * CFG.experts
    for k in range(CFG.top_k):              # all first choices, then all second ones
        for t in range(8):
            e = chosen[t, k]
            if used[e] < capacity:
                expected[t, e, used[e]] = 1.0
            used[e] += 1
    np.testing.assert_array_equal(np.asarray(dispatch), expected)
    assert_close(combine, expected * np.asarray(probs)[:, :, None])   # weighted by the router
    np.testing.assert_array_equal(np.asarray(assigned), np.bincount(chosen.ravel(), minlength=CFG.experts))
    assert expected.sum() < 8 * CFG.top_k, "the capacity must drop some assignments here"


def test_forward_and_every_gradient_equal_the_unsharded_routing(mesh, data):
    params, x, target = data
    assert moe.dropped(x, params["router"], CFG, mesh.size) > 0
    layer = moe.make_sharded_moe(mesh, CFG)
    reference = lambda x, p: moe.reference_moe(x, p, CFG, mesh.size)  # noqa: E731
    with jax.set_mesh(mesh):
        grads, (y, aux) = _outputs_and_grads(layer)(params, x, target)
    ref_grads, (ref_y, ref_aux) = _outputs_and_grads(reference)(params, x, target)
    assert_close(jlm.full_tensor(y), ref_y)
    assert_close(aux, ref_aux)
    assert jlm.placements_of(y) == tuple(moe.TOKENS)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        assert float(np.max(np.abs(np.asarray(want)))) > 1e-4   # not trivially zero
        assert_close(jlm.full_tensor(got), want)


def test_training_matches_and_the_step_runs_its_all_to_alls(mesh, data, capsys):
    params, x, target = data
    args = type("Args", (), {"lr": 1e-3, "steps": 2})()
    worst = moe.train(mesh, CFG, args, params, x, target)
    out = capsys.readouterr().out
    assert worst < moe.TOL
    assert "collectives per train step: 3 all-to-all" in out
    assert out.count("step ") >= 2


def test_a_wrong_router_gradient_declaration_is_refused(mesh, data):
    params, x, _ = data
    layer = moe.make_sharded_moe(mesh, CFG, router_grad=(Replicate(), Replicate()))
    with pytest.raises(jlm.PlacementValueError, match=r"in_grad_placements\[1\].*Replicate\(\) "
                       r"on mesh axis 'dp'.*Declare Partial\(\)"):
        with jax.set_mesh(mesh):
            layer(x, params)
