"""examples/moe.py at a tiny size: the expert-parallel layer against the unsharded
reference of the same routing (values, every gradient: jlocalmap.testing; training), the routing's
capacity rule against a plain loop, and a wrong gradient declaration refused."""

import importlib.util
import pathlib

import jax
import numpy as np
import pytest

import jlocalmap as jlm
from jlocalmap import Replicate
from jlocalmap.testing import assert_matches_unsharded
from tests.helpers import assert_close, need

need("optax")   # the example's optimizer
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
    """Both outputs (tokens and the balance loss) and the gradients of every parameter
    and of the tokens, against the reference that routes the same groups."""
    params, x, _ = data
    assert moe.dropped(x, params["router"], CFG, mesh.size) > 0
    layer = moe.make_sharded_moe(mesh, CFG)
    reference = lambda x, p: moe.reference_moe(x, p, CFG, mesh.size)  # noqa: E731
    compared = assert_matches_unsharded(layer, reference, x, params, mesh=mesh,
                                        placements=(moe.TOKENS, moe.PLACEMENTS))
    assert sorted(compared) == ["grad of args[0]", "grad of args[1]['router']",
                                "grad of args[1]['w1']", "grad of args[1]['w2']", "output[0]",
                                "output[1]"]
    for name, value in compared.items():
        assert float(np.max(np.abs(value))) > 1e-4, name   # not trivially zero
    with jax.set_mesh(mesh):
        y, _ = layer(jlm.distribute_tensor(x, mesh, moe.TOKENS),
                     {k: jlm.distribute_tensor(v, mesh, moe.PLACEMENTS[k]) for k, v in params.items()})
    assert jlm.placements_of(y) == tuple(moe.TOKENS)


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
