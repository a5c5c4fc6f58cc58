"""ResNet modules: the blocks, the network, and the table of named depths.

Every network of He et al., *Deep Residual Learning for Image Recognition*
(CVPR 2016) is one :class:`ResNet` configured by ``stage_sizes``, ``widths``,
a block class and a stem:

* ImageNet nets (Table 1): 7x7/2 stem + 3x3/2 max-pool, four stages of
  widths 64/128/256/512, basic blocks (18, 34) or bottleneck blocks
  (50, 101, 152).
* CIFAR nets (Section 4.2): 3x3 stem with 16 filters, three stages of widths
  16/32/64 with ``n`` basic blocks each, depth ``6n + 2``.

Inputs are NHWC arrays. Parameter names (``stem_conv``, ``stage2_block1/conv1``,
``head``, ...) are the checkpoint format and the weight converters' contract.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

ModuleDef = Any
Dtype = Any

SHORTCUTS = ("A", "B", "C")
VARIANTS = ("v1", "v1.5")

# He normal, as in [13] of the paper; fan_out like torchvision so that the
# backward signal keeps unit variance (both modes are "as in [13]").
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _check_shortcut(shortcut: str | None) -> None:
    if shortcut is not None and shortcut not in SHORTCUTS:
        raise ValueError(
            f"Unknown shortcut {shortcut!r}; valid options are 'A' (identity, zero-padded "
            "channels), 'B' (projection where the shape changes), 'C' (projection "
            "everywhere) or None (a plain network without shortcuts)."
        )


class Shortcut(nn.Module):
    """The identity path of a residual block, projected or padded as needed.

    Attributes:
      out_features: channels of the block's output.
      strides: spatial stride of the block.
      option: 'A' (parameter-free: subsample by striding, zero-pad the new
        channels, split evenly on both sides), 'B' (1x1 projection + BatchNorm
        only where the shape changes) or 'C' (projection in every block).
    """

    out_features: int
    strides: int
    option: str
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x):
        in_features = x.shape[-1]
        shape_changes = self.strides != 1 or in_features != self.out_features
        if self.option == "C" or (self.option == "B" and shape_changes):
            x = self.conv(self.out_features, (1, 1), strides=self.strides, name="proj_conv")(x)
            return self.norm(name="proj_bn")(x)
        if not shape_changes:
            return x
        # Option A: x[:, ::s, ::s] keeps the top-left sample of each stride
        # window, the sample a stride-s 1x1 convolution would see.
        x = x[:, :: self.strides, :: self.strides, :]
        extra = self.out_features - in_features
        if extra < 0:
            raise ValueError(
                f"Shortcut option A cannot reduce channels ({in_features} -> "
                f"{self.out_features}); use shortcut='B' or 'C'."
            )
        return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (Fig. 2 / Fig. 5 left of the paper).

    Attributes:
      filters: output channels of both convolutions.
      strides: stride of the first convolution.
      shortcut: 'A', 'B', 'C' or None for a plain block without a shortcut.
      zero_init_residual: start the last BatchNorm scale at zero.
      variant: accepted for symmetry with :class:`BottleneckBlock`; a basic
        block is the same in v1 and v1.5.
    """

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable = nn.relu
    strides: int = 1
    shortcut: str | None = "B"
    zero_init_residual: bool = False
    variant: str = "v1"

    expansion = 1

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.filters, (3, 3), strides=self.strides, name="conv1")(x)
        y = self.act(self.norm(name="bn1")(y))
        y = self.conv(self.filters, (3, 3), name="conv2")(y)
        scale_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        y = self.norm(scale_init=scale_init, name="bn2")(y)
        if self.shortcut is not None:
            y = y + Shortcut(
                self.filters, self.strides, self.shortcut, self.conv, self.norm, name="shortcut"
            )(residual)
        return self.act(y)


