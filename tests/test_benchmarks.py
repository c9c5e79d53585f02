"""The benchmark harness at tiny sizes: jlocalmap's programs compile to the same
collectives (kinds and counts) as the hand-written jax.shard_map ones, their
results agree, and the harness runs end to end and writes its JSON and plots.
No timing is asserted."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import need

from benchmarks import report, run, workloads
from benchmarks.workloads import BlockSize, MlpSize


def assert_same_collectives(work):
    assert work.collectives, "no collective comparison recorded"
    for program, ours, hand in work.collectives:
        assert ours == hand, f"{program}: jlocalmap {ours} != hand-written {hand}"


def assert_results_agree(work, rtol):
    for row in work.rows:
        if row.baseline in work.outputs and row.name in work.outputs:
            diff = report.relative_difference(work.outputs[row.name], work.outputs[row.baseline])
            assert diff < rtol, f"{row.name} differs from {row.baseline} by {diff:.2e}"


def test_mlp_steps_match_hand_written():
    work = workloads.mlp_workload(jax.devices(), 4, MlpSize(16, 8, 32, "float32"), overlap=True)
    assert [c[0] for c in work.collectives] == ["mlp", "mlp-sp"]
    assert_same_collectives(work)
    assert work.collectives[0][1]["all-reduce"] >= 1  # the loss keeps the forward psum
    assert_results_agree(work, rtol=1e-5)  # the rings and XLA's partitioning included
    ring = work.info["overlap_collectives"]
    assert ring["collective-permute"] > 0 and ring["all-gather"] == ring["reduce-scatter"] == 0


def test_block_step_matches_hand_written_and_unsharded():
    """jlocalmap's block step has the hand-written one's collectives and results,
    and the hand-written block (the baseline of every block ratio) computes the
    unsharded block: loss and weight gradients against the same math, one device."""
    size = BlockSize(2, 8, 16, 2, 32, "float32")
    work = workloads.block_workload(jax.devices(), (1, 2, 2), size)
    assert_same_collectives(work)
    assert_results_agree(work, rtol=1e-6)
    assert work.info["flops_per_device"] > 0
    loss, grads = work.outputs["block/shard_map"]
    params, x, dy = jax.tree.map(np.asarray, work.inputs["block"])

    def attention(x, wq, wk, wv, wo):
        b, t, _ = x.shape
        q, k, v = ((x @ w).reshape(b, t, -1, size.head_dim) for w in (wq, wk, wv))
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(size.head_dim)
        s = jnp.where(np.tril(np.ones((t, t), bool)), s, -jnp.inf)
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v).reshape(b, t, -1) @ wo

    def mlp(x, w1, w2):
        return workloads.gelu(x @ w1) @ w2
    forward = workloads.block_forward((attention, mlp))
    ref_loss, ref_grads = jax.value_and_grad(lambda p: jnp.sum(forward(p, x) * dy))(params)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-4)
    for got, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-5)


def test_eager_call_matches_hand_written():
    work = workloads.eager_workload(jax.devices(), 8)
    assert_same_collectives(work)
    assert_results_agree(work, rtol=1e-6)


def test_harness_runs_and_writes_json(tmp_path):
    need("matplotlib")   # the plots
    code = run.main(["--quick", "--only", "eager,depth", "--depths", "1,2", "--rounds", "2",
                     "--round-s", "0.001", "--compile-depth-max", "0", "--no-progress",
                     "--out", str(tmp_path)])
    assert code == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert {"eager/jit(shard_map)", "eager/jlocalmap"} <= set(result["rows"])
    assert len(result["rows"]["eager/jlocalmap"]["times"]) == 2
    assert set(result["depth"]) == {"shard_map", "jlocalmap"}
    verdicts = {t["target"]: t["passed"] for t in result["targets"]}
    assert verdicts["eager: same collectives as hand-written"] is True
    assert "eager/jlocalmap call / jitted hand-written call" in verdicts
    assert (tmp_path / "step_times.png").stat().st_size > 0
    assert (tmp_path / "trace_depth.png").stat().st_size > 0


def test_linear_exponent_and_paired_ratio():
    assert report.linear_exponent({8: 1.0, 16: 2.0, 32: 4.0, 64: 8.0}) == pytest.approx(1.0)
    assert report.linear_exponent({8: 1.0, 16: 4.0, 32: 16.0}) == pytest.approx(2.0)
    assert report.paired_ratio([2.0, 4.0, 3.0], [1.0, 2.0, 3.0]) == 2.0


def test_docstring_examples():
    """The harness's own modules are outside the doctest paths: run their examples."""
    import doctest

    from benchmarks import timing
    for module in (timing, report):
        assert doctest.testmod(module).failed == 0


