"""Fine-tuning with few labels against training from scratch, on the digits (issue 14).

    python -m experiments.finetune_digits --root runs/finetune_digits
    python -m experiments.finetune_digits --root runs/finetune_digits \\
        --out experiments/results/finetune_digits          # the committed files

1. *pretrain*: the main job's network (configs/digits.py: ResNet-20, 1,200
   steps) on the digits 0-4 (``classes=(0, 1, 2, 3, 4)``), once, in
   ``ROOT/pretrain_0to4``.
2. For every seed and number of labels per class N (``--labels``), on the
   digits 5-9 (configs/finetune.py: relabelled 0..4, the first N training
   examples per class in an order shuffled by the seed, all 180 test images of
   5-9, batch 16, 300 steps), four runs with the same labels, seed and step
   budget, each in ``ROOT/{method}_n{N}_seed{S}``:

   * ``finetune``: every layer from the pretrained network, a new classifier;
   * ``finetune_slow_backbone``: the same with the backbone's learning rate
     ``SLOW_BACKBONE_LR`` (0.1) times the classifier's
     (``backbone_lr_multiplier``);
   * ``linear_probe``: the same with the backbone and its BatchNorm
     statistics frozen (only the new classifier trains);
   * ``scratch``: the same network from a random initialisation.

3. ``OUT/results.json`` (every run's config overrides of its config file,
   accuracy, seed; provenance: command, UTC times, commit, host) and
   ``OUT/results.md`` (the table, generated from the JSON; OUT defaults to ROOT).

Every run, the pretraining included, subtracts the same per-pixel mean: that
of the whole digits training split, all ten classes
(``resnet_jax.data.load_in_memory``). Every run goes through
``resnet_jax.training.loop.train_and_evaluate`` in this process. Running the same command again skips finished runs (they are only
evaluated) and resumes unfinished ones. ``--pretrain-steps`` and ``--steps``
shorten the schedules (as ``experiments.sweep --steps``); ``--config.KEY=VALUE``
overrides a key of every run (not the keys this experiment sets).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from etils import epath

from experiments import runs, sweep
from resnet_jax import launch
from resnet_jax.errors import UserError

PRETRAIN_CLASSES = (0, 1, 2, 3, 4)
FINETUNE_CLASSES = (5, 6, 7, 8, 9)
METHODS = ("finetune", "finetune_slow_backbone", "linear_probe", "scratch")
FINETUNES = ("finetune", "finetune_slow_backbone")  # each compared with scratch per seed
SLOW_BACKBONE_LR = 0.1
PRETRAIN_CONFIG, FINETUNE_CONFIG = "configs/digits.py", "configs/finetune.py"
# Keys this experiment sets per run; an override of one would change its design.
OWN_KEYS = (
    "classes",
    "init_from",
    "seed",
    "train_examples_per_class",
    "train_subset_seed",
    "freeze_backbone",
    "freeze_bn_stats",
    "backbone_lr_multiplier",
    "dataset",
)


# --------------------------------------------------------------------------- #
# The plan: one config per run
# --------------------------------------------------------------------------- #


def _recipe(path: str) -> Any:
    from configs import digits, finetune

    return {PRETRAIN_CONFIG: digits, FINETUNE_CONFIG: finetune}[path].get_config()


def pretrain_config(steps: int, overrides: Sequence[str]) -> Any:
    """The main job's network on the digits 0-4."""
    c = _recipe(PRETRAIN_CONFIG)
    if steps:
        sweep.shorten(c, steps)
    runs.apply_overrides(c, overrides)
    c.classes = PRETRAIN_CLASSES
    return c


def run_config(
    method: str, labels: int, seed: int, pretrain_dir: str, steps: int, overrides: Sequence[str]
) -> Any:
    """One run on the digits 5-9 with ``labels`` examples per class."""
    c = _recipe(FINETUNE_CONFIG)
    if steps:
        sweep.shorten(c, steps)
    runs.apply_overrides(c, overrides)
    c.classes = FINETUNE_CLASSES
    c.train_examples_per_class = labels
    c.seed = c.train_subset_seed = seed  # the seed also draws the labelled examples
    c.init_from = None if method == "scratch" else pretrain_dir
    c.freeze_backbone = c.freeze_bn_stats = method == "linear_probe"
    c.backbone_lr_multiplier = SLOW_BACKBONE_LR if method == "finetune_slow_backbone" else 1.0
    return c


def config_overrides(config: Any, path: str) -> dict[str, Any]:
    """The keys where ``config`` differs from its config file's ``get_config()``,
    and the ones this experiment sets (``seed`` ...) even at their defaults:
    ``python train.py --config PATH --config.KEY=VALUE ...`` for each reproduces it."""
    base, mine = _recipe(path).to_dict(), config.to_dict()
    own = set(OWN_KEYS) - {"dataset"}
    return {k: v for k, v in sorted(mine.items()) if base.get(k) != v or k in own}


