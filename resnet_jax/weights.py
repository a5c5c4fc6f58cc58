"""Converters between other frameworks' ResNet weights and ``(module, variables)``.

* :func:`from_keras`: a ``keras.applications`` ResNet50/101/152 (v1) object.
* :func:`from_torchvision`: torchvision's and timm's plain ``resnet*`` state
  dicts, and the option-A CIFAR ResNets of most PyTorch reproductions.
* :func:`from_transformers`: Hugging Face ``ResNetModel`` /
  ``ResNetForImageClassification`` state dicts or checkpoint directories.
* :func:`to_torchvision`: a v1.5 ImageNet model as a torchvision state dict.

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
:func:`pretrained` (from :mod:`resnet_jax.hub`) is the one that downloads:
published torchvision / Hugging Face / timm files into a checked cache,
then converted by the converters here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from resnet_jax.hub import pretrained  # noqa: F401  re-exported; the one that downloads
from resnet_jax.models import IMAGENET_WIDTHS, BasicBlock, BottleneckBlock, ResNet, model_spec

# --------------------------------------------------------------------------- #
# What converters return: the model and the preprocessing its weights expect.
# --------------------------------------------------------------------------- #

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
# keras.applications.resnet.preprocess_input (Caffe's BGR mean, no scaling).
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
}


def _preprocessing(p: Preprocessing | str) -> Preprocessing:
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
    p = _preprocessing(preprocessing)
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


_SUPPORTED = "keras.applications.ResNet50, ResNet101 and ResNet152 (v1, channels_last)"


def _unsupported(why: str) -> ValueError:
    return ValueError(
        f"from_keras cannot convert this model: {why}. Supported: {_SUPPORTED}, with "
        "include_top=True or include_top=False with pooling='avg'."
    )


def from_keras(keras_model: Any) -> Converted:
    """Converts a ``keras.applications`` ResNet (v1) into a Flax module and variables.

    The result computes the same function: same logits in inference mode and
    the same batch-statistics path in training mode. Keras' convolution biases
    (ResNet v1 in Keras has them; each is followed by BatchNorm) are folded
    exactly into the BatchNorm running mean: BN(Wx + b) with mean ``m`` equals
    BN(Wx) with mean ``m - b``, and in training mode the batch mean absorbs
    ``b`` the same way, so running-statistic updates stay consistent. The
    module keeps Keras' BatchNorm epsilon (1.001e-5) and momentum (0.99).

    The converted model returns logits: a Keras classifier with
    ``classifier_activation='softmax'`` outputs ``jax.nn.softmax(logits)``.
    Inputs are preprocessed as for the Keras model
    (``keras.applications.resnet.preprocess_input``: BGR, mean-subtracted).

    Args:
      keras_model: e.g. ``keras.applications.ResNet50(weights=None)`` or with
        ``weights='imagenet'``; any input size.

    Returns:
      A :class:`Converted` ``(module, {'params': ..., 'batch_stats': ...})``
      for ``module.apply(variables, x_nhwc, train=False)``, whose
      ``.preprocessing`` is ``PREPROCESSING['keras']`` (Caffe's: BGR,
      mean-subtracted, unscaled).

    Raises:
      ValueError: for a model this converter does not support (ResNetV2,
        channels_first, other architectures), naming what is wrong.
    """
    layers = _keras_layers(keras_model)
    stage_sizes = _keras_stage_sizes(layers)
    head = layers.get("predictions")
    if head is None and "avg_pool" not in layers:
        raise _unsupported("include_top=False without pooling='avg' returns a feature map")
    bn0 = layers["conv1_bn"]
    module = ResNet(
        stage_sizes=stage_sizes,
        block_cls=BottleneckBlock,
        num_classes=0 if head is None else int(head.get_weights()[0].shape[1]),
        shortcut="B",
        variant="v1",
        bn_momentum=float(bn0.momentum),
        bn_epsilon=float(bn0.epsilon),
    )
    variables = _keras_variables(layers, stage_sizes, head)
    return Converted(module, variables, PREPROCESSING["keras"])


def _keras_layers(keras_model: Any) -> dict[str, Any]:
    """The model's layers by name, once it is known to be a channels-last ResNet v1."""
    try:
        layers = {layer.name: layer for layer in keras_model.layers}
    except AttributeError as e:
        raise _unsupported(f"{type(keras_model).__name__} is not a Keras model") from e
    if "post_bn" in layers or any(n.endswith("_preact_bn") for n in layers):
        raise _unsupported("it is a pre-activation ResNetV2")
    if "conv1_conv" not in layers or "conv2_block1_1_conv" not in layers:
        raise _unsupported(f"{keras_model.name!r} has no ResNet v1 layer names")
    if getattr(layers["conv1_bn"], "axis", [-1]) not in (-1, 3, [-1], [3]):
        raise _unsupported("it is channels_first")
    return layers


