"""The one table of named networks: a name -> :class:`ModelSpec` (block,
stage sizes, widths, stem), read by :func:`create_model`."""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn

from resnet_jax.models.layers import BasicBlock, BottleneckBlock
from resnet_jax.models.resnet import CIFAR_WIDTHS, IMAGENET_WIDTHS, ResNet

# --------------------------------------------------------------------------- #
# The depth table.
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What a model name stands for: the :class:`ResNet` fields without options.

    Attributes:
      family: ``'imagenet'`` (Table 1, 224x224 inputs, 1000 classes) or
        ``'cifar'`` (Section 4.2, 32x32 inputs, 10 classes).
      block_cls: :class:`BasicBlock` or :class:`BottleneckBlock`.
      stage_sizes: blocks per stage.
      widths: base filters per stage.
      stem: ``'imagenet'`` or ``'cifar'``.
      stem_width: filters of the stem convolution.
      residual: False for the plain nets of the paper (no shortcuts).
    """

    family: str
    block_cls: type[nn.Module]
    stage_sizes: tuple[int, ...]
    widths: tuple[int, ...]
    stem: str
    stem_width: int
    residual: bool = True

    def resnet_fields(self) -> dict[str, Any]:
        """The :class:`ResNet` constructor arguments this spec fixes."""
        return dict(
            stage_sizes=self.stage_sizes,
            block_cls=self.block_cls,
            widths=self.widths,
            stem=self.stem,
            stem_width=self.stem_width,
        )


def _imagenet(block: type[nn.Module], sizes: tuple[int, ...], residual: bool = True) -> ModelSpec:
    return ModelSpec("imagenet", block, sizes, IMAGENET_WIDTHS, "imagenet", 64, residual)


# Table 1 of the paper (and the plain nets of Section 4.1).
IMAGENET_MODELS: dict[str, ModelSpec] = {
    "resnet18": _imagenet(BasicBlock, (2, 2, 2, 2)),
    "resnet34": _imagenet(BasicBlock, (3, 4, 6, 3)),
    "resnet50": _imagenet(BottleneckBlock, (3, 4, 6, 3)),
    "resnet101": _imagenet(BottleneckBlock, (3, 4, 23, 3)),
    "resnet152": _imagenet(BottleneckBlock, (3, 8, 36, 3)),
    "plain18": _imagenet(BasicBlock, (2, 2, 2, 2), residual=False),
    "plain34": _imagenet(BasicBlock, (3, 4, 6, 3), residual=False),
}
# CIFAR depths of Table 6 (any 6n + 2 works through create_model).
CIFAR_DEPTHS = (8, 20, 32, 44, 56, 110, 1202)

_CIFAR_RE = re.compile(r"^(?:cifar_)?(resnet|plain)(\d+)$")

OPTIONS = (
    "num_classes",
    "variant",
    "shortcut",
    "dtype",
    "param_dtype",
    "zero_init_residual",
    "bn_momentum",
    "bn_epsilon",
    "bn_groups",
    "act",
    "materialize",
)


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted.

    CIFAR nets are listed for the depths of the paper; ``resnetN``/``plainN``
    (or ``cifar_resnetN``) works for every ``N = 6n + 2``. ``resnet50`` and
    ``resnet152`` are the ImageNet nets; their CIFAR namesakes are
    ``cifar_resnet50`` and ``cifar_resnet152``.
    """
    names = set(IMAGENET_MODELS)
    for d in CIFAR_DEPTHS:
        for kind in ("resnet", "plain"):
            name = f"{kind}{d}"
            names.add(name if name not in IMAGENET_MODELS else f"cifar_{name}")
    return sorted(names, key=lambda s: (re.sub(r"\d+", "", s), int(re.sub(r"\D", "", s))))


def model_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` (``ResNet`` fields without options) that ``name`` stands for.

    Raises:
      ValueError: for a name that is neither in the table nor a CIFAR depth 6n+2.
    """
    if name in IMAGENET_MODELS:
        return IMAGENET_MODELS[name]
    m = _CIFAR_RE.match(name)
    if m and (int(m.group(2)) - 2) % 6 == 0 and int(m.group(2)) >= 8:
        n = (int(m.group(2)) - 2) // 6
        return ModelSpec(
            "cifar", BasicBlock, (n, n, n), CIFAR_WIDTHS, "cifar", 16, m.group(1) == "resnet"
        )
    raise ValueError(
        f"Unknown model {name!r}. Valid names: {', '.join(list_models())}; CIFAR nets "
        "accept any depth 6n+2 >= 8 (e.g. resnet1202, plain110, cifar_resnet50)."
    )


def create_model(name: str, **options: Any) -> ResNet:
    """Builds a named network of the paper.

    Args:
      name: one of :func:`list_models` (CIFAR: any ``resnetN``/``plainN`` with
        ``N = 6n + 2``).
      **options: ``num_classes`` (default 1000 for ImageNet nets, 10 for CIFAR
        nets; 0 for a backbone that returns pooled features), ``variant``
        ('v1' default, or 'v1.5'), ``shortcut`` ('A', 'B', 'C'; default A for
        CIFAR and B for ImageNet nets), ``dtype``, ``param_dtype``,
        ``zero_init_residual``, ``bn_momentum`` (0.9), ``bn_epsilon`` (1e-5),
        ``bn_groups`` (1; training BatchNorm statistics over that many equal
        groups of the batch), ``act``, ``materialize`` (False); see :class:`ResNet`.

    Returns:
      An uninitialised :class:`ResNet`.

    Raises:
      ValueError: for an unknown name or option, an invalid option value, or
        shortcut options on a plain network.
    """
    spec = model_spec(name)
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(
            f"Unknown option(s) {unknown} for create_model; valid options: {', '.join(OPTIONS)}."
        )
    shortcut = options.pop("shortcut", None)
    if not spec.residual:
        if shortcut is not None:
            raise ValueError(f"{name} is a plain network and has no shortcuts; drop shortcut=.")
        if options.get("zero_init_residual"):
            raise ValueError(
                f"zero_init_residual=True would zero every block of the plain network {name}."
            )
    elif shortcut is None:
        shortcut = "A" if spec.family == "cifar" else "B"
    options.setdefault("num_classes", 10 if spec.family == "cifar" else 1000)
    return ResNet(**spec.resnet_fields(), shortcut=shortcut, **options)


def _preset(name: str) -> Callable[..., ResNet]:
    return functools.partial(ResNet, **IMAGENET_MODELS[name].resnet_fields())


# ``ResNet50(num_classes=10)``: the table's fields preset, every other field free.
ResNet18 = _preset("resnet18")
ResNet34 = _preset("resnet34")
ResNet50 = _preset("resnet50")
ResNet101 = _preset("resnet101")
ResNet152 = _preset("resnet152")
