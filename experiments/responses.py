"""Fig. 7: standard deviations of the 3x3 layers' responses on the test set.

    python -m experiments.responses ROOT --out ROOT/fig7.png [--models plain20,resnet20]
        [--seeds 0] [--config configs/cifar10.py --config.KEY=VALUE ...]

A layer's *response* is the output of the BatchNorm that follows a 3x3
convolution: after BN, before the ReLU and (in a ResNet) before the addition
of the shortcut, as in the paper. The layers are the CIFAR stem's 3x3
convolution, both 3x3 convolutions of every basic block and the 3x3 of every
bottleneck (not the 7x7 ImageNet stem, nor 1x1 convolutions or projection
shortcuts), in network order. The network runs in eval mode (BatchNorm running
statistics) over the whole evaluation split (the test set for digits and
CIFAR), from each run's newest checkpoint; the standard deviation of a layer is
over every example, position and channel of its output. With several seeds of
a model, each layer's value is the mean over the seeds.

The plot: per layer in network order (top) and sorted by magnitude (bottom),
one line per model (plain dashed, ResNet solid); the data behind it goes to
``OUT`` with ``.json``. A run's config comes from its ``config.json`` (the
sweep writes it); for other workdirs give it as train.py took it (``--config``
and overrides).
"""

from __future__ import annotations

import argparse
import logging
import re
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from etils import epath

from experiments import runs
from resnet_jax import launch
from resnet_jax.errors import UserError

FIGSIZE, DPI = (8.0, 7.0), 100
_CONV = re.compile(r"(stem_conv|conv\d+)")
DEFINITION = (
    "Standard deviation of each 3x3 layer's response: the output of the BatchNorm after the "
    "3x3 convolution (before the ReLU and the shortcut addition), network in eval mode "
    "(running statistics), over every example, position and channel of the evaluation split; "
    "mean over seeds."
)


def response_layers(params: Any) -> list[tuple[str, ...]]:
    """Paths of the BatchNorm modules that follow a 3x3 convolution, in network order.

    ``params``: a ResNet's parameter tree. A convolution ``stem_conv`` is
    followed by ``stem_bn``, ``convK`` by ``bnK`` in the same block.
    """
    from flax import traverse_util

    flat = traverse_util.flatten_dict(params)
    layers = []
    for key, value in flat.items():
        if key[-1] != "kernel" or not _CONV.fullmatch(key[-2]) or tuple(value.shape[:2]) != (3, 3):
            continue
        bn = "stem_bn" if key[-2] == "stem_conv" else "bn" + key[-2][len("conv") :]
        path = (*key[:-2], bn)
        if any(k[: len(path)] == path for k in flat):
            layers.append(path)

    def order(path):  # stem first, then stage, block, layer numbers
        return tuple(int(n) for n in re.findall(r"\d+", "/".join(path)))

    return sorted(layers, key=order)


def _moments_fn(model: Any, layers: Sequence[tuple[str, ...]]):
    """A jitted ``fn(variables, images) -> {layer: (n, mean, m2)}``: per example,
    the element count, mean and sum of squared deviations of each layer's response."""
    import jax
    import jax.numpy as jnp

    wanted = set(layers)

    def keep(module, method_name) -> bool:
        return method_name == "__call__" and tuple(module.scope.path) in wanted

    def fn(variables, images):
        _, state = model.apply(
            variables, images, train=False, capture_intermediates=keep, mutable=["intermediates"]
        )
        out = {}
        for path in layers:
            node = state["intermediates"]
            for name in path:
                node = node[name]
            y = node["__call__"][0].astype(jnp.float32)
            axes = tuple(range(1, y.ndim))
            mean = y.mean(axes)
            m2 = jnp.square(y - mean.reshape(-1, *(1,) * (y.ndim - 1))).sum(axes)
            out["/".join(path)] = (y[0].size, mean, m2)
        return out

    return jax.jit(fn)


def layer_response_std(
    model: Any,
    variables: dict[str, Any],
    batches: Iterable[dict[str, np.ndarray]],
    sharding: Any = None,
) -> dict[str, float]:
    """``{layer: std}`` of every 3x3 layer's response (see the module docstring),
    layers as ``'stage1_block1/bn1'`` in network order.

    Args:
      model: the ResNet; run with ``train=False``.
      variables: ``{'params': ..., 'batch_stats': ...}``.
      batches: ``image`` (B, H, W, C) float32 and optionally ``mask`` (B,):
        examples with mask 0 (padding) are left out.
      sharding: where to put each batch's images (e.g. sharded over ``'data'``).
    """
    import jax

    layers = response_layers(variables["params"])
    fn = _moments_fn(model, layers)
    # Chan et al.'s pairwise update, in float64: (count, mean, M2) per layer.
    totals = {"/".join(p): [0.0, 0.0, 0.0] for p in layers}
    for batch in batches:
        images = batch["image"] if sharding is None else jax.device_put(batch["image"], sharding)
        keep = np.asarray(batch.get("mask", np.ones(len(batch["image"]))), np.float64) > 0
        if not keep.any():
            continue
        for name, (n, mean, m2) in jax.device_get(fn(variables, images)).items():
            mean, m2 = np.asarray(mean, np.float64)[keep], np.asarray(m2, np.float64)[keep]
            nb, mb = float(n) * len(mean), mean.mean()
            m2b = m2.sum() + float(n) * np.square(mean - mb).sum()
            na, ma, m2a = totals[name]
            total = na + nb
            delta = mb - ma
            totals[name] = [total, ma + delta * nb / total, m2a + m2b + delta**2 * na * nb / total]
    return {name: float(np.sqrt(m2 / n)) for name, (n, _, m2) in totals.items() if n}


