"""Images/s of the full jitted train step (or eval step) on synthetic data.

    python -m benchmarks.throughput --model resnet50 --batch-size 128 --dtype bfloat16
    python -m benchmarks.throughput --model resnet20 --batch-size 128 --mode eval

Measures, after compilation and warm-up, ``--steps`` calls of the same step
train.py runs: forward, backward, SGD-momentum + weight-decay update and the
BatchNorm statistics update (``--mode train``), or the inference forward pass
(``--mode eval``), on a device-resident synthetic batch sharded over every
device. Prints a table and, as its last line, one JSON object. Needs jax,
flax and optax only (no TensorFlow).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import time

import numpy as np

DTYPES = ("float32", "bfloat16")
MATERIALIZE = {"auto": None, "on": True, "off": False}
MATERIALIZE_NAMES = {v: k for k, v in MATERIALIZE.items()}


def add_materialize_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--materialize",
        default="auto",
        choices=list(MATERIALIZE),
        help="ResNet(materialize=...): auto = on for the CPU backend (see resnet_jax.materialize)",
    )


def add_cpu_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cpu-devices",
        type=int,
        default=0,
        help="on a CPU host, split it into this many XLA devices (e.g. one per core)",
    )
    p.add_argument(
        "--cpu-conv",
        default="eigen",
        choices=["eigen", "ynn"],
        help="XLA:CPU convolution kernels (resnet_jax.xla_cpu); no effect on GPU/TPU",
    )


def configure_cpu(a: argparse.Namespace) -> None:
    """Applies --cpu-devices/--cpu-conv (must run before JAX starts)."""
    from resnet_jax import xla_cpu

    flags = xla_cpu.configure(a.cpu_devices, a.cpu_conv)
    if flags:
        print(f"XLA_FLAGS={flags}")


def enable_compilation_cache(path: str | None) -> None:
    """Turns on JAX's persistent compilation cache (``''``/None: off)."""
    import jax

    if path:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def setup(
    model: str,
    batch_size: int,
    dtype: str,
    image_size: int | None = None,
    variant: str = "v1",
    num_classes: int | None = None,
    materialize: bool | None = None,
):
    """The benchmarked network and its replicated train state (SGD momentum 0.9 and
    weight decay 1e-4, as the recipes) over every device.

    Returns ``(module, state, replicated_sharding, batch_sharding)``.
    """
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import resnet_jax as rj
    from resnet_jax import train_lib

    options = {"materialize": materialize}
    if num_classes is not None:
        options["num_classes"] = num_classes
    net = rj.create_model(model, variant=variant, dtype=getattr(jnp, dtype), **options)
    size = input_size(net, image_size)
    mesh = train_lib.create_mesh()
    if batch_size % mesh.devices.size:
        raise SystemExit(
            f"--batch-size {batch_size} must divide by the {mesh.devices.size} devices."
        )
    repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))
    state = train_lib.create_train_state(net, tx, (size, size, 3), jax.random.key(0), repl)
    return net, state, repl, data


def input_size(net, image_size: int | None) -> int:
    """``image_size``, else the family's: 224 for ImageNet nets, 32 for CIFAR nets."""
    return image_size or (224 if net.stem == "imagenet" else 32)


def synthetic_batch(net, batch_size: int, image_size: int | None, sharding) -> dict:
    """A fixed random batch (images, labels, mask) for ``net``, sharded over the devices."""
    import jax

    size, num_classes = input_size(net, image_size), net.num_classes
    rng = np.random.default_rng(0)
    return {
        "image": jax.device_put(
            rng.normal(size=(batch_size, size, size, 3)).astype(np.float32), sharding
        ),
        "label": jax.device_put(
            rng.integers(0, num_classes, batch_size).astype(np.int32), sharding
        ),
        "mask": jax.device_put(np.ones((batch_size,), np.float32), sharding),
    }


def jit_train_step(num_classes: int, repl, data):
    """train.py's train step, jitted as the trainer does (state donated)."""
    import jax

    from resnet_jax import train_lib

    return jax.jit(
        functools.partial(
            train_lib.train_step, learning_rate_fn=lambda s: 0.1, num_classes=num_classes
        ),
        in_shardings=(repl, data),
        out_shardings=(repl, repl),
        donate_argnums=0,
    )


def measure(
    model: str = "resnet50",
    batch_size: int = 128,
    dtype: str = "float32",
    mode: str = "train",
    steps: int = 20,
    warmup: int = 3,
    image_size: int | None = None,
    variant: str = "v1",
    materialize: bool | None = None,
) -> dict:
    """Runs the benchmark in this process; returns the result dict."""
    import jax

    from resnet_jax import train_lib

    net, state, repl, data = setup(
        model, batch_size, dtype, image_size, variant, materialize=materialize
    )
    batch = synthetic_batch(net, batch_size, image_size, data)
    if mode == "train":
        fn = jit_train_step(net.num_classes, repl, data)
    else:
        fn = jax.jit(
            functools.partial(train_lib.eval_step, num_classes=net.num_classes),
            in_shardings=(repl, data),
            out_shardings=repl,
        )
    t0 = time.perf_counter()
    compiled = fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0

    def run(n, state):
        out = None
        for _ in range(n):
            if mode == "train":
                state, out = compiled(state, batch)
            else:
                out = compiled(state, batch)
        jax.block_until_ready((state, out))
        return state

    state = run(warmup, state)
    t0 = time.perf_counter()
    state = run(steps, state)
    dt = time.perf_counter() - t0
    dev = jax.devices()[0]
    return {
        "model": model,
        "variant": variant,
        "materialize": MATERIALIZE_NAMES[materialize],
        "mode": mode,
        "batch_size": batch_size,
        "image_size": input_size(net, image_size),
        "dtype": dtype,
        "devices": jax.device_count(),
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "cpu": platform.processor() or platform.machine(),
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "steps": steps,
        "step_ms": 1000 * dt / steps,
        "images_per_sec": batch_size * steps / dt,
        "compile_seconds": compile_s,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--mode", default="train", choices=["train", "eval"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--variant", default="v1", choices=["v1", "v1.5"])
    add_materialize_flag(p)
    p.add_argument(
        "--compilation-cache-dir",
        default=os.path.expanduser("~/.cache/resnet_jax/jax_compilation_cache"),
        help="persistent compilation cache ('' disables it)",
    )
    add_cpu_flags(p)
    a = p.parse_args(argv)
    configure_cpu(a)
    enable_compilation_cache(a.compilation_cache_dir)
    r = measure(
        a.model,
        a.batch_size,
        a.dtype,
        a.mode,
        a.steps,
        a.warmup,
        a.image_size,
        a.variant,
        MATERIALIZE[a.materialize],
    )
    print(
        f"{'model':<10} {'mode':<5} {'batch':>5} {'dtype':<8} {'devices':>7} "
        f"{'step ms':>8} {'images/s':>9} {'compile s':>9}"
    )
    print(
        f"{r['model']:<10} {r['mode']:<5} {r['batch_size']:>5} {r['dtype']:<8} "
        f"{r['devices']:>7} {r['step_ms']:>8.1f} {r['images_per_sec']:>9.1f} "
        f"{r['compile_seconds']:>9.2f}"
    )
    print(json.dumps(r))
    return r


if __name__ == "__main__":
    main()
