"""The pure steps: :class:`TrainState`, :func:`train_step`, :func:`eval_step`.

Functions of arrays only: no orbax, no TensorFlow, no I/O. The trainer jits
them once over a 1-D device ``Mesh`` (axis ``'data'``): the batch is sharded
along it and the state replicated, so BatchNorm statistics and gradients are
global by construction. The same code runs on one CPU, every GPU of a host,
or every chip of a multi-host TPU slice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from resnet_jax.training.mixing import MixConfig, mix_batch
from resnet_jax.training.mixing import random_erasing as random_erasing_fn


class TrainState(train_state.TrainState):
    """``step``, ``params``, ``opt_state`` (from Flax) plus ``batch_stats``, and
    with ``ema_decay`` the average ``ema = {"params", "batch_stats"}`` (None
    without: the state, and its checkpoints, are then as before EMA existed)."""

    batch_stats: Any
    ema: Any = None


@dataclasses.dataclass(frozen=True)
class EmaConfig:
    """The weights' exponential moving average (config keys ``ema_*``).

    Every ``every_steps`` steps, ``ema = decay * ema + (1 - decay) * model``
    for the parameters and the BatchNorm statistics, as torchvision's
    ``ExponentialMovingAverage`` (an ``AveragedModel`` over parameters and
    buffers) in its reference script: its first update, and every update
    while the learning rate warms up (``warmup_steps``), copy the model.
    """

    decay: float
    every_steps: int = 1
    warmup_steps: int = 0


def ema_update(ema: Any, params: Any, batch_stats: Any, step: jax.Array, cfg: EmaConfig) -> Any:
    """The average after step ``step`` (the new step count, 1-based) has made
    ``params`` and ``batch_stats``."""
    current = {"params": params, "batch_stats": batch_stats}
    due = step % cfg.every_steps == 0
    copy = step <= max(cfg.warmup_steps, cfg.every_steps)
    decay = jnp.where(copy, 0.0, cfg.decay)
    return jax.tree.map(
        lambda e, x: jnp.where(due, decay * e + (1.0 - decay) * x, e).astype(e.dtype),
        ema,
        current,
    )


def ema_state(state: TrainState) -> TrainState:
    """``state`` with its EMA weights in place of the model's (to evaluate them)."""
    return state.replace(params=state.ema["params"], batch_stats=state.ema["batch_stats"])


def cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int, smoothing: float = 0.0):
    """Per-example softmax cross-entropy in float32, with optional label smoothing."""
    return soft_cross_entropy(logits, targets(labels, num_classes, smoothing))


def targets(labels: jax.Array, num_classes: int, smoothing: float = 0.0) -> jax.Array:
    """(B, K) float32 one-hot labels, smoothed as timm's (``1 - s + s/K`` on, ``s/K`` off)."""
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if smoothing:
        onehot = optax.smooth_labels(onehot, smoothing)
    return onehot


