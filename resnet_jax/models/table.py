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
    fixed: tuple[tuple[str, Any], ...] = ()
    default_shortcut: str | None = None
    paper: str = "He et al. 2016"

    def resnet_fields(self) -> dict[str, Any]:
        """The :class:`ResNet` constructor arguments this spec fixes."""
        return dict(
            stage_sizes=self.stage_sizes,
            block_cls=self.block_cls,
            widths=self.widths,
            stem=self.stem,
            stem_width=self.stem_width,
            **dict(self.fixed),
        )

    @property
    def shortcut(self) -> str | None:
        """The shortcut option the name builds by default (None: a plain net)."""
        if not self.residual:
            return None
        return self.default_shortcut or ("A" if self.family == "cifar" else "B")


def _imagenet(
    block: type[nn.Module],
    sizes: tuple[int, ...],
    residual: bool = True,
    paper: str = "He et al. 2016",
    **fixed: Any,
) -> ModelSpec:
    stem = fixed.pop("stem", "imagenet")
    if block is BottleneckBlock and fixed:
        fixed.setdefault("variant", "v1.5")  # every later bottleneck strides in its 3x3
    return ModelSpec(
        "imagenet",
        block,
        sizes,
        IMAGENET_WIDTHS,
        stem,
        64,
        residual,
        tuple(sorted(fixed.items())),
        paper=paper,
    )


_RESNET_D = dict(stem="deep", avg_down=True, variant="v1.5")
_BAG_OF_TRICKS = "He et al. 2019 (ResNet-D)"
_RESNEXT = "Xie et al. 2017"
_WIDE = "Zagoruyko & Komodakis 2016"
_SE = "Hu et al. 2018"
_PREACT = "He et al. 2016b"


# Table 1 of the paper (and the plain nets of Section 4.1).
IMAGENET_MODELS: dict[str, ModelSpec] = {
    "resnet18": _imagenet(BasicBlock, (2, 2, 2, 2)),
    "resnet34": _imagenet(BasicBlock, (3, 4, 6, 3)),
    "resnet50": _imagenet(BottleneckBlock, (3, 4, 6, 3)),
    "resnet101": _imagenet(BottleneckBlock, (3, 4, 23, 3)),
    "resnet152": _imagenet(BottleneckBlock, (3, 8, 36, 3)),
    "plain18": _imagenet(BasicBlock, (2, 2, 2, 2), residual=False),
    "plain34": _imagenet(BasicBlock, (3, 4, 6, 3), residual=False),
    # ResNet-D (Bag of Tricks), as timm's resnet*d: deep stem, average-pool shortcuts.
    "resnet18d": _imagenet(BasicBlock, (2, 2, 2, 2), paper=_BAG_OF_TRICKS, **_RESNET_D),
    "resnet34d": _imagenet(BasicBlock, (3, 4, 6, 3), paper=_BAG_OF_TRICKS, **_RESNET_D),
    "resnet50d": _imagenet(BottleneckBlock, (3, 4, 6, 3), paper=_BAG_OF_TRICKS, **_RESNET_D),
    "resnet101d": _imagenet(BottleneckBlock, (3, 4, 23, 3), paper=_BAG_OF_TRICKS, **_RESNET_D),
    "resnet152d": _imagenet(BottleneckBlock, (3, 8, 36, 3), paper=_BAG_OF_TRICKS, **_RESNET_D),
    # ResNeXt, as torchvision's: groups x width per group.
    "resnext50_32x4d": _imagenet(
        BottleneckBlock, (3, 4, 6, 3), paper=_RESNEXT, groups=32, base_width=4
    ),
    "resnext101_32x8d": _imagenet(
        BottleneckBlock, (3, 4, 23, 3), paper=_RESNEXT, groups=32, base_width=8
    ),
    "resnext101_64x4d": _imagenet(
        BottleneckBlock, (3, 4, 23, 3), paper=_RESNEXT, groups=64, base_width=4
    ),
    # torchvision's wide ResNets: twice the bottleneck's inner width.
    "wide_resnet50_2": _imagenet(BottleneckBlock, (3, 4, 6, 3), paper=_WIDE, base_width=128),
    "wide_resnet101_2": _imagenet(BottleneckBlock, (3, 4, 23, 3), paper=_WIDE, base_width=128),
    # Squeeze-and-excitation, as timm's seresnet*/seresnext*.
    "seresnet50": _imagenet(BottleneckBlock, (3, 4, 6, 3), paper=_SE, se=True),
    "seresnet101": _imagenet(BottleneckBlock, (3, 4, 23, 3), paper=_SE, se=True),
    "seresnext50_32x4d": _imagenet(
        BottleneckBlock, (3, 4, 6, 3), paper=_SE, se=True, groups=32, base_width=4
    ),
    # Pre-activation, as timm's BatchNorm resnetv2_*.
    "resnetv2_50": _imagenet(BottleneckBlock, (3, 4, 6, 3), paper=_PREACT, preact=True),
    "resnetv2_101": _imagenet(BottleneckBlock, (3, 4, 23, 3), paper=_PREACT, preact=True),
}


