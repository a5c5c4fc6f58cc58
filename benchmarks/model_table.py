"""Prints the model table of README.md: parameters and multiply-adds per network.

    python -m benchmarks.model_table

Counts come from jax.eval_shape (parameters) and rj.count_macs (the traced
forward pass); nothing is allocated, so ResNet-1202 is cheap.
"""

import jax
import jax.numpy as jnp

import resnet_jax as rj

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
]


def main() -> None:
    print("| model | options | input | params | multiply-adds |")
    print("|---|---|---|---:|---:|")
    for name, opts in ROWS:
        model = rj.create_model(name, **opts)
        shape = (1, 224, 224, 3) if model.stem == "imagenet" else (1, 32, 32, 3)
        x = jax.ShapeDtypeStruct(shape, jnp.float32)
        v = jax.eval_shape(lambda x, m=model: m.init(jax.random.key(0), x), x)
        params = sum(p.size for p in jax.tree.leaves(v["params"]))
        macs = rj.count_macs(model, shape, variables=v)
        opt = ", ".join(f"{k}={v}" for k, v in opts.items()) or f"shortcut {model.shortcut or '-'}"
        print(f"| {name} | {opt} | {shape[1]}x{shape[2]} | {params:,} | {macs / 1e9:.3g} G |")


if __name__ == "__main__":
    main()
