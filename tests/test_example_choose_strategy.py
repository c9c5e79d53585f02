"""examples/choose_strategy.py runs as a user runs it (a fresh process, one small
size): a cost table and the choice, the summary, and the comparison with
the unsharded run last; exit 0."""
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_choose_strategy_example_runs_and_matches_the_unsharded_run(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JLOCALMAP_CACHE_DIR=str(tmp_path))
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "choose_strategy.py"), "--tokens", "64",
         "--d-model", "8", "--d-ff", "32", "--choose", "cost"],
        capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for name in ("tensor-parallel", "seq-parallel-ring", "fsdp"):
        assert f" {name} " in out, out  # its row of the cost table
    assert out.count("chosen: ") == 1 and "tokens  cost model picks" in out, out
    last = out.strip().splitlines()[-1]
    assert last.startswith("max |sharded - unsharded| = "), last
    assert float(last.split("= ")[1].split()[0]) < 1e-4, last