def soft_cross_entropy(logits: jax.Array, target: jax.Array) -> jax.Array:
    """Per-example cross-entropy of float32 logits against label distributions."""
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), target)


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
    dropout_key: jax.Array | None = None,
    augment_key: jax.Array | None = None,
    mix: MixConfig | None = None,
    random_erasing: float = 0.0,
    grad_accum_steps: int = 1,
    micro_batch_sharding: Any = None,
    ema: EmaConfig | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update on a global batch; returns the new state and scalar metrics.

    With ``freeze_bn_stats`` BatchNorm runs in inference mode: it normalises
    with the running statistics and leaves them unchanged (fine-tuning).

    ``batch["image"]`` is normalised float32, or uint8 pixels that are
    normalised here with ``mean`` (see :func:`model_input`).

    ``dropout_key``: for a network with stochastic depth or dropout, the
    run's key; the step's randomness is ``fold_in(dropout_key, state.step)``,
    a function of the step alone, so a resumed run draws what the
    uninterrupted one drew. ``augment_key`` likewise drives ``random_erasing``
    (a probability, :func:`resnet_jax.training.mixing.random_erasing`) and
    ``mix`` (mixup and CutMix, :func:`resnet_jax.training.mixing.mix_batch`),
    applied in that order, as torchvision's recipe does (erasing per image,
    mixing per batch).

    ``grad_accum_steps = k > 1``: the batch is split into ``k`` interleaved
    micro-batches (micro-batch ``j`` holds examples ``j, j+k, j+2k, ...``, so
    each device splits its own shard and no example moves between devices;
    ``micro_batch_sharding`` is the sharding of the (k, B/k, ...) stack, e.g.
    ``P(None, "data")``) run one after another in a ``lax.scan``; their mean
    gradient makes one update and their BatchNorm statistics are averaged, so
    the step equals one with ``bn_groups`` k times larger on the batch
    reordered micro-batch by micro-batch (``GroupedBatchNorm`` averages its
    groups' updates the same way), with one micro-batch's activations in
    memory. Micro-batch ``j`` draws dropout from ``fold_in(step key, j)``.

    ``ema``: updates ``state.ema`` after the step (:func:`ema_update`).

    Metrics: ``loss`` (mean cross-entropy against the (mixed, smoothed)
    targets, without the weight-decay term), ``accuracy`` (against the
    unmixed labels), ``learning_rate``, ``finite`` (1.0 when loss and
    gradients are finite). With ``skip_nonfinite`` a non-finite step leaves
    the state unchanged except for the step counter.
    """
    k = int(grad_accum_steps)
    images = model_input(batch["image"], mean)
    labels = batch["label"]
    target = targets(labels, num_classes, label_smoothing)
    images, target = _augment(augment_key, state.step, images, target, random_erasing, mix)

    grad_fn = jax.value_and_grad(_loss_fn(state, freeze_bn_stats), has_aux=True)
    step_rng = None if dropout_key is None else jax.random.fold_in(dropout_key, state.step)
    if k == 1:
        (loss, (logits, batch_stats)), grads = grad_fn(state.params, images, target, step_rng)
        correct = jnp.mean(jnp.argmax(logits, -1) == labels)
    else:
        loss, correct, grads, batch_stats = _accumulate(
            grad_fn, state, images, target, labels, step_rng, k, micro_batch_sharding
        )
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    new_state, finite = _finish(state, new_state, loss, grads, skip_nonfinite, ema)
    metrics = {
        "loss": loss,
        "accuracy": correct,
        "learning_rate": learning_rate_fn(state.step),
        "finite": finite.astype(jnp.float32),
    }
    return new_state, metrics


def _loss_fn(state: TrainState, freeze_bn_stats: bool) -> Callable:
    """``loss_fn(params, images, target, rng) -> (loss, (logits, batch_stats))``:
    the mean cross-entropy of ``state``'s network against ``target``, in
    training mode (or, with ``freeze_bn_stats``, inference mode)."""

    def loss_fn(params, images, target, rng):
        variables = {"params": params, "batch_stats": state.batch_stats}
        if freeze_bn_stats:
            logits, stats = state.apply_fn(variables, images, train=False), state.batch_stats
        else:
            # rngs only for a network that draws (an apply_fn need not take it).
            rngs = {} if rng is None else {"rngs": {"dropout": rng}}
            logits, updates = state.apply_fn(
                variables, images, train=True, mutable=["batch_stats"], **rngs
            )
            stats = updates["batch_stats"]
        loss = soft_cross_entropy(logits, target).mean()
        return loss, (logits, stats)

    return loss_fn


def _finish(state, new_state, loss, grads, skip_nonfinite, ema):
    """``(new_state, finite)``: whether loss, gradients and updated parameters
    are finite (a finite gradient times a huge learning rate can still
    overflow), the update undone where not and ``skip_nonfinite``, and the EMA
    advanced."""
    finite = jnp.isfinite(loss) & jnp.all(
        jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves((grads, new_state.params))])
    )
    if skip_nonfinite:
        new_state = _keep_if_finite(finite, new_state, state)
    if ema is not None:
        new_state = new_state.replace(
            ema=ema_update(state.ema, new_state.params, new_state.batch_stats, new_state.step, ema)
        )
    return new_state, finite


def _augment(key, step, images, target, random_erasing, mix):
    """Random erasing (per image), then mixup/CutMix (per batch), drawn from
    ``fold_in(key, step)``; ``(images, target)`` unchanged when both are off."""
    if key is None or not (random_erasing or (mix is not None and mix.enabled)):
        return images, target
    k_erase, k_mix = jax.random.split(jax.random.fold_in(key, step))
    if random_erasing:
        images = random_erasing_fn(k_erase, images, random_erasing)
    if mix is not None and mix.enabled:
        images, target, _ = mix_batch(k_mix, images, target, mix)
    return images, target


def _keep_if_finite(finite, new_state, state):
    """``new_state`` where ``finite``, else ``state``'s values. Integer leaves
    (the step counter, optax's schedule counts) advance either way, so the
    learning rate keeps following the step."""
    kept = jax.tree.map(
        lambda new, old: (
            new if jnp.issubdtype(new.dtype, jnp.integer) else jnp.where(finite, new, old)
        ),
        (new_state.params, new_state.batch_stats, new_state.opt_state),
        (state.params, state.batch_stats, state.opt_state),
    )
    return new_state.replace(params=kept[0], batch_stats=kept[1], opt_state=kept[2])


def _accumulate(grad_fn, state, images, target, labels, step_rng, k, sharding):
    """Mean loss, accuracy, gradient and new BatchNorm statistics of ``k``
    interleaved micro-batches, one at a time (a ``lax.scan``).

    Micro-batch ``j`` is examples ``j, j+k, ...``: each device's consecutive
    shard of the batch splits in place. (Consecutive micro-batches would move
    examples between devices, and XLA 0.10's CPU backend then computes
    gradients 2% off on 8 devices; tests/training/test_modern.py.)"""

    def split(x):
        x = jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
        return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)

    micro = (split(images), split(target), split(labels), jnp.arange(k))
    zeros = jax.tree.map(jnp.zeros_like, (state.params, state.batch_stats))

    def body(carry, xs):
        g_sum, s_sum, loss_sum, correct_sum = carry
        x, t, y, j = xs
        rng = None if step_rng is None else jax.random.fold_in(step_rng, j)
        (loss, (logits, stats)), g = grad_fn(state.params, x, t, rng)
        correct = jnp.mean(jnp.argmax(logits, -1) == y)
        g_sum, s_sum = jax.tree.map(jnp.add, (g_sum, s_sum), (g, stats))
        return (g_sum, s_sum, loss_sum + loss, correct_sum + correct), None

    init = (*zeros, jnp.float32(0.0), jnp.float32(0.0))
    (g_sum, s_sum, loss_sum, correct_sum), _ = jax.lax.scan(body, init, micro)
    grads, stats = jax.tree.map(lambda a: a / k, (g_sum, s_sum))
    return loss_sum / k, correct_sum / k, grads, stats


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
