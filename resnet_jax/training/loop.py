"""The training loop, as small parts: a :class:`MetricWindow`, periodic actions
(:class:`LogAction`, :class:`EvalAction`, :class:`CheckpointAction`) and the
loop itself (:func:`train_and_evaluate`), over an :class:`Experiment`."""

from __future__ import annotations

import logging
import time
from typing import Any

import jax
import numpy as np

from resnet_jax.errors import NonFiniteError
from resnet_jax.training import finetune, runtime
from resnet_jax.training.experiment import (
    Experiment,
    build_experiment,
    open_checkpointer,
    restore_or_init,
)
from resnet_jax.training.steps import TrainState

log = logging.getLogger(__name__)


class MetricWindow:
    """Training metrics since the last log line.

    Step metrics stay on the devices until :meth:`drain` fetches them, so the
    loop never waits for a step to finish between logs. The sums are part of
    the checkpoint's meta, so log lines do not depend on restarts.
    """

    def __init__(self, sums: dict[str, float] | None = None, skip_nonfinite: bool = False):
        self.sums = dict(sums or self._empty())
        self.skip_nonfinite = skip_nonfinite
        self._pending: list[tuple[int, Any]] = []
        self.restart_clock()

    @staticmethod
    def _empty() -> dict[str, float]:
        return {"loss": 0.0, "accuracy": 0.0, "steps": 0, "skipped": 0}

    def restart_clock(self) -> None:
        self.t0 = time.perf_counter()
        self.images = 0
        self.data_wait = 0.0
        self.excluded = 0.0

    def exclude(self, seconds: float, images: int = 0) -> None:
        """Takes time that is not training (evaluation, the first step's
        compilation) and its images out of the window's images/s."""
        self.excluded += seconds
        self.images -= images

    def add(self, end_step: int, metrics: Any, images: int) -> None:
        """Queues the device metrics of the call that ended at ``end_step``."""
        self._pending.append((end_step, metrics))
        self.images += images

    def drain(self) -> int | None:
        """Fetches queued metrics into the sums. Returns the first non-finite
        step (None if all were finite, or they are skipped and counted)."""
        pending, self._pending = self._pending, []
        for step, m in _per_step(pending):
            if m["finite"] < 1.0:
                if not self.skip_nonfinite:
                    return step
                self.sums["skipped"] += 1
                continue
            self.sums["loss"] += m["loss"]
            self.sums["accuracy"] += m["accuracy"]
            self.sums["steps"] += 1
        return None

    def line(self) -> dict[str, float]:
        """The log line of the window (call after :meth:`drain`); resets the sums."""
        dt = max(time.perf_counter() - self.t0 - self.excluded, 1e-9)
        n, out = self.sums["steps"], {}
        if n:  # all steps of the window may have been skipped
            out = {"train_loss": self.sums["loss"] / n, "train_accuracy": self.sums["accuracy"] / n}
        if self.images > 0:  # else only the first (compiling) call: no speed to report
            out |= {"images_per_sec": self.images / dt, "data_wait_fraction": self.data_wait / dt}
        else:
            dt = 0.0
        if self.sums["skipped"]:
            out["skipped_steps"] = self.sums["skipped"]
        self.sums = self._empty()
        self.seconds, self.images_done = dt, self.images
        self.restart_clock()
        return out


def _per_step(pending: list[tuple[int, Any]]) -> list[tuple[int, dict[str, float]]]:
    """Per-step host metrics; an entry of k stacked steps ends at its step."""
    out = []
    for end, m in jax.device_get(pending):
        k = int(np.size(m["loss"]))
        for i in range(k):
            out.append((end - k + 1 + i, {n: float(np.reshape(v, -1)[i]) for n, v in m.items()}))
    return out


class PeriodicAction:
    """Runs at every multiple of ``every`` steps and at the last step (in the
    style of ``clu.periodic_actions``, for a loop whose step may advance by
    ``steps_per_call`` at a time)."""

    def __init__(self, every: int, last: int):
        self.every, self.last = int(every), int(last)

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.last


class LogAction(PeriodicAction):
    """Writes the window's line (loss, accuracy, learning rate, images/s, host memory)."""

    def __init__(self, every, last, window, writer, lr_fn, bar, on_nonfinite):
        super().__init__(every, last)
        self.window, self.writer, self.lr_fn, self.bar = window, writer, lr_fn, bar
        self.on_nonfinite = on_nonfinite
        self.train_seconds = 0.0  # of the logged windows, evaluation excluded
        self.train_images = 0

    def __call__(self, step: int) -> None:
        bad = self.window.drain()
        if bad is not None:
            self.on_nonfinite(bad)
        line = self.window.line()
        self.train_seconds += self.window.seconds
        self.train_images += self.window.images_done
        line |= {"learning_rate": float(self.lr_fn(step - 1)), "host_rss_mb": runtime.host_rss_mb()}
        self.writer.write(step, line)
        if self.bar is not None:
            loss = line.get("train_loss", float("nan"))
            self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{line.get('images_per_sec', 0):.0f}")


