"""Training: TrainState, the pure train/eval steps, and the training loop.

The steps are jitted once over a 1-D device ``Mesh`` (axis ``'data'``): the
batch is sharded along it, the state replicated, so BatchNorm statistics and
gradients are global by construction. The same code runs on one CPU, every
GPU of a host, or every chip of a multi-host TPU slice.

This module imports TensorFlow only inside :func:`train_and_evaluate` (through
the input pipeline and the TensorBoard writer), so the steps can be reused
where TensorFlow is absent.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import resource
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import resnet_jax as rj

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class TrainState(train_state.TrainState):
    """``step``, ``params``, ``opt_state`` (from Flax) plus ``batch_stats``."""

    batch_stats: Any


# --------------------------------------------------------------------------- #
# Construction from a config
# --------------------------------------------------------------------------- #


def create_model(config: Any, num_classes: int) -> rj.ResNet:
    """The configured network (``config.model`` and its options)."""
    if config.dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {config.dtype!r}; valid: {', '.join(DTYPES)}.")
    options = dict(
        num_classes=num_classes,
        dtype=DTYPES[config.dtype],
        variant=config.get("variant", "v1"),
        zero_init_residual=config.get("zero_init_residual", False),
        bn_momentum=config.get("bn_momentum", 0.9),
        bn_epsilon=config.get("bn_epsilon", 1e-5),
    )
    if config.get("shortcut"):
        options["shortcut"] = config.shortcut
    return rj.create_model(config.model, **options)


def effective_learning_rate(config: Any) -> float:
    """``learning_rate``, scaled by ``batch_size / lr_batch_base`` when that is set."""
    base = config.get("lr_batch_base", 0)
    return config.learning_rate * (config.batch_size / base if base else 1.0)


def create_learning_rate_fn(config: Any) -> optax.Schedule:
    """The configured schedule, in steps.

    ``lr_schedule='step'``: ``learning_rate`` times ``lr_decay_factor`` at
    each of ``lr_boundaries``; the first ``warmup_steps`` use the constant
    ``warmup_learning_rate`` (the paper's ResNet-110 warm-up: 0.01 for ~400
    iterations). ``'cosine'``: linear warm-up over ``warmup_steps`` from 0,
    then cosine decay to 0 at ``num_train_steps``.
    """
    lr = effective_learning_rate(config)
    warmup = int(config.get("warmup_steps", 0))
    if config.lr_schedule == "step":
        main = optax.piecewise_constant_schedule(
            lr, {int(b): float(config.lr_decay_factor) for b in config.lr_boundaries}
        )
        if not warmup:
            return main
        warm_lr = float(config.warmup_learning_rate)
        # Not optax.join_schedules: it restarts the second schedule's step count
        # at the boundary, which would shift the paper's 32k/48k boundaries.
        return lambda step: jnp.where(step < warmup, warm_lr, main(step))
    if config.lr_schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, lr, max(warmup, 1), int(config.num_train_steps), end_value=0.0
        )
    raise ValueError(f"Unknown lr_schedule {config.lr_schedule!r}; valid: 'step', 'cosine'.")


def _decay_mask(params: Any) -> Any:
    """True for convolution and dense kernels; False for BatchNorm scales and biases."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params
    )


def create_optimizer(config: Any, learning_rate_fn: optax.Schedule) -> optax.GradientTransformation:
    """SGD with momentum and L2 weight decay added to the gradient (as in the paper)."""
    mask = _decay_mask if config.get("weight_decay_exclude_bn_bias", False) else None
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask=mask),
        optax.sgd(
            learning_rate_fn, momentum=config.momentum, nesterov=config.get("nesterov", False)
        ),
    )


