"""What a user can get wrong in a config, checked before any work; schedules
given in epochs resolved into steps for the run.

The one place of a config's checks: :func:`validate_config` runs before any
data is read, anything compiled or downloaded; :func:`check_fast_path` checks
what only the resolved schedule tells. What depends on the data itself (the
labels against ``num_classes``, a training split smaller than a batch) is
checked by :class:`resnet_jax.data.InputPipeline` when it reads them, as it is
for every direct caller of the pipeline.

Every check raises :class:`resnet_jax.errors.UserError` naming the key, its
value and a valid setting; ``train.py`` prints it as one line.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from resnet_jax.data.autoaugment import check as augment_check
from resnet_jax.data.datasets import IN_MEMORY, check_dataset
from resnet_jax.data.transforms import TRAIN_CROPS, eval_crop_size
from resnet_jax.errors import UserError
from resnet_jax.training.recipe import LR_SCHEDULES, OPTIMIZERS, model_from_config

log = logging.getLogger(__name__)


# The train state's step counter is int32; an epoch count beyond this is a typo.
_MAX_STEPS = 2**31 - 1
_MAX_EPOCHS = 1_000_000
_INTERVALS = ("num_train_steps", "log_every_steps", "eval_every_steps", "checkpoint_every_steps")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def _check_optimisation(config: Any) -> None:
    _require(
        config.learning_rate > 0,
        f"learning_rate={config.learning_rate} must be positive (a negative rate ascends "
        "the loss); use e.g. --config.learning_rate=0.1.",
    )
    _require(
        config.weight_decay >= 0,
        f"weight_decay={config.weight_decay} must be >= 0; use e.g. --config.weight_decay=1e-4.",
    )
    _require(
        0 <= config.momentum < 1,
        f"momentum={config.momentum} must be in [0, 1); use e.g. --config.momentum=0.9.",
    )
    _require(
        0 < config.lr_decay_factor <= 1,
        f"lr_decay_factor={config.lr_decay_factor} must be in (0, 1]; use e.g. 0.1.",
    )
    _require(
        0 <= config.label_smoothing < 1,
        f"label_smoothing={config.label_smoothing} must be in [0, 1).",
    )
    _require(config.lr_batch_base >= 0, f"lr_batch_base={config.lr_batch_base} must be >= 0.")
    _require(config.warmup_steps >= 0, f"warmup_steps={config.warmup_steps} must be >= 0.")
    _require(
        config.warmup_learning_rate > 0 or not config.warmup_steps,
        f"warmup_learning_rate={config.warmup_learning_rate} must be positive.",
    )
    _check_boundaries(config)
    _require(
        config.lr_schedule in LR_SCHEDULES,
        f"Unknown lr_schedule {config.lr_schedule!r}; valid: {', '.join(LR_SCHEDULES)}.",
    )
    _require(
        config.lr_power > 0 and 0 <= config.lr_end_value < config.learning_rate,
        f"lr_power={config.lr_power} must be positive and lr_end_value={config.lr_end_value} "
        f"in [0, learning_rate={config.learning_rate}) (the 'polynomial' schedule's; "
        "MLPerf's: 2.0 and 0.0001).",
    )
    _require(
        config.optimizer in OPTIMIZERS,
        f"Unknown optimizer {config.optimizer!r}; valid: {', '.join(OPTIMIZERS)}.",
    )
    _require(
        config.lars_trust_coefficient > 0 and config.lars_eps >= 0,
        f"lars_trust_coefficient={config.lars_trust_coefficient} must be positive and "
        f"lars_eps={config.lars_eps} >= 0 (MLPerf's: 0.001 and 0).",
    )
    _require(
        0 <= config.adam_b1 < 1 and 0 <= config.adam_b2 < 1 and config.adam_eps > 0,
        f"adam_b1={config.adam_b1} and adam_b2={config.adam_b2} must be in [0, 1) and "
        f"adam_eps={config.adam_eps} positive (e.g. 0.9, 0.999, 1e-8).",
    )


def _check_regularisation(config: Any) -> None:
    """EMA, mixup/CutMix, auto-augmentation and random erasing."""
    _require(
        0 <= config.ema_decay < 1,
        f"ema_decay={config.ema_decay} must be in [0, 1) (0: no EMA; torchvision's "
        "recipe: 0.99998 a step).",
    )
    every = config.ema_every_steps
    _require(
        isinstance(every, int) and every >= 1,
        f"ema_every_steps={every} must be an integer >= 1.",
    )
    for key in ("mixup_alpha", "cutmix_alpha"):
        _require(
            math.isfinite(config[key]) and config[key] >= 0,
            f"{key}={config[key]} must be >= 0 (0: off; timm's and torchvision's: 0.2 to 1.0).",
        )
    for key in ("mix_prob", "mix_switch_prob", "random_erasing"):
        _require(0 <= config[key] <= 1, f"{key}={config[key]} must be a probability in [0, 1].")
    augment_check(config.auto_augment, config.randaugment_num_ops, config.randaugment_magnitude)
    _require(
        not (config.auto_augment and config.device_data),
        f"auto_augment={config.auto_augment!r} runs in the host input pipeline, not on the "
        "device-resident fast path: set --config.device_data=False (random_erasing, mixup "
        "and CutMix run on the devices and work on both paths).",
    )
    _require(
        not (config.auto_augment and not config.augment),
        f"auto_augment={config.auto_augment!r} is part of the training augmentation, which "
        "augment=False turns off: set one of them.",
    )
    repeats = config.get("repeated_augmentation", 1)
    _require(
        isinstance(repeats, int) and not isinstance(repeats, bool) and repeats >= 1,
        f"repeated_augmentation={repeats!r} must be an integer >= 1 (1: off; "
        "torchvision's V2 recipe: 4).",
    )
    _require(
        repeats == 1 or not config.device_data,
        f"repeated_augmentation={repeats} runs in the host input pipeline, not on the "
        "device-resident fast path: set --config.device_data=False.",
    )
    _require(
        repeats == 1 or config.augment,
        f"repeated_augmentation={repeats} repeats examples to augment them apart, and "
        "augment=False turns the augmentation off: set one of them.",
    )
    _require(
        isinstance(config.init_from_ema, bool) and (config.init_from or not config.init_from_ema),
        "init_from_ema=True takes the EMA weights of the run given by --config.init_from; set it.",
    )


def _check_boundaries(config: Any) -> None:
    try:
        bounds = [int(b) for b in config.lr_boundaries]
        if any(b != float(x) for b, x in zip(bounds, config.lr_boundaries)):
            raise ValueError
    except (TypeError, ValueError):
        raise UserError(
            f"lr_boundaries={config.lr_boundaries!r} must be a tuple of step numbers, e.g. "
            "--config.lr_boundaries='(32000, 48000)'."
        ) from None
    _require(
        all(b > 0 for b in bounds),
        f"lr_boundaries={tuple(bounds)} must be positive steps.",
    )
    _require(
        all(a < b for a, b in zip(bounds, bounds[1:])),
        f"lr_boundaries={tuple(bounds)} must be strictly increasing, e.g. "
        f"--config.lr_boundaries='{tuple(sorted(set(bounds)))}'.",
    )
    late = [b for b in bounds if b >= config.num_train_steps]
    if late and config.lr_schedule == "step" and config.num_train_steps:
        log.warning(
            "lr_boundaries %s are at or after num_train_steps=%d: the run ends before them.",
            late,
            config.num_train_steps,
        )


def _check_model_and_data(config: Any) -> None:
    check_dataset(config.dataset)
    _require(
        config.num_classes >= 0,
        f"num_classes={config.num_classes} must be >= 0 (0: the dataset's classes).",
    )
    _require(
        0 <= config.bn_momentum < 1,
        f"bn_momentum={config.bn_momentum} must be in [0, 1) (PyTorch's 0.1 is 0.9 here).",
    )
    _require(config.bn_epsilon > 0, f"bn_epsilon={config.bn_epsilon} must be positive.")
    model_from_config(config, 10)  # unknown model names and options raise here
    _require(config.crop_padding >= 0, f"crop_padding={config.crop_padding} must be >= 0.")
    _require(config.validation_split >= 0, "validation_split must be >= 0.")
    _require(
        not config.validation_split or config.dataset in ("cifar10", "cifar100"),
        f"validation_split={config.validation_split} holds out the end of CIFAR's training "
        f"split; {config.dataset} does not use it (the digits have their own test split, "
        "ImageNet its validation set): leave it at 0, or use --config.eval_split.",
    )
    _require(
        isinstance(config.seed, int) and 0 <= config.seed < 2**32,
        f"seed={config.seed!r} must be an integer in [0, 2**32).",
    )
    split = config.eval_split
    _require(
        isinstance(split, str)
        and not (split and config.dataset == "digits")
        and not (split and config.validation_split)
        and not ("[" in split and config.mock_data),
        f"eval_split={split!r}: a tfds split name such as 'validation[:10000]' for ImageNet "
        "or CIFAR ('' for the recipe's); not with the digits (no tfds splits), not with "
        "validation_split, and not sliced on mock data (tfds' mock data ignores slices).",
    )
    _require(
        isinstance(config.deterministic_input, bool),
        f"deterministic_input={config.deterministic_input!r} must be True or False.",
    )
    _require(
        isinstance(config.prefetch_batches, int) and config.prefetch_batches >= 0,
        f"prefetch_batches={config.prefetch_batches} must be an integer >= 0 (0: no prefetching).",
    )
    lo, hi = config.train_scale_range
    crop = eval_crop_size(config)
    _require(
        config.image_size > 0
        and config.image_size <= lo <= hi
        and config.eval_image_size >= 0
        and config.eval_resize >= crop,
        f"image sizes must satisfy 0 < image_size ({config.image_size}) <= train_scale_range "
        f"({lo}, {hi}) in increasing order, eval_image_size ({config.eval_image_size}) >= 0, "
        f"and eval_resize ({config.eval_resize}) >= the eval crop ({crop}).",
    )
    _require(
        config.train_crop in TRAIN_CROPS,
        f"train_crop={config.train_crop!r}; valid: {', '.join(TRAIN_CROPS)}.",
    )
    _require(
        config.keep_checkpoints >= 1,
        f"keep_checkpoints={config.keep_checkpoints} must be >= 1.",
    )


def _check_finetuning(config: Any) -> None:
    """The fine-tuning keys (resnet_jax/training/finetune.py) and the digits class subset."""

    _require(
        config.backbone_lr_multiplier > 0,
        f"backbone_lr_multiplier={config.backbone_lr_multiplier} must be positive (use "
        "--config.freeze_backbone=True for no backbone updates).",
    )
    _require(
        not (config.freeze_backbone and config.backbone_lr_multiplier != 1),
        f"freeze_backbone=True gives the backbone no updates, so backbone_lr_multiplier="
        f"{config.backbone_lr_multiplier} would do nothing; set one of them.",
    )
    subset = bool(config.classes) or config.train_examples_per_class != 0
    _require(
        not subset or config.dataset == "digits",
        f"classes and train_examples_per_class select examples of the in-memory digits "
        f"dataset only, not {config.dataset}; leave them at () and 0.",
    )
    labels = [int(c) for c in config.classes]
    digits = len(set(labels)) == len(labels) >= 2 and set(labels) <= set(range(10))
    _require(
        not labels or digits,
        f"classes={tuple(config.classes)} must be two or more distinct digits 0..9, e.g. "
        "--config.classes='(5, 6, 7, 8, 9)'.",
    )
    _require(
        config.train_examples_per_class >= 0,
        f"train_examples_per_class={config.train_examples_per_class} must be >= 0 (0: all).",
    )


def _divisor(n: int, k: int) -> int:
    """The largest divisor of ``n`` at most ``k`` (a valid accumulation count)."""
    return max(d for d in range(1, max(min(n, k), 1) + 1) if n % d == 0)


# Each step count and the epoch count that stands in for it when it is 0.
_EPOCH_KEYS = {
    "num_train_steps": "num_epochs",
    "warmup_steps": "warmup_epochs",
    "eval_every_steps": "eval_every_epochs",
    "checkpoint_every_steps": "checkpoint_every_epochs",
}


def _check_batches(config: Any, num_devices: int) -> None:
    b = config.batch_size
    _require(
        b > 0 and b % num_devices == 0,
        f"batch_size={b} must be positive and divisible by the number of devices "
        f"({num_devices}) so that every device gets an equal share; use e.g. "
        f"--config.batch_size={num_devices * max(1, b // num_devices)}.",
    )
    k = config.grad_accum_steps
    _require(
        isinstance(k, int) and k >= 1 and b % (k * num_devices) == 0,
        f"grad_accum_steps={k} must be an integer >= 1 that splits batch_size={b} into "
        f"micro-batches divisible by the number of devices ({num_devices}); use e.g. "
        f"--config.grad_accum_steps={_divisor(b // num_devices, k) if b % num_devices == 0 else 1}.",
    )
    micro = b // k
    _require(
        config.bn_groups >= 1 and micro % config.bn_groups == 0,
        f"batch_size={b}"
        + (f" / grad_accum_steps={k}" if k > 1 else "")
        + f" must be divisible by bn_groups={config.bn_groups} "
        "(BatchNorm statistics over equal groups of the batch).",
    )
    # Evaluation pads its batches up to a multiple of the devices (masked).
    _require(
        config.eval_batch_size > 0, f"eval_batch_size={config.eval_batch_size} must be positive."
    )
    for key in _INTERVALS:
        epochs = _EPOCH_KEYS.get(key)
        by_epochs = epochs is not None and config[key] == 0 and config[epochs] > 0
        _require(
            int(config[key]) > 0 or by_epochs,
            f"{key} must be positive, got {config[key]}"
            + (f" (or 0 with {epochs} > 0)." if epochs else "."),
        )
    for epochs in _EPOCH_KEYS.values():
        _require(
            math.isfinite(config[epochs]) and 0 <= config[epochs] <= _MAX_EPOCHS,
            f"{epochs}={config[epochs]} must be a finite number of epochs in [0, {_MAX_EPOCHS:,}].",
        )
    for key in (*_INTERVALS, "warmup_steps"):
        _require(
            config[key] <= _MAX_STEPS,
            f"{key}={config[key]:,} is beyond the step counter's range (int32: at most "
            f"{_MAX_STEPS:,} steps); train for fewer steps.",
        )


def pad_eval_batch(config: Any, num_devices: int) -> Any:
    """A copy of ``config`` whose ``eval_batch_size`` is a multiple of the
    devices (evaluation masks the padding, so it stays exact)."""
    c = config.copy_and_resolve_references()
    padded = -(-c.eval_batch_size // num_devices) * num_devices
    if padded != c.eval_batch_size:
        log.info(
            "eval_batch_size %d padded to %d (a multiple of the devices).",
            c.eval_batch_size,
            padded,
        )
        c.eval_batch_size = padded
    return c


def resolve_schedule(config: Any, train_size: int) -> Any:
    """A copy of ``config`` with every schedule in steps for this run.

    Epoch counts (``num_epochs``, ``warmup_epochs``, ``eval_every_epochs``,
    ``checkpoint_every_epochs``) become steps where their step key is 0, from
    the actual ``batch_size`` (an epoch is ``train_size // batch_size``
    steps). A cosine warm-up that does not fit in the run is shortened to a
    tenth of it, with a warning.
    """
    c = config.copy_and_resolve_references()
    steps_per_epoch = max(1, train_size // c.batch_size)
    for key, epochs in _EPOCH_KEYS.items():
        if c[key] == 0 and c[epochs] > 0:
            c[key] = max(1, round(c[epochs] * steps_per_epoch))
    if c.lr_schedule == "cosine" and c.warmup_steps >= c.num_train_steps:
        short = c.num_train_steps // 10
        log.warning(
            "warmup_steps=%d does not fit in num_train_steps=%d: warming up for %d steps.",
            c.warmup_steps,
            c.num_train_steps,
            short,
        )
        c.warmup_steps = short
    return c


def _check_fast_path(config: Any) -> None:
    """``device_data`` and ``steps_per_call``, as given (the step counts that
    epochs stand for are checked after they are resolved: :func:`check_fast_path`)."""
    k = config.steps_per_call
    _require(isinstance(k, int) and k >= 1, f"steps_per_call={k} must be an integer >= 1.")
    if not config.device_data:
        _require(k == 1, "steps_per_call > 1 needs --config.device_data=True.")
        return
    _require(
        config.dataset in IN_MEMORY,
        f"device_data=True holds the training set on the devices; it supports "
        f"{', '.join(IN_MEMORY)}, not {config.dataset}.",
    )


def check_fast_path(config: Any) -> None:
    """With ``device_data``, every interval (in steps, after :func:`resolve_schedule`)
    must be a multiple of ``steps_per_call``: the loop logs, evaluates and saves
    between calls."""
    k = int(config.steps_per_call)
    if not config.device_data:
        return
    for key in _INTERVALS:
        _require(
            int(config[key]) % k == 0,
            f"{key}={config[key]} must be a multiple of steps_per_call={k} (the loop "
            "logs, evaluates and saves between calls).",
        )


def validate_config(config: Any, num_devices: int, num_processes: int = 1) -> None:
    """Refuses a bad config before any work is done, saying what to change.

    Raises:
      UserError: naming the key, its value and a valid setting.
    """
    _check_model_and_data(config)
    _check_fast_path(config)
    _check_batches(config, num_devices)
    _check_host_memory(config, num_processes)
    _check_optimisation(config)
    _check_regularisation(config)
    _check_finetuning(config)


# The model's input of each dataset (H, W, C) and its bytes a value on the host:
# in-memory datasets leave the host as float32, ImageNet as uint8.
_INPUT = {"digits": ((8, 8, 1), 4), "cifar10": ((32, 32, 3), 4), "cifar100": ((32, 32, 3), 4)}


def host_memory_bytes() -> int | None:
    """This host's physical memory in bytes (None where the system does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _check_host_memory(config: Any, num_processes: int) -> None:
    """A host batch (times the batches in flight) must fit in the host's memory."""
    total = host_memory_bytes()
    if not total:
        return
    side = max(int(config.image_size), eval_crop_size(config))
    shape, itemsize = _INPUT.get(config.dataset, ((side, side, 3), 1))
    per_image = math.prod(shape) * itemsize
    crops = 10 if config.ten_crop else 1
    in_flight = int(config.prefetch_batches) + 2  # prefetched, being copied, being made
    worst = max(config.batch_size, config.eval_batch_size * crops) // max(num_processes, 1)
    need = worst * per_image * in_flight
    _require(
        need <= total,
        f"batch_size={config.batch_size} (eval_batch_size={config.eval_batch_size}): "
        f"{in_flight} host batches of {worst:,} images of {'x'.join(map(str, shape))} need "
        f"{need / 2**30:,.1f} GiB, more than this host's {total / 2**30:,.1f} GiB of memory; "
        "lower --config.batch_size (or --config.prefetch_batches), or use more hosts.",
    )


def resolve_num_classes(config: Any, dataset_classes: int) -> int:
    """The classifier's width: ``config.num_classes``, or the dataset's when 0.

    That it fits the dataset's labels is checked where the labels are known,
    once, by the input pipeline (:class:`resnet_jax.data.InputPipeline`).
    """
    return int(config.num_classes) or dataset_classes
