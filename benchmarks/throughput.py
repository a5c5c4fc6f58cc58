"""Images/s of the full jitted train step (or eval step) on synthetic data.

    python -m benchmarks.throughput --model resnet50 --batch-size 128 --dtype bfloat16
    python -m benchmarks.throughput --model resnet20 --batch-size 128 --mode eval

Compiles the step (timed; the JSON says whether the persistent compilation
cache was hit), runs ``--warmup`` steps, then ``--repeats`` times ``--steps``
calls of the same step train.py runs: forward, backward, SGD-momentum +
weight-decay update and the BatchNorm statistics update (``--mode train``), or
the inference forward pass (``--mode eval``), on a device-resident synthetic
batch sharded over every device. Records every repeat and their median, min
and max (``benchmarks.common.record``). Needs jax, flax and optax only.
"""

from __future__ import annotations

import functools
import time

from benchmarks import common


def _step_fn(mode: str, net, repl, data):
    import jax

    from resnet_jax.training import steps as train_steps

    if mode == "train":
        return common.jit_train_step(net.num_classes, repl, data)
    return jax.jit(
        functools.partial(train_steps.eval_step, num_classes=net.num_classes),
        in_shardings=(repl, data),
        out_shardings=repl,
    )


def timed_repeats(compiled, state, batch, *, train: bool, warmup: int, steps: int, repeats: int):
    """Runs ``warmup`` steps, then ``repeats`` timed runs of ``steps`` steps.

    Returns ``(state, seconds per repeat)``.
    """
    import jax

    def run(n, state):
        out = None
        for _ in range(n):
            if train:
                state, out = compiled(state, batch)
            else:
                out = compiled(state, batch)
        jax.block_until_ready((state, out))
        return state

    state = run(warmup, state)
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state = run(steps, state)
        seconds.append(time.perf_counter() - t0)
    return state, seconds


def measure(a) -> dict:
    """Runs the benchmark described by the parsed flags ``a`` in this process."""
    materialize = common.resolve_materialize(a.materialize)
    net, state, repl, data = common.setup(
        a.model,
        a.batch_size,
        a.dtype,
        materialize=materialize,
        image_size=a.image_size,
        variant=a.variant,
    )
    batch = common.synthetic_batch(net, a.batch_size, a.image_size, data)
    fn = _step_fn(a.mode, net, repl, data)
    compiled, compile_s, cache = common.compile_timed(fn, state, batch)
    _, seconds = timed_repeats(
        compiled,
        state,
        batch,
        train=a.mode == "train",
        warmup=a.warmup,
        steps=a.steps,
        repeats=a.repeats,
    )
    return {
        "model": a.model,
        "variant": a.variant,
        "mode": a.mode,
        "batch_size": a.batch_size,
        "per_device_batch": a.batch_size // common.device_info()["devices"],
        "image_size": common.input_size(net, a.image_size),
        "dtype": a.dtype,
        "materialize": materialize,
        "cpu_conv": a.cpu_conv,
        **common.device_info(),
        "steps": a.steps,
        "warmup": a.warmup,
        "compile_seconds": compile_s,
        "compile_cache": cache,
        **common.repeat_figures(a.batch_size, a.steps, seconds),
    }


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(
        __doc__, model="resnet50", batch_size=128, dtype="float32", steps=20, warmup=3, repeats=3
    )
    p.add_argument("--mode", default="train", choices=["train", "eval"])
    p.add_argument("--image-size", type=int, default=None, help="default: 224 ImageNet, 32 CIFAR")
    p.add_argument("--variant", default="v1", choices=["v1", "v1.5"])
    a = p.parse_args(argv)
    common.configure(a)
    r = measure(a)
    ms, ips = r["step_ms"], r["images_per_sec"]
    print(
        f"{r['model']} {r['mode']} step, batch {r['batch_size']}, {r['dtype']}, "
        f"{r['devices']} x {r['device_kind']}, materialize={r['materialize']}: "
        f"{ms['median']:.1f} ms/step ({ms['min']:.1f}-{ms['max']:.1f}), "
        f"{ips['median']:.1f} images/s, median of {ips['n']}; "
        f"compile {r['compile_seconds']:.2f} s (cache {r['compile_cache']})"
    )
    return common.record(r, a.results, benchmark="throughput", argv=argv)


if __name__ == "__main__":
    main()
