"""Steps/s of the CIFAR fast path: data and augmentation on the devices, k steps per call.

    python -m benchmarks.cifar_fast --model resnet56 --batch-size 128 --steps-per-call 100

A CIFAR-10-shaped training set (50,000 random uint8 32x32x3 images; the speed
does not depend on the pixel values) is put on the devices, and the jitted
``lax.scan`` of ``--steps-per-call`` train steps of train.py's
``device_data=True`` path runs ``--calls`` times after a warm-up call. Prints
steps/s, images/s and the projected time of the paper's 64k-step schedule,
then one JSON line. Needs jax, flax and optax only.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

import numpy as np

from benchmarks import throughput


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet56")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=throughput.DTYPES)
    p.add_argument("--steps-per-call", type=int, default=100)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--train-size", type=int, default=50_000)
    throughput.add_cpu_flags(p)
    throughput.add_materialize_flag(p)
    p.add_argument(
        "--compilation-cache-dir",
        default=os.path.expanduser("~/.cache/resnet_jax/jax_compilation_cache"),
    )
    a = p.parse_args(argv)
    throughput.configure_cpu(a)
    throughput.enable_compilation_cache(a.compilation_cache_dir)
    import jax
    import jax.numpy as jnp

    from resnet_jax import device_data, train_lib

    _, state, repl, shard = throughput.setup(
        a.model,
        a.batch_size,
        a.dtype,
        32,
        num_classes=10,
        materialize=throughput.MATERIALIZE[a.materialize],
    )
    rng = np.random.default_rng(0)
    data = device_data.put_on_devices(
        rng.integers(0, 256, (a.train_size, 32, 32, 3), dtype=np.uint8),
        rng.integers(0, 10, a.train_size).astype(np.int32),
        np.full((32, 32, 3), 0.5, np.float32),
        repl,
    )
    step_fn = functools.partial(
        train_lib.train_step, learning_rate_fn=lambda s: 0.1, num_classes=10
    )
    batch_fn = functools.partial(device_data.batch_at, seed=0, batch_size=a.batch_size)
    k = a.steps_per_call
    multi = jax.jit(
        device_data.make_multi_step(step_fn, batch_fn, k, shard),
        in_shardings=(repl, repl, None),
        out_shardings=(repl, repl),
        donate_argnums=0,
    )
    t0 = time.perf_counter()
    compiled = multi.lower(state, data, jnp.int32(0)).compile()
    compile_s = time.perf_counter() - t0
    state, m = compiled(state, data, jnp.int32(0))
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for c in range(a.calls):
        state, m = compiled(state, data, jnp.int32(k * (c + 1)))
    jax.block_until_ready(m)
    dt = time.perf_counter() - t0
    sps = k * a.calls / dt
    r = {
        "model": a.model,
        "batch_size": a.batch_size,
        "dtype": a.dtype,
        "steps_per_call": k,
        "materialize": a.materialize,
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "steps_per_sec": sps,
        "images_per_sec": sps * a.batch_size,
        "paper_schedule_64k_minutes": 64_000 / sps / 60,
        "compile_seconds": compile_s,
        "final_loss_finite": bool(np.isfinite(np.asarray(m["loss"])).all()),
    }
    print(
        f"{a.model} fast path, batch {a.batch_size}, {a.dtype}, {r['devices']} x "
        f"{r['device_kind']}: {sps:.2f} steps/s, {r['images_per_sec']:.0f} images/s, "
        f"64k steps in {r['paper_schedule_64k_minutes']:.1f} min (compile {compile_s:.1f} s)"
    )
    print(json.dumps(r))
    return r


if __name__ == "__main__":
    main()
