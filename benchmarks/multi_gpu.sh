#!/usr/bin/env bash
# The whole GPU benchmark run in one call (issues 13, 15 and 16), for 1, 2 or 4+
# GPUs, from a checkout:
#
#   bash benchmarks/multi_gpu.sh                  # every stage for the GPUs present
#   bash benchmarks/multi_gpu.sh harness examples # only these stages
#
# Stages (each skipped when it does not apply to the GPU count):
#   harness   python -m benchmarks, full sizes, TP = all GPUs: MLP (+ sequence-parallel
#             rows: collective matmuls, XLA auto), block, eager, depth (1 GPU only),
#             PyTorch local_map rows (torchrun, NCCL), strategy (the strategy region's choice
#             against the fastest hand-picked alternative)
#   windowed  the MLP rows again with XLA's windowed-einsum flags (2+ GPUs)
#   lhs       the MLP rows again with the latency-hiding scheduler forced on (2+ GPUs)
#   tp2       the MLP rows and PyTorch rows at TP=2 on 2 of the GPUs (4+ GPUs: TP=2 -> TP=4)
#   meshes    the block at (dp=2, tp=2) and (cp=2, tp=2) (4+ GPUs)
#   examples  every examples/*.py on the GPUs (their last line: max |sharded - unsharded|)
#
# Results: $OUT (the device tool's folder) if set, else benchmarks/results/multi_gpu:
# summary.txt (every table), bench.tgz (every JSON, PNG and log; refreshed after each
# stage, so a run cut short still returns what it finished), and for the main harness
# run its results.json and PNGs. At most 8 files, as the device tool returns.
#
# Test it without GPUs: JLM_BENCH_SMALL=1 JLM_BENCH_DEVICES=4 bash benchmarks/multi_gpu.sh
# (8 simulated CPU devices, quick sizes, the stages of that many GPUs).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# NVLink multicast stays off (shared hosts): keep whatever the machine sets, else off.
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}" TORCH_SYMM_MEM_DISABLE_MULTICAST="${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}"
PY="${PYTHON:-python3}"
RESULTS="${OUT:-$PWD/benchmarks/results/multi_gpu}"
WORK="$(mktemp -d /tmp/jlm_bench.XXXXXX)"
mkdir -p "$RESULTS"
START=$SECONDS

if [ -n "${JLM_BENCH_SMALL:-}" ]; then
  NGPU="${JLM_BENCH_DEVICES:-2}"; SIZE=(--quick)
  echo "JLM_BENCH_SMALL: simulated CPU devices, quick sizes, stages of $NGPU GPUs"
else
  NGPU=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU" || true)
  SIZE=()
  [ "$NGPU" -ge 1 ] || { echo "no GPU found (nvidia-smi -L); for a CPU test set JLM_BENCH_SMALL=1"; exit 1; }
  nvidia-smi -L
fi
"$PY" -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
"$PY" -c "import torch; print('torch', torch.__version__)" 2>/dev/null || echo "torch: not importable (PyTorch rows skipped)"
WINDOWED="--xla_gpu_threshold_for_windowed_einsum_mib=0 --xla_gpu_multi_streamed_windowed_einsum=true"
LHS="--xla_gpu_enable_latency_hiding_scheduler=true"

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(harness windowed lhs tp2 meshes examples)

pack() {  # refresh the archive and the summary in the results folder
  tar czf "$RESULTS/bench.tgz" -C "$WORK" . 2>/dev/null
  cat "$WORK"/*.table 2>/dev/null > "$RESULTS/summary.txt"
}

harness() {  # name, extra XLA flags, harness arguments...
  local name=$1 flags=$2; shift 2
  echo "== $name ($((SECONDS - START)) s in): python -m benchmarks ${SIZE[*]} $*${flags:+ with XLA_FLAGS+=$flags}"
  mkdir -p "$WORK/$name"
  XLA_FLAGS="${XLA_FLAGS:-}${flags:+ $flags}" "$PY" -m benchmarks "${SIZE[@]}" --no-progress \
    --label "$name${flags:+ $flags}" --out "$WORK/$name" "$@" > "$WORK/$name/log.txt" 2>&1
  local rc=$?
  { echo "=== $name (exit $rc)${flags:+ XLA_FLAGS+=$flags}"; sed -n '/^row /,$p' "$WORK/$name/log.txt"; } \
    > "$WORK/$name.table"
  cat "$WORK/$name.table"
  [ $rc -eq 0 ] || tail -20 "$WORK/$name/log.txt"
  pack
}

flags_work() {  # XLA refuses unknown flags at start: check before a whole run fails on them
  XLA_FLAGS="${XLA_FLAGS:-} $1" "$PY" -c "import jax; jax.devices()" > "$WORK/flagcheck.txt" 2>&1 \
    || { echo "XLA_FLAGS '$1' refused by this jaxlib: stage skipped"; tail -3 "$WORK/flagcheck.txt"; return 1; }
}

for stage in "${stages[@]}"; do
  case $stage in
    harness)
      if [ "$NGPU" -eq 1 ]; then harness main "" --torch-timeout 300
      else harness main "" --only mlp,block,eager,strategy,torch --tp "$NGPU" --torch-timeout 300; fi
      cp "$WORK/main/results.json" "$WORK/main/"*.png "$RESULTS/" 2>/dev/null ;;
    windowed)
      [ "$NGPU" -ge 2 ] && flags_work "$WINDOWED" && harness windowed "$WINDOWED" --only mlp --tp "$NGPU" ;;
    lhs)
      [ "$NGPU" -ge 2 ] && flags_work "$LHS" && harness lhs "$LHS" --only mlp --tp "$NGPU" ;;
    tp2)
      [ "$NGPU" -ge 4 ] && harness tp2 "" --only mlp,torch --tp 2 --torch-timeout 200 ;;
    meshes)
      if [ "$NGPU" -ge 4 ]; then
        harness mesh-dp2-tp2 "" --only block --block-mesh 2,1,2
        harness mesh-cp2-tp2 "" --only block --block-mesh 1,2,2
      fi ;;
    examples)
      echo "== examples ($((SECONDS - START)) s in)"
      for ex in examples/*.py; do
        case $ex in *multiprocess*) continue ;; esac  # its own processes; tested by the suite
        runs=("")
        [ "$(basename "$ex")" = transformer.py ] && [ "$NGPU" -ge 4 ] && runs=("--mesh 2 1 2" "--mesh 1 2 2" "--mesh 1 2 2 --attention ring")
        for extra in "${runs[@]}"; do
          # shellcheck disable=SC2086
          out=$(timeout 300 "$PY" "$ex" $extra 2>&1); rc=$?
          line="$ex $extra: exit $rc: $(echo "$out" | grep -v '^[WI][0-9]' | tail -1)"
          echo "$line" | tee -a "$WORK/examples.table"
          echo "$out" > "$WORK/example_$(basename "$ex" .py)${extra// /_}.log"
        done
      done
      pack ;;
    *) echo "unknown stage '$stage' (stages: harness windowed lhs tp2 meshes examples)" ;;
  esac
done
pack
echo "== done in $((SECONDS - START)) s; results in $RESULTS: $(ls "$RESULTS" | tr '\n' ' ')"
