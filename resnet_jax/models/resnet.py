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
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_jax.models.layers import (
    Dtype,
    GroupedBatchNorm,
    ModuleDef,
    check_batch_divides,
    check_bn_groups,
    check_shortcut,
    check_variant,
    conv_kernel_init,
    materialized,
    padded_conv,
)

STEMS = ("imagenet", "cifar", "deep")
STRIDE_BLOCKS = ("first", "last")
# The ResNet fields a block receives, each only where the block declares it.
BLOCK_FIELDS = (
    "variant",
    "groups",
    "base_width",
    "preact",
    "avg_down",
    "se",
    "dropout",
)
IMAGENET_WIDTHS = (64, 128, 256, 512)
CIFAR_WIDTHS = (16, 32, 64)


class Features(NamedTuple):
    """Intermediate outputs of :class:`ResNet`, from ``apply(..., features=True)``.

    A NamedTuple, so a pytree: it passes through ``jax.jit`` and ``jax.eval_shape``.
    For ``(N, H, W, C)`` inputs:

    Attributes:
      stem: ``(N, ceil(H/4), ceil(W/4), stem_width)`` after the ImageNet (or
        deep) stem's max-pool, ``(N, H, W, stem_width)`` after the CIFAR stem;
        compute dtype. In a pre-activation net it is not normalised.
      stages: one ``(N, H_i, W_i, C_i)`` output per stage, compute dtype; the
        spatial size halves at the start of every stage after the first, and
        ``C_i`` is ``widths[i]`` (basic blocks) or ``4 * widths[i]`` (bottleneck).
        In a pre-activation net the last one is before the final BatchNorm-ReLU.
      pooled: ``(N, C_last)`` global average of the last stage (after the
        final BatchNorm-ReLU of a pre-activation net), float32.
      logits: ``(N, num_classes)`` float32, or None when ``num_classes == 0``.
    """

    stem: jax.Array
    stages: tuple[jax.Array, ...]
    pooled: jax.Array
    logits: jax.Array | None


