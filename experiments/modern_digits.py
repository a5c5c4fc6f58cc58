"""The paper's recipe against the modern options, on the digits (issue 22).

    python -m experiments.modern_digits --root runs/modern_digits
    python -m experiments.modern_digits --root runs/modern_digits \\
        --out experiments/results/modern_digits            # the committed files

Every run is the main job (configs/digits.py: ResNet-20, 1,200 steps of batch
64, learning rate 0.1 divided by 10 at 600 and 900) with one set of options
added (:data:`RECIPES`), for every seed (``--seeds``, default 0, 1, 2), each in
``ROOT/{recipe}_seed{S}``:

* ``paper``: configs/digits.py as it is;
* ``ema``: an EMA of the weights and BatchNorm statistics, decay 0.99 every
  step (a horizon of ~100 steps, 4.5 epochs of the 1,437 training images);
* ``mixup_cutmix``: mixup (alpha 0.2) or CutMix (alpha 1.0), one of them per
  batch with probability 0.5 each (torchvision V2's values);
* ``all``: both of the above with label smoothing 0.1, TrivialAugment-wide and
  random erasing 0.1 (the regularisers of torchvision's V2 recipe on the
  paper's schedule).

A recipe with EMA reports the raw and the EMA network's test accuracy. The
seed draws the initialisation, the data order and every augmentation; the
recipes of one seed share the initialisation. ``OUT/results.json`` (every
run's overrides, accuracies, seed; provenance: command, UTC times, commit,
host) and ``OUT/results.md`` (the table, generated from the JSON; OUT
defaults to ROOT). Running the same command again skips finished runs (they
are only evaluated) and resumes unfinished ones; ``--steps`` shortens the
schedule (as ``experiments.sweep --steps``); ``--config.KEY=VALUE`` overrides
a key of every run (not ``seed`` or a key a recipe sets).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from etils import epath

from experiments import finetune_digits, runs, sweep
from resnet_jax import launch
from resnet_jax.errors import UserError

CONFIG = "configs/digits.py"
_EMA = {"ema_decay": 0.99, "ema_every_steps": 1}
_MIX = {"mixup_alpha": 0.2, "cutmix_alpha": 1.0, "mix_prob": 1.0, "mix_switch_prob": 0.5}
RECIPES: dict[str, dict[str, Any]] = {
    "paper": {},
    "ema": _EMA,
    "mixup_cutmix": _MIX,
    "all": {
        **_EMA,
        **_MIX,
        "label_smoothing": 0.1,
        "auto_augment": "trivialaugment",
        "random_erasing": 0.1,
    },
}
OWN_KEYS = ("seed", *sorted({k for r in RECIPES.values() for k in r}))


def run_config(recipe: str, seed: int, steps: int, overrides: Sequence[str]) -> Any:
    from configs import digits

    c = digits.get_config()
    if steps:
        sweep.shorten(c, steps)
    runs.apply_overrides(c, overrides)
    c.update(RECIPES[recipe])
    c.seed = seed
    return c


def _check_overrides(overrides: Sequence[str]) -> None:
    for o in overrides:
        key = o.split("=")[0].removeprefix("--config.")
        if key in OWN_KEYS:
            raise UserError(f"{o}: this experiment sets {key} itself (see its docstring).")


def run_all(args: argparse.Namespace, overrides: Sequence[str], out=print) -> dict[str, Any]:
    """Every (seed, recipe) run; the records and their summary."""
    from configs import digits

    base = digits.get_config().to_dict()
    root = epath.Path(args.root)
    records = []
    for seed in args.seeds:
        for recipe in args.recipes:
            c = run_config(recipe, seed, args.steps, overrides)
            workdir = os.fspath(root / f"{recipe}_seed{seed}")
            s = finetune_digits.train(c, workdir)
            mine = c.to_dict()
            record = {
                "recipe": recipe,
                "seed": seed,
                "workdir": workdir,
                "config": CONFIG,
                # What differs from configs/digits.py, and the recipe's keys and the
                # seed even at their defaults: train.py --config.KEY=VALUE for each.
                "overrides": {
                    k: v
                    for k, v in sorted(mine.items())
                    if base.get(k) != v or k in RECIPES[recipe] or k == "seed"
                },
                "eval_accuracy": s["eval_accuracy"],
                "eval_loss": s["eval_loss"],
                "eval_count": int(s["eval_count"]),
                "steps": int(s["step"]),
                "wall_seconds": s["wall_seconds"],
            }
            if "eval_ema_accuracy" in s:
                record["eval_ema_accuracy"] = s["eval_ema_accuracy"]
                record["eval_ema_loss"] = s["eval_ema_loss"]
            records.append(record)
            ema = record.get("eval_ema_accuracy")
            out(
                f"  {recipe:>12} seed {seed}: {100 * s['eval_accuracy']:.2f}%"
                + (f", EMA {100 * ema:.2f}%" if ema is not None else "")
                + f" ({s['wall_seconds']:.0f} s)"
            )
    return {"runs": records, "summary": summarize(records)}


def _stats(values: dict[int, float]) -> dict[str, Any]:
    mean, std = finetune_digits.mean_std(list(values.values()))
    return {"seeds": sorted(values), "accuracies": [values[k] for k in sorted(values)]} | {
        "mean": mean,
        "std": std,
    }


def summarize(records: Sequence[dict]) -> list[dict[str, Any]]:
    """Per recipe: the raw (and EMA) test accuracies over seeds, their mean and
    sample std, and the difference from ``paper`` paired by seed."""
    paper = {r["seed"]: r["eval_accuracy"] for r in records if r["recipe"] == "paper"}
    rows = []
    for recipe in RECIPES:
        mine = [r for r in records if r["recipe"] == recipe]
        if not mine:
            continue
        row: dict[str, Any] = {"recipe": recipe}
        row["raw"] = _stats({r["seed"]: r["eval_accuracy"] for r in mine})
        ema = {r["seed"]: r["eval_ema_accuracy"] for r in mine if "eval_ema_accuracy" in r}
        if ema:
            row["ema"] = _stats(ema)
        best = ema or {r["seed"]: r["eval_accuracy"] for r in mine}
        seeds = sorted(set(best) & set(paper))
        if recipe != "paper" and seeds:
            mean, std = finetune_digits.mean_std([best[k] - paper[k] for k in seeds])
            row["minus_paper"] = {
                "seeds": seeds,
                "mean": mean,
                "std": std,
                "of": "ema" if ema else "raw",
            }
        rows.append(row)
    return rows


def _cell(stats: dict | None, signed: bool = False) -> str:
    if not stats:
        return "-"
    sign = "+" if signed else ""
    return f"{100 * stats['mean']:{sign}.2f} ± {100 * stats['std']:.2f}"


def markdown(results: dict[str, Any]) -> str:
    """The table of ``results.json`` as markdown."""
    p = results["provenance"]
    seeds = sorted({r["seed"] for r in results["runs"]})
    count = results["runs"][0]["eval_count"] if results["runs"] else 0
    lines = [
        "# The paper's recipe against the modern options, on the digits",
        "",
        f"Test accuracy (%) on the {count} test images, mean ± sample std over seeds "
        f"{', '.join(map(str, seeds))}; the last column is the EMA network's accuracy "
        "(the raw one where the recipe has no EMA) minus the paper recipe's, paired by seed.",
        "",
        "| recipe | options over configs/digits.py | raw network | EMA network | per seed | "
        "− paper |",
        "|---|---|---:|---:|---|---:|",
    ]
    for row in results["summary"]:
        opts = ", ".join(f"`{k}={v}`" for k, v in RECIPES[row["recipe"]].items()) or "none"
        per_seed = " / ".join(
            f"{100 * a:.2f}" for a in (row.get("ema") or row["raw"])["accuracies"]
        )
        lines.append(
            f"| {row['recipe']} | {opts} | {_cell(row['raw'])} | {_cell(row.get('ema'))} | "
            f"{per_seed} | {_cell(row.get('minus_paper'), signed=True)} |"
        )
    steps = sorted({r["steps"] for r in results["runs"]})
    lines += [
        "",
        f"- Every run: `{CONFIG}` ({', '.join(map(str, steps))} steps) with the options above; "
        "each run's exact overrides are in results.json.",
        f"- Command: `{p['command']}`",
        f"- Commit {p['commit']}; {p['started']} to {p['finished']} ({p['wall_seconds']:.0f} s); "
        f"host {p['host']} ({p['machine']}; {p['devices']}); jax {p['versions']['jax']}, "
        f"flax {p['versions']['flax']}, optax {p['versions']['optax']}.",
        "",
    ]
    return "\n".join(lines)


def _recipes(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in RECIPES]
    if bad or not names:
        raise UserError(f"--recipes={text!r}: choose from {', '.join(RECIPES)}.")
    return names


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    own, overrides = runs.split_config_overrides(argv)
    parser = launch.ArgumentParser(
        prog="python -m experiments.modern_digits", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--root", default="runs/modern_digits", help="the runs' workdirs")
    parser.add_argument("--out", default=None, help="results.json/.md go here (default: ROOT)")
    parser.add_argument("--seeds", type=sweep._int_list, default=[0, 1, 2])
    parser.add_argument("--recipes", type=_recipes, default=list(RECIPES))
    parser.add_argument("--steps", type=int, default=0, help="each run's steps; 0: the recipe's")
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
    prov = finetune_digits.provenance(argv, started, time.time(), prog="experiments.modern_digits")
    results = {"provenance": prov, **results}
    paths = runs.write_results(args.out or args.root, results, markdown(results))
    print(f"modern_digits: {len(results['runs'])} runs; wrote {' and '.join(paths)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(launch.run("modern_digits", main))