class EvalAction(PeriodicAction):
    """One exact pass over the eval split; keeps the latest metrics."""

    def __init__(self, every, last, exp: Experiment, writer):
        super().__init__(every, last)
        self.exp, self.writer = exp, writer
        self.latest: dict[str, float] = {}

    def __call__(self, step: int, state: TrainState) -> None:
        self.latest = self.exp.evaluate(state)
        self.writer.write(step, self.latest)


class CheckpointAction(PeriodicAction):
    """Saves the state and the window (never a state after a non-finite step)."""

    def __init__(self, every, last, exp: Experiment, ckpt, window: MetricWindow, on_nonfinite):
        super().__init__(every, last)
        self.exp, self.checkpointer = exp, ckpt
        self.window, self.on_nonfinite = window, on_nonfinite
        self.last_good = ckpt.latest_step()
        self.saved_step: int | None = None

    def __call__(self, step: int, state: TrainState) -> None:
        bad = self.window.drain()
        if bad is not None:
            self.on_nonfinite(bad)
        meta = {"fingerprint": self.exp.fingerprint, "window": dict(self.window.sums)}
        self.checkpointer.save(step, state, meta)
        self.last_good = self.saved_step = step


# --------------------------------------------------------------------------- #
# The loop
# --------------------------------------------------------------------------- #


def describe_plan(exp: Experiment, start_step: int) -> str:
    """One line: model, data, schedule, workdir, fresh or resumed."""
    c, info = exp.config, exp.pipeline.info
    fresh = "fresh start" if start_step == 0 else f"resuming from step {start_step}"
    if start_step >= c.num_train_steps:
        fresh = f"already finished at step {start_step}: evaluating only"
    return (
        f"{c.model} ({c.dtype}) on {c.dataset}: {info.train_size:,} train / {info.eval_size:,} "
        f"eval examples, {c.num_train_steps:,} steps of batch {c.batch_size} "
        f"(~{c.num_train_steps * c.batch_size / info.train_size:.1f} epochs); workdir "
        f"{exp.workdir} ({fresh})."
    )


def train_and_evaluate(config: Any, workdir: str, progress: bool = True) -> dict[str, Any]:
    """Trains ``config`` in ``workdir``, resuming from its newest checkpoint.

    Writes ``metrics.jsonl``, TensorBoard events and ``checkpoints/``.
    Returns the final summary (eval metrics, wall time, images/s).

    Raises:
      UserError: a bad config, dataset or workdir (before anything is
        written), a workdir in use by another run, a checkpoint of another
        experiment, or a checkpoint that could not be saved.
      NonFiniteError: a non-finite loss or gradient (nothing is saved after it).
    """
    t_start = time.time()
    exp = build_experiment(config, workdir)  # a bad config or dataset stops here
    # A bad init_from stops here too, before the workdir is written.
    finetune.check_init_from(exp.config, exp.workdir, exp.model, exp.abstract_state)
    with runtime.WorkdirLock(workdir, enabled=jax.process_index() == 0):
        ckpt = open_checkpointer(exp)
        try:
            state, meta = restore_or_init(exp, ckpt)
            start_step = int(jax.device_get(state.step))
            log.info("Plan: %s", describe_plan(exp, start_step))
            loop = _Loop(exp, ckpt, meta, start_step, progress)
            try:
                loop.run(state)
            finally:
                loop.close()
        finally:
            ckpt.close()
    return loop.summary(time.time() - t_start)


