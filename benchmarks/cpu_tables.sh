#!/usr/bin/env bash
# The CPU measurements behind the tables of BENCHMARKS.md, in one command.
#
#   bash benchmarks/cpu_tables.sh [RESULTS_FILE]
#
# Run from the repository root on a quiet machine (nothing else running), at a
# clean commit. Each benchmark appends its own line, provenance included, to
# RESULTS_FILE (default benchmarks/results/results.jsonl); then
# `python -m benchmarks.report` rewrites the tables. compare_torch needs
# PyTorch (requirements-test.txt); without it those two runs are skipped and
# the others go on.
set -uo pipefail
results=${1:-benchmarks/results/results.jsonl}
py=${PYTHON:-python3}
cache=$(mktemp -d /tmp/resnet_jax_bench_cache.XXXXXX)
export PYTHONUNBUFFERED=1
status=0

run() {
  echo "=== $(date -u +%FT%TZ) $*"
  "$py" -m "$@" --results "$results" || status=1
}

# ResNet-20 against PyTorch: the library before this work (1 device, no
# materialize, YNNPACK) and now (2 devices, materialize, Eigen). ~2 min.
if "$py" -c "import torch" 2>/dev/null; then
  for setting in "0 off ynn" "2 on eigen"; do
    read -r d m c <<<"$setting"
    run benchmarks.compare_torch --model resnet20 --batch-size 128 --steps 10 --repeats 5 \
      --cpu-devices "$d" --materialize "$m" --cpu-conv "$c" --compilation-cache-dir=
  done
else
  echo "=== PyTorch is not installed: compare_torch skipped (pip install torch)"
fi

# Throughput, one change at a time, then the same cold and warm
# (compile cache). ~2 min.
for setting in "0 off ynn" "0 on ynn" "0 on eigen"; do
  read -r d m c <<<"$setting"
  run benchmarks.throughput --model resnet20 --batch-size 128 --steps 10 --warmup 2 --repeats 3 \
    --cpu-devices "$d" --materialize "$m" --cpu-conv "$c" --compilation-cache-dir=
done
for _ in cold warm; do
  run benchmarks.throughput --model resnet20 --batch-size 128 --steps 10 --warmup 2 --repeats 3 \
    --cpu-devices 2 --materialize on --cpu-conv eigen --compilation-cache-dir "$cache"
done
# ResNet-50, batch 32: the training and the inference step. ~1.5 min.
run benchmarks.throughput --model resnet50 --batch-size 32 --steps 2 --warmup 1 --repeats 2 \
  --cpu-devices 2 --compilation-cache-dir=
run benchmarks.throughput --model resnet50 --batch-size 32 --steps 3 --warmup 1 --repeats 3 \
  --mode eval --cpu-devices 2 --compilation-cache-dir=

# Where the time goes (YNNPACK, whose convolutions the trace names), without
# and with materialize. ~0.5 min.
for m in off on; do
  run benchmarks.profile_step --model resnet20 --batch-size 128 --steps 5 --warmup 2 \
    --materialize "$m" --cpu-conv ynn --compilation-cache-dir=
done

# The CIFAR fast path, and the scan rolled against unrolled. ~1 min.
run benchmarks.cifar_fast --model resnet56 --batch-size 128 --steps-per-call 2 --repeats 3 \
  --cpu-devices 2 --compilation-cache-dir=
for u in on off; do
  run benchmarks.cifar_fast --model resnet20 --batch-size 32 --steps-per-call 4 --repeats 2 \
    --unroll "$u" --compilation-cache-dir=
done

# The tf.data pipeline with the train step (~1.5 min), host memory over a
# long run (~2 min), and the model table (~10 s).
run benchmarks.input_pipeline --config configs/cifar10.py --model resnet20 --steps 100 \
  --log-every 25 --config.mock_data=True --config.mock_num_examples=2048 \
  --compilation-cache-dir=
run benchmarks.host_memory --steps 3000 --compilation-cache-dir=

# The modern recipe (issue 22): gradient accumulation's compiled memory for
# ResNet-50 at 224 (shapes only, ~6 min of compiles) and each option's cost
# on ResNet-20 (~3 min).
run benchmarks.accumulation_memory --model resnet50 --batch-size 256 --accum 1,2,4,8 \
  --compilation-cache-dir=
run benchmarks.option_cost --model resnet20 --batch-size 128 --compilation-cache-dir=
run benchmarks.model_table

rm -rf "$cache"
exit $status
