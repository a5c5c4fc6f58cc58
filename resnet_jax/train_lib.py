"""Training: TrainState, the pure train/eval steps, and the loop as small parts.

The steps are jitted once over a 1-D device ``Mesh`` (axis ``'data'``): the
batch is sharded along it, the state replicated, so BatchNorm statistics and
gradients are global by construction. The same code runs on one CPU, every
GPU of a host, or every chip of a multi-host TPU slice.

The loop (:func:`train_and_evaluate`) is built from parts that each hold one
idea: :func:`build_experiment` (mesh, model, optimizer, pipeline, jitted steps,
built once), :func:`restore_or_init`, a step runner (:class:`HostStepRunner`
for host batches, :class:`DeviceStepRunner` for the on-device scan), a
:class:`MetricWindow`, and periodic actions (:class:`LogAction`,
:class:`EvalAction`, :class:`CheckpointAction`).

Config checks and schedule resolution live in :mod:`resnet_jax.config_checks`.
This module imports TensorFlow only inside :func:`build_experiment` (through
the input pipeline and the TensorBoard writer), so the steps can be reused
where TensorFlow is absent.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import resnet_jax as rj
from resnet_jax import prefetch, runtime
from resnet_jax.config_checks import (
    check_fast_path,
    check_num_classes,
    pad_eval_batch,
    resolve_schedule,
    validate_config,
)
from resnet_jax.errors import NonFiniteError, UserError

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class TrainState(train_state.TrainState):
    """``step``, ``params``, ``opt_state`` (from Flax) plus ``batch_stats``."""

    batch_stats: Any


# --------------------------------------------------------------------------- #
# Construction from a config
# --------------------------------------------------------------------------- #


def model_from_config(config: Any, num_classes: int, *, materialize: bool = False) -> rj.ResNet:
    """The configured network (``config.model`` and its options).

    ``materialize`` is the trainer's choice for the platform (see
    :func:`resolve_materialize`), not a property of the network.
    """
    if config.dtype not in DTYPES:
        hint = (
            " float16 needs loss scaling, which this trainer does not do;"
            if config.dtype == "float16"
            else ""
        )
        raise UserError(
            f"Unknown dtype {config.dtype!r};{hint} valid: {', '.join(DTYPES)} "
            "(use --config.dtype=bfloat16 for reduced precision)."
        )
    options = dict(
        num_classes=num_classes,
        dtype=DTYPES[config.dtype],
        variant=config.variant,
        zero_init_residual=config.zero_init_residual,
        bn_momentum=config.bn_momentum,
        bn_epsilon=config.bn_epsilon,
        bn_groups=config.bn_groups,
        materialize=materialize,
    )
    if config.shortcut:
        options["shortcut"] = config.shortcut
    try:
        return rj.create_model(config.model, **options)
    except UserError:
        raise
    except ValueError as e:  # the library's checks of names and options
        raise UserError(f"{e} (from --config.model and its options)") from e


def resolve_materialize(config: Any, platform: str) -> bool:
    """``config.materialize``, or when unset (None): on for CPU devices only,
    where storing activations made training faster (BENCHMARKS.md)."""
    return platform == "cpu" if config.materialize is None else bool(config.materialize)


def effective_learning_rate(config: Any) -> float:
    """``learning_rate``, scaled by ``batch_size / lr_batch_base`` when that is set."""
    base = config.lr_batch_base
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
    warmup = int(config.warmup_steps)
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
    raise UserError(f"Unknown lr_schedule {config.lr_schedule!r}; valid: 'step', 'cosine'.")


def _decay_mask(params: Any) -> Any:
    """True for convolution and dense kernels; False for BatchNorm scales and biases."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params
    )


def create_optimizer(config: Any, learning_rate_fn: optax.Schedule) -> optax.GradientTransformation:
    """SGD with momentum and L2 weight decay added to the gradient (as in the paper).

    With ``freeze_backbone`` or ``backbone_lr_multiplier``, the head and the
    backbone are two groups of an ``optax.multi_transform``
    (:func:`resnet_jax.finetune.partition_optimizer`).
    """
    from resnet_jax import finetune

    mask = _decay_mask if config.weight_decay_exclude_bn_bias else None

    def sgd(lr_fn: optax.Schedule) -> optax.GradientTransformation:
        return optax.chain(
            optax.add_decayed_weights(config.weight_decay, mask=mask),
            optax.sgd(lr_fn, momentum=config.momentum, nesterov=config.nesterov),
        )

    if finetune.uses_groups(config):
        return finetune.partition_optimizer(config, sgd, learning_rate_fn)
    return sgd(learning_rate_fn)


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


