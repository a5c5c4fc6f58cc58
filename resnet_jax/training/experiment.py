"""The experiment: everything a run builds once from its config (mesh, data,
model, optimizer, the jitted steps and their runner), and the restore-or-init
of its train state.

A step runner feeds the jitted train step: :class:`HostStepRunner` with
batches of the host pipeline (assembled ahead on a thread,
:mod:`resnet_jax.data.prefetch`), :class:`DeviceStepRunner` with the training
set on the devices (the CIFAR fast path, ``steps_per_call`` steps a call).
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
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_jax import data as data_lib
from resnet_jax import models
from resnet_jax.data import device as device_data
from resnet_jax.data import prefetch
from resnet_jax.training import checkpoints, finetune
from resnet_jax.training import workdir as layout
from resnet_jax.training.checks import (
    check_fast_path,
    pad_eval_batch,
    resolve_num_classes,
    resolve_schedule,
    validate_config,
)
from resnet_jax.training.mixing import MixConfig
from resnet_jax.training.recipe import (
    create_learning_rate_fn,
    create_mesh,
    create_optimizer,
    create_train_state,
    model_from_config,
    needs_dropout_rng,
    resolve_conv,
    resolve_materialize,
)
from resnet_jax.training.steps import EmaConfig, TrainState, ema_state, eval_step, train_step

log = logging.getLogger(__name__)
# fold_in(key(seed), DROPOUT_STREAM) drives stochastic depth and dropout;
# AUGMENT_STREAM random erasing, mixup and CutMix.
DROPOUT_STREAM = 0x6472
AUGMENT_STREAM = 0x6D6978


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
    background thread (:mod:`resnet_jax.data.prefetch`); ``data_wait`` counts the
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
    model: models.ResNet
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

    def init_state(self) -> TrainState:
        """The fresh, replicated train state of ``config.seed``."""
        shape = self.pipeline.info.image_shape
        rng = jax.random.key(self.config.seed)
        ema = bool(self.config.ema_decay)
        return create_train_state(self.model, self.tx, shape, rng, self.replicated, ema=ema)

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and (replicated) shardings of the train state, computed
        without initialising it (what a checkpoint is restored into)."""
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.replicated),
            jax.eval_shape(self.init_state),
        )

    def evaluate(self, state: TrainState) -> dict[str, float]:
        """``eval_loss``, ``eval_accuracy``, ... of the model and, with
        ``ema_decay``, the same of its EMA weights as ``eval_ema_loss``,
        ``eval_ema_accuracy``, ..."""
        top5 = self.config.dataset == "imagenet2012"

        def run(s: TrainState) -> dict[str, float]:
            return evaluate(
                s,
                self.pipeline.eval_batches(),
                self.eval_fn,
                self.data_sharding,
                top5=top5,
                prefetch_batches=int(self.config.prefetch_batches),
            )

        metrics = run(state)
        if state.ema is not None:
            ema = run(ema_state(state))
            metrics |= {f"eval_ema_{k[5:]}": v for k, v in ema.items() if k != "eval_count"}
        return metrics


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


def modern_step_options(config: Any, mesh: Mesh) -> dict[str, Any]:
    """The train step's keyword arguments for the modern recipe's options
    (EMA, mixup/CutMix, random erasing, gradient accumulation); none at their
    defaults, so the paper's step is compiled as before."""
    options: dict[str, Any] = {}
    mix = MixConfig(
        mixup_alpha=float(config.mixup_alpha),
        cutmix_alpha=float(config.cutmix_alpha),
        mix_prob=float(config.mix_prob),
        mix_switch_prob=float(config.mix_switch_prob),
    )
    if mix.enabled:
        options["mix"] = mix
    if config.random_erasing:
        options["random_erasing"] = float(config.random_erasing)
    if options:
        options["augment_key"] = jax.random.fold_in(jax.random.key(config.seed), AUGMENT_STREAM)
    if config.grad_accum_steps > 1:
        options["grad_accum_steps"] = int(config.grad_accum_steps)
        options["micro_batch_sharding"] = NamedSharding(mesh, P(None, "data"))
    if config.ema_decay:
        options["ema"] = EmaConfig(
            decay=float(config.ema_decay),
            every_steps=int(config.ema_every_steps),
            warmup_steps=int(config.warmup_steps),
        )
    return options


def build_experiment(config: Any, workdir: str, mesh: Mesh | None = None) -> Experiment:
    """Validates ``config`` and builds the run's parts (no training state yet).

    Writes nothing: the workdir is neither created nor read.

    Raises:
      UserError: a bad config or dataset.
    """
    mesh = create_mesh() if mesh is None else mesh
    validate_config(config, mesh.devices.size, jax.process_count())
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
    num_classes = resolve_num_classes(config, pipeline.info.num_classes)
    platform = mesh.devices.flat[0].platform
    model = model_from_config(
        config,
        num_classes,
        materialize=resolve_materialize(config, platform),
        conv=resolve_conv(config, platform),
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
        # Its own stream of the seed (the parameters' init uses the seed's key itself).
        dropout_key=(
            jax.random.fold_in(jax.random.key(config.seed), DROPOUT_STREAM)
            if needs_dropout_rng(config)
            else None
        ),
        **modern_step_options(config, mesh),
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
    return checkpoints.Checkpointer(
        layout.checkpoints_dir(exp.workdir), max_to_keep=int(exp.config.keep_checkpoints)
    )


def restore_or_init(exp: Experiment, ckpt: Any) -> tuple[TrainState, dict[str, Any] | None]:
    """The newest readable checkpoint of ``ckpt``, or a fresh state.

    Returns ``(state, meta)``; ``meta`` is None for a fresh start.
    """
    restored = ckpt.restore_latest(exp.abstract_state(), exp.fingerprint)
    if restored is None:  # a fresh start: from config.init_from's weights, if set
        state = exp.init_state()
        return finetune.initial_state(
            exp.config, exp.model, exp.pipeline.mean, exp.replicated, state
        ), None
    if exp.config.init_from:
        log.info("Resuming the workdir's checkpoint: init_from is ignored.")
    return restored
