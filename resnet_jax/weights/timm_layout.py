"""timm's ResNets: :func:`from_timm` for ``resnet*``, ``resnet*d``,
``resnext*``, ``seresnet*``, ``seresnext*``, ``wide_resnet*`` (torchvision's
naming, which timm keeps, plus its deep stem, average-pool shortcuts and SE
modules) and the BatchNorm pre-activation ``resnetv2_*`` (timm's own naming:
``stem.conv``, ``stages.{s}.blocks.{b}``, ``norm``, ``head.fc``).

Read without torch from ``.safetensors``, the format of timm's hub repos.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from resnet_jax.models import BasicBlock, BottleneckBlock, list_models
from resnet_jax.weights.preprocessing import Converted, Preprocessing, preprocessing_record
from resnet_jax.weights.torch_layout import (
    TORCHVISION_LAYOUT,
    Layout,
    Refused,
    convert_or_refuse,
    read_source,
    require,
    state_dict_arrays,
)

SUPPORTED_TIMM = (
    "timm's resnet*, resnet*d (deep stem, average-pool shortcuts), resnext*, seresnet*, "
    "seresnext*, wide_resnet* (torchvision naming, SE as se.fc1/fc2) and the BatchNorm "
    "pre-activation resnetv2_* (stem.conv, stages.*, norm, head.fc)"
)
_V2_PARTS = {"bn1": "norm1", "bn2": "norm2", "bn3": "norm3", "final_bn": "norm", "head": "head.fc"}
_LEAVES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def timm_v2_name(path: tuple[str, ...]) -> str:
    """timm ``resnetv2_*``'s name of the variable at ``(collection, *module_path, leaf)``."""
    collection, *modules, leaf = path
    parts = []
    for p in modules:
        block = re.fullmatch(r"stage(\d+)_block(\d+)", p)
        if block:
            parts.append(f"stages.{int(block[1]) - 1}.blocks.{int(block[2]) - 1}")
        elif p == "stem_conv":
            parts.append("stem.conv")
        elif p == "proj_conv":
            parts.append("downsample.conv")
        elif p != "shortcut":
            parts.append(_V2_PARTS.get(p, p))
    return ".".join([*parts, _LEAVES[collection, leaf]])


def _refuse_v2(state: Mapping[str, np.ndarray], name: Callable[[str], str]) -> None:
    for k in sorted(state):
        if re.search(r"\.norm\d?\.weight$", k) or k == "norm.weight":
            stats = k[: -len("weight")] + "running_mean"
            if stats not in state:
                raise Refused(
                    f"tensor {name(k)} has no running statistics ({name(stats)}): GroupNorm "
                    "(BiT's layout, with weight standardisation), not BatchNorm"
                )
        if k.startswith("stem.") and not k.startswith("stem.conv."):
            raise Refused(f"tensor {name(k)} belongs to a stem other than one 7x7 convolution")
        if ".downsample." in k and not k.endswith("downsample.conv.weight"):
            raise Refused(f"tensor {name(k)} belongs to a projection other than one convolution")


