"""``from_transformers``: Hugging Face transformers ResNets (``microsoft/resnet-*``,
``ResNetModel`` / ``ResNetForImageClassification``), by renaming their tensors
to torchvision's layout and converting those."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from resnet_jax.weights.preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Converted,
    Preprocessing,
    preprocessing_record,
)
from resnet_jax.weights.torch_layout import (
    WeightsFileError,
    convert_or_refuse,
    read_source,
    state_dict_arrays,
)

_SUPPORTED_HF = (
    "transformers ResNetModel / ResNetForImageClassification (microsoft/resnet-18 ... -152: "
    "layer_type 'basic' or 'bottleneck', relu, downsample_in_first_stage=False)"
)

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
        an activation other than relu) or state dict (naming the tensor); a
        :class:`~resnet_jax.weights.torch_layout.WeightsFileError` (a
        ``ValueError``) naming the file for weights that cannot be read as a
        state dict or a ``config.json`` / ``preprocessor_config.json`` that is
        not a JSON object, as for :func:`from_torchvision`.
      ImportError: for ``pytorch_model.bin`` without torch installed.
      OSError: for a file that cannot be opened.
    """
    who = "from_transformers"
    raw, directory = read_source(source, who)
    variant = _hf_variant(_hf_config(source, directory, config, who), who)
    state, hf_name = _hf_state(state_dict_arrays(raw), who)
    module, variables = convert_or_refuse(
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
        preprocessing = _hf_directory_preprocessing(directory, who)
    return Converted(module, variables, preprocessing_record(preprocessing))


def _hf_directory_preprocessing(directory: str | None, who: str) -> Preprocessing | str:
    """The directory's ``preprocessor_config.json`` recipe, else 'huggingface'."""
    path = directory and os.path.join(directory, "preprocessor_config.json")
    if path and os.path.exists(path):
        return _hf_preprocessing(_read_json(path, who))
    return "huggingface"


def _read_json(path: str, who: str) -> dict[str, Any]:
    """The JSON object in ``path``; a file that is not one is a WeightsFileError naming it."""
    with open(path, "rb") as f:  # an OSError names the file
        data = f.read()
    try:
        value = json.loads(data)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise WeightsFileError(
            who, path, f"is not JSON ({e}); download or save the checkpoint's file again."
        ) from e
    if not isinstance(value, dict):
        raise WeightsFileError(
            who, path, f"holds a JSON {type(value).__name__}, not an object (a config's keys)."
        )
    return value


def _hf_config(source: Any, directory: str | None, config: Any, who: str) -> Any:
    """The config given, else the model object's, else the directory's config.json, else {}."""
    if config is None:
        config = getattr(source, "config", None)
    if config is None and directory and os.path.exists(os.path.join(directory, "config.json")):
        config = _read_json(os.path.join(directory, "config.json"), who)
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
        return prefix + torchvision_to_hf(k)

    return renamed, hf_name


def torchvision_to_hf(key: str) -> str:
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
