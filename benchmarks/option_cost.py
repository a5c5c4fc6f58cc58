"""What each option of the modern recipe costs in train-step throughput, on
synthetic data, against the paper's step in the same run.

    python -m benchmarks.option_cost --model resnet20 --batch-size 128
    python -m benchmarks.option_cost --model resnet50 --batch-size 128 --dtype bfloat16

Each option alone (``--options``; the default is all of them): ``ema``
(``ema_decay=0.9999``, every step), ``mixup``, ``cutmix``, ``mixup_cutmix``
(both, switched per batch), ``random_erasing`` (p 0.25), ``accum2`` and
``accum4`` (``grad_accum_steps``), ``lars``, ``lamb``, ``adamw``, and ``all``
(EMA, mixup/CutMix, erasing, LARS and accumulation 2 together). The step is
the trainer's (``experiment.modern_step_options`` from a config with the
option set, ``recipe.create_optimizer``), jitted over every device on a
device-resident uint8 batch; each variant is compiled, warmed up and timed
``--repeats`` times ``--steps`` steps, the paper's step (``baseline``) first.
Records images/s of every variant and its ratio to the baseline. The
host-side augmentations (RandAugment, TrivialAugment) are measured by
``benchmarks.input_pipeline``.
"""

from __future__ import annotations

import functools

from benchmarks import common
from benchmarks.throughput import timed_repeats

VARIANTS = {
    "baseline": {},
    "ema": {"ema_decay": 0.9999},
    "mixup": {"mixup_alpha": 0.2},
    "cutmix": {"cutmix_alpha": 1.0},
    "mixup_cutmix": {"mixup_alpha": 0.2, "cutmix_alpha": 1.0},
    "random_erasing": {"random_erasing": 0.25},
    "accum2": {"grad_accum_steps": 2},
    "accum4": {"grad_accum_steps": 4},
    "lars": {"optimizer": "lars"},
    "lamb": {"optimizer": "lamb"},
    "adamw": {"optimizer": "adamw"},
    "all": {
        "ema_decay": 0.9999,
        "mixup_alpha": 0.2,
        "cutmix_alpha": 1.0,
        "random_erasing": 0.25,
        "optimizer": "lars",
        "grad_accum_steps": 2,
    },
}


def measure(a, name: str, overrides: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import resnet_jax as rj
    from configs.common import base_config
    from resnet_jax.training import experiment, recipe
    from resnet_jax.training import steps as train_steps

    c = base_config()
    c.update(overrides)
    net = rj.create_model(
        a.model,
        dtype=getattr(jnp, a.dtype),
        materialize=common.resolve_materialize(a.materialize),
        conv_general_dilated=recipe.resolve_conv(c, jax.devices()[0].platform),
    )
    size = common.input_size(net, None)
    mesh = recipe.create_mesh()
    repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    lr_fn = lambda s: 0.1  # noqa: E731
    tx = recipe.create_optimizer(c, lr_fn)
    state = recipe.create_train_state(
        net, tx, (size, size, 3), jax.random.key(0), repl, ema=bool(c.ema_decay)
    )
    step = functools.partial(
        train_steps.train_step,
        learning_rate_fn=lr_fn,
        num_classes=net.num_classes,
        mean=(0.5, 0.5, 0.5),
        **experiment.modern_step_options(c, mesh),
    )
    jitted = jax.jit(step, in_shardings=(repl, data), out_shardings=(repl, repl), donate_argnums=0)
    rng = np.random.default_rng(0)
    batch = jax.device_put(
        {
            "image": rng.integers(0, 256, (a.batch_size, size, size, 3), dtype=np.uint8),
            "label": rng.integers(0, net.num_classes, a.batch_size).astype(np.int32),
        },
        data,
    )
    compiled, compile_s, _ = common.compile_timed(jitted, state, batch)
    _, seconds = timed_repeats(
        compiled, state, batch, train=True, warmup=a.warmup, steps=a.steps, repeats=a.repeats
    )
    figures = common.repeat_figures(a.batch_size, a.steps, seconds)
    print(
        f"{name:>15}: {figures['images_per_sec']['median']:8.1f} images/s "
        f"(compiled in {compile_s:.1f} s)",
        flush=True,
    )
    return {"variant": name, "overrides": overrides, "compile_seconds": compile_s, **figures}


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(
        __doc__, model="resnet20", batch_size=128, dtype="float32", steps=10, warmup=2, repeats=3
    )
    p.add_argument(
        "--options",
        default=",".join(k for k in VARIANTS if k != "baseline"),
        help=f"comma-separated variants of {', '.join(VARIANTS)}",
    )
    a = p.parse_args(argv)
    names = [n for n in a.options.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown --options {', '.join(unknown)}; valid: {', '.join(VARIANTS)}")
    common.configure(a)
    rows = [
        measure(a, n, VARIANTS[n]) for n in ["baseline", *[n for n in names if n != "baseline"]]
    ]
    base = rows[0]["images_per_sec"]["median"]
    for r in rows:
        r["relative_to_baseline"] = r["images_per_sec"]["median"] / base
    result = {
        "model": a.model,
        "dtype": a.dtype,
        "batch_size": a.batch_size,
        "materialize": common.resolve_materialize(a.materialize),
        **common.device_info(),
        "steps": a.steps,
        "warmup": a.warmup,
        "variants": rows,
    }
    return common.record(result, a.results, benchmark="option_cost", argv=argv)


if __name__ == "__main__":
    main()