def _keras_stage_sizes(layers: Mapping[str, Any]) -> tuple[int, ...]:
    """Bottleneck blocks per stage, from the ``conv{stage}_block{block}_3_conv`` names."""
    stages: dict[int, int] = {}
    for name in layers:
        m = re.match(r"conv(\d)_block(\d+)_3_conv$", name)
        if m:
            s, b = int(m.group(1)), int(m.group(2))
            stages[s] = max(stages.get(s, 0), b)
    if sorted(stages) != [2, 3, 4, 5]:
        raise _unsupported(f"expected stages conv2..conv5 with bottleneck blocks, got {stages}")
    return tuple(stages[s] for s in (2, 3, 4, 5))


def _keras_variables(
    layers: Mapping[str, Any], stage_sizes: tuple[int, ...], head: Any
) -> dict[str, Any]:
    """``{'params', 'batch_stats'}`` from Keras' layers; conv biases folded into BN means."""
    params: dict[str, Any] = {}
    stats: dict[str, Any] = {}

    def put(tree, path, leaf):
        *parents, last = path
        for p in parents:
            tree = tree.setdefault(p, {})
        tree[last] = np.asarray(leaf, np.float32)

    def conv_bn(keras_conv: str, keras_bn: str, conv_path, bn_path):
        conv_w = layers[keras_conv].get_weights()
        kernel = conv_w[0]
        bias = conv_w[1] if len(conv_w) > 1 else np.zeros(kernel.shape[-1], np.float32)
        bn = layers[keras_bn]
        if not (bn.scale and bn.center):
            raise _unsupported(f"BatchNorm {keras_bn} has scale/center disabled")
        gamma, beta, mean, var = bn.get_weights()
        put(params, (*conv_path, "kernel"), kernel)
        put(params, (*bn_path, "scale"), gamma)
        put(params, (*bn_path, "bias"), beta)
        put(stats, (*bn_path, "mean"), mean - bias)  # fold the conv bias
        put(stats, (*bn_path, "var"), var)

    conv_bn("conv1_conv", "conv1_bn", ("stem_conv",), ("stem_bn",))
    for s, size in enumerate(stage_sizes):
        for b in range(size):
            k = f"conv{s + 2}_block{b + 1}"
            f = f"stage{s + 1}_block{b + 1}"
            for i in (1, 2, 3):
                conv_bn(f"{k}_{i}_conv", f"{k}_{i}_bn", (f, f"conv{i}"), (f, f"bn{i}"))
            if f"{k}_0_conv" in layers:
                conv_bn(
                    f"{k}_0_conv",
                    f"{k}_0_bn",
                    (f, "shortcut", "proj_conv"),
                    (f, "shortcut", "proj_bn"),
                )
            elif b == 0:
                raise _unsupported(f"block {k} changes shape but has no projection shortcut")
    if head is not None:
        kernel, bias = head.get_weights()
        put(params, ("head", "kernel"), kernel)
        put(params, ("head", "bias"), bias)
    return {"params": params, "batch_stats": stats}


# --------------------------------------------------------------------------- #
# PyTorch state dicts: torchvision, timm, CIFAR reproductions, Hugging Face.
# --------------------------------------------------------------------------- #

# nn.BatchNorm2d's defaults, kept by torchvision, timm and transformers. Our
# momentum is the weight of the old running value, torch's that of the new.
TORCH_BN_EPSILON = 1e-5
TORCH_BN_MOMENTUM = 0.1
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".th", ".ckpt", ".tar")
# ResNet fields a caller may set on a converted model; the rest come from the weights.
CONVERTER_OPTIONS = (
    "dtype",
    "param_dtype",
    "bn_momentum",
    "bn_epsilon",
    "bn_groups",
    "materialize",
)
_SUPPORTED_TORCH = (
    "torchvision resnet18/34/50/101/152 and timm's plain resnet* (7x7 stem, v1.5 "
    "bottlenecks or basic blocks, 1x1 projection shortcuts 'downsample.0/1'), and CIFAR "
    "ResNets with a 3x3 stem (conv1, bn1, layer1..3, linear; option-A shortcuts, or option B "
    "as shortcut.0/1)"
)
_SUPPORTED_HF = (
    "transformers ResNetModel / ResNetForImageClassification (microsoft/resnet-18 ... -152: "
    "layer_type 'basic' or 'bottleneck', relu, downsample_in_first_stage=False)"
)


class _Refused(ValueError):
    """A state dict the converters cannot convert; the message names the tensor."""


def _is_tensor(v: Any) -> bool:
    return hasattr(v, "shape") and hasattr(v, "dtype")


