"""The degradation experiment and Table 6: plain and residual nets over depths and seeds.

    python -m experiments.sweep --dataset digits --depths 8,20,56 --seeds 0,1,2 \\
        --root runs/sweep_digits --cpu-devices 2
    python -m experiments.sweep --dataset cifar10 --depths 20,32,44,56,110 --seeds 0,1,2 \\
        --root runs/sweep_cifar10

Every run trains in its own workdir ``ROOT/{kind}{depth}_seed{seed}`` through
``resnet_jax.training.loop.train_and_evaluate``, in this process (one JAX start-up
and compilation cache for the whole sweep), with the paper's recipe:

* ``cifar10`` (and ``cifar100``): configs/cifar10.py, 64k steps of batch 128,
  learning rate 0.1 divided by 10 at 32k and 48k; at depth >= 110 the paper's
  warm-up (learning rate 0.01 for the first 400 steps).
* ``digits``: configs/digits.py, the same recipe on a shorter schedule (1,200
  steps of batch 64, divided by 10 at 600 and 900), evaluated every 50 steps so
  that the test curves have as many points as the training curves.

``--steps N`` shortens the schedule further (learning-rate boundaries and
warm-up scaled by N over the recipe's steps, intervals capped at N);
``--config.KEY=VALUE`` overrides any key as with train.py (not the model, seed
or dataset, which the sweep sets). On a GPU or TPU, training uses the
on-device fast path (``device_data=True``, ``steps_per_call`` K = the largest
divisor of the intervals, up to 100). On CPU devices it uses the host input
pipeline: measured on digits (ResNet-20, 2 cores), both paths train at the
same ~38 steps/s, but the fast path's K steps are unrolled there and took
~50 s to compile per run against ~4 s (and its seed is part of the compiled
program, so every run compiles anew). ``--config.device_data=True`` or
``False`` decides instead (K up to 10 on CPU devices).

Re-running the same command resumes unfinished runs from their newest
checkpoint and skips finished ones (evaluated and saved at
``num_train_steps``) without building or training anything. A run that ends is
analysed from its final checkpoint: the training error as the paper defines it
(eval mode, on the whole unaugmented training set), written to
``RUN/result.json``. A failed run is reported on one line (its traceback in
``RUN/error.log``) and the sweep goes on (``--stop-on-error`` stops it); a
signal (Ctrl-C, SIGTERM) saves the current run's checkpoint and stops the
sweep. At the end the sweep writes ``ROOT/table6.md`` and ``ROOT/table6.json``
(:mod:`experiments.table6`) and, with ``--figures``, ``ROOT/fig6.png`` and
``ROOT/fig7.png`` (:mod:`experiments.plot_curves`, :mod:`experiments.responses`).
Exit status: 0 when every run is finished, 1 when one failed or the sweep was
stopped, 2 for a mistake in the command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from etils import epath

from experiments import runs, table6
from resnet_jax import launch
from resnet_jax.errors import UserError, one_line

DATASETS = ("digits", "cifar10", "cifar100")
DEFAULT_DEPTHS = {"digits": "8,20,56", "cifar10": "20,32,44,56,110", "cifar100": "20,32,44,56,110"}
INTERVALS = ("num_train_steps", "log_every_steps", "eval_every_steps", "checkpoint_every_steps")
# Section 4.2: ResNet-110 starts at learning rate 0.01 "until the training error
# is below 80% (about 400 iterations)"; here a fixed count, so resumes are exact.
WARMUP_DEPTH, WARMUP_STEPS = 110, 400
# Largest steps_per_call: XLA:CPU unrolls the K steps (compile time grows with K).
MAX_STEPS_PER_CALL = {"cpu": 10}
MAX_STEPS_PER_CALL_ACCELERATOR = 100
# Keys that may differ between the run's first start and a resume without
# changing what it computes (the fast path's batches depend on the step only).
RESUME_FREE_KEYS = (
    "keep_checkpoints",
    "data_dir",
    "steps_per_call",
    "eval_batch_size",
    "materialize",
)
SWEEP_KEYS = ("--config.model", "--config.seed", "--config.dataset")


# --------------------------------------------------------------------------- #
# The plan: one config per run
# --------------------------------------------------------------------------- #


def recipe(dataset: str, depth: int) -> Any:
    """The paper's recipe for ``dataset`` at ``depth`` (see the module docstring)."""
    if dataset == "digits":
        from configs import digits

        c = digits.get_config()
        c.eval_every_steps = c.log_every_steps
    elif dataset in ("cifar10", "cifar100"):
        from configs import cifar10

        c = cifar10.get_config()
        c.dataset = dataset
        if depth >= WARMUP_DEPTH:
            c.warmup_steps = WARMUP_STEPS
    else:
        raise UserError(f"Unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}.")
    return c


