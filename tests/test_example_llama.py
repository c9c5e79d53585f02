"""examples/llama.py at a tiny size on a (dp, cp, tp) = (2, 2, 2) mesh: it trains
like the unsharded model; a run stopped after a checkpoint and resumed (into a
model built abstractly) equals the uninterrupted run bit for bit; a broken
sharded model fails the comparison."""

import importlib.util
import pathlib

import numpy as np
import pytest

_PATH = pathlib.Path(__file__).parents[1] / "examples" / "llama.py"
_spec = importlib.util.spec_from_file_location("llama_example", _PATH)
ex = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ex)

TINY = ["--dim=32", "--layers=1", "--heads=4", "--kv-heads=2", "--vocab=64", "--seq=8",
        "--batch=4", "--multiple-of=16", "--dp=2", "--cp=2", "--tp=2", "--ckpt-every=2"]


def run(capsys, directory, *flags):
    result = ex.main([*TINY, f"--ckpt-dir={directory}", *flags])
    return result, capsys.readouterr().out.strip().splitlines()


def test_resumed_run_equals_the_uninterrupted_one_and_the_unsharded_model(tmp_path, capsys):
    whole, lines = run(capsys, tmp_path / "whole", "--steps=4")
    assert lines[-1] == f"max |sharded - unsharded| = {whole['worst']:.2e}"
    assert whole["worst"] < ex.TOL and sorted(whole["history"]) == [1, 2, 3, 4]
    assert sum("(checkpoint saved)" in line for line in lines) == 2

    first, _ = run(capsys, tmp_path / "stopped", "--steps=4", "--stop-at=2")
    assert sorted(first["history"]) == [1, 2]
    resumed, lines = run(capsys, tmp_path / "stopped", "--steps=4", "--resume")
    assert any(line.startswith("resumed from the checkpoint of step 2") for line in lines)
    assert sorted(resumed["history"]) == [3, 4] and resumed["worst"] < ex.TOL
    # The same program from the same state: every loss and parameter bit for bit.
    for step in (1, 2):
        assert first["history"][step] == whole["history"][step]
    for step in (3, 4):
        assert resumed["history"][step]["loss"] == whole["history"][step]["loss"]
    for got, want in zip(resumed["params"], whole["params"], strict=True):
        np.testing.assert_array_equal(got, want)


def test_a_broken_sharded_model_fails_the_comparison(tmp_path, capsys, monkeypatch):
    # Every rank looks up vocabulary rows and masks attention as rank 0 would
    # (another vocabulary: a program of its own, not the other tests' compiled one).
    monkeypatch.setattr(ex, "rank", lambda axis: 0)
    result, lines = run(capsys, tmp_path, "--steps=1", "--vocab=32")
    assert result["worst"] > 100 * ex.TOL, lines[-1]


@pytest.mark.parametrize("flags, message", [
    (["--resume"], "--resume needs the --ckpt-dir"),
    (["--kv-heads=3"], "--kv-heads = 3 must be a multiple of 2"),
])
def test_flags_are_checked(flags, message, capsys):
    with pytest.raises(SystemExit):
        ex.main([*TINY, *flags])
    assert message in capsys.readouterr().err