def _to_numpy(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch.Tensor: torch was imported by whoever made it
        v = v.detach().cpu()
        if v.is_floating_point():
            v = v.float()  # exact for float16/bfloat16, which numpy cannot take from torch
        return v.numpy()
    return np.asarray(v)


def _read(source: Any, who: str) -> tuple[Mapping[str, Any], str | None]:
    """The raw state dict of ``source`` and the checkpoint directory it came from."""
    if hasattr(source, "state_dict") and callable(source.state_dict):
        return source.state_dict(), None  # a torch.nn.Module
    if isinstance(source, Mapping):
        return source, None
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"{who} takes a state dict (names to tensors or arrays), a torch module or a "
            f"path, got {type(source).__name__}."
        )
    path = os.fspath(source)
    directory = None
    if os.path.isdir(path):
        directory = path
        names = ("model.safetensors", "pytorch_model.bin")
        found = [n for n in names if os.path.exists(os.path.join(path, n))]
        if not found:
            raise FileNotFoundError(f"{who}: {path} holds neither of {', '.join(names)}.")
        path = os.path.join(path, found[0])
    if path.endswith(".safetensors"):
        try:
            from safetensors.numpy import load_file
        except ImportError as e:
            raise ImportError(
                f"{who}: reading {path} needs the safetensors package (pip install "
                "safetensors); torch is not needed."
            ) from e
        return load_file(path), directory
    if path.endswith(_TORCH_SUFFIXES):
        try:
            import torch
        except ImportError as e:
            raise ImportError(
                f"{who}: {path} is a PyTorch pickle, and reading it needs torch (pip install "
                "torch). A .safetensors file of the same weights is read without torch."
            ) from e
        return torch.load(path, map_location="cpu", weights_only=True), directory
    raise ValueError(
        f"{who}: cannot read {path!r}: expected a .safetensors file, a PyTorch file "
        f"({', '.join(_TORCH_SUFFIXES)}) or a Hugging Face checkpoint directory."
    )