def _check_overrides(overrides: Sequence[str]) -> None:
    for o in overrides:
        key = o.split("=")[0].removeprefix("--config.")
        if key in OWN_KEYS:
            raise UserError(f"{o}: this experiment sets {key} itself (see its docstring).")


# --------------------------------------------------------------------------- #
# Running
# --------------------------------------------------------------------------- #


def train(config: Any, workdir: str) -> dict[str, Any]:
    """Trains (or resumes, or only evaluates a finished) run; its summary."""
    from resnet_jax.training import loop

    runs.write_config(workdir, config)
    summary = loop.train_and_evaluate(config, workdir, progress=False)
    if summary.get("preempted"):
        raise UserError(
            f"stopped by a signal in {workdir} at step {summary['step']} (checkpoint saved); "
            "run the same command to go on."
        )
    return summary


def _record(method: str, labels: int, seed: int, workdir: str, config: Any, s: dict) -> dict:
    return {
        "method": method,
        "labels_per_class": labels,
        "seed": seed,
        "workdir": workdir,
        "config": FINETUNE_CONFIG,
        "overrides": config_overrides(config, FINETUNE_CONFIG),
        "eval_accuracy": s["eval_accuracy"],
        "eval_loss": s["eval_loss"],
        "eval_count": int(s["eval_count"]),
        "train_examples": labels * len(FINETUNE_CLASSES),
        "steps": int(s["step"]),
        "wall_seconds": s["wall_seconds"],
    }


def run_all(args: argparse.Namespace, overrides: Sequence[str], out=print) -> dict[str, Any]:
    """Trains the pretrained network, then every (labels, seed, method) run."""
    root = epath.Path(args.root)
    pre_dir = os.fspath(root / "pretrain_0to4")
    pre = pretrain_config(args.pretrain_steps, overrides)
    out(f"finetune_digits: pretraining {pre.model} on digits 0-4 in {pre_dir}")
    s = train(pre, pre_dir)
    pretrain = {
        "workdir": pre_dir,
        "config": PRETRAIN_CONFIG,
        "overrides": config_overrides(pre, PRETRAIN_CONFIG),
        "eval_accuracy": s["eval_accuracy"],
        "eval_count": int(s["eval_count"]),
        "steps": int(s["step"]),
        "wall_seconds": s["wall_seconds"],
    }
    out(f"  digits 0-4: {100 * s['eval_accuracy']:.2f}% on {int(s['eval_count'])} test images")
    records = []
    for seed in args.seeds:
        for labels in args.labels:
            for method in args.methods:
                c = run_config(method, labels, seed, pre_dir, args.steps, overrides)
                workdir = os.fspath(root / f"{method}_n{labels}_seed{seed}")
                s = train(c, workdir)
                records.append(_record(method, labels, seed, workdir, c, s))
                out(
                    f"  {method:>22} n={labels:<3} seed {seed}: "
                    f"{100 * s['eval_accuracy']:.2f}% ({s['wall_seconds']:.0f} s)"
                )
    return {"pretrain": pretrain, "runs": records, "summary": summarize(records)}


# --------------------------------------------------------------------------- #
# Results: summary, provenance, the table
# --------------------------------------------------------------------------- #


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(records: Sequence[dict]) -> list[dict[str, Any]]:
    """Per (labels, method): accuracies over seeds, their mean and std; per
    labels, each fine-tuning method minus scratch paired by seed
    (``{method}_minus_scratch``)."""
    rows = []
    for labels in sorted({r["labels_per_class"] for r in records}):
        by = {
            m: {
                r["seed"]: r["eval_accuracy"]
                for r in records
                if r["labels_per_class"] == labels and r["method"] == m
            }
            for m in METHODS
        }
        row: dict[str, Any] = {"labels_per_class": labels}
        for m, acc in by.items():
            if acc:
                mean, std = mean_std(list(acc.values()))
                row[m] = {
                    "seeds": sorted(acc),
                    "accuracies": [acc[k] for k in sorted(acc)],
                    "mean": mean,
                    "std": std,
                }
        for m in FINETUNES:
            seeds = sorted(set(by[m]) & set(by["scratch"]))
            if seeds:
                mean, std = mean_std([by[m][k] - by["scratch"][k] for k in seeds])
                row[f"{m}_minus_scratch"] = {"seeds": seeds, "mean": mean, "std": std}
        rows.append(row)
    return rows


