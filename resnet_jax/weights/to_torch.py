"""``to_torchvision``: a resnet_jax ImageNet ResNet (ResNeXt and wide ones too) as a
torchvision state dict."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from resnet_jax.models import IMAGENET_WIDTHS, BasicBlock, BottleneckBlock, ResNet
from resnet_jax.weights.torch_layout import (
    TORCH_BN_EPSILON,
    to_torch_array,
    torch_name,
    torchvision_order,
    variable_shapes,
)


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
        bottlenecks (with any ``groups`` and ``base_width``: torchvision's
        ``resnext*`` and ``wide_resnet*``), shortcut 'B', BatchNorm epsilon
        1e-5 (torchvision's fixed structure; any stage sizes). Build the
        torchvision module with ``torchvision.models.ResNet(Bottleneck, sizes,
        groups=module.groups, width_per_group=module.base_width)``.
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
    expected = variable_shapes(module, 3)
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
    state = {torch_name(path): to_torch_array(value) for path, value in flat.items()}
    for path in flat:
        if path[0] == "batch_stats" and path[-1] == "mean":  # one per BatchNorm
            bn = torch_name(path)[: -len("running_mean")]
            state[bn + "num_batches_tracked"] = np.zeros((), np.int64)
    return dict(sorted(state.items(), key=lambda kv: torchvision_order(kv[0])))


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
    for field, what in (
        ("preact", "pre-activation blocks"),
        ("se", "SE modules"),
        ("avg_down", "ResNet-D shortcuts"),
    ):
        if getattr(module, field):
            problems.append(f"{what} (timm's layout: not a torchvision architecture)")
    if module.stride_block != "first":
        problems.append(f"stride_block {module.stride_block!r} (Keras' ResNetV2 layout)")
    for field in ("stem_bias", "stem_pool_zeros"):
        if getattr(module, field):
            problems.append(f"{field}=True (Keras' ResNetV2 layout)")
    if module.block_cls is BasicBlock and (module.groups != 1 or module.base_width != 64):
        problems.append("grouped or widened basic blocks (torchvision's BasicBlock has neither)")
    if not math.isclose(module.bn_epsilon, TORCH_BN_EPSILON, rel_tol=1e-6):
        problems.append(f"BatchNorm epsilon {module.bn_epsilon} (torchvision's is 1e-5)")
    if problems:
        raise ValueError(
            "to_torchvision exports only what torchvision.models.ResNet computes; this model "
            f"has {'; '.join(problems)}."
        )