class _Loop:
    """The training loop of :func:`train_and_evaluate` and its bookkeeping."""

    def __init__(self, exp, ckpt, meta: dict | None, start_step: int, progress: bool):
        c = exp.config
        is_main = jax.process_index() == 0
        self.exp, self.start_step, self.step = exp, start_step, start_step
        self.writer = runtime.MetricWriter(
            exp.workdir, start_step if meta is not None else None, enabled=is_main
        )
        self.window = MetricWindow((meta or {}).get("window"), bool(c.skip_nonfinite_steps))
        self.bar = (
            runtime.progress_bar(c.num_train_steps, start_step) if progress and is_main else None
        )
        last = int(c.num_train_steps)
        self.log = LogAction(
            c.log_every_steps,
            last,
            self.window,
            self.writer,
            exp.learning_rate_fn,
            self.bar,
            self._nonfinite,
        )
        self.eval = EvalAction(c.eval_every_steps, last, exp, self.writer)
        self.ckpt = CheckpointAction(
            c.checkpoint_every_steps, last, exp, ckpt, self.window, self._nonfinite
        )
        self.preempt = runtime.PreemptionFlag()
        self.stopped_by_signal = False
        self.first_step_seconds: float | None = None  # compilation, pipeline start-up
        self.eval_seconds = 0.0

    def _nonfinite(self, step: int) -> None:
        good = self.ckpt.last_good
        where = f"step {good} in {self.ckpt.checkpointer.directory}" if good is not None else "none"
        raise NonFiniteError(
            f"Non-finite loss or gradient at step {step}. The last good checkpoint is {where}; "
            "nothing was saved after it. Lower --config.learning_rate, or set "
            "--config.skip_nonfinite_steps=True to skip such steps."
        )

    def run(self, state: TrainState) -> TrainState:
        """Trains from ``self.step`` to ``num_train_steps`` (or a signal)."""
        runner, batch, end = (
            self.exp.runner,
            self.exp.config.batch_size,
            self.exp.config.num_train_steps,
        )
        if self.step < end:  # a finished run (the same command again) reads no batch
            runner.start(self.step, end)
        self.preempt.install()
        while self.step < end:
            t0, wait0 = time.perf_counter(), runner.data_wait
            state, metrics = runner(state, self.step)
            self.step += runner.steps_per_call
            images = batch * runner.steps_per_call
            self.window.add(self.step, metrics, images)
            if self.first_step_seconds is None:
                # Compilation and the pipeline's start-up are not training
                # speed: the first call is timed apart and left out.
                jax.block_until_ready(metrics)
                self.first_step_seconds = time.perf_counter() - t0
                self.window.exclude(self.first_step_seconds, images)
            else:
                self.window.data_wait += runner.data_wait - wait0
            self._periodic(state)
            if self.preempt.reached(self.step // runner.steps_per_call):
                if self.ckpt.saved_step != self.step:
                    self.writer.flush()
                    self.ckpt(self.step, state)
                self.stopped_by_signal = True
                return state
        if not self.eval.latest:
            # Already finished when started (the same command run again):
            # evaluate so that the summary still reports the accuracy.
            self.eval.latest = self.exp.evaluate(state)
        return state

    def _periodic(self, state: TrainState) -> None:
        step = self.step
        if self.log.due(step):
            self.log(step)
        if self.bar is not None:
            self.bar.update(self.exp.runner.steps_per_call)
        if self.eval.due(step):
            jax.block_until_ready(state)  # the steps before it are training time
            t0 = time.perf_counter()
            self.eval(step, state)
            self.eval_seconds += time.perf_counter() - t0
            self.window.exclude(time.perf_counter() - t0)
        if self.ckpt.due(step):
            self.writer.flush()  # every line up to a checkpoint is stored first
            self.ckpt(step, state)

    def close(self) -> None:
        try:
            self.preempt.uninstall()
            if self.bar is not None:
                self.bar.close()
            self.writer.close()
        finally:
            self.exp.runner.close()

    def summary(self, wall: float) -> dict[str, Any]:
        out = {
            "step": self.step,
            "wall_seconds": wall,
            # Logged windows only, without evaluation and the first call; None
            # when no step after the first was logged (a 1-step run).
            "train_images_per_sec": (
                self.log.train_images / self.log.train_seconds if self.log.train_images else None
            ),
            "first_step_seconds": self.first_step_seconds,
            "eval_seconds": self.eval_seconds,
            **self.eval.latest,
        }
        if self.stopped_by_signal:
            out["preempted"] = True
            log.warning(
                "Stopped by a signal at step %d; checkpoint saved. Run the same command to resume.",
                self.step,
            )
        return out


def summary_line(summary: dict[str, Any]) -> str:
    """The one-line end-of-run summary."""
    parts = [f"step {summary['step']}"]
    if "eval_accuracy" in summary:
        parts.append(f"eval accuracy {100 * summary['eval_accuracy']:.2f}%")
        parts.append(
            f"eval loss {summary['eval_loss']:.4f} on {int(summary['eval_count'])} examples"
        )
    if "eval_ema_accuracy" in summary:
        parts.append(f"EMA eval accuracy {100 * summary['eval_ema_accuracy']:.2f}%")
    parts.append(f"wall time {summary['wall_seconds']:.1f} s")
    if summary.get("train_images_per_sec") is not None:
        parts.append(f"{summary['train_images_per_sec']:.0f} train images/s")
    if summary.get("preempted"):
        parts.append("stopped by signal (resumable)")
    return ", ".join(parts)