def model_input(images: jax.Array, mean: Any = None) -> jax.Array:
    """The model's input: uint8 pixels become ``images / 255 - mean`` in
    float32 (on the device, inside the jitted step: the host sends 4x fewer
    bytes); float images are already normalised and pass unchanged.

    ``mean``: (C,) or (H, W, C) on the 0..1 scale; required for uint8.
    """
    if images.dtype != jnp.uint8:
        return images
    if mean is None:
        raise ValueError("uint8 images need the mean to normalise them (mean=None).")
    return images.astype(jnp.float32) / 255.0 - jnp.asarray(mean, jnp.float32)


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    learning_rate_fn: Callable[[jax.Array], jax.Array],
    num_classes: int,
    label_smoothing: float = 0.0,
    skip_nonfinite: bool = False,
    mean: Any = None,
    freeze_bn_stats: bool = False,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step on a global batch; returns the new state and scalar metrics.

    With ``freeze_bn_stats`` BatchNorm runs in inference mode: it normalises
    with the running statistics and leaves them unchanged (fine-tuning).

    ``batch["image"]`` is normalised float32, or uint8 pixels that are
    normalised here with ``mean`` (see :func:`model_input`).

    Metrics: ``loss`` (mean cross-entropy, without the weight-decay term),
    ``accuracy``, ``learning_rate``, ``finite`` (1.0 when loss and gradients
    are finite). With ``skip_nonfinite`` a non-finite step leaves the state
    unchanged except for the step counter.
    """

    images = model_input(batch["image"], mean)

    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        if freeze_bn_stats:
            logits, stats = state.apply_fn(variables, images, train=False), state.batch_stats
        else:
            logits, updates = state.apply_fn(variables, images, train=True, mutable=["batch_stats"])
            stats = updates["batch_stats"]
        loss = cross_entropy(logits, batch["label"], num_classes, label_smoothing).mean()
        return loss, (logits, stats)

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    # Finite loss, gradients and updated parameters (a finite gradient times a
    # huge learning rate can still overflow).
    finite = jnp.isfinite(loss) & jnp.all(
        jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves((grads, new_state.params))])
    )
    if skip_nonfinite:
        # Values stay as they were; counters (optax's schedule step) advance
        # with state.step, so the learning rate keeps following the step.
        kept = jax.tree.map(
            lambda new, old: (
                new if jnp.issubdtype(new.dtype, jnp.integer) else jnp.where(finite, new, old)
            ),
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


def eval_step(
    state: TrainState, batch: dict[str, jax.Array], *, num_classes: int, mean: Any = None
) -> dict:
    """Masked sums over a batch: ``loss``, ``correct``, ``correct_top5``, ``count``.

    Images of shape (N, K, H, W, C) are K crops per example (10-crop testing):
    their softmax outputs are averaged. uint8 images are normalised with
    ``mean`` (:func:`model_input`).
    """
    images = model_input(batch["image"], mean)
    crops = images.shape[1] if images.ndim == 5 else 1
    if crops > 1:
        images = images.reshape(-1, *images.shape[2:])
    logits = state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats}, images, train=False
    )
    if crops > 1:
        # log of the crops' mean probability, computed in log space: a
        # probability that underflows to 0 would make the loss 0 * -inf = NaN.
        log_probs = jax.nn.log_softmax(logits).reshape(-1, crops, logits.shape[-1])
        logits = jax.nn.logsumexp(log_probs, axis=1) - jnp.log(crops)
    mask = batch["mask"]
    loss = cross_entropy(logits, batch["label"], num_classes)
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    return {
        "loss": jnp.sum(loss * mask),
        "correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask),
        "correct_top5": jnp.sum(jnp.any(top5 == batch["label"][:, None], axis=-1) * mask),
        "count": jnp.sum(mask),
    }


def host_batch_to_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict:
    """This process's part of a global batch -> global arrays sharded over ``'data'``."""
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }


def evaluate(
    state: TrainState,
    batches: Iterator[dict[str, np.ndarray]],
    eval_fn: Callable,
    sharding: NamedSharding,
    top5: bool = False,
    prefetch_batches: int = 2,
) -> dict[str, float]:
    """One exact pass over the eval split: ``eval_loss``, ``eval_accuracy``,
    ``eval_count`` and, with ``top5``, ``eval_top5_accuracy``. Batches are
    copied to the devices ``prefetch_batches`` ahead on a background thread."""
    totals = None
    to_global = functools.partial(host_batch_to_global, sharding=sharding)
    with prefetch.prefetch(batches, to_global, prefetch_batches) as device_batches:
        for batch in device_batches:
            sums = eval_fn(state, batch)
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


# --------------------------------------------------------------------------- #
# The experiment, built once
# --------------------------------------------------------------------------- #


