"""The README's main example and the microbatch example run as users run them
(a fresh process, small sizes): they print the comparison with the unsharded run
last and exit 0; a failed comparison would exit 1."""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("program, flags", [
    ("tp_mlp.py", ["--steps", "2", "--hidden", "16", "--batch", "8"]),
    ("dp_microbatches.py", ["--microbatches", "2"]),
])
def test_example_runs_and_matches_the_unsharded_run(program, flags):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(ROOT / "examples" / program), *flags],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("max |sharded - unsharded| = "), last
    assert float(last.split("= ")[1].split()[0]) < 1e-4, last
