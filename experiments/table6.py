"""Table 6 of the paper from a sweep's runs: test and training error per model.

    python -m experiments.table6 ROOT

Reads every finished run under ROOT (its ``result.json``, written by
:mod:`experiments.sweep`) and writes ``ROOT/table6.md`` and ``ROOT/table6.json``:
per model (kind and depth), the test error and two training errors, mean ±
standard deviation over seeds, beside the paper's CIFAR-10 test errors.
"""

from __future__ import annotations

import datetime
import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from etils import epath

from experiments import runs
from resnet_jax import launch

# Table 6 of He et al. (2016), CIFAR-10 test error (%) of the ResNets. For
# ResNet-110 the table gives the best of 5 runs, 6.43, and "6.61±0.16" (mean ± std).
PAPER_RESNET_TEST_ERROR = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43, 1202: 7.93}
PAPER_RESNET110_MEAN = "6.61 ± 0.16"

NOTES = (
    "Test error: top-1 error on the evaluation split ({eval_split}) after the last "
    "step, mean ± sample standard deviation (n - 1) over the seeds.",
    "Training error, eval mode: the paper's definition of training error, the error on "
    "the whole training set, unaugmented, with the network in eval mode (BatchNorm running "
    "statistics), from the final checkpoint.",
    "Training error, logged: 1 - train_accuracy of the last logging window of the run, the "
    "mean over the training batches of that window, augmented (random crops) and in train "
    "mode (BatchNorm batch statistics): the dashed curves of fig6.png. Not the paper's "
    "definition; usually higher than the eval-mode error.",
    "Paper: CIFAR-10 test errors of the ResNets from Table 6 of He et al., 2016 (ResNet-110: "
    "best of 5 runs, mean 6.61 ± 0.16). The plain nets have no numbers in the paper: they "
    "appear only as curves in Fig. 6, and reading values off a plot would be approximate, so "
    "none are given here; the Fig. 6 caption says plain-110's error is above 60%. "
    "{dataset_note}",
)


def paper_column(kind: str, depth: int) -> str:
    """The paper's CIFAR-10 test error (%) for the model, or why there is none."""
    if kind == "resnet":
        if depth not in PAPER_RESNET_TEST_ERROR:
            return "n/a (not in Table 6)"
        text = f"{PAPER_RESNET_TEST_ERROR[depth]:.2f}"
        return f"{text} (best; mean {PAPER_RESNET110_MEAN})" if depth == 110 else text
    if kind == "preact":  # He et al. 2016b, a different paper: not Table 6
        return "n/a (pre-activation, not in Table 6)"
    if depth == 110:
        return "> 60 (Fig. 6 caption)"
    return "n/a (Fig. 6 only)"


def _stats(values: Sequence[float | None]) -> dict[str, Any]:
    """``mean``, ``std`` (sample, None for one value) and ``values``, in percent."""
    vals = [100.0 * v for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "values": []}
    std = statistics.stdev(vals) if len(vals) > 1 else None
    return {"mean": statistics.fmean(vals), "std": std, "values": vals}


def collect(root: str) -> tuple[list[dict[str, Any]], list[str]]:
    """``(rows, unfinished)``: one row per model (kind, depth) over its finished
    runs' seeds, and the workdirs of runs without a result yet."""
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    unfinished = []
    for run in runs.find_runs(root):
        result = runs.read_result(run.workdir)
        if result is None:
            unfinished.append(run.workdir)
        else:
            groups[(run.kind, run.depth)].append(result)
    rows = []
    for (kind, depth), results in sorted(
        groups.items(), key=lambda kv: (runs.KINDS.index(kv[0][0]), kv[0][1])
    ):
        results.sort(key=lambda r: r["seed"])
        rows.append(
            {
                "model": runs.model_name(kind, depth),
                "label": runs.Run("", kind, depth, 0).label,
                "kind": kind,
                "depth": depth,
                "dataset": results[0]["dataset"],
                "seeds": [r["seed"] for r in results],
                "steps": sorted({r["step"] for r in results}),
                "params": results[0]["params"],
                "test_error_pct": _stats([r["test_error"] for r in results]),
                "train_error_eval_mode_pct": _stats([r["train_error_eval_mode"] for r in results]),
                "train_error_logged_pct": _stats([r["train_error_logged"] for r in results]),
                "paper_cifar10_test_error_pct": PAPER_RESNET_TEST_ERROR.get(depth)
                if kind == "resnet"
                else None,
                "paper": paper_column(kind, depth),
            }
        )
    return rows, unfinished


def _cell(stats: dict[str, Any]) -> str:
    if stats["mean"] is None:
        return "n/a"
    if stats["std"] is None:
        return f"{stats['mean']:.2f}"
    return f"{stats['mean']:.2f} ± {stats['std']:.2f}"


def _params(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def markdown(rows: Sequence[dict], unfinished: Sequence[str], root: str, written: str) -> str:
    datasets = sorted({r["dataset"] for r in rows}) or ["(none)"]
    name = ", ".join(datasets)
    lines = [
        f"# Table 6: plain and residual networks on {name}",
        "",
        f"{sum(len(r['seeds']) for r in rows)} finished runs under `{root}`, written {written}.",
        "",
        "| model | params | seeds | steps | test error (%) | paper, CIFAR-10 test error (%) "
        "| training error (%), eval mode | training error (%), logged |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {_params(r['params'])} | {len(r['seeds'])} | "
            f"{', '.join(f'{s:,}' for s in r['steps'])} | {_cell(r['test_error_pct'])} | "
            f"{r['paper']} | {_cell(r['train_error_eval_mode_pct'])} | "
            f"{_cell(r['train_error_logged_pct'])} |"
        )
    lines += ["", *(f"* {n}" for n in notes(datasets))]
    if unfinished:
        lines += ["", f"Not finished (left out): {', '.join(sorted(unfinished))}."]
    return "\n".join(lines) + "\n"


def notes(datasets: Sequence[str]) -> list[str]:
    cifar = datasets == ["cifar10"]
    eval_split = {
        "digits": "digits: the stratified 360-image test split",
        "cifar10": "CIFAR-10: the 10,000-image test set",
        "cifar100": "CIFAR-100: the 10,000-image test set",
    }
    dataset_note = (
        ""
        if cifar
        else "These runs are not on CIFAR-10: the paper's column is there for reference, "
        "not for comparison."
    )
    return [
        n.format(
            eval_split="; ".join(eval_split.get(d, d) for d in datasets),
            dataset_note=dataset_note,
        ).strip()
        for n in NOTES
    ]


def write(root: str) -> tuple[str, str]:
    """Writes ``ROOT/table6.md`` and ``ROOT/table6.json``; returns their paths."""
    rows, unfinished = collect(root)
    written = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    path = epath.Path(root)
    md, js = path / "table6.md", path / "table6.json"
    md.write_text(markdown(rows, unfinished, root, written))
    datasets = sorted({r["dataset"] for r in rows})
    runs.write_json(
        js,
        {
            "root": root,
            "written": written,
            "rows": rows,
            "unfinished": sorted(unfinished),
            "notes": notes(datasets),
        },
    )
    return str(md), str(js)


def main(argv: Sequence[str] | None = None) -> int:
    p = launch.ArgumentParser(prog="python -m experiments.table6", description=__doc__)
    p.add_argument("root", help="the sweep's directory of runs")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    md, _ = write(args.root)
    print(epath.Path(md).read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(launch.run("experiments.table6", main))
