"""Converters between other frameworks' ResNet weights and ``(module, variables)``.

* :func:`from_keras`: a ``keras.applications`` ResNet50/101/152 (v1) or
  ResNet50V2/101V2/152V2 object.
* :func:`from_torchvision`: torchvision's ``resnet*``, ``resnext*`` and
  ``wide_resnet*`` state dicts (and timm's, which share the naming), and the
  option-A CIFAR ResNets of most PyTorch reproductions.
* :func:`from_timm`: timm's ``resnet*``, ``resnet*d``, ``resnext*``,
  ``seresnet*``, ``seresnext*``, ``wide_resnet*`` and BatchNorm ``resnetv2_*``.
* :func:`from_transformers`: Hugging Face ``ResNetModel`` /
  ``ResNetForImageClassification`` state dicts or checkpoint directories.
* :func:`to_torchvision`: a v1.5 ImageNet model (ResNeXt and wide included)
  as a torchvision state dict.

Every ``from_*`` returns a :class:`Converted`: a 2-tuple ``(module,
variables)`` (``module.apply(variables, x_nhwc)``) that also carries
``.preprocessing``, the :class:`Preprocessing` its weights expect;
:func:`preprocess` applies one to a batch of images.

A PyTorch converter's result (:func:`from_torchvision`,
:func:`from_transformers`) computes the same function as its source: in
inference mode (running statistics, copied as stored; torch and flax both
normalise with them directly) and in training mode (batch statistics, biased
variance in both). BatchNorm keeps torch's epsilon (1e-5) and momentum
(torch's 0.1 is our 0.9). Training updates differ in one detail: torch updates
the running variance with the unbiased batch variance, flax with the biased
one, a factor ``n / (n - 1)`` for ``n`` values per channel.

No framework is imported at module level. Keras models are passed in;
``.safetensors`` files are read with the ``safetensors`` package and numpy;
torch is imported only to read ``.pth``/``.bin`` pickles. Converters never
download anything: they take a path or an in-memory state dict.
:func:`pretrained` (:mod:`resnet_jax.weights.pretrained`) is the one that
downloads: published torchvision / Hugging Face / timm files, then converted by
the converters here.

Modules: :mod:`~resnet_jax.weights.preprocessing` (the records and
:func:`preprocess`), :mod:`~resnet_jax.weights.torch_layout` (torchvision and
timm state dicts), :mod:`~resnet_jax.weights.timm_layout` (timm's later
ResNets), :mod:`~resnet_jax.weights.hf_layout` (transformers),
:mod:`~resnet_jax.weights.keras_layout`, :mod:`~resnet_jax.weights.to_torch`
(the export) and :mod:`~resnet_jax.weights.pretrained` (downloads).
"""

from __future__ import annotations

from resnet_jax.weights.hf_layout import from_transformers, torchvision_to_hf
from resnet_jax.weights.keras_layout import from_keras
from resnet_jax.weights.preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INTERPOLATIONS,
    PREPROCESSING,
    Converted,
    Preprocessing,
    preprocess,
)
from resnet_jax.weights.pretrained import pretrained
from resnet_jax.weights.timm_layout import from_timm
from resnet_jax.weights.to_torch import to_torchvision
from resnet_jax.weights.torch_layout import (
    CONVERTER_OPTIONS,
    TORCH_BN_EPSILON,
    TORCH_BN_MOMENTUM,
    TorchNeededError,
    WeightsFileError,
    from_torchvision,
)

__all__ = [
    "CONVERTER_OPTIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INTERPOLATIONS",
    "PREPROCESSING",
    "TORCH_BN_EPSILON",
    "TORCH_BN_MOMENTUM",
    "Converted",
    "Preprocessing",
    "TorchNeededError",
    "WeightsFileError",
    "from_keras",
    "from_timm",
    "from_torchvision",
    "from_transformers",
    "preprocess",
    "pretrained",
    "to_torchvision",
    "torchvision_to_hf",
]