def create_mesh(devices: Any = None) -> Mesh:
    """A 1-D mesh with axis ``'data'`` over every device of every process."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices.reshape(-1), ("data",))


def create_train_state(
    model: rj.ResNet,
    tx: optax.GradientTransformation,
    image_shape: tuple[int, ...],
    rng: jax.Array,
    sharding: NamedSharding,
) -> TrainState:
    """Initialises the replicated state directly on the devices."""

    def init(rng):
        variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
        return TrainState.create(
            apply_fn=model.apply,
            params=variables["params"],
            batch_stats=variables["batch_stats"],
            tx=tx,
        )

    return jax.jit(init, out_shardings=sharding)(rng)


# --------------------------------------------------------------------------- #
# The steps
# --------------------------------------------------------------------------- #


def cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int, smoothing: float = 0.0):
    """Per-example softmax cross-entropy in float32, with optional label smoothing."""
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if smoothing:
        onehot = optax.smooth_labels(onehot, smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), onehot)


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    learning_rate_fn: Callable[[jax.Array], jax.Array],
    num_classes: int,
    label_smoothing: float = 0.0,
    skip_nonfinite: bool = False,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step on a global batch; returns the new state and scalar metrics.

    Metrics: ``loss`` (mean cross-entropy, without the weight-decay term),
    ``accuracy``, ``learning_rate``, ``finite`` (1.0 when loss and gradients
    are finite). With ``skip_nonfinite`` a non-finite step leaves the state
    unchanged except for the step counter.
    """

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            batch["image"],
            train=True,
            mutable=["batch_stats"],
        )
        loss = cross_entropy(logits, batch["label"], num_classes, label_smoothing).mean()
        return loss, (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    # Finite loss, gradients and updated parameters (a finite gradient times a
    # huge learning rate can still overflow).
    finite = jnp.isfinite(loss) & jnp.all(
        jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves((grads, new_state.params))])
    )
    if skip_nonfinite:
        kept = jax.tree.map(
            lambda new, old: jnp.where(finite, new, old),
            (new_state.params, new_state.batch_stats, new_state.opt_state),
            (state.params, state.batch_stats, state.opt_state),
        )
        new_state = new_state.replace(params=kept[0], batch_stats=kept[1], opt_state=kept[2])
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
        "learning_rate": learning_rate_fn(state.step),
        "finite": finite.astype(jnp.float32),
    }
    return new_state, metrics


def eval_step(state: TrainState, batch: dict[str, jax.Array], *, num_classes: int) -> dict:
    """Masked sums over a batch: ``loss``, ``correct``, ``correct_top5``, ``count``.

    Images of shape (N, K, H, W, C) are K crops per example (10-crop testing):
    their softmax outputs are averaged.
    """
    images = batch["image"]
    crops = images.shape[1] if images.ndim == 5 else 1
    if crops > 1:
        images = images.reshape(-1, *images.shape[2:])
    logits = state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats}, images, train=False
    )
    if crops > 1:
        probs = jax.nn.softmax(logits).reshape(-1, crops, logits.shape[-1]).mean(axis=1)
        logits = jnp.log(probs)
    mask = batch["mask"]
    loss = cross_entropy(logits, batch["label"], num_classes)
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    return {
        "loss": jnp.sum(loss * mask),
        "correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask),
        "correct_top5": jnp.sum(jnp.any(top5 == batch["label"][:, None], axis=-1) * mask),
        "count": jnp.sum(mask),
    }


# --------------------------------------------------------------------------- #
# The loop
# --------------------------------------------------------------------------- #


