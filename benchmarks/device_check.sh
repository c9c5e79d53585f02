#!/usr/bin/env bash
# One call on a GPU machine: the suite on that machine's jax (simulated CPU
# devices), then the examples and the benchmark on its GPUs.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
# Export serialization needs flatbuffers; the machine has no index: carry the
# wheel in .devwheels/ (pip download flatbuffers -d .devwheels).
python3 -c "import flatbuffers" 2>/dev/null || pip install -q --no-index --find-links .devwheels flatbuffers
python3 -m pytest -p no:cacheprovider -q -x "$@" 2>&1 | tail -25
for script in examples/tp_mlp.py examples/dp_microbatches.py benchmarks/eager_vs_jit.py \
    benchmarks/trace_scale.py; do
  echo "== $script (GPUs)"; python3 "$script" 2>&1 | grep -v "^W1\|^I1"
done
