"""examples/llama_programs.py: the sharded training step equals the unsharded
reference on 8 simulated CPU devices (loss and parameters after AdamW steps), the
published shapes trace on abstract meshes of thousands of devices in seconds,
FSDP is a placement change, and wrong sizes are refused by name."""

import importlib.util
import pathlib
import re
import sys
import time

import jax
import jax.numpy as jnp
import pytest

_PATH = pathlib.Path(__file__).parents[1] / "examples" / "llama_programs.py"
_spec = importlib.util.spec_from_file_location("llama_programs", _PATH)
lp = importlib.util.module_from_spec(_spec)
sys.modules["llama_programs"] = lp   # dataclasses look their module up by name
_spec.loader.exec_module(lp)

TINY = lp.PRESETS["tiny"]


def test_the_script_trains_like_the_unsharded_model(capsys):
    """Selective remat, blocked attention, context parallelism: AdamW at lr 1e-2
    (each step moves every weight by about 1e-2, so a wrong gradient shows)."""
    worst = lp.main(["--mesh", "fsdp=2,cp=2,tp=2", "--steps", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert worst < lp.TOL and lines[-1] == f"max |sharded - unsharded| = {worst:.2e}"
    assert len([line for line in lines if line.startswith("step ")]) == 2


def test_step_without_remat_equals_the_unsharded_step():
    """dp, fsdp and tp together, dense attention, everything saved."""
    plan = lp.Plan(remat="none", attention="dense", compute_dtype="float32", lr=1e-2)
    with jax.default_matmul_precision("highest"):
        history = lp.run_and_compare(TINY, lp.make_mesh({"dp": 2, "fsdp": 2, "tp": 2}),
                                     batch=4, seq=16, plan=plan)
    assert len(history) == 2 and history[0]["loss"] != history[1]["loss"]
    assert max(max(h["loss_diff"], h["param_diff"]) for h in history) < lp.TOL


def test_gradient_accumulation_equals_the_unsharded_step():
    """Two microbatches accumulated in a scan, dp and fsdp splitting each."""
    plan = lp.Plan(remat="full", attention="blocked", attention_block=8, microbatches=2,
                   compute_dtype="float32", lr=1e-2)
    with jax.default_matmul_precision("highest"):
        history = lp.run_and_compare(TINY, lp.make_mesh({"dp": 2, "fsdp": 2, "tp": 2}),
                                     batch=8, seq=16, plan=plan)
    assert max(max(h["loss_diff"], h["param_diff"]) for h in history) < lp.TOL


def test_fsdp_gathers_in_the_regions_and_reduce_scatters_the_gradients():
    """FSDP as the frameworks run it: weights enter the regions as their fsdp
    shards and are all-gathered there (once a use, again in the backward where
    checkpointing drops them: the 7 matrices of a layer); their gradients are
    reduce-scattered over fsdp (one per weight matrix: 7 a layer, the embedding,
    the head) and all-reduced over dp and cp at the regions' boundaries."""
    mesh = lp.make_abstract_mesh({"fsdp": 8})
    step, args, _, _ = lp.build(TINY, mesh, batch=8, seq=16, plan=lp.Plan(attention="dense"))
    jaxpr = str(jax.make_jaxpr(step)(*args))
    gathers = re.findall(r"all_gather\[[^\]]*axis_name=\(([^)]*)\)", jaxpr)
    assert gathers.count("'fsdp',") == 9 + 7
    scatters = re.findall(r"reduce_scatter\[[^\]]*axis_name=\(([^)]*)\)", jaxpr)
    assert scatters.count("'fsdp',") == 9
    sums = re.findall(r"psum\w*\[[^\]]*axes=\(([^)]*)\)", jaxpr)
    assert sums.count("'dp', 'cp'") == 9 and not any("'fsdp'" in axes and "'tp'" not in axes
                                                     for axes in sums)


@pytest.mark.parametrize("model, sizes, batch", [
    ("llama3-405b", {"dp": 32, "fsdp": 64, "tp": 8}, 2048),
    ("llama2-70b", {"fsdp": 64}, 128),
])
def test_published_shapes_trace_on_abstract_meshes(model, sizes, batch):
    mesh = lp.make_abstract_mesh(sizes)
    start = time.perf_counter()
    step, args, flops, tokens = lp.build(lp.PRESETS[model], mesh, batch=batch, seq=4096,
                                         plan=lp.Plan(remat="full"))
    jax.make_jaxpr(step)(*args)
    assert time.perf_counter() - start < 30
    assert tokens == batch * 4096 and flops > 6 * lp.PRESETS[model].n_params * tokens * 0.95


def test_parameter_counts_match_the_published_models():
    counts = {name: lp.PRESETS[name].n_params / 1e9 for name in
              ("llama3-8b", "llama3-70b", "llama3-405b", "llama2-7b", "llama2-70b")}
    assert counts == pytest.approx({"llama3-8b": 8.03, "llama3-70b": 70.55,
                                    "llama3-405b": 405.85, "llama2-7b": 6.74,
                                    "llama2-70b": 68.98}, abs=0.01)


def test_fp8_plan_multiplies_float8_operands():
    """precision="fp8": the projections' matmuls (forward and both backward ones)
    take float8 operands; attention and the LM head stay in bf16."""
    mesh = lp.make_abstract_mesh({"fsdp": 2, "tp": 2})
    step, args, _, _ = lp.build(TINY, mesh, batch=4, seq=16, plan=lp.Plan(precision="fp8"))
    text = str(jax.make_jaxpr(step)(*args))
    assert "f8_e4m3fn" in text and "f8_e5m2" in text


def test_fp8_matmul_is_close_to_the_bf16_one():
    x = jax.random.normal(jax.random.key(0), (4, 8, 32), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (32, 16), jnp.bfloat16) * 0.2

    def loss(f, x, w):
        return jnp.sum(f(x, w).astype(jnp.float32) ** 2)
    exact = jax.grad(lambda *a: loss(jnp.matmul, *a), argnums=(0, 1))(x, w)
    fp8 = jax.grad(lambda *a: loss(lp.fp8_matmul, *a), argnums=(0, 1))(x, w)
    for a, b in zip(exact, fp8, strict=True):
        rel = jnp.linalg.norm((a - b).astype(jnp.float32)) / jnp.linalg.norm(a.astype(jnp.float32))
        assert 1e-3 < float(rel) < 0.15   # float8's rounding, not zero, not wrong


def test_sizes_the_mesh_does_not_divide_are_refused_by_name():
    mesh = lp.make_abstract_mesh({"tp": 8})
    with pytest.raises(ValueError, match="n_kv_heads 2 must be a multiple of tp = 8"):
        lp.build(TINY, mesh, batch=8, seq=16)
    with pytest.raises(ValueError, match="axes must be among"):
        lp.make_abstract_mesh({"pp": 2})