class PreemptionFlag:
    """Tells the loop when to save and stop.

    One process: set by SIGTERM (a preemption notice) or SIGINT (Ctrl-C; a
    second Ctrl-C interrupts at once). Several processes: JAX's preemption
    service (started by ``jax.distributed.initialize``) catches SIGTERM on any
    host and ``reached_preemption_sync_point`` turns true at the same step on
    every host, so all of them save the same step.
    """

    def __init__(self):
        self._event = threading.Event()
        self._old = {}
        self._multi = jax.process_count() > 1

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        signals = (signal.SIGINT,) if self._multi else (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            self._old[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def _handle(self, signum, frame):
        if self._event.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        log.warning(
            "Received signal %d: saving a checkpoint at the next step, then stopping.", signum
        )
        self._event.set()

    def reached(self, step: int) -> bool:
        if self._multi:
            from jax.experimental import multihost_utils

            try:
                return bool(multihost_utils.reached_preemption_sync_point(step))
            except RuntimeError:  # no preemption service (not started by jax.distributed)
                return False
        return self._event.is_set()


class MetricWriter:
    """Writes ``WORKDIR/metrics.jsonl`` and TensorBoard events (process 0 only)."""

    def __init__(self, workdir: str, resume_step: int | None, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not enabled:
            return
        if resume_step is not None and os.path.exists(self.path):
            # Lines past the restored step are replayed identically by this run.
            with open(self.path) as f:
                keep = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= resume_step]
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(keep)
            os.replace(tmp, self.path)
        elif resume_step is None and os.path.exists(self.path):
            os.replace(self.path, self.path + f".{int(time.time())}.bak")
        from clu import metric_writers

        self._tb = metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard"))
        self._file = open(self.path, "a")

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self._tb.write_scalars(step, metrics)

    def flush(self) -> None:
        if self.enabled:
            self._file.flush()
            self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._tb.close()


def _host_rss_mb() -> float:
    """Current resident memory of this process (peak where /proc is absent)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _fetch(pending: list[tuple[int, dict]]) -> list[tuple[int, dict[str, float]]]:
    """Per-step host metrics; an entry of k stacked steps ends at its step."""
    out = []
    for end, m in jax.device_get(pending):
        k = int(np.size(m["loss"]))
        for i in range(k):
            out.append((end - k + 1 + i, {n: float(np.reshape(v, -1)[i]) for n, v in m.items()}))
    return out


def _host_batch_to_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict:
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }


def evaluate(
    state: TrainState,
    pipeline: Any,
    p_eval_step: Callable,
    sharding: NamedSharding,
    top5: bool = False,
) -> dict[str, float]:
    """One exact pass over the eval split: ``eval_loss``, ``eval_accuracy``,
    ``eval_count`` and, with ``top5``, ``eval_top5_accuracy``."""
    totals = None
    for batch in pipeline.eval_batches():
        sums = p_eval_step(state, _host_batch_to_global(batch, sharding))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    n = float(totals["count"])
    metrics = {
        "eval_loss": float(totals["loss"]) / n,
        "eval_accuracy": float(totals["correct"]) / n,
        "eval_count": n,
    }
    if top5:
        metrics["eval_top5_accuracy"] = float(totals["correct_top5"]) / n
    return metrics


def validate_config(config: Any, num_devices: int) -> None:
    """Refuses a bad config before any work is done, saying what to change."""
    from resnet_jax import data as data_lib

    data_lib.check_dataset(config.dataset)
    create_model(config, 10)  # unknown model names and options raise here
    create_learning_rate_fn(config)
    for key in ("batch_size", "eval_batch_size"):
        if config[key] <= 0 or config[key] % num_devices:
            raise ValueError(
                f"{key}={config[key]} must be positive and divisible by the number of "
                f"devices ({num_devices}) so that every device gets an equal share; use e.g. "
                f"--config.{key}={num_devices * max(1, config[key] // num_devices)}."
            )
    for key in ("num_train_steps", "log_every_steps", "eval_every_steps", "checkpoint_every_steps"):
        if int(config[key]) <= 0:
            raise ValueError(f"{key} must be positive, got {config[key]}.")
    k = int(config.get("steps_per_call", 1))
    if config.get("device_data", False):
        if config.dataset not in data_lib.IN_MEMORY:
            raise ValueError(
                f"device_data=True holds the training set on the devices; it supports "
                f"{', '.join(data_lib.IN_MEMORY)}, not {config.dataset}."
            )
        for key in (
            "num_train_steps",
            "log_every_steps",
            "eval_every_steps",
            "checkpoint_every_steps",
        ):
            if int(config[key]) % k:
                raise ValueError(
                    f"{key}={config[key]} must be a multiple of steps_per_call={k} (the loop "
                    "logs, evaluates and saves between calls)."
                )
    elif k != 1:
        raise ValueError("steps_per_call > 1 needs --config.device_data=True.")


def train_and_evaluate(config: Any, workdir: str, progress: bool = True) -> dict[str, float]:
    """Trains ``config`` in ``workdir``, resuming from its newest checkpoint.

    Writes ``metrics.jsonl``, TensorBoard events and ``checkpoints/``.
    Returns the final summary (eval metrics, wall time, images/s).
    """
    from resnet_jax import checkpoints
    from resnet_jax import data as data_lib

    t_start = time.time()
    workdir = os.path.abspath(workdir)
    mesh = create_mesh()
    validate_config(config, mesh.devices.size)
    os.makedirs(workdir, exist_ok=True)
    replicated = NamedSharding(mesh, P())
    data_sharding = NamedSharding(mesh, P("data"))

    pipeline = data_lib.InputPipeline(config, jax.process_index(), jax.process_count())
    info = pipeline.info
    num_classes = int(config.get("num_classes") or info.num_classes)
    model = create_model(config, num_classes)
    lr_fn = create_learning_rate_fn(config)
    tx = create_optimizer(config, lr_fn)
    rng = jax.random.key(config.seed)

    ckpt = checkpoints.Checkpointer(
        os.path.join(workdir, "checkpoints"), max_to_keep=int(config.get("keep_checkpoints", 3))
    )
    fp = checkpoints.fingerprint(config) | {"num_classes": num_classes}
    abstract = jax.eval_shape(
        lambda r: create_train_state(model, tx, info.image_shape, r, replicated), rng
    )
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract
    )
    restored = ckpt.restore_latest(abstract, fp)
    if restored is None:
        state = create_train_state(model, tx, info.image_shape, rng, replicated)
        meta = {}
        start_step = 0
    else:
        state, meta = restored
        start_step = int(jax.device_get(state.step))
        log.info("Resumed from the checkpoint at step %d.", start_step)

    step_fn = functools.partial(
        train_step,
        learning_rate_fn=lr_fn,
        num_classes=num_classes,
        label_smoothing=float(config.get("label_smoothing", 0.0)),
        skip_nonfinite=bool(config.get("skip_nonfinite_steps", False)),
    )
    steps_per_call = 1
    on_device = bool(config.get("device_data", False))
    if on_device:
        from resnet_jax import device_data

        steps_per_call = int(config.get("steps_per_call", 1))
        data_on_device = device_data.put_on_devices(
            pipeline.train.images, pipeline.train.labels, pipeline.mean, replicated
        )
        batch_fn = functools.partial(
            device_data.batch_at,
            seed=int(config.seed),
            batch_size=int(config.batch_size),
            augment=bool(config.get("augment", True)),
            pad=int(config.get("crop_padding", 4)),
            flip=bool(config.get("random_flip", True)),
        )
        multi_fn = jax.jit(
            device_data.make_multi_step(step_fn, batch_fn, steps_per_call, data_sharding),
            in_shardings=(replicated, replicated, None),
            out_shardings=(replicated, replicated),
            donate_argnums=0,
        )
    else:
        train_fn = jax.jit(
            step_fn,
            in_shardings=(replicated, data_sharding),
            out_shardings=(replicated, replicated),
            donate_argnums=0,
        )
    eval_fn = jax.jit(
        functools.partial(eval_step, num_classes=num_classes),
        in_shardings=(replicated, data_sharding),
        out_shardings=replicated,
    )

    is_main = jax.process_index() == 0
    writer = MetricWriter(workdir, start_step if restored else None, enabled=is_main)
    total_steps = int(config.num_train_steps)
    log_every = int(config.log_every_steps)
    # The running window of training metrics (sums since the last log line);
    # restored from the checkpoint so that log lines do not depend on restarts.
    window = meta.get("window", {"loss": 0.0, "accuracy": 0.0, "steps": 0, "skipped": 0})
    pending: list[tuple[int, Any]] = []
    preempt = PreemptionFlag()
    preempt.install()
    bar = None
    if progress and is_main:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    last_good = ckpt.latest_step()
    t_window = time.time()
    waited = 0.0
    images_seen = 0
    t_train = 0.0
    eval_metrics: dict[str, float] = {}
    step = start_step

    def drain() -> None:
        """Moves fetched per-step metrics into the window; stops on a bad step."""
        nonlocal pending
        for s, m in _fetch(pending):
            if m["finite"] < 1.0:
                if config.get("skip_nonfinite_steps", False):
                    window["skipped"] += 1
                    continue
                raise FloatingPointError(
                    f"Non-finite loss or gradient at step {s}. The last good checkpoint is "
                    + (f"step {last_good} in {ckpt.directory}" if last_good is not None else "none")
                    + "; nothing was saved after it. Lower --config.learning_rate, or set "
                    "--config.skip_nonfinite_steps=True to skip such steps."
                )
            window["loss"] += m["loss"]
            window["accuracy"] += m["accuracy"]
            window["steps"] += 1
        pending = []

    def run_eval() -> dict[str, float]:
        return evaluate(
            state, pipeline, eval_fn, data_sharding, top5=config.dataset == "imagenet2012"
        )

    def save(at_step: int) -> None:
        nonlocal last_good
        drain()  # never write a non-finite state
        ckpt.save(at_step, state, {"fingerprint": fp, "window": dict(window)})
        last_good = at_step

    batches = None if on_device else pipeline.train_batches(start_step)
    stopped_by_signal = False
    try:
        while step < total_steps:
            if on_device:
                state, metrics = multi_fn(state, data_on_device, jnp.int32(step))
            else:
                t0 = time.time()
                batch = next(batches)
                waited += time.time() - t0
                state, metrics = train_fn(state, _host_batch_to_global(batch, data_sharding))
            step += steps_per_call
            pending.append((step, metrics))
            images_seen += config.batch_size * steps_per_call
            if step % log_every == 0 or step == total_steps:
                drain()
                dt = time.time() - t_window
                t_train += dt
                n = window["steps"]
                line = {}
                if n:  # all steps of the window may have been skipped
                    line["train_loss"] = window["loss"] / n
                    line["train_accuracy"] = window["accuracy"] / n
                line |= {
                    "learning_rate": float(lr_fn(step - 1)),
                    "images_per_sec": images_seen / dt,
                    "data_wait_fraction": waited / dt,
                    "host_rss_mb": _host_rss_mb(),
                }
                if window["skipped"]:
                    line["skipped_steps"] = window["skipped"]
                writer.write(step, line)
                if bar is not None:
                    bar.set_postfix(
                        loss=f"{line.get('train_loss', float('nan')):.4f}",
                        img_s=f"{line['images_per_sec']:.0f}",
                    )
                window = {"loss": 0.0, "accuracy": 0.0, "steps": 0, "skipped": 0}
                t_window, waited, images_seen = time.time(), 0.0, 0
            if bar is not None:
                bar.update(steps_per_call)
            if step % int(config.eval_every_steps) == 0 or step == total_steps:
                eval_metrics = run_eval()
                writer.write(step, eval_metrics)
            saved = step % int(config.checkpoint_every_steps) == 0 or step == total_steps
            if saved:
                save(step)
            if preempt.reached(step):
                if not saved:
                    save(step)
                stopped_by_signal = True
                break
        if not eval_metrics and not stopped_by_signal:
            # Already finished when started (the same command run again):
            # evaluate so that the summary still reports the accuracy.
            eval_metrics = run_eval()
    finally:
        preempt.uninstall()
        if bar is not None:
            bar.close()
        ckpt.close()
        writer.flush()
        writer.close()

    wall = time.time() - t_start
    summary = {
        "step": step,
        "wall_seconds": wall,
        "train_images_per_sec": (step - start_step) * config.batch_size / max(t_train, 1e-9),
        **eval_metrics,
    }
    if stopped_by_signal:
        summary["preempted"] = True
        log.warning(
            "Stopped by a signal at step %d; checkpoint saved. Run the same command to resume.",
            step,
        )
    return summary


def summary_line(summary: dict[str, Any]) -> str:
    """The one-line end-of-run summary."""
    parts = [f"step {summary['step']}"]
    if "eval_accuracy" in summary:
        parts.append(f"eval accuracy {100 * summary['eval_accuracy']:.2f}%")
        parts.append(
            f"eval loss {summary['eval_loss']:.4f} on {int(summary['eval_count'])} examples"
        )
    parts.append(f"wall time {summary['wall_seconds']:.1f} s")
    parts.append(f"{summary['train_images_per_sec']:.0f} train images/s")
    if summary.get("preempted"):
        parts.append("stopped by signal (resumable)")
    return ", ".join(parts)


__all__ = [
    "TrainState",
    "create_learning_rate_fn",
    "create_mesh",
    "create_model",
    "create_optimizer",
    "create_train_state",
    "eval_step",
    "evaluate",
    "train_and_evaluate",
    "train_step",
]
