"""``from_keras``: a ``keras.applications`` ResNet50/101/152 (v1) or
ResNet50V2/101V2/152V2 object into ``(module, variables)``. Keras is never
imported: the model is passed in."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from resnet_jax.models import BottleneckBlock, ResNet
from resnet_jax.weights.preprocessing import PREPROCESSING, Converted

_SUPPORTED = (
    "keras.applications.ResNet50, ResNet101, ResNet152 (v1) and ResNet50V2, ResNet101V2, "
    "ResNet152V2, channels_last"
)


def _unsupported(why: str) -> ValueError:
    return ValueError(
        f"from_keras cannot convert this model: {why}. Supported: {_SUPPORTED}, with "
        "include_top=True or include_top=False with pooling='avg'."
    )


def from_keras(keras_model: Any) -> Converted:
    """Converts a ``keras.applications`` ResNet (v1 or V2) into a Flax module and variables.

    The result computes the same function: same logits in inference mode and
    the same batch-statistics path in training mode. The module keeps Keras'
    BatchNorm epsilon (1.001e-5) and momentum (0.99).

    * v1 (``ResNet50``/``101``/``152``): the paper's bottleneck (``variant='v1'``).
      Keras' convolution biases are each followed by BatchNorm and fold exactly
      into its running mean: BN(Wx + b) with mean ``m`` equals BN(Wx) with
      mean ``m - b``, and in training mode the batch mean absorbs ``b`` the
      same way, so running-statistic updates stay consistent.
    * V2 (``ResNet50V2``/``101V2``/``152V2``): pre-activation bottlenecks with
      the stride in the 3x3 and Keras' layout options (:class:`ResNet`'s
      ``stride_block='last'``, ``stem_bias``, ``stem_pool_zeros``). The biases
      of each block's last convolution and of its projection add to the
      residual stream, which only BatchNorms read (the next block's
      pre-activation, the final one) or the shortcuts carry unchanged, so the
      stream differs from Keras' by a per-channel constant that is folded into
      the running mean of every BatchNorm that reads it. The stem's bias comes
      before a zero-padded max-pool and is kept.

    The converted model returns logits: a Keras classifier with
    ``classifier_activation='softmax'`` outputs ``jax.nn.softmax(logits)``.
    Inputs are preprocessed as for the Keras model: ``PREPROCESSING['keras']``
    for v1 (``keras.applications.resnet.preprocess_input``: BGR,
    mean-subtracted) and ``PREPROCESSING['keras-v2']`` for V2
    (``resnet_v2.preprocess_input``: RGB scaled to [-1, 1]).

    Args:
      keras_model: e.g. ``keras.applications.ResNet50(weights=None)`` or
        ``ResNet50V2(weights='imagenet')``; any input size.

    Returns:
      A :class:`Converted` ``(module, {'params': ..., 'batch_stats': ...})``
      for ``module.apply(variables, x_nhwc, train=False)``, with its
      ``.preprocessing``.

    Raises:
      ValueError: for a model this converter does not support (channels_first,
        a feature-map output, other architectures), naming what is wrong.
    """
    layers = _keras_layers(keras_model)
    v2 = "post_bn" in layers
    stage_sizes = _keras_stage_sizes(layers)
    head = layers.get("predictions")
    if head is None and "avg_pool" not in layers:
        raise _unsupported("include_top=False without pooling='avg' returns a feature map")
    bn0 = layers["post_bn" if v2 else "conv1_bn"]
    layout = dict(preact=True, variant="v1.5", stride_block="last", stem_bias=True)
    module = ResNet(
        stage_sizes=stage_sizes,
        block_cls=BottleneckBlock,
        num_classes=0 if head is None else int(head.get_weights()[0].shape[1]),
        shortcut="B",
        **(dict(layout, stem_pool_zeros=True) if v2 else dict(variant="v1")),
        bn_momentum=float(bn0.momentum),
        bn_epsilon=float(bn0.epsilon),
    )
    variables = (_keras_v2_variables if v2 else _keras_variables)(layers, stage_sizes, head)
    return Converted(module, variables, PREPROCESSING["keras-v2" if v2 else "keras"])


def _keras_layers(keras_model: Any) -> dict[str, Any]:
    """The model's layers by name, once it is known to be a channels-last ResNet."""
    try:
        layers = {layer.name: layer for layer in keras_model.layers}
    except AttributeError as e:
        raise _unsupported(f"{type(keras_model).__name__} is not a Keras model") from e
    if "conv1_conv" not in layers or "conv2_block1_1_conv" not in layers:
        raise _unsupported(f"{keras_model.name!r} has no ResNet layer names")
    first_bn = layers.get("post_bn", layers.get("conv1_bn"))
    if first_bn is None:
        raise _unsupported("it has neither a stem BatchNorm (v1) nor a final one (V2)")
    if getattr(first_bn, "axis", [-1]) not in (-1, 3, [-1], [3]):
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