def _commit() -> str:
    """``git rev-parse HEAD`` of the checkout (read only), or 'unknown'."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def provenance(
    argv: Sequence[str], started: float, finished: float, prog: str = "experiments.finetune_digits"
) -> dict[str, Any]:
    import flax
    import jax
    import optax

    def utc(t):
        return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")

    return {
        "command": " ".join([f"python -m {prog}", *argv]),
        "started": utc(started),
        "finished": utc(finished),
        "wall_seconds": round(finished - started, 1),
        "commit": _commit(),
        "host": socket.gethostname(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}",
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()})",
        "versions": {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__},
    }


def _cell(stats: dict | None, signed: bool = False) -> str:
    if not stats:
        return "n/a"
    sign = "+" if signed else ""
    return f"{100 * stats['mean']:{sign}.1f} ± {100 * stats['std']:.1f}"


def markdown(results: dict[str, Any]) -> str:
    """The table of ``results.json`` as markdown."""
    p, pre = results["provenance"], results["pretrain"]
    seeds = sorted({r["seed"] for r in results["runs"]})
    lines = [
        "# Fine-tuning with few labels (digits 5-9) against training from scratch",
        "",
        f"Test accuracy (%) on the {results['runs'][0]['eval_count'] if results['runs'] else 0} "
        f"test images of the digits 5-9, mean ± sample std over seeds {', '.join(map(str, seeds))} "
        "(each seed draws its own labelled examples, initialisation and data order; the "
        "methods of a seed share its labelled examples and step budget).",
        "",
        f"| labels per class | train examples | fine-tune | fine-tune, backbone lr × "
        f"{SLOW_BACKBONE_LR:g} | linear probe | scratch | fine-tune − scratch | "
        f"backbone lr × {SLOW_BACKBONE_LR:g} − scratch |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["summary"]:
        n = row["labels_per_class"]
        cells = [_cell(row.get(m)) for m in METHODS]
        cells += [_cell(row.get(f"{m}_minus_scratch"), signed=True) for m in FINETUNES]
        lines.append(f"| {n} | {n * len(FINETUNE_CLASSES)} | {' | '.join(cells)} |")
    steps = sorted({r["steps"] for r in results["runs"]})
    lines += [
        "",
        f"- Pretrained network: `{PRETRAIN_CONFIG}` on the digits 0-4 ({pre['steps']} steps), "
        f"{100 * pre['eval_accuracy']:.2f}% on their {pre['eval_count']} test images.",
        f"- Every run: `{FINETUNE_CONFIG}`, {', '.join(map(str, steps))} steps; fine-tune: all layers "
        "from the pretrained network with a new classifier; backbone lr × "
        f"{SLOW_BACKBONE_LR:g}: the same with `backbone_lr_multiplier={SLOW_BACKBONE_LR:g}`; "
        "linear probe: only the new classifier (backbone and BatchNorm statistics frozen); "
        "scratch: random initialisation. Every run subtracts the per-pixel mean of the whole "
        "digits training split (all ten classes), as the pretraining does. Each run's exact "
        "overrides are in results.json.",
        f"- Command: `{p['command']}`",
        f"- Commit {p['commit']}; {p['started']} to {p['finished']} ({p['wall_seconds']:.0f} s); "
        f"host {p['host']} ({p['machine']}; {p['devices']}); jax {p['versions']['jax']}, "
        f"flax {p['versions']['flax']}, optax {p['versions']['optax']}.",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- #
# The command line
# --------------------------------------------------------------------------- #


def _names(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in METHODS]
    if bad or not names:
        raise UserError(f"--methods={text!r}: choose from {', '.join(METHODS)}.")
    return names


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    own, overrides = runs.split_config_overrides(argv)
    parser = launch.ArgumentParser(
        prog="python -m experiments.finetune_digits", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--root", default="runs/finetune_digits", help="the runs' workdirs")
    parser.add_argument("--out", default=None, help="results.json/.md go here (default: ROOT)")
    parser.add_argument("--labels", type=sweep._int_list, default=[5, 10, 25], help="per class")
    parser.add_argument("--seeds", type=sweep._int_list, default=[0, 1, 2])
    parser.add_argument("--methods", type=_names, default=list(METHODS))
    parser.add_argument("--pretrain-steps", type=int, default=0, help="0: the recipe's 1,200")
    parser.add_argument(
        "--steps", type=int, default=0, help="each run's steps; 0: the recipe's 300"
    )
    launch.add_argparse_flags(parser)
    args = parser.parse_args(own)
    _check_overrides(overrides)
    return args, overrides


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, overrides = parse_args(argv)
    launch.setup_logging(args.verbose, logging.WARNING)
    launch.start(launch.options_from(args), log_level=None)
    started = time.time()
    results = run_all(args, overrides, out=lambda s: print(s, flush=True))
    results = {"provenance": provenance(argv, started, time.time()), **results}
    paths = runs.write_results(args.out or args.root, results, markdown(results))
    print(f"finetune_digits: {len(results['runs'])} runs; wrote {' and '.join(paths)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(launch.run("finetune_digits", main))