def shorten(config: Any, steps: int) -> Any:
    """``config`` on ``steps`` steps (in place): boundaries and warm-up scaled by
    ``steps / num_train_steps``, the log, eval and checkpoint intervals capped at ``steps``."""
    if steps <= 0:
        raise UserError(f"--steps={steps} must be positive.")
    ratio = steps / config.num_train_steps
    config.lr_boundaries = tuple(sorted({max(1, round(b * ratio)) for b in config.lr_boundaries}))
    config.warmup_steps = round(config.warmup_steps * ratio)
    for key in INTERVALS[1:]:
        config[key] = min(int(config[key]), steps)
    config.num_train_steps = steps
    return config


def steps_per_call(config: Any, platform: str) -> int:
    """The largest K dividing every interval, up to the platform's limit."""
    g = math.gcd(*(int(config[k]) for k in INTERVALS))
    cap = MAX_STEPS_PER_CALL.get(platform, MAX_STEPS_PER_CALL_ACCELERATOR)
    return max(d for d in range(1, min(g, cap) + 1) if g % d == 0)


@dataclasses.dataclass
class PlannedRun:
    """One run of the sweep: its network, seed, workdir and complete config."""

    kind: str
    depth: int
    seed: int
    workdir: str
    config: Any

    @property
    def label(self) -> str:
        return f"{runs.model_name(self.kind, self.depth)} seed {self.seed}"

    @property
    def steps(self) -> int:
        return int(self.config.num_train_steps)


def run_config(
    dataset: str,
    kind: str,
    depth: int,
    seed: int,
    *,
    steps: int,
    overrides: Sequence[str],
    platform: str,
) -> Any:
    """The complete config of one run."""
    c = recipe(dataset, depth)
    if steps:
        shorten(c, steps)
    # The fast path where it pays (see the module docstring), unless overridden.
    c.device_data = platform != "cpu"
    runs.apply_overrides(c, overrides)
    c.model, c.seed = runs.model_name(kind, depth), seed
    if c.device_data and not any(o.startswith("--config.steps_per_call") for o in overrides):
        c.steps_per_call = steps_per_call(c, platform)
    return c


def check_config(config: Any, num_devices: int) -> None:
    """Everything train_and_evaluate would refuse, before the sweep starts."""
    from resnet_jax.training import checks

    if int(config.num_train_steps) <= 0:
        raise UserError("The sweep needs num_train_steps > 0 (a schedule in steps).")
    k = int(config.steps_per_call)
    bad = [f"{key}={config[key]}" for key in INTERVALS if config.device_data and config[key] % k]
    if bad:
        raise UserError(
            f"{', '.join(bad)} must be multiples of steps_per_call={k} (the fast path runs K "
            "steps per call); change them or set --config.steps_per_call."
        )
    checks.validate_config(config, num_devices)


def plan(args: argparse.Namespace, overrides: Sequence[str], platform: str, num_devices: int):
    """Every run of the sweep in order (seed by seed, so that a first complete
    set of models finishes early), each config checked."""
    for o in overrides:
        if o.split("=")[0] in SWEEP_KEYS:
            raise UserError(f"{o}: the sweep sets it; use --kinds, --depths, --seeds, --dataset.")
    planned = []
    for seed in args.seeds:
        for depth in args.depths:
            for kind in args.kinds:
                c = run_config(
                    args.dataset,
                    kind,
                    depth,
                    seed,
                    steps=args.steps,
                    overrides=overrides,
                    platform=platform,
                )
                check_config(c, num_devices)
                workdir = os.path.join(args.root, runs.run_name(kind, depth, seed))
                planned.append(PlannedRun(kind, depth, seed, workdir, c))
    return planned


def check_stored_config(run: PlannedRun) -> None:
    """Refuses to resume a run that was started with another config."""
    stored = runs.read_config_dict(run.workdir)
    if stored is None:
        return
    now = json.loads(json.dumps(run.config.to_dict()))
    diff = [
        f"{k}: {stored.get(k)!r} then, {now.get(k)!r} now"
        for k in sorted(set(stored) | set(now))
        if k not in RESUME_FREE_KEYS and stored.get(k) != now.get(k)
    ]
    if diff:
        raise UserError(
            f"{run.workdir} was started with another config ({'; '.join(diff)}). Use another "
            "--root, or the options it was started with."
        )


# --------------------------------------------------------------------------- #
# Running
# --------------------------------------------------------------------------- #


