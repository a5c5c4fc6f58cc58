"""The pure steps: :class:`TrainState`, :func:`train_step`, :func:`eval_step`.

Functions of arrays only: no orbax, no TensorFlow, no I/O. The trainer jits
them once over a 1-D device ``Mesh`` (axis ``'data'``): the batch is sharded
along it and the state replicated, so BatchNorm statistics and gradients are
global by construction. The same code runs on one CPU, every GPU of a host,
or every chip of a multi-host TPU slice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state


class TrainState(train_state.TrainState):
    """``step``, ``params``, ``opt_state`` (from Flax) plus ``batch_stats``."""

    batch_stats: Any


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
    dropout_key: jax.Array | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step on a global batch; returns the new state and scalar metrics.

    With ``freeze_bn_stats`` BatchNorm runs in inference mode: it normalises
    with the running statistics and leaves them unchanged (fine-tuning).

    ``batch["image"]`` is normalised float32, or uint8 pixels that are
    normalised here with ``mean`` (see :func:`model_input`).

    ``dropout_key``: for a network with stochastic depth or dropout, the
    run's key; the step's randomness is ``fold_in(dropout_key, state.step)``,
    a function of the step alone, so a resumed run draws what the
    uninterrupted one drew.

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
            # rngs only for a network that draws (an apply_fn need not take it).
            rngs = (
                {}
                if dropout_key is None
                else {"rngs": {"dropout": jax.random.fold_in(dropout_key, state.step)}}
            )
            logits, updates = state.apply_fn(
                variables, images, train=True, mutable=["batch_stats"], **rngs
            )
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