def _replicated(sharding: NamedSharding) -> NamedSharding:
    return NamedSharding(sharding.mesh, P())


class HostStepRunner:
    """One train step per call on a batch from the host input pipeline.

    Global batches are assembled ``prefetch_batches`` steps ahead on a
    background thread (:mod:`resnet_jax.prefetch`); ``data_wait`` counts the
    seconds a step waited for the host pipeline and the host-to-device copy.
    """

    def __init__(
        self,
        step_fn: Callable,
        pipeline: Any,
        data_sharding: NamedSharding,
        prefetch_batches: int = 2,
    ):
        self.steps_per_call = 1
        self._pipeline = pipeline
        self._sharding = data_sharding
        self._prefetch = int(prefetch_batches)
        self._jitted = jax.jit(
            step_fn,
            in_shardings=(_replicated(data_sharding), data_sharding),
            out_shardings=(_replicated(data_sharding), _replicated(data_sharding)),
            donate_argnums=0,
        )
        self._batches = None
        self.data_wait = 0.0  # seconds spent waiting for the host pipeline

    def start(self, step: int, end: int) -> None:
        """Batches for steps ``step`` .. ``end - 1`` (none are read past ``end``)."""
        self.close()
        to_global = functools.partial(host_batch_to_global, sharding=self._sharding)
        batches = itertools.islice(self._pipeline.train_batches(step), max(end - step, 0))
        self._batches = prefetch.prefetch(batches, to_global, self._prefetch)

    def __call__(self, state: TrainState, step: int) -> tuple[TrainState, dict]:
        t0 = time.perf_counter()
        batch = next(self._batches)
        self.data_wait += time.perf_counter() - t0
        return self._jitted(state, batch)

    def close(self) -> None:
        """Stops the prefetching thread."""
        if self._batches is not None:
            self._batches.close()
            self._batches = None


class DeviceStepRunner:
    """``steps_per_call`` train steps per call in one ``lax.scan``, with the
    training set and its augmentation on the devices (the CIFAR fast path)."""

    def __init__(self, step_fn: Callable, config: Any, pipeline: Any, mesh: Mesh, unroll: bool):
        from resnet_jax import device_data

        replicated = NamedSharding(mesh, P())
        self.steps_per_call = int(config.steps_per_call)
        self._data = device_data.put_on_devices(
            pipeline.train.images, pipeline.train.labels, pipeline.mean, replicated
        )
        batch_fn = functools.partial(
            device_data.batch_at,
            seed=int(config.seed),
            batch_size=int(config.batch_size),
            augment=bool(config.augment),
            pad=int(config.crop_padding),
            flip=bool(config.random_flip),
        )
        multi = device_data.make_multi_step(
            step_fn, batch_fn, self.steps_per_call, NamedSharding(mesh, P("data")), unroll=unroll
        )
        self._jitted = jax.jit(
            multi,
            in_shardings=(replicated, replicated, None),
            out_shardings=(replicated, replicated),
            donate_argnums=0,
        )
        self.data_wait = 0.0  # the data is already there

    def start(self, step: int, end: int) -> None:
        del step, end

    def __call__(self, state: TrainState, step: int) -> tuple[TrainState, dict]:
        return self._jitted(state, self._data, jnp.int32(step))

    def close(self) -> None:
        pass


@dataclasses.dataclass
class Experiment:
    """Everything a run builds once from its config, before the first step."""

    config: Any
    workdir: str
    mesh: Mesh
    pipeline: Any
    model: rj.ResNet
    num_classes: int
    learning_rate_fn: optax.Schedule
    tx: optax.GradientTransformation
    runner: HostStepRunner | DeviceStepRunner
    eval_fn: Callable
    fingerprint: dict[str, Any]  # what a checkpoint of this run must match

    @property
    def data_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, P("data"))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def evaluate(self, state: TrainState) -> dict[str, float]:
        top5 = self.config.dataset == "imagenet2012"
        return evaluate(
            state,
            self.pipeline.eval_batches(),
            self.eval_fn,
            self.data_sharding,
            top5=top5,
            prefetch_batches=int(self.config.prefetch_batches),
        )


def make_runner(
    step_fn: Callable, config: Any, pipeline: Any, mesh: Mesh
) -> HostStepRunner | DeviceStepRunner:
    """The fast path's on-device runner with ``config.device_data``, else the host one."""
    if config.device_data:
        # XLA:CPU runs a step inside a while loop far slower than outside one
        # (BENCHMARKS.md): unroll the scan there; GPUs and TPUs keep it rolled.
        cpu = mesh.devices.flat[0].platform == "cpu"
        return DeviceStepRunner(step_fn, config, pipeline, mesh, unroll=cpu)
    data_sharding = NamedSharding(mesh, P("data"))
    return HostStepRunner(step_fn, pipeline, data_sharding, int(config.prefetch_batches))