def _infer_v2(state: Mapping[str, np.ndarray], name: Callable[[str], str]) -> dict[str, Any]:
    stem = require(state, "stem.conv.weight", name)
    if stem.ndim != 4 or stem.shape[2:] != (7, 7):
        raise Refused(f"tensor {name('stem.conv.weight')} of shape {stem.shape} is not a 7x7 stem")
    blocks: dict[int, int] = {}
    for k in state:
        m = re.match(r"stages\.(\d+)\.blocks\.(\d+)\.", k)
        if m:
            blocks[int(m[1])] = max(blocks.get(int(m[1]), 0), int(m[2]) + 1)
    if not blocks or sorted(blocks) != list(range(len(blocks))):
        raise Refused(
            f"tensor {name('stages.0.blocks.0.conv1.weight')} (or a later stage's) is missing"
        )
    stage_sizes = tuple(blocks[s] for s in range(len(blocks)))
    bottleneck = "stages.0.blocks.0.conv3.weight" in state
    last = "conv3" if bottleneck else "conv2"
    outs = [
        int(require(state, f"stages.{s}.blocks.0.{last}.weight", name).shape[0]) for s in blocks
    ]
    widths = tuple(o // 4 for o in outs) if bottleneck else tuple(outs)
    inner = int(require(state, "stages.0.blocks.0.conv1.weight", name).shape[0])
    grouped = require(state, "stages.0.blocks.0.conv2.weight", name)
    groups = max(1, inner // int(grouped.shape[1]))
    fields: dict[str, Any] = dict(
        stage_sizes=stage_sizes,
        block_cls=BottleneckBlock if bottleneck else BasicBlock,
        widths=widths,
        stem="imagenet",
        stem_width=int(stem.shape[0]),
        shortcut="B",
        preact=True,
    )
    if bottleneck and groups != 1:
        fields["groups"] = groups
    if bottleneck and inner * 64 // (groups * widths[0]) != 64:
        fields["base_width"] = inner * 64 // (groups * widths[0])
    return fields


TIMM_V2_LAYOUT = Layout(
    refuse=_refuse_v2,
    infer=_infer_v2,
    classifier=lambda state: "head.fc",
    namer=lambda module, state: timm_v2_name,
)


def from_timm(
    source: Any,
    name: str | None = None,
    *,
    num_classes: int | None = None,
    preprocessing: Preprocessing | str | None = None,
    **options: Any,
) -> Converted:
    """Converts a timm ResNet (``resnet*``, ``resnet*d``, ``resnext*``,
    ``seresnet*``, ``seresnext*``, ``wide_resnet*``, BatchNorm ``resnetv2_*``) to Flax.

    The architecture is read off the tensors: depth, widths, ResNeXt groups,
    the bottleneck's inner width, the deep stem, ResNet-D shortcuts, SE
    modules, pre-activation (timm's ``resnetv2`` naming). Bottlenecks are
    ``variant='v1.5'``, as timm builds every one of them.

    Args:
      source: a state dict (torch tensors or numpy arrays), a timm module, or
        a path (``.safetensors`` read without torch, as in timm's hub repos,
        or a ``.pth``/``.bin`` that needs torch).
      name: optionally, the architecture as timm names it (``'resnet50d'``,
        ``'seresnext50_32x4d'``, ``'resnetv2_50'``; a pretrained tag's part
        before the dot) when it is one of :func:`resnet_jax.list_models`: the
        tensors are then checked against it, and a mismatch names the first
        tensor off.
      num_classes: None keeps the classifier, 0 drops it, another value must
        match the weights'.
      preprocessing: the :class:`Preprocessing` the result carries (default
        'torchvision': ImageNet's mean and std at 224; timm's own, from its
        ``pretrained_cfg``, is ``Preprocessing.from_timm(cfg)``, which
        :func:`~resnet_jax.weights.pretrained` passes).
      **options: ``CONVERTER_OPTIONS`` (``dtype``, ``bn_groups``, ...).

    Returns:
      A :class:`Converted` ``(module, {'params', 'batch_stats'})`` with ``.preprocessing``.

    Raises:
      ValueError: for a layout it does not support (BiT's GroupNorm and weight
        standardisation, ResNeSt's split attention, attention pools, other
        stems), a missing or extra tensor or a shape that does not fit, naming
        the tensor; an unknown ``name``. File errors as :func:`from_torchvision`.
    """
    who = "from_timm"
    if name is not None and name not in list_models():
        raise ValueError(
            f"{who}: {name!r} is not one of the networks resnet_jax builds by name; pass "
            "name=None to read the architecture off the tensors alone."
        )
    raw, _ = read_source(source, who)
    state = state_dict_arrays(raw)
    v2 = "stem.conv.weight" in state or any(k.startswith("stages.") for k in state)
    if v2 and "head.fc.weight" in state and state["head.fc.weight"].ndim == 4:
        # timm's resnetv2 classifier is a 1x1 convolution: (classes, C, 1, 1).
        state["head.fc.weight"] = state["head.fc.weight"][:, :, 0, 0]
    module, variables = convert_or_refuse(
        who,
        SUPPORTED_TIMM,
        state=state,
        name=lambda k: k,
        model=name,
        num_classes=num_classes,
        variant="v1.5",
        options=options,
        layout=TIMM_V2_LAYOUT if v2 else TORCHVISION_LAYOUT,
    )
    return Converted(module, variables, preprocessing_record(preprocessing or "torchvision"))
