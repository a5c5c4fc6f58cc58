"""What converted weights expect as input: :class:`Preprocessing` records, the
published recipes (``PREPROCESSING``), :func:`preprocess`, and :class:`Converted`
(what every converter returns: ``(module, variables)`` plus its preprocessing).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.models import ResNet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """The input a set of weights expects, as the recipe that makes it from images.

    :func:`preprocess` applies it in this order: resize so that the shorter
    side is ``resize`` pixels (aspect ratio kept), crop the centre ``crop`` x
    ``crop`` pixels, scale to [0, 1], put the channels in ``channels`` order,
    then subtract ``mean`` and divide by ``std``.

    Attributes:
      mean, std: per-channel statistics in [0, 1] units, in ``channels`` order.
      resize: the shorter side after resizing, in pixels; None: no resize.
      crop: the side of the square centre crop, in pixels; None: no crop.
      interpolation: 'bilinear', 'bicubic' or 'nearest'; shrinking is
        antialiased, as PIL and torchvision (antialias=True) do.
      channels: 'RGB', or 'BGR' for weights trained in Caffe (Keras').
    """

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    resize: int | None = 256
    crop: int | None = 224
    interpolation: str = "bilinear"
    channels: str = "RGB"

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"Unknown interpolation {self.interpolation!r}; valid: {', '.join(INTERPOLATIONS)}."
            )
        if self.channels not in ("RGB", "BGR"):
            raise ValueError(f"channels must be 'RGB' or 'BGR', got {self.channels!r}.")
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean {self.mean} and std {self.std} differ in length.")
        for field in ("resize", "crop"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{field} must be a positive int or None, got {value!r}.")

    @classmethod
    def from_timm(cls, cfg: Mapping[str, Any]) -> Preprocessing:
        """The evaluation preprocessing of a timm ``pretrained_cfg`` (a plain dict).

        As ``timm.data.create_transform(**resolve_data_config({}, model=m))``:
        resize to ``floor(input_size / crop_pct)``, centre crop ``input_size``.
        E.g. ``Preprocessing.from_timm(timm.create_model('resnet50.a1_in1k').pretrained_cfg)``.

        Raises:
          ValueError: for a non-square input size or a crop mode other than 'center'.
        """
        _, height, width = cfg.get("input_size", (3, 224, 224))
        if height != width or cfg.get("crop_mode", "center") not in (None, "center"):
            raise ValueError(
                f"Only square input sizes with crop_mode='center' are supported, got "
                f"input_size={cfg.get('input_size')} crop_mode={cfg.get('crop_mode')!r}."
            )
        crop_pct = cfg.get("crop_pct") or 0.875
        return cls(
            mean=tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN)),
            std=tuple(float(v) for v in cfg.get("std", IMAGENET_STD)),
            resize=math.floor(height / crop_pct),
            crop=int(height),
            interpolation=cfg.get("interpolation") or "bilinear",
        )


# The published weights' own recipes: torchvision's weight transforms
# (ResNet*_Weights.IMAGENET1K_V1/V2.transforms()), the image processor of
# microsoft/resnet-* (ConvNext's: shorter side 224 / crop_pct 0.875, bicubic),
# akamaster/pytorch_resnet_cifar10 (ImageNet statistics on 32x32 images) and
# keras.applications.resnet.preprocess_input (Caffe's BGR mean, no scaling)
# and keras.applications.resnet_v2.preprocess_input (x / 127.5 - 1, RGB).
PREPROCESSING: dict[str, Preprocessing] = {
    "torchvision": Preprocessing(resize=256, crop=224, interpolation="bilinear"),
    "torchvision-v2": Preprocessing(resize=232, crop=224, interpolation="bilinear"),
    "huggingface": Preprocessing(resize=256, crop=224, interpolation="bicubic"),
    "cifar": Preprocessing(resize=None, crop=None),
    "keras": Preprocessing(
        mean=(103.939 / 255, 116.779 / 255, 123.68 / 255),
        std=(1 / 255, 1 / 255, 1 / 255),
        resize=256,
        crop=224,
        channels="BGR",
    ),
    "keras-v2": Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize=256, crop=224),
}


def preprocessing_record(p: Preprocessing | str) -> Preprocessing:
    if isinstance(p, Preprocessing):
        return p
    if p not in PREPROCESSING:
        raise ValueError(
            f"Unknown preprocessing {p!r}; valid names: {', '.join(PREPROCESSING)}, or a "
            "Preprocessing record."
        )
    return PREPROCESSING[p]


def preprocess(images: Any, preprocessing: Preprocessing | str) -> jax.Array:
    """Turns images into the input a converted model expects.

    Resizes (the shorter side to ``preprocessing.resize``, antialiased),
    centre-crops, scales to [0, 1] and normalises, in jax.numpy, as the
    torchvision / timm / Hugging Face evaluation transforms do; resampling
    kernels differ slightly between libraries, so results agree with theirs
    to about one grey level, not bit for bit. uint8 images are rounded back
    to integers after resizing, as PIL and torchvision do with uint8 images.

    Args:
      images: ``(N, H, W, 3)`` or ``(H, W, 3)`` RGB images, uint8 or floats
        in [0, 255]; one size for the whole batch.
      preprocessing: a :class:`Preprocessing` or a name in ``PREPROCESSING``
        (e.g. ``converted.preprocessing``).

    Returns:
      float32 ``(N, crop, crop, 3)`` (or ``(crop, crop, 3)`` for one image),
      NHWC, for ``module.apply``.

    Raises:
      ValueError: for images smaller than the crop, or not of rank 3 or 4.
    """
    p = preprocessing_record(preprocessing)
    x = jnp.asarray(images)
    integer = jnp.issubdtype(x.dtype, jnp.integer)
    if x.ndim not in (3, 4):
        raise ValueError(f"images must be (N, H, W, C) or (H, W, C), got shape {x.shape}.")
    single = x.ndim == 3
    x = x[None] if single else x
    x = x.astype(jnp.float32)
    n, h, w, c = x.shape
    if p.resize is not None:
        # torchvision's rule: the shorter side to `resize`, the longer one truncated.
        if h <= w:
            h, w = p.resize, int(p.resize * w / h)
        else:
            h, w = int(p.resize * h / w), p.resize
        x = jax.image.resize(x, (n, h, w, c), method=p.interpolation, antialias=True)
        x = jnp.clip(jnp.round(x) if integer else x, 0.0, 255.0)
    if p.crop is not None:
        if min(h, w) < p.crop:
            raise ValueError(f"Images of {h}x{w} pixels are smaller than the {p.crop}-pixel crop.")
        top, left = int(round((h - p.crop) / 2.0)), int(round((w - p.crop) / 2.0))
        x = x[:, top : top + p.crop, left : left + p.crop, :]
    x = x / 255.0
    if p.channels == "BGR":
        x = x[..., ::-1]
    x = (x - jnp.asarray(p.mean, jnp.float32)) / jnp.asarray(p.std, jnp.float32)
    return x[0] if single else x


class Converted(tuple):
    """What a converter returns: the 2-tuple ``(module, variables)``, plus preprocessing.

    It unpacks like the ``(module, variables)`` pair of :func:`from_keras`
    (``module, variables = from_torchvision(...)``); the parts are also
    ``.module``, ``.variables`` and ``.preprocessing`` (the
    :class:`Preprocessing` the weights expect, for :func:`preprocess`).
    """

    def __new__(
        cls, module: ResNet, variables: dict[str, Any], preprocessing: Preprocessing
    ) -> Converted:
        self = super().__new__(cls, (module, variables))
        self.preprocessing = preprocessing
        return self

    def __getnewargs__(self):  # pickle and copy
        return (self[0], self[1], self.preprocessing)

    @property
    def module(self) -> ResNet:
        return self[0]

    @property
    def variables(self) -> dict[str, Any]:
        return self[1]

    def __repr__(self) -> str:
        n = sum(int(np.size(v)) for v in jax.tree.leaves(self[1].get("params", {})))
        return (
            f"Converted(module={self[0]!r}, variables=<{n:,} parameters>, "
            f"preprocessing={self.preprocessing!r})"
        )