def status(run: PlannedRun) -> tuple[str, int]:
    """``(state, step)``: 'done' (finished and analysed), 'trained' (finished,
    result.json missing), 'partial' (newest checkpoint at ``step``) or 'new'."""
    n = run.steps
    saved = runs.checkpoint_steps(run.workdir)
    final = any(m["step"] == n and "eval_accuracy" in m for m in runs.read_metrics(run.workdir))
    if final and n in saved:
        return ("done" if runs.read_result(run.workdir) else "trained"), n
    return ("partial", saved[-1]) if saved else ("new", 0)


class SweepStopped(Exception):
    """A signal stopped the run in progress (its checkpoint is saved)."""


def train_run(run: PlannedRun, state: str) -> dict[str, Any]:
    """Trains ``run`` to its end (unless it is already trained), then analyses
    it; returns its result (also in ``RUN/result.json``)."""
    from resnet_jax.training import loop

    runs.write_config(run.workdir, run.config)
    summary: dict[str, Any] = {}
    if state != "trained":
        summary = loop.train_and_evaluate(run.config, run.workdir, progress=False)
        if summary.get("preempted"):
            raise SweepStopped(
                f"stopped by a signal during {run.label} at step {summary['step']} (checkpoint "
                "saved); run the same command to resume."
            )
    return finalize(run, summary)


def finalize(run: PlannedRun, summary: dict[str, Any]) -> dict[str, Any]:
    """``RUN/result.json`` from the final checkpoint and ``metrics.jsonl``: test
    error, training error in eval mode on the unaugmented training split, the
    last logged training error, parameters."""
    import jax

    exp, state = runs.restore(run.config, run.workdir)
    step = int(jax.device_get(state.step))
    if step != run.steps:
        raise RuntimeError(f"{run.workdir}: newest checkpoint is step {step}, not {run.steps}.")
    train = runs.train_split_error(exp, state) or {}
    metrics = runs.read_metrics(run.workdir)
    finals = [m for m in metrics if m["step"] == step and "eval_accuracy" in m]
    # A run killed after its last checkpoint but before the line reached the
    # file: the resumed loop evaluates without writing; evaluate here instead.
    final = finals[-1] if finals else exp.evaluate(state)
    logged = [m for m in metrics if "train_accuracy" in m]
    result = {
        "model": run.config.model,
        "kind": run.kind,
        "depth": run.depth,
        "seed": run.seed,
        "dataset": run.config.dataset,
        "step": step,
        "test_error": 1.0 - final["eval_accuracy"],
        "test_loss": final["eval_loss"],
        "test_count": final["eval_count"],
        "train_error_eval_mode": train.get("train_error"),
        "train_loss_eval_mode": train.get("train_loss"),
        "train_count": train.get("train_count"),
        "train_error_logged": 1.0 - logged[-1]["train_accuracy"] if logged else None,
        "params": runs.num_params(state),
        "train_images_per_sec": summary.get("train_images_per_sec"),
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
    }
    runs.write_json(epath.Path(run.workdir) / runs.RESULT_FILE, result)
    return result


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Eta:
    """Time left, from the measured seconds per unit of work (depth x steps) of
    the runs that this sweep has trained so far."""

    def __init__(self):
        self.seconds, self.work = 0.0, 0

    def add(self, seconds: float, work: int) -> None:
        self.seconds += seconds
        self.work += work

    def text(self, remaining_work: int) -> str:
        if not self.work:
            return "ETA after the first run"
        return f"ETA {duration(self.seconds / self.work * remaining_work)}"


def _percent(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def run_sweep(
    planned: Sequence[PlannedRun],
    stop_on_error: bool = False,
    out: Callable[[str], None] = print,
    train: Callable[[PlannedRun, str], dict] = train_run,
) -> Counter:
    """Runs (or resumes, or skips) every planned run in order, one progress
    line each. Returns the counts: trained, skipped, failed, stopped."""
    states = [status(r) for r in planned]
    left = sum(r.depth * (r.steps - step) for r, (_, step) in zip(planned, states))
    eta, counts = Eta(), Counter()
    for i, (run, (state, start)) in enumerate(zip(planned, states), 1):
        head = f"run {i} of {len(planned)}: {run.label}"
        work = run.depth * (run.steps - start)
        if state == "done":
            out(f"{head}: skipped (finished at step {start})")
            counts["skipped"] += 1
            continue
        what = {
            "new": "fresh start",
            "partial": f"resuming from step {start}",
            "trained": "trained; analysing its checkpoint",
        }[state]
        out(f"{head} ({what}), {eta.text(left)}")
        t0 = time.perf_counter()
        try:
            result = train(run, state)
        except SweepStopped as e:
            out(f"{head}: {e}")
            counts["stopped"] += 1
            break
        except Exception as e:  # noqa: BLE001 - reported, and the sweep goes on
            log = epath.Path(run.workdir) / "error.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(traceback.format_exc())
            out(f"{head}: FAILED: {type(e).__name__}: {one_line(str(e))[:300]} (traceback: {log})")
            counts["failed"] += 1
            left -= work
            if stop_on_error:
                out("stopping (--stop-on-error).")
                break
            continue
        seconds = time.perf_counter() - t0
        if work:  # an analysis alone says nothing about training speed
            eta.add(seconds, work)
        left -= work
        counts["trained"] += 1
        out(
            f"{head}: done in {duration(seconds)}: test error "
            f"{_percent(result['test_error'])}, training error "
            f"{_percent(result['train_error_eval_mode'])} (eval mode, unaugmented)"
        )
    return counts


# --------------------------------------------------------------------------- #
# Command line
# --------------------------------------------------------------------------- #


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers"
        ) from None


