"""Inference latency and throughput of one network's weights in each runtime, in one run.

    python -m benchmarks.inference                      # ResNet-50, 224x224, batch 1 and 32, CPU
    python -m benchmarks.inference --model resnet18 --image-size 64 --batch-sizes 1,4

The weights are torchvision's architecture (seeded random init: no download),
converted with ``rj.weights.from_torchvision``; the same weights run in
``--runtimes`` (default all): ``jax`` (``jax.jit`` of ``module.apply``),
``onnxruntime`` (the file ``resnet_jax.export`` writes, CPUExecutionProvider,
or CUDAExecutionProvider where it is available), ``savedmodel`` (the
SavedModel ``resnet_jax.export`` writes, loaded by TensorFlow; skipped where
TensorFlow is not installed, as on the GPU image), ``torch`` (eager, the
torchvision model) and ``torch_compile`` (``torch.compile`` of it). Every
runtime gets the same float32 NCHW/NHWC batch of normal noise; its logits are
checked against JAX's before it is timed (``max_rel_error`` is recorded).
Each call takes and returns host (numpy) arrays, so on a GPU every runtime's
time includes the transfers; ``where`` records the device or execution
provider each ran on (torch on CUDA where it is available).
Each (runtime, batch) is warmed up with ``--warmup`` calls, then timed
``--repeats`` times ``--steps`` calls; the record holds the median latency
(ms a call) and images/s. A runtime that cannot run here is recorded with its
error, not silently left out.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Any

import numpy as np

from benchmarks import common

RUNTIMES = ("jax", "onnxruntime", "savedmodel", "torch", "torch_compile")


def _timed(call, x, warmup: int, steps: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        call(x)
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            call(x)
        seconds.append(time.perf_counter() - t0)
    return seconds


def _runners(name: str, module, variables, model, size: int, tmp: str) -> tuple[Any, str]:
    """A callable ``x_nhwc -> logits (numpy)`` for runtime ``name``, and where it runs.
    Each takes and returns host arrays: the transfers are in every runtime's time."""
    import jax

    from resnet_jax import export as ex

    if name == "jax":
        f = jax.jit(lambda x: module.apply(variables, x, train=False))
        return (lambda x: np.asarray(f(x))), jax.devices()[0].platform
    if name == "onnxruntime":
        import onnxruntime as ort

        path = os.path.join(tmp, "m.onnx")
        ex.export(module, variables, path, "onnx", image_shape=(size, size, 3))
        providers = [
            p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
            if p in ort.get_available_providers()
        ]  # fmt: skip
        s = ort.InferenceSession(path, providers=providers)
        return (lambda x: s.run(None, {"images": x})[0]), s.get_providers()[0]
    if name == "savedmodel":
        import tensorflow as tf

        path = os.path.join(tmp, "sm")
        ex.export(module, variables, path, "savedmodel", image_shape=(size, size, 3))
        f = tf.saved_model.load(path).signatures["serving_default"]
        where = "gpu" if tf.config.list_physical_devices("GPU") else "cpu"
        return (lambda x: f(images=tf.constant(x))["logits"].numpy()), where
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    m = model.to(device)
    m = m if name == "torch" else torch.compile(m)

    def run(x):
        with torch.inference_mode():
            y = m(torch.from_numpy(x.transpose(0, 3, 1, 2)).to(device))
            return y.cpu().numpy()

    return run, device


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__, model="resnet50", steps=10, warmup=3, repeats=3)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-sizes", default="1,32", help="comma-separated batch sizes")
    p.add_argument(
        "--runtimes", default=",".join(RUNTIMES), help="comma-separated, of " + ",".join(RUNTIMES)
    )
    a = p.parse_args(argv)
    runtimes = [r for r in a.runtimes.split(",") if r]
    bad = [r for r in runtimes if r not in RUNTIMES]
    if bad:
        p.error(f"--runtimes: unknown {','.join(bad)}; valid: {','.join(RUNTIMES)}")
    batches = [int(b) for b in a.batch_sizes.split(",") if b]
    common.configure(a)
    import torch  # before TensorFlow (its protobuf), and the reference weights
    import torchvision

    import resnet_jax as rj

    torch.manual_seed(0)
    model = getattr(torchvision.models, a.model)().eval()
    module, variables = rj.weights.from_torchvision(model.state_dict())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in runtimes:
            try:
                call, where = _runners(name, module, variables, model, a.image_size, tmp)
            except Exception as e:  # recorded: the runtime cannot run here
                rows.append({"runtime": name, "error": f"{type(e).__name__}: {e}"[:300]})
                continue
            for b in batches:
                x = np.random.RandomState(b).normal(size=(b, a.image_size, a.image_size, 3))
                x = x.astype(np.float32)
                try:
                    got = call(x)
                    ref = np.asarray(module.apply(variables, x, train=False))
                    err = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
                    seconds = _timed(call, x, a.warmup, a.steps, a.repeats)
                except Exception as e:  # recorded: the runtime cannot run here
                    rows.append(
                        {"runtime": name, "batch": b, "error": f"{type(e).__name__}: {e}"[:300]}
                    )
                    continue
                per_call = statistics.median(seconds) / a.steps
                rows.append({
                    "runtime": name, "where": where, "batch": b, "latency_ms": 1e3 * per_call,
                    "images_per_sec": b / per_call, "max_rel_error": err,
                    "seconds": seconds,
                })  # fmt: skip
                print(
                    f"{name:14s} batch {b:3d}: {1e3 * per_call:8.2f} ms, {b / per_call:8.1f} img/s, rel err {err:.1e}",
                    flush=True,
                )
    result = {
        "model": a.model, "image_size": a.image_size, "batch_sizes": batches,
        "steps": a.steps, "warmup": a.warmup, "repeats": a.repeats,
        "torch_threads": torch.get_num_threads(), "rows": rows, **common.device_info(),
    }  # fmt: skip
    return common.record(result, a.results, benchmark="inference", argv=argv)


if __name__ == "__main__":
    main()
