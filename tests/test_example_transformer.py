"""examples/transformer.py at a tiny size: both attention variants, and the
--overlap projections, train like the unsharded model (loss, parameters and
gradients every step), and the two kinds of mistake the comparison exists for
are caught: a wrong gradient declaration, by jlocalmap at trace time, and a
wrong causal mask, by the comparison. The attention and --overlap regions alone,
with jlocalmap.testing: values, gradients and collectives."""

import dataclasses
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlocalmap as jlm
from helpers import need

from jlocalmap.testing import assert_matches_unsharded, expect_collectives

need("optax")   # the example's optimizer
_PATH = pathlib.Path(__file__).parents[1] / "examples" / "transformer.py"
_spec = importlib.util.spec_from_file_location("transformer_example", _PATH)
tr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tr)

TINY = tr.Config(vocab=16, dim=8, heads=2, head_dim=4, ffn=8, layers=1, batch=2, seq=8)
FLAGS = [f"--{f.name}={getattr(TINY, f.name)}" for f in dataclasses.fields(TINY)]


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((2, 2, 2), ("dp", "cp", "tp"))


@pytest.mark.parametrize("variant", ["allgather", "ring"])
def test_training_equals_the_unsharded_model(variant, capsys):
    worst = tr.main([f"--attention={variant}", "--steps=2", *FLAGS])
    lines = capsys.readouterr().out.strip().splitlines()
    assert worst < tr.TOL
    assert lines[-1] == f"max |sharded - unsharded| = {worst:.2e}"
    steps = [line for line in lines if line.startswith("step ")]
    assert len(steps) == 2 and all("max |grad diff|" in line for line in steps)
    comms = "\n".join(lines)
    # The all-gather variant gathers k and v over cp; the ring passes them on.
    kind = "all-gather" if variant == "allgather" else "collective-permute"
    assert f"{kind:<20}{0:>7}" not in comms


def _collective_counts(lines: list[str]) -> dict[str, int]:
    """kind -> count from the printed table of the compiled step's collectives."""
    kinds = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
    return {line.split()[0]: int(line.split()[1]) for line in lines
            if line.split() and line.split()[0] in kinds}


def test_overlap_trains_like_the_unsharded_model_with_rings_of_permutes(capsys):
    """--overlap: every tp projection (q/k/v, wo, w1/w3, w2 per layer, and the LM
    head) is one all_gather_matmul or matmul_reduce_scatter ring, tp - 1
    collective-permutes forward and as many in its backward (tp = 2: one way)."""
    worst = tr.main(["--overlap", "--steps=2", *FLAGS])
    lines = capsys.readouterr().out.strip().splitlines()
    assert worst < tr.TOL
    assert lines[-1] == f"max |sharded - unsharded| = {worst:.2e}"
    assert len([line for line in lines if line.startswith("step ")]) == 2
    rings, tp = 4 * TINY.layers + 1, 2
    assert _collective_counts(lines)["collective-permute"] == 2 * rings * (tp - 1)


@pytest.mark.parametrize("variant, moves", [("allgather", dict(all_gather=2)),
                                            ("ring", dict(collective_permute=2))])
def test_attention_region_equals_the_unsharded_attention(mesh, variant, moves):
    """The region alone: its output and the gradients of q, k and v; its forward moves
    k and v over cp, by one all-gather each or one ring step each (cp = 2)."""
    attention = tr.make_attention(mesh, variant)
    q, k, v = (np.random.default_rng(i).standard_normal((2, 8, 2, 4)).astype(np.float32)
               for i in range(3))
    assert_matches_unsharded(attention, tr.causal_softmax_attention, q, k, v, mesh=mesh,
                             placements=tr.QKV, rtol=tr.TOL)
    with jax.set_mesh(mesh):
        expect_collectives(attention, *(jlm.distribute_tensor(a, mesh, tr.QKV) for a in (q, k, v)),
                           **moves)


def test_overlapped_projections_are_one_ring_each_way(mesh):
    """--overlap's regions on their own: tp - 1 collective-permutes forward, as many
    backward, and no all-gather or reduce-scatter; the weights' gradients are
    all-reduced over dp and cp (a count XLA may combine)."""
    rng = np.random.default_rng(0)
    h, w = (jlm.distribute_tensor(rng.standard_normal(s).astype(np.float32), mesh, p)
            for s, p in (((2, 8, 8), tr.SEQUENCE_PARALLEL), ((8, 8), tr.COLUMN)))
    x, w2 = (jlm.distribute_tensor(rng.standard_normal(s).astype(np.float32), mesh, p)
             for s, p in (((2, 8, 8), tr.COLUMN_OUT), ((8, 8), tr.ROW)))
    column, row = tr.make_overlapped_column(mesh), tr.make_overlapped_row(mesh)
    tp = mesh.shape["tp"]
    with jax.set_mesh(mesh):
        for region, args in ((column, (h, w, w)), (row, (x, w2))):
            def squares(*a, f=region):
                return sum(jnp.sum(o ** 2) for o in jax.tree.leaves(f(*a)))
            expect_collectives(region, *args, collective_permute=tp - 1)
            expect_collectives(jax.grad(squares, argnums=tuple(range(len(args)))), *args,
                               collective_permute=2 * (tp - 1), all_reduce=None)


def _loss_and_grads(ops, params, tokens, labels):
    return jax.jit(jax.value_and_grad(tr.loss_fn), static_argnums=(3, 4))(
        params, tokens, labels, ops, TINY.head_dim)


def test_kv_gradient_declared_replicate_on_cp_is_refused(mesh):
    """PyTorch's silent bug: the gathered k/v's gradient labelled Replicate() on cp
    would skip the sum over the cp ranks. jlocalmap refuses it at trace time."""
    params, batch, _ = tr.starting_point(mesh, TINY, seed=2)
    wrong = [tr.S0, tr.R, tr.S2]
    ops = tr.sharded_ops(mesh, TINY, "allgather", kv_grad_placements=wrong)
    with jax.set_mesh(mesh), pytest.raises(jlm.PlacementValueError) as err:
        _loss_and_grads(ops, params, *batch)
    message = str(err.value)
    assert "in_grad_placements[1]" in message and "'cp'" in message and "Partial()" in message


def test_mask_without_the_cp_offset_fails_the_comparison(mesh):
    """Every cp rank masking as if its queries started at position 0 trains,
    but not like the unsharded model: the check the example prints must see it."""
    no_offset = jlm.local_map(tr.causal_softmax_attention, out_placements=tr.QKV,
                              in_placements=(tr.QKV, tr.KV_GATHERED, tr.KV_GATHERED),
                              device_mesh=mesh, redistribute_inputs=True)
    ops = dataclasses.replace(tr.sharded_ops(mesh, TINY, "allgather"), attention=no_offset)
    history = tr.train_and_compare(mesh, TINY, ops, steps=1, log=lambda *_: None)
    assert history[0]["loss_diff"] > 100 * tr.TOL