def _kinds(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    if not kinds or any(k not in runs.KINDS for k in kinds):
        raise argparse.ArgumentTypeError(
            f"{text!r}: kinds are 'plain', 'resnet' and 'preact' (pre-activation ResNets)"
        )
    return kinds


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    own, overrides = runs.split_config_overrides(argv)
    p = launch.ArgumentParser(
        prog="python -m experiments.sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset", choices=DATASETS, default="digits")
    p.add_argument("--depths", type=_int_list, help="depths 6n+2 (default: per dataset)")
    p.add_argument("--seeds", type=_int_list, default=[0, 1, 2])
    p.add_argument("--kinds", type=_kinds, default=["plain", "resnet"], help="plain,resnet,preact")
    p.add_argument("--root", help="directory of the runs (default: runs/sweep_DATASET)")
    p.add_argument("--steps", type=int, default=0, help="shorten the schedule to N steps")
    p.add_argument("--stop-on-error", action="store_true", help="stop at the first failed run")
    p.add_argument(
        "--dry-run", action="store_true", help="print the plan and each run's state; train nothing"
    )
    p.add_argument(
        "--figures",
        action="store_true",
        help="at the end, also write ROOT/fig6.png (experiments.plot_curves) and ROOT/fig7.png "
        "(experiments.responses), with their data",
    )
    launch.add_argparse_flags(p)
    args = p.parse_args(own)
    args.depths = args.depths or _int_list(DEFAULT_DEPTHS[args.dataset])
    args.root = args.root or f"runs/sweep_{args.dataset}"
    return args, overrides


def main(argv: Sequence[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    if not args.dry_run:
        _check_root(args.root)
    launch.start(launch.options_from(args), log_level=None)
    import jax

    planned = plan(args, overrides, jax.default_backend(), jax.device_count())
    for run in planned:
        check_stored_config(run)
    c = planned[0].config
    print(
        f"sweep: {len(planned)} runs of {c.num_train_steps:,} steps on {args.dataset} "
        f"({'fast path, ' + str(c.steps_per_call) + ' steps per call' if c.device_data else 'host input'}; "
        f"{jax.device_count()} {jax.default_backend().upper()} device(s)) under {args.root}",
        flush=True,
    )
    if args.dry_run:
        for i, run in enumerate(planned, 1):
            state, step = status(run)
            print(f"run {i} of {len(planned)}: {run.label}: {state} (step {step})")
        return 0
    counts = run_sweep(planned, args.stop_on_error, out=lambda s: print(s, flush=True))
    md, _ = table6.write(args.root)
    print(
        f"sweep: {counts['trained']} trained, {counts['skipped']} skipped, "
        f"{counts['failed']} failed{', stopped' if counts['stopped'] else ''}; table: {md}",
        flush=True,
    )
    if args.figures and not counts["stopped"]:
        write_figures(args)
    return 1 if counts["failed"] or counts["stopped"] else 0


def _check_root(root: str) -> None:
    """``--root`` must be a directory this process can write (created if missing)."""
    if os.path.exists(root) and not os.path.isdir(root):
        raise UserError(f"--root {root} exists and is not a directory; give a directory.")
    try:
        os.makedirs(root, exist_ok=True)
        probe = os.path.join(root, f".write_test_{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(
            f"--root {root} is not writable ({e.strerror}); choose another --root."
        ) from e


def write_figures(args: argparse.Namespace) -> None:
    """ROOT/fig6.png (curves) and ROOT/fig7.png (responses), each with its data."""
    from experiments import plot_curves, responses

    root = args.root
    plot_curves.main([root, "--out", os.path.join(root, "fig6.png")])
    cache = f"--compilation-cache-dir={args.compilation_cache_dir}"
    responses.main([root, "--out", os.path.join(root, "fig7.png"), cache])


if __name__ == "__main__":
    _args, _ = parse_args(sys.argv[1:])
    launch.setup_logging(_args.verbose, logging.WARNING)
    sys.exit(launch.run("experiments.sweep", main))