class _Tree:
    """The ``params`` and ``batch_stats`` trees being filled from Keras' layers."""

    def __init__(self, layers: Mapping[str, Any]):
        self.layers = layers
        self.params: dict[str, Any] = {}
        self.stats: dict[str, Any] = {}

    @staticmethod
    def put(tree, path, leaf):
        *parents, last = path
        for p in parents:
            tree = tree.setdefault(p, {})
        tree[last] = np.asarray(leaf, np.float32)

    def conv(self, keras_conv: str, path, keep_bias: bool = False) -> np.ndarray:
        """Puts the kernel (and with ``keep_bias`` the bias); returns the bias (zeros if none)."""
        weights = self.layers[keras_conv].get_weights()
        kernel = weights[0]
        bias = weights[1] if len(weights) > 1 else np.zeros(kernel.shape[-1], np.float32)
        self.put(self.params, (*path, "kernel"), kernel)
        if keep_bias:
            self.put(self.params, (*path, "bias"), bias)
        return np.asarray(bias, np.float32)

    def bn(self, keras_bn: str, path, offset: Any = 0.0) -> None:
        """Puts a BatchNorm whose input is ``offset`` less than Keras' (folded into the mean)."""
        bn = self.layers[keras_bn]
        if not (bn.scale and bn.center):
            raise _unsupported(f"BatchNorm {keras_bn} has scale/center disabled")
        gamma, beta, mean, var = bn.get_weights()
        self.put(self.params, (*path, "scale"), gamma)
        self.put(self.params, (*path, "bias"), beta)
        self.put(self.stats, (*path, "mean"), mean - offset)
        self.put(self.stats, (*path, "var"), var)

    def head(self, head: Any) -> dict[str, Any]:
        if head is not None:
            kernel, bias = head.get_weights()
            self.put(self.params, ("head", "kernel"), kernel)
            self.put(self.params, ("head", "bias"), bias)
        return {"params": self.params, "batch_stats": self.stats}


def _keras_variables(
    layers: Mapping[str, Any], stage_sizes: tuple[int, ...], head: Any
) -> dict[str, Any]:
    """v1's ``{'params', 'batch_stats'}``; each conv bias folded into the BN after it."""
    tree = _Tree(layers)

    def conv_bn(keras_conv: str, keras_bn: str, conv_path, bn_path):
        tree.bn(keras_bn, bn_path, offset=tree.conv(keras_conv, conv_path))

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
    return tree.head(head)


def _keras_v2_variables(
    layers: Mapping[str, Any], stage_sizes: tuple[int, ...], head: Any
) -> dict[str, Any]:
    """V2's ``{'params', 'batch_stats'}``. ``offset`` is what Keras' residual
    stream holds above ours: the biases of the last convolutions (and the
    projection) since the stream last started at a projection."""
    tree = _Tree(layers)
    tree.conv("conv1_conv", ("stem_conv",), keep_bias=True)
    offset: Any = 0.0
    for s, size in enumerate(stage_sizes):
        for b in range(size):
            k = f"conv{s + 2}_block{b + 1}"
            f = f"stage{s + 1}_block{b + 1}"
            tree.bn(f"{k}_preact_bn", (f, "bn1"), offset=offset)
            # Keras' have no bias here; one would fold into the BatchNorm after it.
            tree.bn(f"{k}_1_bn", (f, "bn2"), offset=tree.conv(f"{k}_1_conv", (f, "conv1")))
            tree.bn(f"{k}_2_bn", (f, "bn3"), offset=tree.conv(f"{k}_2_conv", (f, "conv2")))
            residual = tree.conv(f"{k}_3_conv", (f, "conv3"))
            if f"{k}_0_conv" in layers:
                offset = tree.conv(f"{k}_0_conv", (f, "shortcut", "proj_conv")) + residual
            elif b == 0:
                raise _unsupported(f"block {k} changes shape but has no projection shortcut")
            else:
                offset = offset + residual
    tree.bn("post_bn", ("final_bn",), offset=offset)
    return tree.head(head)