class BottleneckBlock(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (Fig. 5 right of the paper).

    ``variant='v1'`` puts the stride in the first 1x1 convolution, as in the
    paper and Keras; ``'v1.5'`` puts it in the 3x3, as in torchvision (more
    accurate, about 6% more multiply-adds for ResNet-50).
    """

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable = nn.relu
    strides: int = 1
    shortcut: str | None = "B"
    zero_init_residual: bool = False
    variant: str = "v1"

    expansion = 4

    @nn.compact
    def __call__(self, x):
        residual = x
        s1, s2 = (self.strides, 1) if self.variant == "v1" else (1, self.strides)
        y = self.conv(self.filters, (1, 1), strides=s1, name="conv1")(x)
        y = self.act(self.norm(name="bn1")(y))
        y = self.conv(self.filters, (3, 3), strides=s2, name="conv2")(y)
        y = self.act(self.norm(name="bn2")(y))
        y = self.conv(self.filters * 4, (1, 1), name="conv3")(y)
        scale_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        y = self.norm(scale_init=scale_init, name="bn3")(y)
        if self.shortcut is not None:
            y = y + Shortcut(
                self.filters * 4, self.strides, self.shortcut, self.conv, self.norm, name="shortcut"
            )(residual)
        return self.act(y)


class ResNet(nn.Module):
    """A residual (or plain) network.

    Attributes:
      stage_sizes: blocks per stage, e.g. ``(3, 4, 6, 3)`` for ResNet-50.
      block_cls: :class:`BasicBlock` or :class:`BottleneckBlock` (or any module
        with the same fields).
      widths: base filters per stage (a bottleneck block outputs 4x that).
      stem: ``'imagenet'`` (7x7/2 conv + 3x3/2 max-pool) or ``'cifar'`` (3x3 conv).
      stem_width: filters of the stem convolution.
      num_classes: classifier outputs; 0 drops the classifier and returns the
        pooled features ``(N, C)``.
      shortcut: 'A', 'B', 'C', or None for a plain network (no shortcuts).
      variant: 'v1' (paper) or 'v1.5' (stride in the bottleneck's 3x3).
      zero_init_residual: start the last BatchNorm scale of each block at 0.
      bn_momentum: decay of the running statistics, ``ra = m * ra + (1 - m) *
        batch``. PyTorch's ``momentum`` is ``1 - bn_momentum`` (0.1 <-> 0.9).
      bn_epsilon: BatchNorm epsilon.
      dtype: compute dtype (e.g. ``jnp.bfloat16``). BatchNorm statistics, the
        pooled features and the logits stay float32.
      param_dtype: storage dtype of the parameters.
      act: the activation function (ReLU).
      materialize: in training, pass every activation through
        :func:`materialize` (an identity XLA cannot fuse across) so that the
        convolution kernel gradients read it from memory. ``None`` (default):
        on when JAX's default backend is the CPU, where it made the ResNet-20
        train step 11-27% faster (BENCHMARKS.md), off elsewhere. Values and
        gradients are the same either way.
    """

    stage_sizes: Sequence[int]
    block_cls: ModuleDef
    widths: Sequence[int] = (64, 128, 256, 512)
    stem: str = "imagenet"
    stem_width: int = 64
    num_classes: int = 1000
    shortcut: str | None = "B"
    variant: str = "v1"
    zero_init_residual: bool = False
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    act: Callable = nn.relu
    materialize: bool | None = None

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False):
        """Runs the network on a batch of NHWC images.

        Args:
          x: ``(N, H, W, C)`` images.
          train: use batch statistics and update ``batch_stats`` (apply with
            ``mutable=['batch_stats']``); False uses the running statistics.
          features: return a dict of intermediate outputs instead of logits:
            ``stem``, ``stage1`` ... ``stageK`` (NHWC, compute dtype),
            ``pooled`` (``(N, C)`` float32) and ``logits`` when
            ``num_classes > 0``.

        Returns:
          ``(N, num_classes)`` float32 logits, ``(N, C)`` pooled features when
          ``num_classes == 0``, or the feature dict.
        """
        if x.ndim != 4:
            raise ValueError(
                f"ResNet expects NHWC images of rank 4, got shape {x.shape}; add a batch "
                "axis with x[None] or transpose NCHW inputs with x.transpose(0, 2, 3, 1)."
            )
        if "stem_conv" in self.variables.get("params", {}):
            expected = self.variables["params"]["stem_conv"]["kernel"].shape[2]
            if x.shape[-1] != expected:
                hint = (
                    " The input looks like NCHW: transpose it with x.transpose(0, 2, 3, 1)."
                    if x.shape[1] == expected
                    else ""
                )
                raise ValueError(
                    f"Input has {x.shape[-1]} channels in its last axis but the model was "
                    f"initialised for {expected} (inputs are NHWC).{hint}"
                )
        conv = functools.partial(
            _conv,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=conv_kernel_init,
        )
        norm = functools.partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        act = self.act
        on = jax.default_backend() == "cpu" if self.materialize is None else self.materialize
        if train and on:
            act = _materialized(self.act)
        out = {}
        x = jnp.asarray(x, self.dtype)
        if self.stem == "imagenet":
            x = conv(self.stem_width, (7, 7), strides=2, name="stem_conv")(x)
            x = act(norm(name="stem_bn")(x))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        elif self.stem == "cifar":
            x = conv(self.stem_width, (3, 3), name="stem_conv")(x)
            x = act(norm(name="stem_bn")(x))
        else:
            raise ValueError(f"Unknown stem {self.stem!r}; valid: 'imagenet', 'cifar'.")
        out["stem"] = x
        for i, (size, width) in enumerate(zip(self.stage_sizes, self.widths, strict=True)):
            for j in range(size):
                x = self.block_cls(
                    width,
                    conv=conv,
                    norm=norm,
                    act=act,
                    strides=2 if i > 0 and j == 0 else 1,
                    shortcut=self.shortcut,
                    zero_init_residual=self.zero_init_residual,
                    variant=self.variant,
                    name=f"stage{i + 1}_block{j + 1}",
                )(x)
            out[f"stage{i + 1}"] = x
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        out["pooled"] = x
        if self.num_classes > 0:
            x = nn.Dense(
                self.num_classes, dtype=jnp.float32, param_dtype=self.param_dtype, name="head"
            )(x)
            out["logits"] = x
        return out if features else x


def materialize(x: jax.Array) -> jax.Array:
    """Returns ``x`` unchanged, computed once and stored.

    XLA fuses cheap elementwise producers into every consumer. For the kernel
    gradient of a convolution, XLA:CPU transposes the input activation; fused
    with the BatchNorm + residual + ReLU chain that produced it, that transpose
    recomputes the chain, several blocks deep, with strided reads (measured:
    41% of the ResNet-20 step's operator time). A ``lax.cond`` is a boundary
    XLA does not fuse across (``lax.optimization_barrier`` is removed before
    fusion on XLA:CPU). Its predicate is read from ``x`` so that it cannot be
    folded at compile time, and the two branches differ (``x`` and ``x + 0``)
    so that they are not merged; both return ``x``'s values, NaN included.
    """
    first = x[(0,) * x.ndim]
    return lax.cond(first == first, lambda t: t, lambda t: t + jnp.zeros((), t.dtype), x)


def _materialized(act: Callable) -> Callable:
    def wrapped(x):
        return materialize(act(x))

    return wrapped


def _conv(features: int, kernel_size: tuple[int, int], strides: int = 1, **kw) -> nn.Conv:
    """``nn.Conv`` with the paper's (and torchvision's, Keras') symmetric ``k // 2``
    padding; XLA's 'SAME' pads stride-2 convolutions asymmetrically."""
    pads = tuple((k // 2, k // 2) for k in kernel_size)
    return nn.Conv(features, kernel_size, strides=strides, padding=pads, **kw)


# --------------------------------------------------------------------------- #
# The depth table.
# --------------------------------------------------------------------------- #

IMAGENET_WIDTHS = (64, 128, 256, 512)
CIFAR_WIDTHS = (16, 32, 64)

# name -> (block, stage sizes, residual?)  (Table 1 of the paper)
IMAGENET_MODELS: dict[str, tuple[type[nn.Module], tuple[int, ...], bool]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2), True),
    "resnet34": (BasicBlock, (3, 4, 6, 3), True),
    "resnet50": (BottleneckBlock, (3, 4, 6, 3), True),
    "resnet101": (BottleneckBlock, (3, 4, 23, 3), True),
    "resnet152": (BottleneckBlock, (3, 8, 36, 3), True),
    "plain18": (BasicBlock, (2, 2, 2, 2), False),
    "plain34": (BasicBlock, (3, 4, 6, 3), False),
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


def model_spec(name: str) -> dict[str, Any]:
    """The ``ResNet`` fields (without options) that a table name stands for."""
    if name in IMAGENET_MODELS:
        block, sizes, residual = IMAGENET_MODELS[name]
        return dict(
            family="imagenet",
            block_cls=block,
            stage_sizes=sizes,
            widths=IMAGENET_WIDTHS,
            stem="imagenet",
            stem_width=64,
            residual=residual,
        )
    m = _CIFAR_RE.match(name)
    if m and (int(m.group(2)) - 2) % 6 == 0 and int(m.group(2)) >= 8:
        n = (int(m.group(2)) - 2) // 6
        return dict(
            family="cifar",
            block_cls=BasicBlock,
            stage_sizes=(n, n, n),
            widths=CIFAR_WIDTHS,
            stem="cifar",
            stem_width=16,
            residual=m.group(1) == "resnet",
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
        ``act``.

    Returns:
      An uninitialised :class:`ResNet`.
    """
    spec = model_spec(name)
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(
            f"Unknown option(s) {unknown} for create_model; valid options: {', '.join(OPTIONS)}."
        )
    variant = options.pop("variant", "v1")
    if variant not in VARIANTS:
        raise ValueError(f"Unknown variant {variant!r}; valid: 'v1' (paper), 'v1.5'.")
    shortcut = options.pop("shortcut", None)
    _check_shortcut(shortcut)
    if not spec["residual"]:
        if shortcut is not None:
            raise ValueError(f"{name} is a plain network and has no shortcuts; drop shortcut=.")
        if options.get("zero_init_residual"):
            raise ValueError(
                f"zero_init_residual=True would zero every block of the plain network {name}."
            )
    elif shortcut is None:
        shortcut = "A" if spec["family"] == "cifar" else "B"
    num_classes = options.pop("num_classes", 10 if spec["family"] == "cifar" else 1000)
    if not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}.")
    return ResNet(
        stage_sizes=spec["stage_sizes"],
        block_cls=spec["block_cls"],
        widths=spec["widths"],
        stem=spec["stem"],
        stem_width=spec["stem_width"],
        num_classes=num_classes,
        shortcut=shortcut,
        variant=variant,
        **options,
    )


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BottleneckBlock)
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block_cls=BottleneckBlock)
ResNet152 = functools.partial(ResNet, stage_sizes=(3, 8, 36, 3), block_cls=BottleneckBlock)