def _cifar_preact(block: type[nn.Module], n: int, widths=CIFAR_WIDTHS, paper=_PREACT) -> ModelSpec:
    # The bottlenecks stride in their first 1x1, as the authors' reference code
    # (KaimingHe/resnet-1k-layers, resnet-pre-act.lua) does.
    fixed = (("preact", True),) + ((("variant", "v1"),) if block is BottleneckBlock else ())
    return ModelSpec("cifar", block, (n, n, n), tuple(widths), "cifar", 16, True, fixed, "B", paper)


# The CIFAR nets of He et al. 2016b (pre-activation; ResNet-164 and -1001 with
# bottlenecks, depth 9n + 2) and the wide ResNets WRN-d-k of Zagoruyko and
# Komodakis (pre-activation basic blocks, depth 6n + 4, widths 16k/32k/64k).
CIFAR_MODELS: dict[str, ModelSpec] = {
    "preact_resnet110": _cifar_preact(BasicBlock, 18),
    "preact_resnet164": _cifar_preact(BottleneckBlock, 18),
    "preact_resnet1001": _cifar_preact(BottleneckBlock, 111),
    "wrn16_8": _cifar_preact(BasicBlock, 2, (128, 256, 512), _WIDE),
    "wrn28_10": _cifar_preact(BasicBlock, 4, (160, 320, 640), _WIDE),
}
_WRN_RE = re.compile(r"^wrn(\d+)_(\d+)$")
# CIFAR depths of Table 6 (any 6n + 2 works through create_model).
CIFAR_DEPTHS = (8, 20, 32, 44, 56, 110, 1202)

