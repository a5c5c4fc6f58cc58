"""The train step's memory with gradient accumulation, from XLA's compiled
memory analysis (no step is run).

    python -m benchmarks.accumulation_memory --model resnet50 --batch-size 256 --accum 1,2,4,8

For each ``k`` in ``--accum``, compiles train.py's train step
(``grad_accum_steps=k``: ``k`` micro-batches of ``batch / k`` in a
``lax.scan``) for the network at ``--image-size`` and records what XLA's
``compiled.memory_analysis()`` reports: temporary bytes (activations and
workspace: what accumulation should shrink), argument, output and alias
bytes. Shapes only: the state is ``jax.eval_shape``'d, so a ResNet-50 at
224x224 needs no memory for its activations here. The figures are those of
the backend it runs on (CPU here; ``benchmarks/gpu_checks.sh`` runs it on a GPU).
"""

from __future__ import annotations

import functools

from benchmarks import common


def analyse(a) -> list[dict]:
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import resnet_jax as rj
    from configs.common import base_config
    from resnet_jax.training import recipe
    from resnet_jax.training import steps as train_steps

    materialize = common.resolve_materialize(a.materialize)
    net = rj.create_model(
        a.model, variant="v1.5", dtype=getattr(jnp, a.dtype), materialize=materialize
    )
    size = common.input_size(net, a.image_size)
    mesh = recipe.create_mesh()
    repl = NamedSharding(mesh, P())
    tx = recipe.create_optimizer(base_config(), lambda step: 0.1)
    state = jax.eval_shape(
        lambda: recipe.create_train_state(net, tx, (size, size, 3), jax.random.key(0), repl)
    )
    batch = {
        "image": jax.ShapeDtypeStruct((a.batch_size, size, size, 3), jnp.uint8),
        "label": jax.ShapeDtypeStruct((a.batch_size,), jnp.int32),
    }
    rows = []
    for k in [int(x) for x in a.accum.split(",")]:
        step = functools.partial(
            train_steps.train_step,
            learning_rate_fn=lambda s: 0.1,
            num_classes=net.num_classes,
            mean=(0.485, 0.456, 0.406),
            grad_accum_steps=k,
            micro_batch_sharding=NamedSharding(mesh, P(None, "data")),
        )
        jitted = jax.jit(step, donate_argnums=0)
        compiled = jitted.lower(state, batch).compile()
        m = compiled.memory_analysis()
        row = {
            "grad_accum_steps": k,
            "micro_batch": a.batch_size // k,
            "temp_bytes": int(m.temp_size_in_bytes),
            "argument_bytes": int(m.argument_size_in_bytes),
            "output_bytes": int(m.output_size_in_bytes),
            "alias_bytes": int(m.alias_size_in_bytes),
        }
        print(
            f"k={k}: micro-batch {row['micro_batch']:>4}, temporary "
            f"{row['temp_bytes'] / 2**30:7.2f} GiB, arguments {row['argument_bytes'] / 2**20:7.1f} MiB",
            flush=True,
        )
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__, model="resnet50", batch_size=256, dtype="float32")
    p.add_argument("--image-size", type=int, default=224, help="input side (default 224)")
    p.add_argument("--accum", default="1,2,4,8", help="comma-separated grad_accum_steps values")
    a = p.parse_args(argv)
    common.configure(a)
    rows = analyse(a)
    result = {
        "model": a.model,
        "variant": "v1.5",
        "dtype": a.dtype,
        "batch_size": a.batch_size,
        "image_size": a.image_size,
        "materialize": common.resolve_materialize(a.materialize),
        **common.device_info(),
        "rows": rows,
        "temp_ratio_to_k1": {
            r["grad_accum_steps"]: r["temp_bytes"] / rows[0]["temp_bytes"] for r in rows
        },
    }
    return common.record(result, a.results, benchmark="accumulation_memory", argv=argv)


if __name__ == "__main__":
    main()
