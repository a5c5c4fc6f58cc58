"""The layers of a ResNet: BatchNorm over groups, the shortcut, the basic and
bottleneck blocks, and :func:`materialize`.

A block receives ``conv``/``norm``/``act`` factories from the network, so it
never knows about dtype or train mode (as in Flax's ImageNet example).
"""

from __future__ import annotations

from collections.abc import Callable
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


def check_shortcut(shortcut: str | None) -> None:
    if shortcut is not None and shortcut not in SHORTCUTS:
        raise ValueError(
            f"Unknown shortcut {shortcut!r}; valid options are 'A' (identity, zero-padded "
            "channels), 'B' (projection where the shape changes), 'C' (projection "
            "everywhere) or None (a plain network without shortcuts)."
        )


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(
            f"Unknown variant {variant!r}; valid: 'v1' (paper: stride in the bottleneck's "
            "first 1x1) or 'v1.5' (stride in its 3x3)."
        )


def check_bn_groups(groups: int, field: str) -> None:
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(
            f"{field} must be an int >= 1 (1: statistics over the whole batch), got {groups!r}."
        )


def check_batch_divides(batch: int, groups: int, field: str) -> None:
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
        check_bn_groups(self.groups, "groups")
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
        check_batch_divides(n, self.groups, "groups")
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


def projects(option: str, strides: int, in_features: int, out_features: int) -> bool:
    """Whether a shortcut of ``option`` is a 1x1 projection for this shape change."""
    shape_changes = strides != 1 or in_features != out_features
    return option == "C" or (option == "B" and shape_changes)


class Shortcut(nn.Module):
    """The identity path of a residual block, projected or padded as needed.

    Maps ``(N, H, W, C_in)`` to ``(N, ceil(H/s), ceil(W/s), out_features)``.

    Attributes:
      out_features: channels of the block's output.
      strides: spatial stride ``s`` of the block.
      option: 'A' (parameter-free: subsample by striding, zero-pad the new
        channels, split evenly on both sides), 'B' (1x1 projection + BatchNorm
        only where the shape changes) or 'C' (projection in every block).
      avg_down: ResNet-D (*Bag of Tricks*, He et al. 2019): a strided
        projection is a 2x2 average pool of stride ``s`` (ceil mode, windows
        cut by the edge averaged over what they hold, as timm's
        ``AvgPool2d(2, s, ceil_mode=True, count_include_pad=False)``), then a
        stride-1 1x1 convolution, so that no input pixel is skipped.
      preact: a pre-activation block's projection, a convolution without
        BatchNorm (the block's input was normalised before it).
    """

    out_features: int
    strides: int
    option: str
    conv: ModuleDef
    norm: ModuleDef
    avg_down: bool = False
    preact: bool = False

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
        if projects(self.option, self.strides, in_features, self.out_features):
            strides = self.strides
            if self.avg_down and strides > 1:
                x = _avg_pool_ceil(x, strides)
                strides = 1
            x = self.conv(self.out_features, (1, 1), strides=strides, name="proj_conv")(x)
            return x if self.preact else self.norm(name="proj_bn")(x)
        if self.strides == 1 and in_features == self.out_features:
            return x
        # Option A: x[:, ::s, ::s] keeps the top-left sample of each stride
        # window, the sample a stride-s 1x1 convolution would see. (lax.slice,
        # not x[:, ::s, ::s]: with a symbolic batch, as in an export, indexing
        # becomes a gather.)
        for axis in (1, 2):
            x = lax.slice_in_dim(x, 0, None, stride=self.strides, axis=axis)
        extra = self.out_features - in_features
        if extra < 0:
            raise ValueError(
                f"Shortcut option A cannot reduce channels ({in_features} -> "
                f"{self.out_features}); use shortcut='B' or 'C'."
            )
        return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))


def _avg_pool_ceil(x: jax.Array, strides: int) -> jax.Array:
    """2x2 average pool of stride ``strides``, ceil mode, edge windows over their valid pixels."""
    h, w = x.shape[1:3]
    pad_h = (-(h - 2) % strides) if h >= 2 else 2 - h
    pad_w = (-(w - 2) % strides) if w >= 2 else 2 - w
    return nn.avg_pool(
        x,
        (2, 2),
        strides=(strides, strides),
        padding=((0, pad_h), (0, pad_w)),
        count_include_pad=False,
    )