def _state_dict(raw: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Numpy arrays by name, unwrapped from training checkpoints and DataParallel."""
    for key in ("state_dict", "model", "model_state_dict"):
        inner = raw.get(key)
        if isinstance(inner, Mapping) and not _is_tensor(inner):
            raw = inner
            break
    state = {str(k): _to_numpy(v) for k, v in raw.items() if _is_tensor(v)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _refuse_variants(state: Mapping[str, np.ndarray], name: Callable[[str], str]) -> None:
    """Raises _Refused for ResNet relatives whose tensors have other roles or shapes."""
    for k in sorted(state):
        if re.match(r"conv1\.\d+\.", k):
            raise _Refused(f"tensor {name(k)} belongs to a deep (ResNet-C/D) stem")
        if re.search(r"\.(se|se_module|attn|eca)\.", k):
            raise _Refused(f"tensor {name(k)} belongs to a squeeze-and-excitation/attention block")
        if re.search(r"\.(downsample|shortcut)\.2\.", k) or (
            re.search(r"\.(downsample|shortcut)\.1\.weight$", k) and state[k].ndim == 4
        ):
            raise _Refused(
                f"tensor {name(k)} belongs to an average-pool downsample (ResNet-D shortcut)"
            )
    for k in sorted(state):
        m = re.match(r"(layer\d+\.\d+)\.conv2\.weight$", k)
        first = m and state.get(f"{m[1]}.conv1.weight")
        if first is not None and state[k].ndim == 4 and state[k].shape[1] != first.shape[0]:
            raise _Refused(
                f"tensor {name(k)} of shape {state[k].shape} is a grouped convolution "
                f"({first.shape[0]} input channels, {state[k].shape[1]} per group: ResNeXt)"
            )
        m = re.match(r"(layer\d+\.\d+)\.conv3\.weight$", k)
        first = m and state.get(f"{m[1]}.conv1.weight")
        if first is not None and state[k].shape[0] != 4 * first.shape[0]:
            raise _Refused(
                f"tensor {name(k)} has {state[k].shape[0]} output channels, not 4x the "
                f"bottleneck width {first.shape[0]} (a wide ResNet)"
            )


def _require(state: Mapping[str, np.ndarray], key: str, name: Callable[[str], str]) -> np.ndarray:
    if key not in state:
        raise _Refused(f"tensor {name(key)} is missing")
    return state[key]


def _infer(state: Mapping[str, np.ndarray], name: Callable[[str], str]) -> dict[str, Any]:
    """ResNet fields read off a state dict in torchvision's naming.

    The stem from ``conv1.weight``, the block type from the presence of
    ``conv3``, stage sizes from the ``layer{s}.{b}`` indices, widths from the
    shapes, the shortcut option from where ``downsample``/``shortcut``
    tensors are (none: A; in every block: C; else B).
    """
    stem = _require(state, "conv1.weight", name)
    if stem.ndim != 4 or stem.shape[2:] not in ((7, 7), (3, 3)):
        raise _Refused(
            f"tensor {name('conv1.weight')} of shape {stem.shape} is neither a 7x7 (ImageNet) "
            "nor a 3x3 (CIFAR) stem"
        )
    blocks: dict[int, int] = {}
    for k in state:
        m = re.match(r"layer(\d+)\.(\d+)\.", k)
        if m:
            blocks[int(m[1])] = max(blocks.get(int(m[1]), 0), int(m[2]) + 1)
    if not blocks:
        raise _Refused(f"no tensor of a residual stage (e.g. {name('layer1.0.conv1.weight')})")
    stages = range(1, max(blocks) + 1)
    stage_sizes = tuple(blocks.get(s, 0) for s in stages)
    if min(stage_sizes) == 0:
        missing = next(s for s in stages if s not in blocks)
        raise _Refused(f"tensor {name(f'layer{missing}.0.conv1.weight')} is missing")
    widths = tuple(int(_require(state, f"layer{s}.0.conv1.weight", name).shape[0]) for s in stages)
    bottleneck = "layer1.0.conv3.weight" in state
    projected = {
        m[1] for k in state if (m := re.match(r"(layer\d+\.\d+)\.(downsample|shortcut)\.0\.", k))
    }
    n_blocks = sum(stage_sizes)
    shortcut = "A" if not projected else "C" if len(projected) == n_blocks else "B"
    return dict(
        stage_sizes=stage_sizes,
        block_cls=BottleneckBlock if bottleneck else BasicBlock,
        widths=widths,
        stem="imagenet" if stem.shape[2] == 7 else "cifar",
        stem_width=int(stem.shape[0]),
        shortcut=shortcut,
    )


_LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def _torch_name(path: tuple[str, ...], classifier: str = "fc", projection: str = "downsample"):
    """The torchvision-layout name of the variable at ``(collection, *module_path, leaf)``."""
    collection, *modules, leaf = path
    parts = []
    for p in modules:
        block = re.fullmatch(r"stage(\d+)_block(\d+)", p)
        if block:
            parts.append(f"layer{block[1]}.{int(block[2]) - 1}")
        elif p != "shortcut":
            parts.append(
                {
                    "stem_conv": "conv1",
                    "stem_bn": "bn1",
                    "head": classifier,
                    "proj_conv": f"{projection}.0",
                    "proj_bn": f"{projection}.1",
                }.get(p, p)
            )
    return ".".join([*parts, _LEAF_NAMES[collection, leaf]])


def _to_flax(torch_value: np.ndarray) -> np.ndarray:
    """OIHW convolution -> HWIO, (out, in) linear -> (in, out); vectors as they are."""
    if torch_value.ndim == 4:
        return torch_value.transpose(2, 3, 1, 0)
    if torch_value.ndim == 2:
        return torch_value.T
    return torch_value


def _to_torch(flax_value: Any) -> np.ndarray:
    """HWIO -> OIHW, (in, out) -> (out, in): a new, writable, C-contiguous float32 array."""
    value = np.asarray(flax_value, np.float32)
    if value.ndim == 4:
        value = value.transpose(3, 2, 0, 1)
    elif value.ndim == 2:
        value = value.T
    return np.array(value, np.float32, order="C")


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(flax_shape) == 4:
        return tuple(flax_shape[i] for i in (3, 2, 0, 1))
    return tuple(reversed(flax_shape))


def _shapes(module: ResNet, in_channels: int) -> dict[tuple[str, ...], Any]:
    """The module's variables, flattened, as shapes: nothing is computed."""
    shapes = jax.eval_shape(
        lambda: module.init(jax.random.key(0), jnp.zeros((1, 32, 32, in_channels)))
    )
    return traverse_util.flatten_dict(shapes)


def _convert(
    state: dict[str, np.ndarray],
    *,
    name: Callable[[str], str],
    model: str | None,
    num_classes: int | None,
    variant: str,
    options: Mapping[str, Any],
) -> tuple[ResNet, dict[str, Any]]:
    """The module and variables of a state dict in torchvision's naming."""
    unknown = sorted(set(options) - set(CONVERTER_OPTIONS))
    if unknown:
        raise ValueError(f"Unknown option(s) {unknown}; valid: {', '.join(CONVERTER_OPTIONS)}.")
    _refuse_variants(state, name)
    fields = _infer(state, name)
    if model is not None:
        spec = model_spec(model)
        shortcut = fields["shortcut"] if spec.residual else None
        fields = dict(spec.resnet_fields(), shortcut=shortcut)
    classifier = "linear" if "linear.weight" in state else "fc"
    projection = "shortcut" if any(".shortcut.0." in k for k in state) else "downsample"
    state, num_classes = _classifier(state, classifier, num_classes, name)
    module = ResNet(
        **fields,
        num_classes=num_classes,
        variant=variant,
        **{"bn_momentum": 1 - TORCH_BN_MOMENTUM, "bn_epsilon": TORCH_BN_EPSILON, **options},
    )
    in_channels = int(state["conv1.weight"].shape[1])
    flat: dict[tuple[str, ...], np.ndarray] = {}
    # In torchvision's order, so that the first tensor named is the first one off.
    named = {
        _torch_name(path, classifier, projection): (path, shape)
        for path, shape in _shapes(module, in_channels).items()
    }
    for key in sorted(named, key=_torchvision_order):
        path, shape = named[key]
        value = _to_flax(_require(state, key, name))
        if value.shape != shape.shape:
            raise _Refused(
                f"tensor {name(key)} has shape {state[key].shape}, but "
                f"{model or 'the network the other tensors describe'} needs "
                f"{_torch_shape(shape.shape)}"
            )
        # A copy: numpy views of torch tensors would change with the torch model.
        flat[path] = np.array(value, np.float32, order="C")
    extra = sorted(
        (k for k in state if k not in named and not k.endswith(".num_batches_tracked")),
        key=_torchvision_order,
    )
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise _Refused(f"tensor {name(extra[0])}{more} has no place in {model or 'the network'}")
    return module, traverse_util.unflatten_dict(flat)


def _classifier(
    state: dict[str, np.ndarray], classifier: str, num_classes: int | None, name: Callable
) -> tuple[dict[str, np.ndarray], int]:
    """The state dict (less the classifier for num_classes=0) and the number of classes."""
    weight = f"{classifier}.weight"
    available = int(state[weight].shape[0]) if weight in state else 0
    if num_classes is None:
        return state, available
    if num_classes == 0:
        return {k: v for k, v in state.items() if not k.startswith(f"{classifier}.")}, 0
    if num_classes != available:
        raise ValueError(
            f"num_classes={num_classes}, but the weights have a {available}-class classifier "
            f"(tensor {name(weight)}); pass num_classes=0 to drop it and train a new one."
        )
    return state, num_classes


def _convert_or_refuse(who: str, supported: str, **kw) -> tuple[ResNet, dict[str, Any]]:
    try:
        return _convert(**kw)
    except _Refused as e:
        raise ValueError(
            f"{who} cannot convert this state dict: {e}. Supported: {supported}."
        ) from None


def from_torchvision(
    source: Any,
    *,
    name: str | None = None,
    num_classes: int | None = None,
    preprocessing: Preprocessing | str | None = None,
    **options: Any,
) -> Converted:
    """Converts a torchvision / timm ResNet, or a PyTorch CIFAR ResNet, to Flax.

    Reads torchvision's ``resnet18/34/50/101/152`` (V1 and V2 weights), timm's
    plain ``resnet*`` (e.g. ``resnet50.a1_in1k``, ``resnet26``) and the CIFAR
    ResNets of akamaster/pytorch_resnet_cifar10 and most reproductions (3x3
    stem, ``layer1..3``, ``linear``; option-A shortcuts, taken as such when
    there are no projections: pass ``name='plain20'`` etc. for a plain net; or
    option B as ``shortcut.0/1``). The architecture is read off the tensors;
    bottlenecks are ``variant='v1.5'``, as in torchvision and timm. The result
    computes the same function as the source in both modes (module docstring).

    Args:
      source: a state dict (names to torch tensors or numpy arrays; a
        checkpoint's ``{'state_dict': ...}`` or ``{'model': ...}`` and
        DataParallel's ``module.`` prefix are unwrapped), a torch module, or a
        path: ``.safetensors`` (read without torch) or ``.pth``/``.pt``/
        ``.bin``/``.th`` (needs torch). Nothing is downloaded.
      name: check the weights against a named model (``'resnet50'``,
        ``'resnet20'``, ``'plain20'``, ...) instead of reading the
        architecture off them alone; a mismatch names the first tensor off.
      num_classes: None keeps the classifier (``fc``/``linear``) or its
        absence; 0 drops it (the module returns pooled features); any other
        value must match the weights'.
      preprocessing: the :class:`Preprocessing` (or name in ``PREPROCESSING``)
        the result carries. Default: 'torchvision' (V1 weights) for ImageNet
        nets, 'cifar' for CIFAR nets; torchvision's V2 weights want
        'torchvision-v2', timm's ``Preprocessing.from_timm(cfg)``.
      **options: ResNet fields for the converted module, one of
        ``CONVERTER_OPTIONS`` (``dtype``, ``param_dtype``, ``bn_momentum``,
        ``bn_epsilon``, ``bn_groups``, ``materialize``).

    Returns:
      A :class:`Converted` ``(module, {'params', 'batch_stats'})`` of float32
      numpy arrays, with ``.preprocessing``.

    Raises:
      ValueError: for a layout this converter does not support (deep stems,
        ResNet-D shortcuts, ResNeXt, SE blocks, wide ResNets), a missing or an
        extra tensor, or a shape that does not fit; the message names the tensor.
      ImportError: for a ``.pth``/``.bin`` file without torch installed.
    """
    who = "from_torchvision"
    raw, _ = _read(source, who)
    module, variables = _convert_or_refuse(
        who,
        _SUPPORTED_TORCH,
        state=_torchvision_state(raw, who),
        name=lambda k: k,
        model=name,
        num_classes=num_classes,
        variant="v1.5",
        options=options,
    )
    if preprocessing is None:
        preprocessing = "torchvision" if module.stem == "imagenet" else "cifar"
    return Converted(module, variables, _preprocessing(preprocessing))


def _torchvision_state(raw: Mapping[str, Any], who: str) -> dict[str, np.ndarray]:
    """The state dict as numpy arrays; refuses transformers' layout, naming the converter."""
    state = _state_dict(raw)
    if any(k.startswith(("embedder.embedder.", "resnet.embedder.")) for k in state):
        raise ValueError(
            f"{who}: these are Hugging Face transformers weights (embedder.*, encoder.*); "
            "use rj.weights.from_transformers."
        )
    return state


# transformers' names -> torchvision's, after the optional "resnet." prefix of
# ResNetForImageClassification.
_HF_RULES: tuple[tuple[str, Callable[[re.Match], str]], ...] = (
    (r"embedder\.embedder\.convolution\.(\w+)", lambda m: f"conv1.{m[1]}"),
    (r"embedder\.embedder\.normalization\.(\w+)", lambda m: f"bn1.{m[1]}"),
    (
        r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.convolution\.(\w+)",
        lambda m: f"layer{int(m[1]) + 1}.{m[2]}.conv{int(m[3]) + 1}.{m[4]}",
    ),
    (
        r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.normalization\.(\w+)",
        lambda m: f"layer{int(m[1]) + 1}.{m[2]}.bn{int(m[3]) + 1}.{m[4]}",
    ),
    (
        r"encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.convolution\.(\w+)",
        lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.0.{m[3]}",
    ),
    (
        r"encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.normalization\.(\w+)",
        lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.1.{m[3]}",
    ),
    (r"classifier\.1\.(\w+)", lambda m: f"fc.{m[1]}"),
)


def _hf_rename(key: str) -> str:
    rest = key[len("resnet.") :] if key.startswith("resnet.") else key
    for pattern, rename in _HF_RULES:
        m = re.fullmatch(pattern, rest)
        if m:
            return rename(m)
    return "?" + key  # no torchvision name: reported as an extra tensor


def _config_value(config: Any, key: str, default: Any) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def _hf_preprocessing(cfg: Mapping[str, Any]) -> Preprocessing:
    """The Preprocessing of a ConvNext-style ``preprocessor_config.json`` (microsoft/resnet-*)."""
    size = cfg.get("size", 224)
    if isinstance(size, Mapping):
        size = size.get("shortest_edge")
    if not isinstance(size, int) or size >= 384:
        raise ValueError(
            f"preprocessor_config.json with size={cfg.get('size')!r} is not a resize-and-crop "
            "recipe; pass preprocessing= to from_transformers."
        )
    interpolation = {0: "nearest", 2: "bilinear", 3: "bicubic"}.get(cfg.get("resample", 3))
    if interpolation is None:
        raise ValueError(f"preprocessor_config.json: unsupported resample {cfg.get('resample')!r}.")
    normalise = cfg.get("do_normalize", True)
    return Preprocessing(
        mean=tuple(cfg.get("image_mean", IMAGENET_MEAN)) if normalise else (0.0, 0.0, 0.0),
        std=tuple(cfg.get("image_std", IMAGENET_STD)) if normalise else (1.0, 1.0, 1.0),
        resize=int(size / cfg.get("crop_pct", 224 / 256)),
        crop=size,
        interpolation=interpolation,
    )


def from_transformers(
    source: Any,
    *,
    config: Any = None,
    num_classes: int | None = None,
    preprocessing: Preprocessing | str | None = None,
    **options: Any,
) -> Converted:
    """Converts a Hugging Face transformers ResNet (``microsoft/resnet-18`` ... ``-152``).

    Takes the weights of ``ResNetForImageClassification`` (``resnet.*`` and
    ``classifier.1``) or ``ResNetModel`` (no classifier). transformers' ResNet
    is torchvision's network under other names: a 7x7/2 stem with max-pool,
    basic or bottleneck layers with 1x1 projection shortcuts where the shape
    changes, BatchNorm with torch's epsilon and momentum, and the stride in
    the bottleneck's 3x3 (v1.5) unless the config says
    ``downsample_in_bottleneck=True`` (then ``variant='v1'``). The
    architecture is read off the tensors; the config is consulted for what
    the tensors cannot tell (strides, activation). Inference and training
    outputs equal the source's, as for :func:`from_torchvision`.

    Args:
      source: a checkpoint directory (``model.safetensors``, read without
        torch, or ``pytorch_model.bin``; with its ``config.json`` and
        ``preprocessor_config.json`` when present), a weights file, a state
        dict, or a transformers model object (its ``.config`` is used).
        Nothing is downloaded.
      config: a ``ResNetConfig`` or its dict, overriding the one found
        with ``source``; without any, ``downsample_in_bottleneck=False``.
      num_classes: as for :func:`from_torchvision`.
      preprocessing: default: the directory's ``preprocessor_config.json``,
        else ``PREPROCESSING['huggingface']`` (microsoft/resnet-*'s: resize
        256, crop 224, bicubic).
      **options: as for :func:`from_torchvision`.

    Returns:
      A :class:`Converted` ``(module, variables)`` with ``.preprocessing``.

    Raises:
      ValueError: for an unsupported config (``downsample_in_first_stage``,
        an activation other than relu) or state dict (naming the tensor).
      ImportError: for ``pytorch_model.bin`` without torch installed.
    """
    who = "from_transformers"
    raw, directory = _read(source, who)
    variant = _hf_variant(_hf_config(source, directory, config), who)
    state, hf_name = _hf_state(_state_dict(raw), who)
    module, variables = _convert_or_refuse(
        who,
        _SUPPORTED_HF,
        state=state,
        name=hf_name,
        model=None,
        num_classes=num_classes,
        variant=variant,
        options=options,
    )
    if preprocessing is None:
        preprocessing = _hf_directory_preprocessing(directory)
    return Converted(module, variables, _preprocessing(preprocessing))


def _hf_directory_preprocessing(directory: str | None) -> Preprocessing | str:
    """The directory's ``preprocessor_config.json`` recipe, else 'huggingface'."""
    path = directory and os.path.join(directory, "preprocessor_config.json")
    if path and os.path.exists(path):
        with open(path) as f:
            return _hf_preprocessing(json.load(f))
    return "huggingface"


def _hf_config(source: Any, directory: str | None, config: Any) -> Any:
    """The config given, else the model object's, else the directory's config.json, else {}."""
    if config is None:
        config = getattr(source, "config", None)
    if config is None and directory and os.path.exists(os.path.join(directory, "config.json")):
        with open(os.path.join(directory, "config.json")) as f:
            config = json.load(f)
    return {} if config is None else config


def _hf_variant(config: Any, who: str) -> str:
    """'v1' or 'v1.5' from a ResNetConfig (or its dict); raises for what we cannot build."""
    if _config_value(config, "downsample_in_first_stage", False):
        raise ValueError(
            f"{who}: config has downsample_in_first_stage=True (a stride-2 first stage), "
            "which resnet_jax's ResNet does not have."
        )
    act = _config_value(config, "hidden_act", "relu")
    if act != "relu":
        raise ValueError(f"{who}: config has hidden_act={act!r}; only 'relu' is supported.")
    return "v1" if _config_value(config, "downsample_in_bottleneck", False) else "v1.5"


def _hf_state(
    state: Mapping[str, np.ndarray], who: str
) -> tuple[dict[str, np.ndarray], Callable[[str], str]]:
    """The state dict in torchvision's names, and the function naming a tensor as transformers does."""
    if "conv1.weight" in state:
        raise ValueError(
            f"{who}: these are torchvision-layout weights (conv1, layer1, ...); use "
            "rj.weights.from_torchvision."
        )
    original = {}
    renamed = {}
    for k, v in state.items():
        new = _hf_rename(k)
        original[new], renamed[new] = k, v

    def hf_name(k: str) -> str:
        if k in original:
            return original[k]
        # A tensor the network needs but the state dict lacks: its transformers name.
        prefix = "resnet." if any(o.startswith("resnet.") for o in original.values()) else ""
        return prefix + _torchvision_to_hf(k)

    return renamed, hf_name


def _torchvision_to_hf(key: str) -> str:
    """transformers' name of a torchvision-layout name (for messages about missing tensors)."""
    m = re.fullmatch(r"layer(\d+)\.(\d+)\.(conv|bn)(\d)\.(\w+)", key)
    if m:
        kind = "convolution" if m[3] == "conv" else "normalization"
        return f"encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.layer.{int(m[4]) - 1}.{kind}.{m[5]}"
    m = re.fullmatch(r"layer(\d+)\.(\d+)\.downsample\.([01])\.(\w+)", key)
    if m:
        kind = "convolution" if m[3] == "0" else "normalization"
        return f"encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.shortcut.{kind}.{m[4]}"
    m = re.fullmatch(r"(conv1|bn1)\.(\w+)", key)
    if m:
        kind = "convolution" if m[1] == "conv1" else "normalization"
        return f"embedder.embedder.{kind}.{m[2]}"
    m = re.fullmatch(r"fc\.(\w+)", key)
    return f"classifier.1.{m[1]}" if m else key


def to_torchvision(module: ResNet, variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Exports a resnet_jax ImageNet ResNet as a torchvision state dict.

    ``torchvision.models.resnet50().load_state_dict({k: torch.from_numpy(v)
    for k, v in sd.items()})`` then computes what ``module.apply(variables,
    x_nhwc)`` computes, on ``x_nchw``. Without torch, the result can be saved
    with ``safetensors.numpy.save_file(sd, 'resnet50.safetensors')``, which
    PyTorch users read with ``safetensors.torch.load_file``. Values are
    copied exactly (float32), so ``from_torchvision(to_torchvision(m, v))``
    gives back ``v`` bit for bit. ``num_batches_tracked`` (unknown here) is 0.

    Args:
      module: the :class:`ResNet` the variables belong to: ImageNet stem, four
        stages of widths 64/128/256/512, basic blocks or ``variant='v1.5'``
        bottlenecks, shortcut 'B', BatchNorm epsilon 1e-5 (torchvision's
        fixed structure; any stage sizes).
      variables: ``{'params': ..., 'batch_stats': ...}``.

    Returns:
      Contiguous numpy arrays keyed as ``torchvision.models.resnetN().state_dict()``:
      ``fc.*`` included when ``module.num_classes > 0``.

    Raises:
      ValueError: for a module torchvision's ResNet cannot express, saying why.
    """
    _check_exportable(module)
    flat = traverse_util.flatten_dict(
        {c: dict(variables.get(c, {})) for c in ("params", "batch_stats")}
    )
    expected = _shapes(module, 3)
    for path in sorted(set(expected) | set(flat)):
        where = "/".join(path)
        if path not in flat:
            raise ValueError(f"to_torchvision: variables lack {where}, which the module has.")
        if path not in expected:
            raise ValueError(f"to_torchvision: variables have {where}, which the module lacks.")
        if np.shape(flat[path]) != expected[path].shape:
            raise ValueError(
                f"to_torchvision: {where} has shape {np.shape(flat[path])}, the module's "
                f"{expected[path].shape}."
            )
    state = {_torch_name(path): _to_torch(value) for path, value in flat.items()}
    for path in flat:
        if path[0] == "batch_stats" and path[-1] == "mean":  # one per BatchNorm
            bn = _torch_name(path)[: -len("running_mean")]
            state[bn + "num_batches_tracked"] = np.zeros((), np.int64)
    return dict(sorted(state.items(), key=lambda kv: _torchvision_order(kv[0])))


def _check_exportable(module: ResNet) -> None:
    """Raises ValueError, listing why, for a module torchvision's ResNet cannot express."""
    problems = []
    if module.stem != "imagenet" or module.stem_width != 64:
        problems.append(f"stem {module.stem!r} of width {module.stem_width} (needs 'imagenet', 64)")
    if tuple(module.widths) != IMAGENET_WIDTHS:
        problems.append(f"widths {tuple(module.widths)} (needs {IMAGENET_WIDTHS})")
    if module.shortcut != "B":
        problems.append(f"shortcut {module.shortcut!r} (needs 'B')")
    if module.block_cls is BottleneckBlock and module.variant != "v1.5":
        problems.append(f"variant {module.variant!r} bottlenecks (needs 'v1.5')")
    if module.block_cls not in (BasicBlock, BottleneckBlock):
        problems.append(f"block {module.block_cls!r}")
    if not math.isclose(module.bn_epsilon, TORCH_BN_EPSILON, rel_tol=1e-6):
        problems.append(f"BatchNorm epsilon {module.bn_epsilon} (torchvision's is 1e-5)")
    if problems:
        raise ValueError(
            "to_torchvision exports only what torchvision.models.ResNet computes; this model "
            f"has {'; '.join(problems)}."
        )


_TORCHVISION_RANKS = {
    **{n: i for i, n in enumerate(("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample"))},
    **{n: i for i, n in enumerate(("weight", "bias", "running_mean", "running_var"))},
    "num_batches_tracked": 4,
    "shortcut": 6,
    "fc": 1000,
    "linear": 1000,
}


def _torchvision_order(key: str) -> tuple[int, ...]:
    """Sorts names as torchvision's state_dict() lists them (layer10 after layer9)."""
    ranks = []
    for part in key.split("."):
        layer = re.fullmatch(r"layer(\d+)", part)
        ranks.append(
            10 + int(layer[1])
            if layer
            else int(part)
            if part.isdigit()
            else _TORCHVISION_RANKS.get(part, 999)
        )
    return tuple(ranks)