def run_response_std(run: runs.Run, config: Any) -> dict[str, float]:
    """:func:`layer_response_std` of a run's newest checkpoint on its eval split."""
    exp, state = runs.restore(config, run.workdir)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return layer_response_std(exp.model, variables, exp.pipeline.eval_batches(), exp.data_sharding)


def collect(
    run_list: Sequence[runs.Run],
    config_file: str | None = None,
    overrides: Sequence[str] = (),
    out=print,
) -> list[dict[str, Any]]:
    """Per model: its layers, the std per layer (mean over seeds), per seed, sorted."""
    per_model: dict[tuple[str, int], dict[int, dict[str, float]]] = defaultdict(dict)
    for run in run_list:
        config = runs.run_config(run, config_file, overrides)
        per_model[(run.kind, run.depth)][run.seed] = run_response_std(run, config)
        out(f"{run.workdir}: {len(per_model[(run.kind, run.depth)][run.seed])} layers")
    models = []
    for (kind, depth), by_seed in sorted(
        per_model.items(), key=lambda kv: (runs.KINDS.index(kv[0][0]), kv[0][1])
    ):
        layers = list(next(iter(by_seed.values())))
        std = [statistics.fmean(s[name] for s in by_seed.values()) for name in layers]
        models.append(
            {
                "model": runs.model_name(kind, depth),
                "label": runs.Run("", kind, depth, 0).label,
                "kind": kind,
                "depth": depth,
                "seeds": sorted(by_seed),
                "layers": layers,
                "std": std,
                "std_sorted": sorted(std, reverse=True),
                "std_per_seed": {
                    str(s): [v[n] for n in layers] for s, v in sorted(by_seed.items())
                },
            }
        )
    return models


def plot(models: Sequence[dict[str, Any]], out: str, title: str | None = None) -> None:
    """Top: std per layer index; bottom: sorted by magnitude. PNG of FIGSIZE x DPI pixels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=FIGSIZE, dpi=DPI)
    depths = sorted({m["depth"] for m in models})
    colors = {d: plt.get_cmap("tab10")(i % 10) for i, d in enumerate(depths)}
    for m in models:
        style = dict(
            color=colors[m["depth"]],
            linestyle="--" if m["kind"] == "plain" else "-",
            linewidth=1.3,
            marker=".",
            markersize=4,
            label=f"{m['label']} (n={len(m['seeds'])})",
        )
        x = np.arange(1, len(m["std"]) + 1)
        top.plot(x, m["std"], **style)
        bottom.plot(x, m["std_sorted"], **style)
    top.set_xlabel("layer index (original)")
    bottom.set_xlabel("layer index (sorted by magnitude)")
    for ax in (top, bottom):
        ax.set_ylabel("std")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if models:
            ax.legend(fontsize=7, ncol=2, loc="upper right")
    fig.suptitle(title or "Fig. 7: standard deviations of the 3x3 layers' responses")
    fig.text(
        0.5,
        0.012,
        "After BatchNorm, before ReLU and addition; eval mode, whole test split; "
        "plain nets dashed, ResNets solid.",
        ha="center",
        fontsize=8,
    )
    fig.subplots_adjust(left=0.09, right=0.98, bottom=0.1, top=0.93, hspace=0.3)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    own, overrides = runs.split_config_overrides(argv)
    p = launch.ArgumentParser(
        prog="python -m experiments.responses",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("root", help="a directory of runs (or one run's workdir)")
    p.add_argument("--out", help="the PNG (default: ROOT/fig7.png); its data goes to OUT.json")
    p.add_argument("--models", help="comma-separated models to include, e.g. plain20,resnet110")
    p.add_argument("--seeds", help="comma-separated seeds to include (default: all)")
    p.add_argument("--config", help="config file of runs without config.json (as train.py took it)")
    p.add_argument("--title")
    launch.add_argparse_flags(p)
    return p.parse_args(own), overrides


def main(argv: Sequence[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    run_list = runs.find_runs(args.root)
    if args.models:
        wanted = {m.strip() for m in args.models.split(",")}
        run_list = [r for r in run_list if r.model in wanted]
    if args.seeds:
        seeds = {int(s) for s in args.seeds.split(",")}
        run_list = [r for r in run_list if r.seed in seeds]
    if not run_list:
        raise UserError(f"{args.root} holds no runs to analyse (workdirs named plainN/resnetN).")
    launch.start(launch.options_from(args), log_level=None)
    models = collect(run_list, args.config, overrides)
    out = epath.Path(args.out or epath.Path(args.root) / "fig7.png")
    plot(models, str(out), args.title)
    data = out.with_suffix(".json")
    runs.write_json(data, {"definition": DEFINITION, "models": models})
    print(f"{out} ({len(run_list)} runs, {len(models)} models); data: {data}")
    return 0


if __name__ == "__main__":
    _args, _ = parse_args(sys.argv[1:])
    launch.setup_logging(_args.verbose, logging.WARNING)
    sys.exit(launch.run("experiments.responses", main))
