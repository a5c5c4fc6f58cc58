#!/usr/bin/env bash
# The GPU measurements that BENCHMARKS.md asks for, in one command.
#
#   bash benchmarks/gpu_checks.sh OUT_DIR [resnet50|cifar|all]
#
# Run from the repository root on a GPU host with jax[cuda], flax, optax, torch
# and torchvision installed (no TensorFlow needed). Each benchmark appends its
# own line, provenance included, to OUT_DIR/gpu.jsonl (benchmarks.common.record)
# and its whole output goes to OUT_DIR/gpu.log; the ResNet-50 profile's
# Perfetto trace goes to OUT_DIR/trace. Copy gpu.jsonl into benchmarks/results/
# (e.g. as benchmarks/results/gpu-h100.jsonl) and run python -m benchmarks.report
# to put the figures into BENCHMARKS.md. "resnet50" takes about 5 minutes on one
# H100 (compiles included), "cifar" about 3 (estimates: not yet run).
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_checks.sh OUT_DIR [resnet50|cifar|all]}
which=${2:-all}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
status=0

run() {
  echo "=== $(date -u +%FT%TZ) $*" | tee -a "$out/gpu.log"
  "$py" -m "$@" --results "$out/gpu.jsonl" 2>&1 | tee -a "$out/gpu.log" || status=1
}

"$py" -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee -a "$out/gpu.log"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$out/gpu.log"
# A tiny convolution first: a CUDA or cuDNN that does not match jaxlib fails
# here, in one clear line, instead of in the middle of a benchmark.
if ! "$py" - <<'PY' 2>&1 | tee -a "$out/gpu.log"; then
import sys
import jax, jax.numpy as jnp
if jax.default_backend() != "gpu":
    sys.exit(f"gpu_checks: JAX runs on {jax.default_backend()}, not a GPU: install jax[cuda12] or jax[cuda13] (docs/accelerators.md).")
try:
    x = jnp.ones((1, 8, 8, 3)); k = jnp.ones((3, 3, 3, 4))
    y = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert float(y.sum()) > 0
except Exception as e:
    sys.exit(f"gpu_checks: a 3x3 convolution fails on the GPU ({type(e).__name__}: {str(e).splitlines()[0][:200]}): the CUDA/cuDNN libraries do not match this jaxlib.")
print("gpu_checks: convolution on", jax.devices()[0].device_kind, "ok")
PY
  echo "gpu_checks: stopped before the benchmarks" >&2
  exit 1
fi

if [[ $which == resnet50 || $which == all ]]; then
  run benchmarks.compare_torch --model resnet50 --batch-size 128 --dtype bfloat16 --steps 100 \
    --warmup 20 --repeats 5
  run benchmarks.throughput --model resnet50 --batch-size 256 --dtype bfloat16 --steps 100 \
    --warmup 20 --repeats 5
  run benchmarks.throughput --model resnet50 --batch-size 128 --dtype bfloat16 --variant v1.5 \
    --repeats 5
  run benchmarks.profile_step --model resnet50 --batch-size 128 --dtype bfloat16 \
    --trace-dir "$out/trace"
  # The modern recipe (issue 22): accumulation's memory, each option's cost.
  run benchmarks.accumulation_memory --model resnet50 --batch-size 256 --accum 1,2,4,8
  run benchmarks.option_cost --model resnet50 --batch-size 128 --dtype bfloat16 --steps 50 \
    --warmup 10 --repeats 3
  # Export (issue 23): the same ResNet-50 weights in JAX, onnxruntime (CUDA provider
  # where installed), torch eager and torch.compile (no TensorFlow on the GPU image).
  run benchmarks.inference --runtimes jax,onnxruntime,torch,torch_compile --steps 50 \
    --warmup 10 --repeats 3
fi
if [[ $which == cifar || $which == all ]]; then
  run benchmarks.compare_torch --model resnet56 --batch-size 128 --dtype bfloat16 --steps 100 \
    --warmup 20 --repeats 5
  run benchmarks.cifar_fast --model resnet56 --batch-size 128 --steps-per-call 200 --repeats 5
  run benchmarks.cifar_fast --model resnet56 --batch-size 128 --steps-per-call 200 --repeats 5 \
    --dtype bfloat16
fi
exit $status
