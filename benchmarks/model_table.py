"""Parameters and multiply-adds per network (docs/models.md#models and BENCHMARKS.md).

    python -m benchmarks.model_table [--models resnet20,resnet50]

Counts come from jax.eval_shape (parameters) and rj.count_macs (the traced
forward pass, one image); nothing is allocated, so ResNet-1202 is cheap.
Prints a markdown table and records every row in one line.
"""

from __future__ import annotations

from benchmarks import common

ROWS = [
    ("resnet18", {}),
    ("resnet34", {}),
    ("resnet50", {}),
    ("resnet50", {"variant": "v1.5"}),
    ("resnet101", {}),
    ("resnet152", {}),
    ("plain18", {}),
    ("plain34", {}),
    ("resnet20", {}),
    ("resnet32", {}),
    ("resnet44", {}),
    ("resnet56", {}),
    ("resnet110", {}),
    ("resnet1202", {}),
    ("plain20", {}),
    ("plain56", {}),
    # The later ResNets (docs/models.md#the-later-resnets).
    ("resnet18d", {}),
    ("resnet34d", {}),
    ("resnet50d", {}),
    ("resnet101d", {}),
    ("resnet152d", {}),
    ("resnext50_32x4d", {}),
    ("resnext101_32x8d", {}),
    ("resnext101_64x4d", {}),
    ("wide_resnet50_2", {}),
    ("wide_resnet101_2", {}),
    ("seresnet50", {}),
    ("seresnet101", {}),
    ("seresnext50_32x4d", {}),
    ("resnetv2_50", {}),
    ("resnetv2_101", {}),
    ("preact_resnet110", {}),
    ("preact_resnet164", {}),
    ("preact_resnet1001", {}),
    ("wrn16_8", {}),
    ("wrn28_10", {}),
]


def count(name: str, options: dict) -> dict:
    """``{"model", "options", "input", "params", "macs"}`` of one network."""
    import jax
    import jax.numpy as jnp

    import resnet_jax as rj

    model = rj.create_model(name, **options)
    shape = (1, 32, 32, 3) if model.stem == "cifar" else (1, 224, 224, 3)
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    v = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    opt = ", ".join(f"{k}={v}" for k, v in options.items()) or f"shortcut {model.shortcut or '-'}"
    return {
        "model": name,
        "options": opt,
        "input": f"{shape[1]}x{shape[2]}",
        "params": sum(p.size for p in jax.tree.leaves(v["params"])),
        "macs": rj.count_macs(model, shape, variables=v),
    }


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--models", default=None, help="comma-separated names (default: the table)")
    a = p.parse_args(argv)
    common.configure(a)
    rows = [(m, {}) for m in a.models.split(",")] if a.models else ROWS
    counted = [count(name, opts) for name, opts in rows]
    print("| model | options | input | params | multiply-adds |")
    print("|---|---|---|---:|---:|")
    for r in counted:
        print(
            f"| {r['model']} | {r['options']} | {r['input']} | {r['params']:,} | "
            f"{r['macs'] / 1e9:.3g} G |"
        )
    result = {"models": ",".join(r["model"] for r in counted), "rows": counted}
    result.update(common.device_info())
    return common.record(result, a.results, benchmark="model_table", argv=argv)


if __name__ == "__main__":
    main()
