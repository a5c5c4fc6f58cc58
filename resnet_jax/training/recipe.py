"""The recipe: the model, the optimizer, the schedule, the mesh and the first
train state, each built from a config (``configs/common.py`` names every key)."""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from resnet_jax import models
from resnet_jax.errors import UserError
from resnet_jax.training import cpu_conv, finetune
from resnet_jax.training.steps import TrainState

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
LR_SCHEDULES = ("step", "cosine", "polynomial")
OPTIMIZERS = ("sgd", "lars", "lamb", "adamw")


def model_from_config(
    config: Any, num_classes: int, *, materialize: bool = False, conv: Any = None
) -> models.ResNet:
    """The configured network (``config.model`` and its options).

    ``materialize`` and ``conv`` (the network's ``conv_general_dilated``) are
    the trainer's choices for the platform (see :func:`resolve_materialize`
    and :func:`resolve_conv`), not properties of the network.
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
        zero_init_residual=config.zero_init_residual,
        bn_momentum=config.bn_momentum,
        bn_epsilon=config.bn_epsilon,
        bn_groups=config.bn_groups,
        materialize=materialize,
        conv_general_dilated=conv,
        drop_path_rate=config.get("drop_path_rate", 0.0),
        dropout_rate=config.get("dropout_rate", 0.0),
    )
    # The later names (resnet50d, resnext50_32x4d, ...) fix variant v1.5: the
    # config's default 'v1' (the paper's nets') then means "the name's own";
    # any other value is passed on, and create_model refuses a mismatch.
    fixed = _fixed_variant(config.model)
    if fixed is None or config.variant != "v1":
        options["variant"] = config.variant
    if config.shortcut:
        options["shortcut"] = config.shortcut
    try:
        return models.create_model(config.model, **options)
    except UserError:
        raise
    except ValueError as e:  # the library's checks of names and options
        raise UserError(f"{e} (from --config.model and its options)") from e


def _fixed_variant(name: str) -> str | None:
    try:
        return dict(models.model_spec(name).fixed).get("variant")
    except ValueError:  # an unknown name: create_model says so
        return None


def needs_dropout_rng(config: Any) -> bool:
    """Whether the configured network draws random numbers in training."""
    return bool(config.get("drop_path_rate", 0.0) or config.get("dropout_rate", 0.0))


def resolve_materialize(config: Any, platform: str) -> bool:
    """``config.materialize``, or when unset (None): on for CPU devices only,
    where storing activations made training faster (BENCHMARKS.md)."""
    return platform == "cpu" if config.materialize is None else bool(config.materialize)


def resolve_conv(config: Any, platform: str) -> Any:
    """The network's convolution for the platform: on the CPU under gradient
    accumulation, :func:`resnet_jax.training.cpu_conv.conv_general_dilated`,
    whose gradients XLA:CPU runs on its fast kernels inside the accumulation
    loop; otherwise None (``lax.conv_general_dilated``)."""
    if platform == "cpu" and config.get("grad_accum_steps", 1) > 1:
        return cpu_conv.conv_general_dilated
    return None


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
    then cosine decay to 0 at ``num_train_steps``. ``'polynomial'`` (MLPerf's
    LARS schedule, its ``PolynomialDecayWithWarmup``): ``lr * step /
    warmup_steps`` up to ``warmup_steps``, then ``(lr - lr_end_value) * (1 -
    t / T) ** lr_power + lr_end_value`` with ``t = step - warmup_steps`` and
    ``T = num_train_steps - warmup_steps + 1``.
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
    if config.lr_schedule == "polynomial":
        decay = optax.polynomial_schedule(
            lr,
            float(config.lr_end_value),
            float(config.lr_power),
            transition_steps=max(int(config.num_train_steps) - warmup + 1, 1),
        )
        if not warmup:
            return decay
        return lambda step: jnp.where(step <= warmup, lr * step / warmup, decay(step - warmup))
    raise UserError(
        f"Unknown lr_schedule {config.lr_schedule!r}; valid: {', '.join(LR_SCHEDULES)}."
    )


def _decay_mask(params: Any) -> Any:
    """True for convolution and dense kernels; False for BatchNorm scales and biases."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params
    )


