"""Steps/s of the CIFAR fast path: data and augmentation on the devices, k steps per call.

    python -m benchmarks.cifar_fast --model resnet56 --batch-size 128 --steps-per-call 100

A CIFAR-10-shaped training set (``--train-size`` random uint8 32x32x3 images;
the speed does not depend on the pixel values) is put on the devices, and the
jitted ``lax.scan`` of ``--steps-per-call`` train steps of train.py's
``device_data=True`` path runs once to warm up, then ``--repeats`` timed calls.
``--unroll auto`` unrolls the scan on the CPU backend only
(``make_multi_step(unroll=...)``), as train.py does; ``on``/``off`` measure
either way. Records every call's steps/s and images/s, their median and
spread, the projected time of the paper's 64k-step schedule at the median, and
the train state's final step. Needs jax, flax and optax only.
"""

from __future__ import annotations

import functools
import time

import numpy as np

from benchmarks import common


def _multi_step(a, repl, shard, unroll: bool):
    """The jitted k-step function of train.py's device-data path."""
    import jax

    from resnet_jax.data import device as device_data
    from resnet_jax.training import steps as train_steps

    step_fn = functools.partial(
        train_steps.train_step, learning_rate_fn=lambda s: 0.1, num_classes=10
    )
    batch_fn = functools.partial(device_data.batch_at, seed=0, batch_size=a.batch_size)
    multi = device_data.make_multi_step(step_fn, batch_fn, a.steps_per_call, shard, unroll=unroll)
    return jax.jit(
        multi, in_shardings=(repl, repl, None), out_shardings=(repl, repl), donate_argnums=0
    )


def measure(a) -> dict:
    """Runs the benchmark described by the parsed flags ``a`` in this process."""
    import jax
    import jax.numpy as jnp

    from resnet_jax.data import device as device_data

    materialize = common.resolve_materialize(a.materialize)
    unroll = jax.default_backend() == "cpu" if a.unroll == "auto" else a.unroll == "on"
    _, state, repl, shard = common.setup(
        a.model, a.batch_size, a.dtype, materialize=materialize, image_size=32, num_classes=10
    )
    rng = np.random.default_rng(0)
    data = device_data.put_on_devices(
        rng.integers(0, 256, (a.train_size, 32, 32, 3), dtype=np.uint8),
        rng.integers(0, 10, a.train_size).astype(np.int32),
        np.full((32, 32, 3), 0.5, np.float32),
        repl,
    )
    k = a.steps_per_call
    compiled, compile_s, cache = common.compile_timed(
        _multi_step(a, repl, shard, unroll), state, data, jnp.int32(0)
    )
    state, m = compiled(state, data, jnp.int32(0))  # warm-up call
    jax.block_until_ready(m)
    seconds = []
    for c in range(a.repeats):
        t0 = time.perf_counter()
        state, m = compiled(state, data, jnp.int32(k * (c + 1)))
        jax.block_until_ready(m)
        seconds.append(time.perf_counter() - t0)
    fig = common.repeat_figures(a.batch_size, k, seconds)
    steps_per_sec = common.spread([k / s for s in seconds])
    return {
        "model": a.model,
        "batch_size": a.batch_size,
        "dtype": a.dtype,
        "materialize": materialize,
        "cpu_conv": a.cpu_conv,
        **common.device_info(),
        "steps_per_call": k,
        "unroll": unroll,
        "train_size": a.train_size,
        "compile_seconds": compile_s,
        "compile_cache": cache,
        **fig,
        "steps_per_sec": steps_per_sec,
        "paper_schedule_64k_hours": 64_000 / steps_per_sec["median"] / 3600,
        "final_step": int(state.step),
        "final_loss_finite": bool(np.isfinite(np.asarray(m["loss"])).all()),
    }


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__, model="resnet56", batch_size=128, dtype="float32", repeats=3)
    p.add_argument("--steps-per-call", type=int, default=100, help="k: steps per lax.scan call")
    p.add_argument(
        "--unroll",
        default="auto",
        choices=["auto", "on", "off"],
        help="unroll the lax.scan; auto: on for the CPU backend",
    )
    p.add_argument("--train-size", type=int, default=50_000, help="images on the devices")
    a = p.parse_args(argv)
    common.configure(a)
    r = measure(a)
    sps = r["steps_per_sec"]
    print(
        f"{a.model} fast path, batch {a.batch_size}, {a.dtype}, {r['devices']} x "
        f"{r['device_kind']}: {sps['median']:.2f} steps/s ({sps['min']:.2f}-{sps['max']:.2f}, "
        f"{sps['n']} timed calls of {r['steps_per_call']} steps), "
        f"{r['images_per_sec']['median']:.0f} images/s, 64k steps in "
        f"{r['paper_schedule_64k_hours']:.1f} h (compile {r['compile_seconds']:.1f} s)"
    )
    return common.record(r, a.results, benchmark="cifar_fast", argv=argv)


if __name__ == "__main__":
    main()
