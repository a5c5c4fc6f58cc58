"""Fig. 1 / Fig. 6 (CIFAR-10, digits) and Fig. 4 (ImageNet): error against iterations.

    python -m experiments.plot_curves ROOT --out ROOT/fig6.png [--ymax 20]
    python -m experiments.plot_curves ROOT --out ROOT/fig1.png --models plain20,plain56

Plain networks in the left panel, ResNets in the right one (Fig. 4 and 6); or,
when every model drawn is of one kind (``--models plain20,plain56``), Fig. 1's
layout: training error left, test error right. Per depth, the training error
dashed and the test (ImageNet: validation) error bold, each the mean over the
seeds at the steps every seed logged. Read from the runs'
``metrics.jsonl`` under ROOT (any workdirs named or configured as
``plainN``/``resnetN``, e.g. ImageNet plain18/34 against resnet18/34 for Fig. 4).

Which training error: the logged one, ``1 - train_accuracy`` averaged over the
training batches of each logging window, which are augmented and run in train
mode (BatchNorm batch statistics). The paper's training error is on the
training set; where a run has ``result.json`` (the sweep's analysis), an ``x``
at the last step marks that error: eval mode, unaugmented training set.

Writes the PNG (1200 x 450 pixels) and the data behind it beside it
(``OUT`` with ``.csv``: kind, depth, curve, step, error mean and population
standard deviation over seeds in percent, number of seeds). Needs matplotlib; no computation on devices.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from etils import epath

from experiments import runs
from resnet_jax import launch
from resnet_jax.errors import UserError

FIGSIZE, DPI = (12.0, 4.5), 100
DATASET_NAMES = {
    "cifar10": "CIFAR-10",
    "cifar100": "CIFAR-100",
    "imagenet2012": "ImageNet",
    "digits": "digits",
}


def _mean_curve(
    per_seed: Sequence[tuple[list[int], list[float]]],
) -> list[tuple[int, float, float]]:
    """``(step, mean, std)`` in percent at the steps every seed has (population std over seeds)."""
    common = set(per_seed[0][0])
    for steps, _ in per_seed[1:]:
        common &= set(steps)
    values = [dict(zip(steps, errors)) for steps, errors in per_seed]
    out = []
    for step in sorted(common):
        vals = [100.0 * v[step] for v in values]
        out.append((step, statistics.fmean(vals), statistics.pstdev(vals)))
    return out


def _dataset(run: runs.Run, metrics: Sequence[dict], result: dict | None) -> str:
    """The run's dataset: from its config or result, else ImageNet when its
    evaluation reports top-5 (the trainer does so for imagenet2012 only)."""
    config = runs.read_config_dict(run.workdir) or result or {}
    if config.get("dataset"):
        return config["dataset"]
    return "imagenet2012" if any("eval_top5_accuracy" in m for m in metrics) else ""


def curves(run_list: Sequence[runs.Run]) -> dict[tuple[str, int], dict[str, Any]]:
    """Per model (kind, depth): the mean training and test curves over seeds,
    the eval-mode training error at the end (where known), seeds, dataset."""
    groups: dict[tuple[str, int], list[runs.Run]] = defaultdict(list)
    for run in run_list:
        groups[(run.kind, run.depth)].append(run)
    models = {}
    for (kind, depth), members in groups.items():
        train, test, end, datasets = [], [], [], set()
        for run in members:
            metrics = runs.read_metrics(run.workdir)
            for curve, points in (
                (train, runs.train_errors(metrics)),
                (test, runs.eval_errors(metrics)),
            ):
                if points[0]:
                    curve.append(points)
            result = runs.read_result(run.workdir)
            datasets.add(_dataset(run, metrics, result))
            if result and result.get("train_error_eval_mode") is not None:
                end.append((result["step"], 100.0 * result["train_error_eval_mode"]))
        models[(kind, depth)] = {
            "label": members[0].label,
            "seeds": sorted(r.seed for r in members),
            "train": _mean_curve(train) if train else [],
            "test": _mean_curve(test) if test else [],
            "end": (max(s for s, _ in end), statistics.fmean(e for _, e in end)) if end else None,
            "datasets": datasets,
        }
    return models


CSV_COLUMNS = (
    "kind",
    "depth",
    "model",
    "curve",
    "step",
    "error_mean_pct",
    "error_std_pct",
    "seeds",
)


def write_csv(models: dict, path: epath.Path) -> None:
    """One row per point: curve 'train', 'test' or 'train_eval_mode_final'."""
    rows = []
    for (kind, depth), m in sorted(models.items(), key=lambda kv: _order(kv[0])):
        n = len(m["seeds"])
        for curve in ("train", "test"):
            rows += [
                (kind, depth, m["label"], curve, s, f"{e:.4f}", f"{sd:.4f}", n)
                for s, e, sd in m[curve]
            ]
        if m["end"] is not None:
            step, error = m["end"]
            rows.append(
                (kind, depth, m["label"], "train_eval_mode_final", step, f"{error:.4f}", "", n)
            )
    with path.open("w") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(rows)


def _order(model: tuple[str, int]) -> tuple[int, int]:
    return runs.KINDS.index(model[0]), model[1]


def _auto_ymax(models: dict) -> float:
    """Room for the converged part of every curve: 1.2 x the largest median of
    a curve's second half (early, higher errors are clipped, as in the paper)."""
    tails = []
    for m in models.values():
        for curve in ("train", "test"):
            values = [mean for _, mean, _ in m[curve]]
            if values:
                tails.append(statistics.median(values[len(values) // 2 :]))
    return min(100.0, max(1.0, 1.2 * max(tails))) if tails else 100.0


PANELS = {"plain": "plain networks", "resnet": "ResNets", "preact": "pre-activation ResNets"}


def plot(models: dict, out: str, ymax: float | None = None, title: str | None = None) -> None:
    """Draws the panels into ``out`` (PNG, FIGSIZE x DPI pixels per two
    panels): one per kind of network (Fig. 4 and 6), or, when every model is
    of one kind, Fig. 1's two: training error left, test error right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted(set().union(*(m["datasets"] for m in models.values())) - {""})
    imagenet = datasets == ["imagenet2012"]
    name = ", ".join(DATASET_NAMES.get(d, d) for d in datasets) or "runs"
    split = "validation" if imagenet else "test"
    depths = sorted({d for _, d in models})
    colors = {d: plt.get_cmap("tab10")(i % 10) for i, d in enumerate(depths)}
    one_kind = len({k for k, _ in models}) == 1
    if one_kind:
        # Fig. 1's layout: training error left, test error right.
        kind = next(iter(models))[0]
        shown = [(d, m) for (_, d), m in sorted(models.items())]
        panel_list = [
            ("training error", shown, ("train", "end")),
            (f"{split} error", shown, ("test",)),
        ]
    else:
        # One panel per kind that has runs (plain and ResNets always, as Fig. 6 has them).
        kinds = [
            k for k in runs.KINDS if k in ("plain", "resnet") or any(m[0] == k for m in models)
        ]
        panel_list = [
            (
                PANELS[k],
                [(d, m) for (k2, d), m in sorted(models.items()) if k2 == k],
                ("train", "test", "end"),
            )
            for k in kinds
        ]
    width = FIGSIZE[0] * len(panel_list) / 2
    fig, axes = plt.subplots(1, len(panel_list), figsize=(width, FIGSIZE[1]), dpi=DPI, sharey=True)
    top = ymax or _auto_ymax(models)
    for ax, (panel, shown, parts) in zip(axes, panel_list):
        for depth, m in shown:
            c = colors[depth]
            label = f"{m['label']} (n={len(m['seeds'])})"
            if m["train"] and "train" in parts:
                steps, means, _ = zip(*m["train"])
                ax.plot(
                    steps,
                    means,
                    "--",
                    color=c,
                    linewidth=1.0,
                    label=None if "test" in parts else label,
                )
            if m["test"] and "test" in parts:
                steps, means, _ = zip(*m["test"])
                ax.plot(steps, means, "-", color=c, linewidth=2.2, label=label)
            if m["end"] is not None and "end" in parts:
                ax.plot([m["end"][0]], [m["end"][1]], "x", color=c, markersize=8, mew=2)
        if not shown:
            ax.text(0.5, 0.5, "no runs", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.legend(loc="upper right", fontsize=8)
        ax.set_title(panel)
        ax.set_xlabel("iterations")
        ax.set_ylim(0, top)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("error (%)")
    figure = "Fig. 1" if one_kind and kind == "plain" else "Fig. 4" if imagenet else "Fig. 6"
    fig.suptitle(title or f"{figure}: {name}, training (dashed) and {split} (bold) error")
    fig.text(
        0.5,
        0.012,
        "dashed: training error as logged (mean per logging window over augmented batches, "
        f"BatchNorm in train mode); bold: {split} error; mean over seeds (n).\n"
        "x: final training error in eval mode on the whole unaugmented training set "
        "(the paper's definition of training error).",
        ha="center",
        fontsize=7.5,
    )
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.22, top=0.86, wspace=0.06)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = launch.ArgumentParser(
        prog="python -m experiments.plot_curves",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("root", help="a directory of runs (or one run's workdir)")
    p.add_argument("--out", help="the PNG (default: ROOT/fig6.png); its data goes to OUT.csv")
    p.add_argument(
        "--models", help="comma-separated models to draw, e.g. plain20,plain56 for Fig. 1"
    )
    p.add_argument("--ymax", type=float, help="top of the error axis in percent (default: auto)")
    p.add_argument("--title")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    run_list = runs.find_runs(args.root)
    if args.models:
        wanted = {m.strip() for m in args.models.split(",")}
        run_list = [r for r in run_list if r.model in wanted]
    if not run_list:
        raise UserError(
            f"{args.root} holds no runs (workdirs with metrics.jsonl named plainN/resnetN)."
        )
    out = epath.Path(args.out or epath.Path(args.root) / "fig6.png")
    models = curves(run_list)
    plot(models, str(out), args.ymax, args.title)
    data = out.with_suffix(".csv")
    write_csv(models, data)
    print(f"{out} ({len(run_list)} runs, {len(models)} models); data: {data}")
    return 0


if __name__ == "__main__":
    sys.exit(launch.run("experiments.plot_curves", main))
