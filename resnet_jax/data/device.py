"""The CIFAR fast path: the training set on the devices, augmentation on the
devices, many steps per host call.

For small datasets (CIFAR, digits) the host-side input pipeline and the
per-step dispatch dominate a small ResNet's step on a GPU. Here the uint8
images live on every device (150 MB for CIFAR-10), each step's batch is drawn
from a per-epoch ``jax.random.permutation`` and augmented (pad, random crop,
flip) inside the jitted computation, and ``lax.scan`` runs ``k`` train steps
per call. Everything is a function of ``(seed, step)``, so resumes stay exact.

Needs jax only (no TensorFlow).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding


class DeviceData(NamedTuple):
    """A training split on the devices: ``images`` (N, H, W, C) uint8, ``labels``
    (N,) int32, ``mean`` (H, W, C) float32 on the 0..1 scale."""

    images: jax.Array
    labels: jax.Array
    mean: jax.Array


def put_on_devices(
    images: np.ndarray, labels: np.ndarray, mean: np.ndarray, sharding: NamedSharding
) -> DeviceData:
    """Copies a split to every device (replicated)."""
    return DeviceData(
        jax.device_put(np.asarray(images, np.uint8), sharding),
        jax.device_put(np.asarray(labels, np.int32), sharding),
        jax.device_put(np.asarray(mean, np.float32), sharding),
    )


def pad_crop_flip(key: jax.Array, images: jax.Array, pad: int, flip: bool) -> jax.Array:
    """Per-image random crop of the ``pad``-padded images and random horizontal flip."""
    b, h, w, c = images.shape
    k_y, k_x, k_f = jax.random.split(key, 3)
    if pad:
        padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        ys = jax.random.randint(k_y, (b,), 0, 2 * pad + 1)
        xs = jax.random.randint(k_x, (b,), 0, 2 * pad + 1)
        images = jax.vmap(lambda im, y, x: jax.lax.dynamic_slice(im, (y, x, 0), (h, w, c)))(
            padded, ys, xs
        )
    if flip:
        mirror = jax.random.bernoulli(k_f, 0.5, (b,))
        images = jnp.where(mirror[:, None, None, None], images[:, :, ::-1, :], images)
    return images


def batch_at(
    data: DeviceData,
    step: jax.Array,
    *,
    seed: int,
    batch_size: int,
    augment: bool = True,
    pad: int = 4,
    flip: bool = True,
) -> dict[str, jax.Array]:
    """The global training batch of ``step``: epoch ``step // steps_per_epoch``
    is a permutation of the split (the remainder of each epoch is dropped)."""
    n = data.labels.shape[0]
    steps_per_epoch = n // batch_size
    epoch, k = step // steps_per_epoch, step % steps_per_epoch
    key = jax.random.key(seed)
    perm = jax.random.permutation(jax.random.fold_in(jax.random.fold_in(key, 0), epoch), n)
    idx = jax.lax.dynamic_slice(perm, (k * batch_size,), (batch_size,))
    images = data.images[idx]
    if augment:
        images = pad_crop_flip(
            jax.random.fold_in(jax.random.fold_in(key, 1), step), images, pad, flip
        )
    return {
        "image": images.astype(jnp.float32) / 255.0 - data.mean,
        "label": data.labels[idx],
    }


def make_multi_step(
    train_step: Callable[[Any, dict], tuple[Any, dict]],
    batch_fn: Callable[[DeviceData, jax.Array], dict],
    steps_per_call: int,
    data_sharding: NamedSharding,
    unroll: bool = False,
) -> Callable[[Any, DeviceData, jax.Array], tuple[Any, dict]]:
    """``fn(state, data, start_step) -> (state, metrics)`` running ``steps_per_call``
    train steps in one ``lax.scan``; metrics are stacked along a leading axis.

    ``unroll=True`` unrolls the scan: the caller asks for it on CPU devices,
    where XLA:CPU runs a ResNet step inside a while loop several times slower
    than outside one (BENCHMARKS.md); GPUs and TPUs run the rolled loop.
    """

    def multi(state, data, start_step):
        def body(state, i):
            batch = batch_fn(data, start_step + i)
            batch = jax.lax.with_sharding_constraint(batch, data_sharding)
            return train_step(state, batch)

        return jax.lax.scan(body, state, jnp.arange(steps_per_call), unroll=bool(unroll))

    return multi
