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

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

ModuleDef = Any
Dtype = Any

SHORTCUTS = ("A", "B", "C")
VARIANTS = ("v1", "v1.5")
STEMS = ("imagenet", "cifar")
IMAGENET_WIDTHS = (64, 128, 256, 512)
CIFAR_WIDTHS = (16, 32, 64)

# He normal, as in [13] of the paper; fan_out like torchvision so that the
# backward signal keeps unit variance (both modes are "as in [13]").
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class Features(NamedTuple):
    """Intermediate outputs of :class:`ResNet`, from ``apply(..., features=True)``.

    A NamedTuple, so a pytree: it passes through ``jax.jit`` and ``jax.eval_shape``.
    For ``(N, H, W, C)`` inputs:

    Attributes:
      stem: ``(N, ceil(H/4), ceil(W/4), stem_width)`` after the ImageNet stem's
        max-pool, ``(N, H, W, stem_width)`` after the CIFAR stem; compute dtype.
      stages: one ``(N, H_i, W_i, C_i)`` output per stage, compute dtype; the
        spatial size halves at the start of every stage after the first, and
        ``C_i`` is ``widths[i]`` (basic blocks) or ``4 * widths[i]`` (bottleneck).
      pooled: ``(N, C_last)`` global average of the last stage, float32.
      logits: ``(N, num_classes)`` float32, or None when ``num_classes == 0``.
    """

    stem: jax.Array
    stages: tuple[jax.Array, ...]
    pooled: jax.Array
    logits: jax.Array | None


def _check_shortcut(shortcut: str | None) -> None:
    if shortcut is not None and shortcut not in SHORTCUTS:
        raise ValueError(
            f"Unknown shortcut {shortcut!r}; valid options are 'A' (identity, zero-padded "
            "channels), 'B' (projection where the shape changes), 'C' (projection "
            "everywhere) or None (a plain network without shortcuts)."
        )


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(
            f"Unknown variant {variant!r}; valid: 'v1' (paper: stride in the bottleneck's "
            "first 1x1) or 'v1.5' (stride in its 3x3)."
        )


def _check_resnet_fields(m: ResNet) -> None:
    """Raises ValueError for a field of ``m`` that names no valid network."""
    _check_shortcut(m.shortcut)
    _check_variant(m.variant)
    if m.stem not in STEMS:
        raise ValueError(
            f"Unknown stem {m.stem!r}; valid: 'imagenet' (7x7/2 conv + 3x3/2 max-pool) "
            "or 'cifar' (3x3 conv)."
        )
    if not isinstance(m.num_classes, int) or m.num_classes < 0:
        raise ValueError(
            f"num_classes must be an int >= 0 (0 drops the classifier), got {m.num_classes!r}."
        )
    if len(m.stage_sizes) != len(m.widths):
        raise ValueError(
            f"stage_sizes {tuple(m.stage_sizes)} and widths {tuple(m.widths)} must have "
            "the same length: one width per stage."
        )
    if not m.stage_sizes or min(m.stage_sizes) < 1:
        raise ValueError(
            f"stage_sizes must list at least one stage of >= 1 blocks, got {m.stage_sizes!r}."
        )
    _check_bn_groups(m.bn_groups, "bn_groups")


def _check_bn_groups(groups: int, field: str) -> None:
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(
            f"{field} must be an int >= 1 (1: statistics over the whole batch), got {groups!r}."
        )


def _check_batch_divides(batch: int, groups: int, field: str) -> None:
    if batch % groups:
        raise ValueError(
            f"The training batch of {batch} examples does not divide into {field}={groups} "
            f"equal groups; use a batch size that is a multiple of {groups}."
        )