def se_channels(channels: int, ratio: float = 1 / 16, divisor: int = 8) -> int:
    """The squeeze width of timm's ``SEModule``: ``channels * ratio`` rounded to
    the nearest multiple of ``divisor``, at least ``divisor`` (timm's ``make_divisible``)."""
    return max(divisor, int(channels * ratio + divisor / 2) // divisor * divisor)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al., CVPR 2018), as timm's ``SEModule``.

    The global mean of ``(N, H, W, C)``, a 1x1 convolution with bias to
    :func:`se_channels` ``(C)`` channels, ReLU, a 1x1 convolution back to ``C``,
    a sigmoid; the input is scaled by the result. Same shape and dtype out.
    """

    conv: ModuleDef
    act: Callable = nn.relu

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = self.conv(se_channels(channels), (1, 1), use_bias=True, name="reduce")(s)
        s = self.conv(channels, (1, 1), use_bias=True, name="expand")(self.act(s))
        return x * nn.sigmoid(s)


class DropPath(nn.Module):
    """Stochastic depth (Huang et al., ECCV 2016), per example, as timm's ``DropPath``.

    In training (``deterministic=False``), each example's residual branch is
    zeroed with probability ``rate`` and the kept ones scaled by
    ``1 / (1 - rate)``, so the expectation is unchanged; the randomness comes
    from the ``'dropout'`` rng stream (``apply(..., rngs={'dropout': key})``).
    Otherwise, and for ``rate == 0``, the identity.
    """

    rate: float = 0.0
    deterministic: bool = True

    @nn.compact
    def __call__(self, x):
        if self.rate == 0.0 or self.deterministic:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(
            self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1)
        )
        return x * (mask.astype(x.dtype) / jnp.asarray(keep, x.dtype))


class _Block(nn.Module):
    """The fields both residual blocks have (documented on :class:`BasicBlock`)."""

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable = nn.relu
    strides: int = 1
    shortcut: str | None = "B"
    zero_init_residual: bool = False
    preact: bool = False
    avg_down: bool = False
    se: bool = False
    drop_path: float = 0.0
    dropout: float = 0.0
    deterministic: bool = True

    def __post_init__(self) -> None:
        check_shortcut(self.shortcut)
        super().__post_init__()


class BasicBlock(_Block):
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
      zero_init_residual: start the last BatchNorm scale at zero (the
        residual branch then starts at zero in both layouts).
      preact: pre-activation (He et al., *Identity Mappings in Deep Residual
        Networks*, ECCV 2016): ``bn1``-ReLU before ``conv1``, ``bn2``-ReLU
        before ``conv2``, nothing after the addition; a projection reads the
        normalised input and has no BatchNorm of its own.
      avg_down: ResNet-D projection shortcuts (:class:`Shortcut`).
      se: squeeze-and-excitation on the residual branch, before the addition.
      drop_path: stochastic-depth rate of this block (:class:`DropPath`).
      dropout: dropout rate between the two convolutions (wide ResNets).
      deterministic: no drop path or dropout (evaluation).
    """

    @nn.compact
    def __call__(self, x):
        scale_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        if self.preact:
            p = self.act(self.norm(name="bn1")(x))
            y = self.conv(self.filters, (3, 3), strides=self.strides, name="conv1")(p)
            y = self.act(self.norm(scale_init=scale_init, name="bn2")(y))
            y = nn.Dropout(self.dropout, deterministic=self.deterministic)(y)
            y = self.conv(self.filters, (3, 3), name="conv2")(y)
            return _residual(self, y, x, p, self.filters)
        y = self.conv(self.filters, (3, 3), strides=self.strides, name="conv1")(x)
        y = self.act(self.norm(name="bn1")(y))
        y = nn.Dropout(self.dropout, deterministic=self.deterministic)(y)
        y = self.conv(self.filters, (3, 3), name="conv2")(y)
        y = self.norm(scale_init=scale_init, name="bn2")(y)
        return self.act(_residual(self, y, x, x, self.filters))


class BottleneckBlock(_Block):
    """1x1 reduce, 3x3, 1x1 expand (Fig. 5 right of the paper).

    Maps ``(N, H, W, C)`` to ``(N, ceil(H/strides), ceil(W/strides), 4 * filters)``.
    Fields as :class:`BasicBlock`, plus:

    * ``variant``: ``'v1'`` puts the stride in the first 1x1 convolution, as
      in the paper and Keras; ``'v1.5'`` puts it in the 3x3, as in
      torchvision and timm (ResNet-B; more accurate, about 6% more
      multiply-adds for ResNet-50, as counted by :func:`resnet_jax.count_macs`).
    * ``groups`` and ``base_width``: the 3x3 convolution has ``groups`` groups
      (ResNeXt's cardinality, Xie et al. 2017) and the inner width is
      ``int(filters * base_width / 64) * groups``, as torchvision's
      ``groups``/``width_per_group``: ``resnext50_32x4d`` is 32 and 4,
      ``wide_resnet50_2`` 1 and 128; 1 and 64 is the paper's bottleneck.
    """

    variant: str = "v1"
    groups: int = 1
    base_width: int = 64

    def __post_init__(self) -> None:
        check_variant(self.variant)
        super().__post_init__()

    @nn.compact
    def __call__(self, x):
        width = int(self.filters * self.base_width / 64) * self.groups
        out = self.filters * 4
        s1, s2 = (self.strides, 1) if self.variant == "v1" else (1, self.strides)
        scale_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        grouped = dict(feature_group_count=self.groups)
        if self.preact:
            p = self.act(self.norm(name="bn1")(x))
            y = self.conv(width, (1, 1), strides=s1, name="conv1")(p)
            y = self.act(self.norm(name="bn2")(y))
            y = self.conv(width, (3, 3), strides=s2, name="conv2", **grouped)(y)
            y = self.act(self.norm(scale_init=scale_init, name="bn3")(y))
            y = nn.Dropout(self.dropout, deterministic=self.deterministic)(y)
            y = self.conv(out, (1, 1), name="conv3")(y)
            return _residual(self, y, x, p, out)
        y = self.conv(width, (1, 1), strides=s1, name="conv1")(x)
        y = self.act(self.norm(name="bn1")(y))
        y = self.conv(width, (3, 3), strides=s2, name="conv2", **grouped)(y)
        y = self.act(self.norm(name="bn2")(y))
        y = nn.Dropout(self.dropout, deterministic=self.deterministic)(y)
        y = self.conv(out, (1, 1), name="conv3")(y)
        y = self.norm(scale_init=scale_init, name="bn3")(y)
        return self.act(_residual(self, y, x, x, out))


def _residual(block: nn.Module, y: jax.Array, x: jax.Array, p: jax.Array, out: int) -> jax.Array:
    """The residual branch ``y`` (SE, drop path) plus the block's shortcut.

    ``x`` is the block's input and ``p`` what a projection reads: the
    normalised input in a pre-activation block, ``x`` otherwise. Runs in the
    block's scope (``se``, ``shortcut``).
    """
    if block.se:
        y = SqueezeExcite(block.conv, block.act, name="se")(y)
    y = DropPath(block.drop_path, block.deterministic)(y)
    if block.shortcut is None:
        return y
    projected = projects(block.shortcut, block.strides, x.shape[-1], out)
    shortcut = Shortcut(
        out,
        block.strides,
        block.shortcut,
        block.conv,
        block.norm,
        avg_down=block.avg_down,
        preact=block.preact,
        name="shortcut",
    )
    return y + shortcut(p if projected else x)


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


def materialized(act: Callable) -> Callable:
    def wrapped(x):
        return materialize(act(x))

    return wrapped


def padded_conv(features: int, kernel_size: tuple[int, int], strides: int = 1, **kw) -> nn.Conv:
    """``nn.Conv`` with the paper's (and torchvision's, Keras') symmetric ``k // 2``
    padding; XLA's 'SAME' pads stride-2 convolutions asymmetrically."""
    pads = tuple((k // 2, k // 2) for k in kernel_size)
    return nn.Conv(features, kernel_size, strides=strides, padding=pads, **kw)
