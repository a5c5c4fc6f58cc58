"""Batch augmentation on the devices, inside the jitted train step: mixup,
CutMix and random erasing. Pure functions of a key and arrays; the trainer's
key is ``fold_in(key, step)``, so a resumed run draws what the uninterrupted
one drew.

- :func:`mix_batch`: timm's ``Mixup`` in ``'batch'`` mode (one lambda per
  batch; each example mixed with the one at the mirrored position, the batch
  reversed), with timm's area-corrected lambda for CutMix and label smoothing
  applied before mixing, as timm's ``mixup_target``.
- :func:`random_erasing`: torchvision's ``RandomErasing`` per example
  (``value=0`` on normalised images, which is the mean pixel here).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class MixConfig:
    """Mixup and CutMix settings (config keys of the same names)."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    mix_switch_prob: float = 0.5

    @property
    def enabled(self) -> bool:
        return self.mix_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


def cut_box(key: jax.Array, lam: jax.Array, height: int, width: int) -> tuple[jax.Array, ...]:
    """timm's ``rand_bbox``: a box of sides ``int(H * sqrt(1 - lam))`` and
    ``int(W * sqrt(1 - lam))`` around a uniform centre, clipped to the image.
    Returns ``(y0, y1, x0, x1)`` (int32, end exclusive)."""
    ratio = jnp.sqrt(1.0 - lam)
    cut_h = jnp.floor(height * ratio).astype(jnp.int32)
    cut_w = jnp.floor(width * ratio).astype(jnp.int32)
    ky, kx = jax.random.split(key)
    cy = jax.random.randint(ky, (), 0, height)
    cx = jax.random.randint(kx, (), 0, width)
    y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
    x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
    return y0, y1, x0, x1


def box_mask(box: tuple[jax.Array, ...], height: int, width: int) -> jax.Array:
    """(H, W, 1) bool: True inside ``box``."""
    y0, y1, x0, x1 = box
    ys = jnp.arange(height)[:, None]
    xs = jnp.arange(width)[None, :]
    return ((ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1))[..., None]


def mix_batch(
    key: jax.Array, images: jax.Array, targets: jax.Array, cfg: MixConfig
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Mixes a batch with its reverse.

    ``images``: (B, H, W, C) float; ``targets``: (B, K) float32 label
    distributions (one-hot, already smoothed). With probability
    ``mix_prob`` the batch is mixed: by CutMix with probability
    ``mix_switch_prob`` when both alphas are set (else by the one that is),
    with ``lam ~ Beta(alpha, alpha)``; CutMix pastes the reversed batch's box
    and corrects ``lam`` to the pixels kept. ``targets`` become ``lam *
    targets + (1 - lam) * reversed targets``. Returns the images, the targets
    and ``{"mix_lambda", "cutmix"}`` (scalars, for tests and logging).
    """
    _, height, width, _ = images.shape
    k_apply, k_switch, k_mixup, k_cutmix, k_box = jax.random.split(key, 5)
    apply = jax.random.uniform(k_apply) < cfg.mix_prob
    if cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(k_switch) < cfg.mix_switch_prob
    else:
        use_cutmix = jnp.asarray(cfg.cutmix_alpha > 0)
    lam_mixup = (
        jax.random.beta(k_mixup, cfg.mixup_alpha, cfg.mixup_alpha) if cfg.mixup_alpha > 0 else 1.0
    )
    lam_cut = (
        jax.random.beta(k_cutmix, cfg.cutmix_alpha, cfg.cutmix_alpha)
        if cfg.cutmix_alpha > 0
        else jnp.float32(1.0)
    )
    box = cut_box(k_box, lam_cut, height, width)
    inside = box_mask(box, height, width)
    y0, y1, x0, x1 = box
    lam_cut = 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (height * width)

    flipped = images[::-1]
    mixed_up = lam_mixup * images + (1.0 - lam_mixup) * flipped
    cut = jnp.where(inside[None], flipped, images)
    out = jnp.where(use_cutmix, cut, mixed_up)
    lam = jnp.where(use_cutmix, lam_cut, lam_mixup)
    images = jnp.where(apply, out, images).astype(images.dtype)
    lam = jnp.where(apply, lam, 1.0).astype(jnp.float32)
    targets = lam * targets + (1.0 - lam) * targets[::-1]
    return images, targets, {"mix_lambda": lam, "cutmix": (apply & use_cutmix).astype(jnp.float32)}


# torchvision's RandomErasing defaults.
ERASE_SCALE = (0.02, 0.33)
ERASE_RATIO = (0.3, 3.3)
ERASE_ATTEMPTS = 10


def erase_boxes(key: jax.Array, batch: int, height: int, width: int, prob: float) -> jax.Array:
    """Per example, torchvision's ``RandomErasing.get_params``: with
    probability ``prob``, up to 10 attempts at a box of ``U(0.02, 0.33)`` of
    the area and a log-uniform aspect in (0.3, 3.3), the first that fits.
    Returns (B, 4) int32 ``(y0, y1, x0, x1)``; an empty box where none is
    erased."""
    k_apply, k_area, k_ratio, k_y, k_x = jax.random.split(key, 5)
    shape = (batch, ERASE_ATTEMPTS)
    area = (
        height
        * width
        * jax.random.uniform(k_area, shape, minval=ERASE_SCALE[0], maxval=ERASE_SCALE[1])
    )
    log_ratio = jax.random.uniform(
        k_ratio, shape, minval=math.log(ERASE_RATIO[0]), maxval=math.log(ERASE_RATIO[1])
    )
    aspect = jnp.exp(log_ratio)
    h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    fits = (h < height) & (w < width)
    # torch.randint(0, H - h + 1): uniform offsets over the positions that fit.
    y0 = jnp.floor(jax.random.uniform(k_y, shape) * (height - h + 1)).astype(jnp.int32)
    x0 = jnp.floor(jax.random.uniform(k_x, shape) * (width - w + 1)).astype(jnp.int32)
    first = jnp.argmax(fits, axis=1)
    take = lambda a: jnp.take_along_axis(a, first[:, None], axis=1)[:, 0]  # noqa: E731
    erase = (jax.random.uniform(k_apply, (batch,)) < prob) & jnp.any(fits, axis=1)
    h, w, y0, x0 = (jnp.where(erase, take(a), 0) for a in (h, w, y0, x0))
    return jnp.stack([y0, y0 + h, x0, x0 + w], axis=1)


def random_erasing(key: jax.Array, images: jax.Array, prob: float) -> jax.Array:
    """torchvision's ``RandomErasing(p=prob, value=0)`` on each image of a
    normalised (B, H, W, C) batch (0 is the mean pixel: ``images / 255 - mean``)."""
    batch, height, width, _ = images.shape
    boxes = erase_boxes(key, batch, height, width, prob)
    ys = jnp.arange(height)[None, :, None]
    xs = jnp.arange(width)[None, None, :]
    y0, y1, x0, x1 = (boxes[:, i, None, None] for i in range(4))
    inside = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
    return jnp.where(inside[..., None], jnp.zeros((), images.dtype), images)