class GroupedBatchNorm(nn.Module):
    """BatchNorm whose training statistics are computed over equal groups of the batch.

    "Ghost" batch normalisation, as in tuned large-batch ImageNet runs (MLPerf):
    in training, an ``(N, ..., C)`` input is split along its first axis into
    ``groups`` consecutive groups of ``N / groups`` examples, and each group is
    normalised with the float32 mean and (biased) variance of its own
    examples, exactly as :class:`flax.linen.BatchNorm` would normalise that
    group on its own. When the groups line up with the devices of a batch
    sharded over a mesh axis (``groups`` a multiple of the device count), no
    statistic of the forward or backward pass crosses a device.

    The running statistics are updated with the mean over the groups of their
    statistics: ``ra_mean = m * ra_mean + (1 - m) * mean_g(mean_g)`` and
    ``ra_var = m * ra_var + (1 - m) * mean_g(var_g)``, the mean of the groups'
    variances (not the variance of the whole batch, which also counts the
    spread of the group means). Both are the average of the updates the
    groups would make separately from the same running statistics. This
    average is the one cross-group (cross-device) reduction, one per layer,
    and nothing else in the step waits on it.

    With ``use_running_average`` (evaluation) it is :class:`flax.linen.BatchNorm`.
    Variables have flax's names and shapes: params ``scale`` and ``bias``,
    batch_stats ``mean`` and ``var``, each ``(C,)`` float32, so checkpoints
    move freely between grouped and ungrouped models.

    Maps ``(N, ..., C)`` to the same shape in ``dtype``. Training raises
    ValueError when ``N`` does not divide by ``groups``.

    Attributes:
      groups: number of equal groups of the batch (1: the whole batch).
      use_running_average: normalise with the running statistics (evaluation);
        may also be given at call time, as for ``nn.BatchNorm``.
      momentum: decay of the running statistics, as ``nn.BatchNorm``'s.
      epsilon: added to the variance.
      dtype: the output dtype (None: from the input and parameters); the
        statistics are at least float32 whatever it is.
      param_dtype: storage dtype of ``scale`` and ``bias``.
      use_bias, use_scale, bias_init, scale_init: as ``nn.BatchNorm``'s.
    """

    groups: int = 1
    use_running_average: bool | None = None
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Callable = nn.initializers.zeros
    scale_init: Callable = nn.initializers.ones

    def __post_init__(self) -> None:
        _check_bn_groups(self.groups, "groups")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        """Normalises ``x`` (``(N, ..., C)``) over all axes but the last."""
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        features = (x.shape[-1],)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
        scale = bias = None
        if self.use_scale:
            scale = self.param("scale", self.scale_init, features, self.param_dtype)
        if self.use_bias:
            bias = self.param("bias", self.bias_init, features, self.param_dtype)
        out_dtype = nn.dtypes.canonicalize_dtype(
            *(a for a in (x, scale, bias) if a is not None), dtype=self.dtype
        )

        if use_running_average:
            y = _affine(x, ra_mean.value, ra_var.value, self.epsilon, scale, bias)
            return jnp.asarray(y, out_dtype)

        n = x.shape[0]
        _check_batch_divides(n, self.groups, "groups")
        # (N, ..., C) -> (G, N/G, ..., C): with the batch sharded over devices
        # and G a multiple of their number, each group lives on one device.
        xg = x.reshape(self.groups, n // self.groups, *x.shape[1:])
        stats_dtype = jnp.promote_types(self.dtype or x.dtype, jnp.float32)
        xs = xg.astype(stats_dtype)
        axes = tuple(range(1, xg.ndim - 1))
        # E[x^2] - E[x]^2 in one pass, clipped at 0, as nn.BatchNorm's default.
        mean = xs.mean(axes)
        var = jnp.maximum(0.0, jnp.square(xs).mean(axes) - jnp.square(mean))
        if not self.is_initializing():
            m = self.momentum
            ra_mean.value = m * ra_mean.value + (1 - m) * mean.mean(0)
            ra_var.value = m * ra_var.value + (1 - m) * var.mean(0)
        shape = (self.groups,) + (1,) * len(axes) + features
        y = _affine(xg, mean.reshape(shape), var.reshape(shape), self.epsilon, scale, bias)
        return jnp.asarray(y, out_dtype).reshape(x.shape)


def _affine(x, mean, var, epsilon, scale, bias):
    """``(x - mean) * rsqrt(var + epsilon) * scale + bias``, in flax's order of operations."""
    y = x - mean
    mul = lax.rsqrt(var + epsilon)
    if scale is not None:
        mul = mul * scale
    y = y * mul
    if bias is not None:
        y = y + bias
    return y


class Shortcut(nn.Module):
    """The identity path of a residual block, projected or padded as needed.

    Maps ``(N, H, W, C_in)`` to ``(N, ceil(H/s), ceil(W/s), out_features)``.

    Attributes:
      out_features: channels of the block's output.
      strides: spatial stride ``s`` of the block.
      option: 'A' (parameter-free: subsample by striding, zero-pad the new
        channels, split evenly on both sides), 'B' (1x1 projection + BatchNorm
        only where the shape changes) or 'C' (projection in every block).
    """

    out_features: int
    strides: int
    option: str
    conv: ModuleDef
    norm: ModuleDef

    def __post_init__(self) -> None:
        if self.option not in SHORTCUTS:
            raise ValueError(
                f"Unknown shortcut option {self.option!r}; valid: 'A', 'B' or 'C' (a plain "
                "block, shortcut=None, has no Shortcut module)."
            )
        super().__post_init__()

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

    Maps ``(N, H, W, C)`` to ``(N, ceil(H/strides), ceil(W/strides), filters)``.

    Attributes:
      filters: output channels of both convolutions.
      conv, norm: module factories (``nn.Conv``/``nn.BatchNorm`` or
        :class:`GroupedBatchNorm`, with dtype and train mode bound), called
        as ``conv(features, kernel_size, strides=, name=)``.
      act: the activation function.
      strides: stride of the first convolution.
      shortcut: 'A', 'B', 'C' or None for a plain block without a shortcut.
      zero_init_residual: start the last BatchNorm scale at zero.
    """

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable = nn.relu
    strides: int = 1
    shortcut: str | None = "B"
    zero_init_residual: bool = False

    def __post_init__(self) -> None:
        _check_shortcut(self.shortcut)
        super().__post_init__()

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

    Maps ``(N, H, W, C)`` to ``(N, ceil(H/strides), ceil(W/strides), 4 * filters)``.
    Fields as :class:`BasicBlock`, plus ``variant``: ``'v1'`` puts the stride in
    the first 1x1 convolution, as in the paper and Keras; ``'v1.5'`` puts it in
    the 3x3, as in torchvision (more accurate, about 6% more multiply-adds for
    ResNet-50, as counted by :func:`resnet_jax.count_macs`).
    """

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable = nn.relu
    strides: int = 1
    shortcut: str | None = "B"
    zero_init_residual: bool = False
    variant: str = "v1"

    def __post_init__(self) -> None:
        _check_shortcut(self.shortcut)
        _check_variant(self.variant)
        super().__post_init__()

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

    Construction raises ValueError for an unknown ``shortcut``, ``variant`` or
    ``stem``, a negative ``num_classes``, or ``stage_sizes`` and ``widths`` of
    different lengths.

    Attributes:
      stage_sizes: blocks per stage, e.g. ``(3, 4, 6, 3)`` for ResNet-50.
      block_cls: :class:`BasicBlock` or :class:`BottleneckBlock` (or any module
        with the same fields; ``variant`` is passed only to a block that declares it).
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
      bn_groups: in training, each BatchNorm computes its statistics over
        ``bn_groups`` equal groups of the batch ("ghost" BatchNorm, see
        :class:`GroupedBatchNorm`); the batch size must divide by it. With a
        batch sharded over devices and ``bn_groups`` a multiple of their
        number, no BatchNorm statistic crosses a device. 1 (default): over the
        whole batch, with ``nn.BatchNorm``. Evaluation and the variables'
        names and shapes do not depend on it.
      dtype: compute dtype (e.g. ``jnp.bfloat16``). BatchNorm statistics, the
        pooled features and the logits stay float32.
      param_dtype: storage dtype of the parameters.
      act: the activation function (ReLU).
      materialize: in training, pass every activation through
        :func:`materialize` (an identity XLA cannot fuse across) so that the
        convolution kernel gradients read it from memory instead of
        recomputing it. Only on request: it helps XLA:CPU (see BENCHMARKS.md),
        so the trainer and benchmarks ask for it there. Values and gradients
        are the same either way.
    """

    stage_sizes: Sequence[int]
    block_cls: ModuleDef
    widths: Sequence[int] = IMAGENET_WIDTHS
    stem: str = "imagenet"
    stem_width: int = 64
    num_classes: int = 1000
    shortcut: str | None = "B"
    variant: str = "v1"
    zero_init_residual: bool = False
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    bn_groups: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    act: Callable = nn.relu
    materialize: bool = False

    def __post_init__(self) -> None:
        _check_resnet_fields(self)
        super().__post_init__()

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False):
        """Runs the network on a batch of NHWC images.

        Args:
          x: ``(N, H, W, C)`` images.
          train: use batch statistics (of each of the ``bn_groups`` groups)
            and update ``batch_stats`` (apply with ``mutable=['batch_stats']``);
            False uses the running statistics.
          features: return a :class:`Features` record of the intermediate
            outputs (stem, every stage, pooled, logits or None) instead.

        Returns:
          ``(N, num_classes)`` float32 logits, ``(N, C)`` float32 pooled
          features when ``num_classes == 0``, or :class:`Features`.

        Raises:
          ValueError: for inputs that are not NHWC with the initialised
            channels, or in training when ``N`` does not divide by ``bn_groups``.
        """
        _check_input(x, self.variables.get("params", {}))
        if train:
            _check_batch_divides(x.shape[0], self.bn_groups, "bn_groups")
        conv, norm, act = self._layers(train)
        x = _stem(jnp.asarray(x, self.dtype), self.stem, self.stem_width, conv, norm, act)
        stem = x
        stages = []
        block_options = self._block_options()
        for i, (size, width) in enumerate(zip(self.stage_sizes, self.widths, strict=True)):
            for j in range(size):
                x = self.block_cls(
                    width,
                    conv=conv,
                    norm=norm,
                    act=act,
                    strides=2 if i > 0 and j == 0 else 1,
                    name=f"stage{i + 1}_block{j + 1}",
                    **block_options,
                )(x)
            stages.append(x)
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        logits = None
        if self.num_classes > 0:
            logits = nn.Dense(
                self.num_classes, dtype=jnp.float32, param_dtype=self.param_dtype, name="head"
            )(pooled)
        if features:
            return Features(stem=stem, stages=tuple(stages), pooled=pooled, logits=logits)
        return pooled if logits is None else logits

    @nn.nowrap
    def _layers(self, train: bool) -> tuple[Callable, Callable, Callable]:
        """The conv and norm factories and the activation the blocks share."""
        conv = functools.partial(
            _conv,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=conv_kernel_init,
        )
        # nn.BatchNorm for one group keeps the ungrouped numerics bit for bit.
        bn = (
            nn.BatchNorm
            if self.bn_groups == 1
            else functools.partial(GroupedBatchNorm, groups=self.bn_groups)
        )
        norm = functools.partial(
            bn,
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        act = _materialized(self.act) if train and self.materialize else self.act
        return conv, norm, act

    @nn.nowrap
    def _block_options(self) -> dict[str, Any]:
        """The fields every block gets; ``variant`` only where the block declares it."""
        options: dict[str, Any] = dict(
            shortcut=self.shortcut, zero_init_residual=self.zero_init_residual
        )
        if "variant" in getattr(self.block_cls, "__dataclass_fields__", {}):
            options["variant"] = self.variant
        return options


def _check_input(x: jax.Array, params: Mapping[str, Any]) -> None:
    """Raises ValueError for inputs that are not NHWC with the initialised channels."""
    if x.ndim != 4:
        raise ValueError(
            f"ResNet expects NHWC images of rank 4, got shape {x.shape}; add a batch "
            "axis with x[None] or transpose NCHW inputs with x.transpose(0, 2, 3, 1)."
        )
    if "stem_conv" not in params:
        return
    expected = params["stem_conv"]["kernel"].shape[2]
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


def _stem(x: jax.Array, kind: str, width: int, conv, norm, act) -> jax.Array:
    """The stem, in the calling module's scope (``stem_conv``, ``stem_bn``)."""
    if kind == "imagenet":
        x = conv(width, (7, 7), strides=2, name="stem_conv")(x)
        x = act(norm(name="stem_bn")(x))
        return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    x = conv(width, (3, 3), name="stem_conv")(x)
    return act(norm(name="stem_bn")(x))


def materialize(x: jax.Array) -> jax.Array:
    """Returns ``x`` unchanged (any shape and dtype), computed once and stored.

    XLA fuses cheap elementwise producers into every consumer. For the kernel
    gradient of a convolution, XLA:CPU transposes the input activation; fused
    with the BatchNorm + residual + ReLU chain that produced it, that transpose
    recomputes the chain, several blocks deep, with strided reads (its share
    of the step time is in BENCHMARKS.md). A ``lax.cond`` is a boundary
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