def build_experiment(config: Any, workdir: str, mesh: Mesh | None = None) -> Experiment:
    """Validates ``config`` and builds the run's parts (no training state yet).

    Writes nothing: the workdir is neither created nor read.

    Raises:
      UserError: a bad config or dataset.
    """
    from resnet_jax import checkpoints
    from resnet_jax import data as data_lib

    mesh = create_mesh() if mesh is None else mesh
    validate_config(config, mesh.devices.size)
    config = pad_eval_batch(config, mesh.devices.size)
    data_lib.prepare_for_processes(config, jax.process_index(), jax.process_count())
    # File datasets leave the host as uint8 pixels (4x fewer bytes than
    # float32), normalised on the devices inside the jitted steps.
    image_dtype = "float32" if config.dataset in data_lib.IN_MEMORY else "uint8"
    pipeline = data_lib.InputPipeline(
        config, jax.process_index(), jax.process_count(), image_dtype=image_dtype
    )
    mean = None if image_dtype == "float32" else pipeline.mean
    config = resolve_schedule(config, pipeline.info.train_size)
    check_fast_path(config)
    num_classes = check_num_classes(config, pipeline.info.num_classes)
    platform = mesh.devices.flat[0].platform
    model = model_from_config(
        config, num_classes, materialize=resolve_materialize(config, platform)
    )
    lr_fn = create_learning_rate_fn(config)
    step_fn = functools.partial(
        train_step,
        learning_rate_fn=lr_fn,
        num_classes=num_classes,
        label_smoothing=float(config.label_smoothing),
        skip_nonfinite=bool(config.skip_nonfinite_steps),
        mean=mean,
        freeze_bn_stats=bool(config.freeze_bn_stats),
    )
    data_sharding = NamedSharding(mesh, P("data"))
    runner = make_runner(step_fn, config, pipeline, mesh)
    eval_fn = jax.jit(
        functools.partial(eval_step, num_classes=num_classes, mean=mean),
        in_shardings=(_replicated(data_sharding), data_sharding),
        out_shardings=_replicated(data_sharding),
    )
    return Experiment(
        config=config,
        workdir=workdir,
        mesh=mesh,
        pipeline=pipeline,
        model=model,
        num_classes=num_classes,
        learning_rate_fn=lr_fn,
        tx=create_optimizer(config, lr_fn),
        runner=runner,
        eval_fn=eval_fn,
        fingerprint=checkpoints.fingerprint(config) | {"num_classes": num_classes},
    )


def open_checkpointer(exp: Experiment) -> Any:
    """The workdir's ``checkpoints/`` directory (created if missing)."""
    from resnet_jax import checkpoints

    return checkpoints.Checkpointer(
        epath.Path(exp.workdir) / "checkpoints", max_to_keep=int(exp.config.keep_checkpoints)
    )


def restore_or_init(exp: Experiment, ckpt: Any) -> tuple[TrainState, dict[str, Any] | None]:
    """The newest readable checkpoint of ``ckpt``, or a fresh state.

    Returns ``(state, meta)``; ``meta`` is None for a fresh start.
    """
    rng = jax.random.key(exp.config.seed)
    shape = exp.pipeline.info.image_shape

    def init(r):
        return create_train_state(exp.model, exp.tx, shape, r, exp.replicated)

    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=exp.replicated),
        jax.eval_shape(init, rng),
    )
    from resnet_jax import finetune

    restored = ckpt.restore_latest(abstract, exp.fingerprint)
    if restored is None:  # a fresh start: from config.init_from's weights, if set
        return finetune.initial_state(exp, init(rng)), None
    if exp.config.init_from:
        log.info("Resuming the workdir's checkpoint: init_from is ignored.")
    return restored


# --------------------------------------------------------------------------- #
# The loop's parts: a metric window and periodic actions
# --------------------------------------------------------------------------- #


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
    parts.append(f"wall time {summary['wall_seconds']:.1f} s")
    if summary.get("train_images_per_sec") is not None:
        parts.append(f"{summary['train_images_per_sec']:.0f} train images/s")
    if summary.get("preempted"):
        parts.append("stopped by signal (resumable)")
    return ", ".join(parts)


__all__ = [
    "Experiment",
    "TrainState",
    "build_experiment",
    "create_learning_rate_fn",
    "create_mesh",
    "create_optimizer",
    "create_train_state",
    "eval_step",
    "evaluate",
    "model_from_config",
    "restore_or_init",
    "train_and_evaluate",
    "train_step",
    "validate_config",
]
