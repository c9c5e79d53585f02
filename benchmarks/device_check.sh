#!/usr/bin/env bash
# One call on a GPU machine, for that machine's jax (0.11 there): the whole suite
# (simulated CPU devices, many workers), the trace-time benchmark and every
# example on 8 simulated CPU devices. The GPU benchmarks are multi_gpu.sh's.
#   run(kind="nvidia-h200", command="bash benchmarks/device_check.sh", timeout_s=600)
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
CPU8="--xla_force_host_platform_device_count=8"
python3 -c "import jax, jaxlib, flax, optax; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'flax', flax.__version__, 'optax', optax.__version__)"
echo "== suite"
JAX_PLATFORMS=cpu timeout 360 python3 -m pytest -p no:cacheprovider -q -n 14 \
    --ignore=tests/test_docs_site.py "$@" 2>&1 | tail -40
echo "== trace_scale"
XLA_FLAGS=$CPU8 JAX_PLATFORMS=cpu timeout 120 python3 benchmarks/trace_scale.py 2>&1 | grep -v "^W1\|^I1"
for ex in examples/*.py; do
  echo "== $ex"
  XLA_FLAGS=$CPU8 JAX_PLATFORMS=cpu timeout 90 python3 "$ex" 2>&1 | tail -3
done