def lars(
    learning_rate_fn: optax.Schedule,
    weight_decay: float,
    trust_coefficient: float,
    eps: float,
    momentum: float,
    nesterov: bool,
) -> optax.GradientTransformation:
    """MLPerf's LARS (``lars_optimizer.py`` of its ResNet-50 reference): for each
    kernel ``w`` with gradient ``g``, ``v = momentum * v + lr * r * (g + wd * w)``
    and ``w -= v``, where the trust ratio ``r = eta * |w| / (|g| + wd * |w| + eps)``
    (1 when ``|w|`` or ``|g|`` is 0); BatchNorm parameters and biases get
    ``v = momentum * v + lr * g``. ``optax.lars`` divides by ``|g + wd * w|``
    instead. The chain has ``optax.lars``'s four parts and state, so a
    checkpoint of either restores into the other."""

    def decay_and_trust(updates, state, params):
        def one(g, w):
            w_norm, g_norm = jnp.linalg.norm(w), jnp.linalg.norm(g)
            ratio = trust_coefficient * w_norm / (g_norm + weight_decay * w_norm + eps)
            ratio = jnp.where((w_norm > 0) & (g_norm > 0), ratio, 1.0).astype(g.dtype)
            return ratio * (g + weight_decay * w)

        return jax.tree.map(one, updates, params), state

    kernels_only = optax.GradientTransformation(optax.init_empty_state, decay_and_trust)
    return optax.chain(
        optax.masked(kernels_only, _decay_mask),
        optax.masked(optax.identity(), _decay_mask),  # optax.lars's trust ratio's place
        optax.scale_by_learning_rate(learning_rate_fn),
        optax.trace(decay=momentum, nesterov=nesterov),
    )


def base_optimizer(config: Any, learning_rate_fn: optax.Schedule) -> optax.GradientTransformation:
    """``config.optimizer`` at ``learning_rate_fn``, each from optax.

    - ``'sgd'``: the paper's: L2 weight decay added to the gradient, then SGD
      with ``momentum`` (``nesterov``).
    - ``'lars'``: LARS (You et al. 2017) as MLPerf's reference
      (``lars_optimizer.py``): each kernel's update ``g + wd * w`` scaled by
      the trust ratio ``eta * |w| / (|g| + wd * |w| + eps)`` (1 where a norm
      is 0), then the learning rate and ``momentum``; the BatchNorm scales and
      biases get neither weight decay nor the trust ratio (whatever
      ``weight_decay_exclude_bn_bias`` says). :func:`lars` builds it.
    - ``'lamb'``, ``'adamw'``: ``optax.lamb`` and ``optax.adamw`` with
      ``adam_b1``, ``adam_b2``, ``adam_eps``, and decoupled weight decay.

    ``weight_decay_exclude_bn_bias`` masks the weight decay of sgd, lamb and adamw.
    """
    wd = float(config.weight_decay)
    mask = _decay_mask if config.weight_decay_exclude_bn_bias else None
    name = config.get("optimizer", "sgd")
    if name == "sgd":
        return optax.chain(
            optax.add_decayed_weights(wd, mask=mask),
            optax.sgd(learning_rate_fn, momentum=config.momentum, nesterov=config.nesterov),
        )
    if name == "lars":
        return lars(
            learning_rate_fn,
            weight_decay=wd,
            trust_coefficient=float(config.lars_trust_coefficient),
            eps=float(config.lars_eps),
            momentum=float(config.momentum),
            nesterov=bool(config.nesterov),
        )
    adam = dict(b1=float(config.adam_b1), b2=float(config.adam_b2), eps=float(config.adam_eps))
    if name == "lamb":
        return optax.lamb(learning_rate_fn, weight_decay=wd, mask=mask, **adam)
    if name == "adamw":
        return optax.adamw(learning_rate_fn, weight_decay=wd, mask=mask, **adam)
    raise UserError(f"Unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}.")


def create_optimizer(config: Any, learning_rate_fn: optax.Schedule) -> optax.GradientTransformation:
    """The configured optimizer (:func:`base_optimizer`).

    With ``freeze_backbone`` or ``backbone_lr_multiplier``, the head and the
    backbone are two groups of an ``optax.multi_transform``
    (:func:`resnet_jax.training.finetune.partition_optimizer`).
    """
    make = lambda lr_fn: base_optimizer(config, lr_fn)  # noqa: E731
    if finetune.uses_groups(config):
        return finetune.partition_optimizer(config, make, learning_rate_fn)
    return make(learning_rate_fn)


def create_mesh(devices: Any = None) -> Mesh:
    """A 1-D mesh with axis ``'data'`` over every device of every process."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices.reshape(-1), ("data",))


def create_train_state(
    model: models.ResNet,
    tx: optax.GradientTransformation,
    image_shape: tuple[int, ...],
    rng: jax.Array,
    sharding: NamedSharding,
    ema: bool = False,
) -> TrainState:
    """Initialises the replicated state directly on the devices; with ``ema``,
    its average starts as a copy of the initial weights."""

    def init(rng):
        variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
        return TrainState.create(
            apply_fn=model.apply,
            params=variables["params"],
            batch_stats=variables["batch_stats"],
            tx=tx,
            # Copies: a donated state must not hold one buffer twice.
            ema=jax.tree.map(jnp.copy, dict(variables)) if ema else None,
        )

    return jax.jit(init, out_shardings=sharding)(rng)