_CIFAR_RE = re.compile(r"^(?:cifar_)?(resnet|plain)(\d+)$")
_PREACT_RE = re.compile(r"^preact_resnet(\d+)$")

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
    "conv_general_dilated",
    "drop_path_rate",
    "dropout_rate",
)


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted.

    CIFAR nets are listed for the depths of the paper; ``resnetN``/``plainN``
    (or ``cifar_resnetN``) works for every ``N = 6n + 2``. ``resnet50`` and
    ``resnet152`` are the ImageNet nets; their CIFAR namesakes are
    ``cifar_resnet50`` and ``cifar_resnet152``.
    """
    names = set(IMAGENET_MODELS) | set(CIFAR_MODELS)
    for d in CIFAR_DEPTHS:
        for kind in ("resnet", "plain"):
            name = f"{kind}{d}"
            names.add(name if name not in IMAGENET_MODELS else f"cifar_{name}")
    return sorted(
        names, key=lambda s: (re.sub(r"\d+", "", s), [int(d) for d in re.findall(r"\d+", s)])
    )


def model_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` (``ResNet`` fields without options) that ``name`` stands for.

    Raises:
      ValueError: for a name that is neither in the table nor a CIFAR depth 6n+2.
    """
    if name in IMAGENET_MODELS:
        return IMAGENET_MODELS[name]
    if name in CIFAR_MODELS:
        return CIFAR_MODELS[name]
    m = _PREACT_RE.match(name)
    if m and (int(m[1]) - 2) % 6 == 0 and int(m[1]) >= 8:  # basic blocks, 6n + 2
        return _cifar_preact(BasicBlock, (int(m[1]) - 2) // 6)
    m = _WRN_RE.match(name)
    if m and (int(m[1]) - 4) % 6 == 0 and int(m[1]) >= 10 and int(m[2]) >= 1:
        k = int(m[2])
        return _cifar_preact(BasicBlock, (int(m[1]) - 4) // 6, (16 * k, 32 * k, 64 * k), _WIDE)
    m = _CIFAR_RE.match(name)
    if m and (int(m.group(2)) - 2) % 6 == 0 and int(m.group(2)) >= 8:
        n = (int(m.group(2)) - 2) // 6
        return ModelSpec(
            "cifar", BasicBlock, (n, n, n), CIFAR_WIDTHS, "cifar", 16, m.group(1) == "resnet"
        )
    raise ValueError(
        f"Unknown model {name!r}. Valid names: {', '.join(list_models())}; CIFAR nets "
        "accept any depth 6n+2 >= 8 (e.g. resnet1202, plain110, cifar_resnet50, "
        "preact_resnet56), wide ResNets any wrn<6n+4>_<k> (e.g. wrn40_4)."
    )


def create_model(name: str, **options: Any) -> ResNet:
    """Builds a named network of the paper.

    Args:
      name: one of :func:`list_models` (CIFAR: any ``resnetN``/``plainN`` with
        ``N = 6n + 2``, ``preact_resnetN`` (pre-activation basic blocks; 164
        and 1001 are He et al.'s bottleneck nets), any ``wrnD_K`` with
        ``D = 6n + 4``). The names of the
        later ResNets are torchvision's and timm's (``resnet50d``,
        ``resnext50_32x4d``, ``wide_resnet50_2``, ``seresnet50``,
        ``resnetv2_50``) and build their networks; they fix ``variant='v1.5'``
        (the CIFAR ``preact_resnet164``/``1001``: ``'v1'``, as the authors' code).
      **options: ``num_classes`` (default 1000 for ImageNet nets, 10 for CIFAR
        nets; 0 for a backbone that returns pooled features), ``variant``
        ('v1' default, or 'v1.5'), ``shortcut`` ('A', 'B', 'C'; default A for
        CIFAR and B for ImageNet nets), ``dtype``, ``param_dtype``,
        ``zero_init_residual``, ``bn_momentum`` (0.9), ``bn_epsilon`` (1e-5),
        ``bn_groups`` (1; training BatchNorm statistics over that many equal
        groups of the batch), ``act``, ``materialize`` (False),
        ``conv_general_dilated`` (None: ``lax.conv_general_dilated``),
        ``drop_path_rate`` (0: stochastic depth off), ``dropout_rate`` (0);
        see :class:`ResNet`.

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
        shortcut = spec.shortcut
    fields = spec.resnet_fields()
    if "variant" in fields and options.get("variant", fields["variant"]) != fields["variant"]:
        raise ValueError(
            f"{name} has its stride where it is published (variant={fields['variant']!r}); "
            f"variant={options['variant']!r} names no such network: drop variant=."
        )
    if "variant" in fields:
        options.pop("variant", None)
    if fields.get("avg_down") and shortcut != "B":
        raise ValueError(
            f"{name}'s shortcuts are ResNet-D's average-pool projections; shortcut="
            f"{shortcut!r} does not apply: drop shortcut=."
        )
    options.setdefault("num_classes", 10 if spec.family == "cifar" else 1000)
    return ResNet(**fields, shortcut=shortcut, **options)


def _preset(name: str) -> Callable[..., ResNet]:
    return functools.partial(ResNet, **IMAGENET_MODELS[name].resnet_fields())


# ``ResNet50(num_classes=10)``: the table's fields preset, every other field free.
ResNet18 = _preset("resnet18")
ResNet34 = _preset("resnet34")
ResNet50 = _preset("resnet50")
ResNet101 = _preset("resnet101")
ResNet152 = _preset("resnet152")