def _check_resnet_fields(m: ResNet) -> None:
    """Raises ValueError for a field of ``m`` that names no valid network."""
    check_shortcut(m.shortcut)
    check_variant(m.variant)
    if m.stem not in STEMS:
        raise ValueError(
            f"Unknown stem {m.stem!r}; valid: 'imagenet' (7x7/2 conv + 3x3/2 max-pool), "
            "'cifar' (3x3 conv) or 'deep' (three 3x3 convs + 3x3/2 max-pool, ResNet-C/D)."
        )
    _check_family_fields(m)
    _check_layout_fields(m)
    if m.conv_general_dilated is not None and not callable(m.conv_general_dilated):
        raise ValueError(
            f"conv_general_dilated={m.conv_general_dilated!r} is not callable; give a function "
            "with lax.conv_general_dilated's signature, or None for lax's."
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
    check_bn_groups(m.bn_groups, "bn_groups")
    if not (isinstance(m.bn_momentum, int | float) and 0 <= m.bn_momentum < 1):
        raise ValueError(
            f"bn_momentum must be in [0, 1) (the running statistics' decay: PyTorch's "
            f"momentum 0.1 is 0.9 here), got {m.bn_momentum!r}."
        )
    if not (isinstance(m.bn_epsilon, int | float) and m.bn_epsilon > 0):
        raise ValueError(
            f"bn_epsilon must be positive (it keeps 1/sqrt(variance + epsilon) finite), "
            f"got {m.bn_epsilon!r}; torchvision's is 1e-5."
        )
    for field in ("dtype", "param_dtype"):
        _check_dtype(getattr(m, field), field)


def _check_family_fields(m: ResNet) -> None:
    """Raises ValueError for the later ResNets' fields (groups, widths, SE,
    pre-activation, ResNet-D, drop path, dropout) that name no network."""
    for field in ("groups", "base_width"):
        value = getattr(m, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{field} must be an int >= 1, got {value!r}.")
    for field in ("drop_path_rate", "dropout_rate"):
        value = getattr(m, field)
        if not (isinstance(value, int | float) and 0 <= value < 1):
            raise ValueError(
                f"{field} must be in [0, 1) (the probability of dropping), got {value!r}."
            )
    declared = getattr(m.block_cls, "__dataclass_fields__", {})
    defaults = dict(groups=1, base_width=64, preact=False, avg_down=False, se=False, dropout=0.0)
    for field, default in defaults.items():
        value = m.dropout_rate if field == "dropout" else getattr(m, field)
        if value != default and field not in declared:
            what = getattr(m.block_cls, "__name__", str(m.block_cls))
            hint = (
                " Grouped and wider 3x3 convolutions (ResNeXt, wide ResNets) are "
                "bottleneck options; widen basic blocks with widths=."
                if field in ("groups", "base_width")
                else ""
            )
            raise ValueError(f"{field}={value!r} does not apply to {what}.{hint}")
    if m.drop_path_rate and "drop_path" not in declared:
        raise ValueError(f"drop_path_rate does not apply to {m.block_cls.__name__}.")
    if m.drop_path_rate and m.shortcut is None:
        raise ValueError(
            "drop_path_rate drops residual branches; a plain network (shortcut=None) has none."
        )
    if m.preact:
        clash = [f for f in ("se", "avg_down") if getattr(m, f)] + (
            ["stem='deep'"] if m.stem == "deep" else []
        )
        if clash:
            raise ValueError(
                f"preact=True with {', '.join(clash)}: no such pre-activation network is "
                "published (timm's resnetv2_50d and BiT use GroupNorm); drop one of them."
            )
    if m.avg_down and m.shortcut != "B":
        raise ValueError(
            f"avg_down=True is ResNet-D's projection shortcut; it needs shortcut='B', got "
            f"{m.shortcut!r}."
        )


def _check_layout_fields(m: ResNet) -> None:
    """Raises ValueError for the layout options (where the stride sits, the
    stem's bias and max-pool padding) that name no network."""
    if m.stride_block not in STRIDE_BLOCKS:
        raise ValueError(
            f"Unknown stride_block {m.stride_block!r}; valid: 'first' (the paper's: every "
            "stage after the first starts with the strided block) or 'last' (Keras' "
            "ResNetV2: every stage but the last ends with it)."
        )
    for field in ("stem_bias", "stem_pool_zeros"):
        if not isinstance(getattr(m, field), bool):
            raise ValueError(f"{field} must be True or False, got {getattr(m, field)!r}.")
    if m.stem_pool_zeros and m.stem == "cifar":
        raise ValueError("stem_pool_zeros=True pads the stem's max-pool; stem='cifar' has none.")


def _check_dtype(dtype: Any, field: str) -> None:
    try:
        kind = jnp.dtype(dtype)
    except (TypeError, ValueError):
        kind = None
    if kind is None or not jnp.issubdtype(kind, jnp.floating):
        raise ValueError(
            f"{field}={dtype!r} names no floating-point dtype; use jnp.float32 (or "
            "'float32'), jnp.bfloat16 or jnp.float16."
        )


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
      stem: ``'imagenet'`` (7x7/2 conv + 3x3/2 max-pool), ``'cifar'`` (3x3
        conv) or ``'deep'`` (ResNet-C/D, *Bag of Tricks*: 3x3/2 conv to
        ``stem_width // 2``, 3x3 conv to ``stem_width // 2``, 3x3 conv to
        ``stem_width``, each with BatchNorm + ReLU, then the 3x3/2 max-pool).
      stem_width: output channels of the stem.
      num_classes: classifier outputs; 0 drops the classifier and returns the
        pooled features ``(N, C)``.
      shortcut: 'A', 'B', 'C', or None for a plain network (no shortcuts).
      variant: 'v1' (paper) or 'v1.5' (stride in the bottleneck's 3x3).
      groups, base_width: the bottleneck's grouped 3x3 (ResNeXt) and inner
        width (wide ResNets), see :class:`BottleneckBlock`.
      preact: pre-activation blocks (He et al. 2016b): no BatchNorm or ReLU in
        the stem, BatchNorm-ReLU before each convolution, and a final
        BatchNorm (``final_bn``) + ReLU before the pooling.
      avg_down: ResNet-D shortcuts (average pool, then a stride-1 projection).
      se: a squeeze-and-excitation module in every block.
      drop_path_rate: stochastic depth; block ``b`` of ``B`` (counted over
        all stages from 0) drops its residual branch with probability
        ``drop_path_rate * b / (B - 1)``, per example, in training only (as
        timm). Training then needs ``rngs={'dropout': key}``.
      dropout_rate: dropout between the convolutions of each block (wide
        ResNets); training needs the ``'dropout'`` rng too.
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
      stride_block: ``'first'`` (the paper's, and every other
        implementation's: each stage after the first starts with the strided
        block) or ``'last'`` (Keras' ``ResNet50V2``/``101V2``/``152V2``: each
        stage but the last ends with it, and that block's identity shortcut
        is subsampled, Keras' 1x1 max-pool of the stride, which keeps the
        top-left pixel of each window). The strides and output sizes are the
        same; ``Features.stages`` then holds each stage's output after its
        stride.
      stem_bias: a bias in the stem's first convolution (Keras' ResNetV2; in
        its v1 the bias is followed by BatchNorm and folds into it).
      stem_pool_zeros: pad the stem's 3x3/2 max-pool with zeros (Keras'
        ``ZeroPadding2D``) instead of leaving the padding out (PyTorch's and
        Flax's). The two differ only where the pooled values can be negative,
        as in a pre-activation stem, which has no ReLU before the pool.
      act: the activation function (ReLU).
      materialize: in training, pass every activation through
        :func:`materialize` (an identity XLA cannot fuse across) so that the
        convolution kernel gradients read it from memory instead of
        recomputing it. Only on request: it helps XLA:CPU (see BENCHMARKS.md),
        so the trainer and benchmarks ask for it there. Values and gradients
        are the same either way.
      conv_general_dilated: the convolution every ``nn.Conv`` of the network
        calls (``lax.conv_general_dilated`` when None). A backend's choice,
        not a property of the network: the trainer passes
        :func:`resnet_jax.training.cpu_conv.conv_general_dilated` on the CPU
        under gradient accumulation.
    """

    stage_sizes: Sequence[int]
    block_cls: ModuleDef
    widths: Sequence[int] = IMAGENET_WIDTHS
    stem: str = "imagenet"
    stem_width: int = 64
    num_classes: int = 1000
    shortcut: str | None = "B"
    variant: str = "v1"
    groups: int = 1
    base_width: int = 64
    preact: bool = False
    avg_down: bool = False
    se: bool = False
    drop_path_rate: float = 0.0
    dropout_rate: float = 0.0
    zero_init_residual: bool = False
    stride_block: str = "first"
    stem_bias: bool = False
    stem_pool_zeros: bool = False
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    bn_groups: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    act: Callable = nn.relu
    materialize: bool = False
    conv_general_dilated: Callable | None = None

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
            check_batch_divides(x.shape[0], self.bn_groups, "bn_groups")
        conv, norm, act = self._layers(train)
        x = _stem(jnp.asarray(x, self.dtype), self, conv, norm, act)
        stem = x
        stages = []
        block_options = self._block_options(train)
        total = sum(self.stage_sizes)
        index = 0
        for i, (size, width) in enumerate(zip(self.stage_sizes, self.widths, strict=True)):
            for j in range(size):
                if self.drop_path_rate:
                    block_options["drop_path"] = self.drop_path_rate * index / max(total - 1, 1)
                strides, options = self._block_stride(i, j, size, block_options)
                x = self.block_cls(
                    width,
                    conv=conv,
                    norm=norm,
                    act=act,
                    strides=strides,
                    name=f"stage{i + 1}_block{j + 1}",
                    **options,
                )(x)
                index += 1
            stages.append(x)
        if self.preact:
            x = act(norm(name="final_bn")(x))
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
            padded_conv,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=conv_kernel_init,
            conv_general_dilated=self.conv_general_dilated,
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
        act = materialized(self.act) if train and self.materialize else self.act
        return conv, norm, act

    @nn.nowrap
    def _block_stride(
        self, stage: int, block: int, size: int, options: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        """The stride of block ``block`` of stage ``stage`` (of ``size`` blocks),
        and its options: with ``stride_block='last'`` a strided block whose
        channels do not change subsamples its identity shortcut (option A with
        no channels to pad; where the channels change, the projection strides)."""
        if self.stride_block == "first":
            return (2 if stage > 0 and block == 0 else 1), options
        if stage == len(self.stage_sizes) - 1 or block != size - 1:
            return 1, options
        if size > 1 and self.shortcut == "B":
            return 2, dict(options, shortcut="A")
        return 2, options

    @nn.nowrap
    def _block_options(self, train: bool) -> dict[str, Any]:
        """The fields every block gets; the later ones only where the block
        declares them (a block without them is refused at construction if
        they are set)."""
        options: dict[str, Any] = dict(
            shortcut=self.shortcut, zero_init_residual=self.zero_init_residual
        )
        declared = getattr(self.block_cls, "__dataclass_fields__", {})
        values = dict(
            {f: getattr(self, f) for f in BLOCK_FIELDS if f != "dropout"},
            dropout=self.dropout_rate,
        )
        options.update({f: v for f, v in values.items() if f in declared})
        if "deterministic" in declared:
            options["deterministic"] = not train
        return options


def _check_input(x: jax.Array, params: Mapping[str, Any]) -> None:
    """Raises ValueError for inputs that are not NHWC with the initialised channels."""
    if x.ndim != 4:
        raise ValueError(
            f"ResNet expects NHWC images of rank 4, got shape {x.shape}; add a batch "
            "axis with x[None] or transpose NCHW inputs with x.transpose(0, 2, 3, 1)."
        )
    if "stem_conv" not in params:  # init: the input decides the stem's channels
        if x.shape[1] in (1, 3, 4) and x.shape[-1] > 4:
            raise ValueError(
                f"Input of shape {x.shape} looks like NCHW (channels first): the network "
                f"would be initialised for {x.shape[-1]} input channels. Inputs are NHWC: "
                "transpose with x.transpose(0, 2, 3, 1)."
            )
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


def _stem(x: jax.Array, m: ResNet, conv, norm, act) -> jax.Array:
    """The stem of ``m``, in its scope (``stem_conv``, ``stem_bn``; the deep
    stem's later convolutions ``stem_conv2``/``3``, ``stem_bn2``/``3``)."""
    width = m.stem_width
    bias = dict(use_bias=True) if m.stem_bias else {}
    if m.stem == "deep":
        x = conv(width // 2, (3, 3), strides=2, name="stem_conv", **bias)(x)
        x = act(norm(name="stem_bn")(x))
        x = act(norm(name="stem_bn2")(conv(width // 2, (3, 3), name="stem_conv2")(x)))
        x = act(norm(name="stem_bn3")(conv(width, (3, 3), name="stem_conv3")(x)))
        return _stem_pool(x, m.stem_pool_zeros)
    if m.stem == "imagenet":
        x = conv(width, (7, 7), strides=2, name="stem_conv", **bias)(x)
        if not m.preact:
            x = act(norm(name="stem_bn")(x))
        return _stem_pool(x, m.stem_pool_zeros)
    x = conv(width, (3, 3), name="stem_conv", **bias)(x)
    return x if m.preact else act(norm(name="stem_bn")(x))


def _stem_pool(x: jax.Array, zeros: bool) -> jax.Array:
    """The stem's 3x3/2 max-pool, its one-pixel padding left out or (``zeros``) zeros."""
    if zeros:
        x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
