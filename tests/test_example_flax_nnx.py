"""examples/flax_nnx.py at a tiny size: the NNX model trains like the unsharded
module (loss, parameters, gradients every step) with its parameters and Adam
moments in the declared layouts, and mistakes are caught: a bias added before
the tensor-parallel sum (by its gradient declaration at trace time, or without
declarations by the comparison), a wrong gradient declaration (by jlocalmap)."""

import argparse
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import need

import jlocalmap as jlm
from jlocalmap import Replicate

need("optax")   # the example's optimizer
nnx = need("flax.nnx")

_PATH = pathlib.Path(__file__).parents[1] / "examples" / "flax_nnx.py"
_spec = importlib.util.spec_from_file_location("flax_nnx_example", _PATH)
fx = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fx)

TINY = dict(dim=8, hidden=16, out=4, layers=1, batch=8)


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((2, 4), ("dp", "tp"))


def _args(steps=2):
    return argparse.Namespace(steps=steps, lr=1e-2, **TINY)


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((TINY["batch"], TINY["dim"])).astype(np.float32)
    return x, rng.standard_normal((TINY["batch"], TINY["out"])).astype(np.float32)


def test_training_equals_the_unsharded_module(capsys):
    worst = fx.main(["--steps=2", *[f"--{k}={v}" for k, v in TINY.items()]])
    lines = capsys.readouterr().out.strip().splitlines()
    assert worst < fx.TOL
    assert lines[-1] == f"max |sharded - unsharded| = {worst:.2e}"
    steps = [line for line in lines if line.startswith("step ")]
    assert len(steps) == 2 and all("max |grad diff|" in line for line in steps)
    assert any(line.startswith("all-reduce") for line in lines)


def test_parameters_and_adam_moments_keep_the_declared_layouts(mesh):
    model, optimizer = fx.build(mesh, _args())
    x, y = (jlm.distribute_tensor(a, mesh, fx.ACTIVATION) for a in _data())
    with jax.set_mesh(mesh):
        fx.train_step(model, optimizer, x, y)
    fx.check_layouts(model, mesh)
    params = nnx.state(model, nnx.Param)
    moments = nnx.state(optimizer)["opt_state"][0]
    for name in ("mu", "nu"):
        for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(moments[name]), strict=True):
            assert jlm.placements_of(m) == jlm.placements_of(p)


def _bias_before_the_tp_sum(monkeypatch):
    """torchtitan #2106's shape: a replicated bias added to each tp rank's partial
    product, so the sum over tp adds it tp times."""
    monkeypatch.setattr(fx.RowParallelLinear, "body",
                        staticmethod(lambda h, w, b: jax.lax.psum(h @ w + b, "tp")))


def test_bias_added_before_the_tp_sum_is_refused_by_its_declaration(mesh, monkeypatch):
    """The bias's declared gradient, Replicate() on tp, no longer holds: jlocalmap
    says so at trace time."""
    _bias_before_the_tp_sum(monkeypatch)
    with pytest.raises(jlm.PlacementValueError) as err:
        fx.train_and_compare(mesh, _args(steps=1), *_data(), log=lambda *_: None)
    assert "in_grad_placements[2]" in str(err.value) and "'tp'" in str(err.value)


def test_bias_added_before_the_tp_sum_fails_the_comparison(mesh, monkeypatch):
    """Without declarations the program runs (JAX reduces every gradient right),
    but its values are wrong: the comparison the example prints catches it."""
    _bias_before_the_tp_sum(monkeypatch)
    monkeypatch.setattr(fx, "dp_summand", lambda placements: None)
    history = fx.train_and_compare(mesh, _args(steps=1), *_data(), log=lambda *_: None)
    assert history[0]["loss_diff"] > 100 * fx.TOL


def test_bias_gradient_declared_replicate_on_dp_is_refused(mesh, monkeypatch):
    """Declaring the row bias's gradient Replicate() on dp would skip its sum over
    the batch shards (PyTorch's silent default): refused at trace time."""
    monkeypatch.setattr(fx, "dp_summand", lambda placements: [Replicate(), *placements[1:]])
    model, _ = fx.build(mesh, _args())
    x, y = (jlm.distribute_tensor(a, mesh, fx.ACTIVATION) for a in _data())
    with jax.set_mesh(mesh), pytest.raises(jlm.PlacementValueError) as err:
        nnx.jit(nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2)))(model)
    assert "in_grad_placements[1]" in str(err.value) and "'dp'" in str(err.value)