def test_strategy_row_runs_the_chosen_alternative_and_takes_the_fastest_as_baseline():
    from benchmarks import strategy
    from benchmarks.timing import run_rounds
    work = strategy.strategy_workload(jax.devices()[:4], MlpSize(32, 8, 32, "float32"))
    chosen = work.info["chosen"]
    assert chosen in {"tensor-parallel", "seq-parallel-ring", "fsdp"}
    assert chosen in work.info["cost_table"]
    for row in work.rows:  # every alternative computes the same step
        diff = report.relative_difference(work.outputs[row.name],
                                          work.outputs[f"strategy/{chosen}"])
        assert diff < 1e-5, f"{row.name} differs from {chosen} by {diff:.2e}"
    run_rounds(work.rows, rounds=2, iters=1, block=jax.block_until_ready)
    strategy.pick_baseline(work)
    rows = {row.name: row for row in work.rows}
    best = work.info["best_hand_picked"]
    assert rows["strategy/chosen"].baseline == best != "strategy/chosen"
    assert min(np.median(r.times) for n, r in rows.items() if n != "strategy/chosen") == \
        np.median(rows[best].times)


def test_a_row_whose_own_check_fails_shows_no_figure_and_fails_its_target():
    """The torch.compile row of an H200 run had zero gradients (grad_check norm
    ratio 0.0) and was printed as the fastest row: such a row is now invalid."""
    zero = {"norm_ratio": [0.0, 0.0], "max_rel_err": [1.0, 1.0]}
    right = {"norm_ratio": [1.0001, 0.9999], "max_rel_err": [0.004, 0.005]}
    stats = {"median": 6.7e-3, "spread": 0.01, "q1": 6.6e-3, "q3": 6.8e-3}
    rows = {"mlp/torch.compile": {"stats": stats, "ratio": 0.9},
            "mlp/torch-eager": {"stats": stats, "ratio": 1.04},
            "mlp/jlocalmap": {"stats": stats, "ratio": 1.0, "rel_diff": 0.5}}
    for name, check in (("mlp/torch.compile", zero), ("mlp/torch-eager", right),
                        ("mlp/jlocalmap", None)):
        failed = report.failed_check(rows[name], check)
        if failed is not None:
            rows[name]["invalid"] = failed
    result = {"rows": rows, "collectives": [], "depth": {}}
    result["targets"] = report.targets(result)
    table = report.table(result)
    assert "mlp/torch.compile            invalid: grad_check: norm_ratio [0.0, 0.0]" in table
    assert "mlp/jlocalmap                invalid: rel_diff 5.0e-01" in table
    assert "0.900x" not in table and "1.040x" in table   # the valid row keeps its figures
    failed = {t["target"] for t in result["targets"] if not t["passed"]}
    assert failed == {"mlp/torch.compile: its own check passes",
                      "mlp/jlocalmap: its own check passes"}
    # no comparison is made with an invalid row
    assert not any("faster than" in t["target"] for t in result["targets"])


def test_first_call_reports_one_compile_and_bounded_caches(capsys):
    """benchmarks/first_call.py (the core refactor's before/after figures): one XLA
    compile for an even and an uneven first call, the wrapper's cache at its bound."""
    from benchmarks import first_call

    assert first_call.main(["--signatures", "100"]) == 0
    out = capsys.readouterr().out
    assert "first call eager        : XLA compiles even 1, uneven 1" in out, out
    assert "first call under jax.jit: XLA compiles even 1, uneven 1" in out, out
    assert out.count("grew: f._cache holds 64") == 2, out
    last = out.strip().splitlines()[-1]
    assert last.startswith("max |sharded - unsharded| = ") and float(last.split("=")[1]) < 1e-5
