"""``from_keras``: a ``keras.applications`` ResNet50/101/152 (v1) object into
``(module, variables)``. Keras is never imported: the model is passed in."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from resnet_jax.models import BottleneckBlock, ResNet
from resnet_jax.weights.preprocessing import PREPROCESSING, Converted

_SUPPORTED = "keras.applications.ResNet50, ResNet101 and ResNet152 (v1, channels_last)"


def _unsupported(why: str) -> ValueError:
    return ValueError(
        f"from_keras cannot convert this model: {why}. Supported: {_SUPPORTED}, with "
        "include_top=True or include_top=False with pooling='avg'."
    )


def from_keras(keras_model: Any) -> Converted:
    """Converts a ``keras.applications`` ResNet (v1) into a Flax module and variables.

    The result computes the same function: same logits in inference mode and
    the same batch-statistics path in training mode. Keras' convolution biases
    (ResNet v1 in Keras has them; each is followed by BatchNorm) are folded
    exactly into the BatchNorm running mean: BN(Wx + b) with mean ``m`` equals
    BN(Wx) with mean ``m - b``, and in training mode the batch mean absorbs
    ``b`` the same way, so running-statistic updates stay consistent. The
    module keeps Keras' BatchNorm epsilon (1.001e-5) and momentum (0.99).

    The converted model returns logits: a Keras classifier with
    ``classifier_activation='softmax'`` outputs ``jax.nn.softmax(logits)``.
    Inputs are preprocessed as for the Keras model
    (``keras.applications.resnet.preprocess_input``: BGR, mean-subtracted).

    Args:
      keras_model: e.g. ``keras.applications.ResNet50(weights=None)`` or with
        ``weights='imagenet'``; any input size.

    Returns:
      A :class:`Converted` ``(module, {'params': ..., 'batch_stats': ...})``
      for ``module.apply(variables, x_nhwc, train=False)``, whose
      ``.preprocessing`` is ``PREPROCESSING['keras']`` (Caffe's: BGR,
      mean-subtracted, unscaled).

    Raises:
      ValueError: for a model this converter does not support (ResNetV2,
        channels_first, other architectures), naming what is wrong.
    """
    layers = _keras_layers(keras_model)
    stage_sizes = _keras_stage_sizes(layers)
    head = layers.get("predictions")
    if head is None and "avg_pool" not in layers:
        raise _unsupported("include_top=False without pooling='avg' returns a feature map")
    bn0 = layers["conv1_bn"]
    module = ResNet(
        stage_sizes=stage_sizes,
        block_cls=BottleneckBlock,
        num_classes=0 if head is None else int(head.get_weights()[0].shape[1]),
        shortcut="B",
        variant="v1",
        bn_momentum=float(bn0.momentum),
        bn_epsilon=float(bn0.epsilon),
    )
    variables = _keras_variables(layers, stage_sizes, head)
    return Converted(module, variables, PREPROCESSING["keras"])


def _keras_layers(keras_model: Any) -> dict[str, Any]:
    """The model's layers by name, once it is known to be a channels-last ResNet v1."""
    try:
        layers = {layer.name: layer for layer in keras_model.layers}
    except AttributeError as e:
        raise _unsupported(f"{type(keras_model).__name__} is not a Keras model") from e
    if "post_bn" in layers or any(n.endswith("_preact_bn") for n in layers):
        raise _unsupported("it is a pre-activation ResNetV2")
    if "conv1_conv" not in layers or "conv2_block1_1_conv" not in layers:
        raise _unsupported(f"{keras_model.name!r} has no ResNet v1 layer names")
    if getattr(layers["conv1_bn"], "axis", [-1]) not in (-1, 3, [-1], [3]):
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


def _keras_variables(
    layers: Mapping[str, Any], stage_sizes: tuple[int, ...], head: Any
) -> dict[str, Any]:
    """``{'params', 'batch_stats'}`` from Keras' layers; conv biases folded into BN means."""
    params: dict[str, Any] = {}
    stats: dict[str, Any] = {}

    def put(tree, path, leaf):
        *parents, last = path
        for p in parents:
            tree = tree.setdefault(p, {})
        tree[last] = np.asarray(leaf, np.float32)

    def conv_bn(keras_conv: str, keras_bn: str, conv_path, bn_path):
        conv_w = layers[keras_conv].get_weights()
        kernel = conv_w[0]
        bias = conv_w[1] if len(conv_w) > 1 else np.zeros(kernel.shape[-1], np.float32)
        bn = layers[keras_bn]
        if not (bn.scale and bn.center):
            raise _unsupported(f"BatchNorm {keras_bn} has scale/center disabled")
        gamma, beta, mean, var = bn.get_weights()
        put(params, (*conv_path, "kernel"), kernel)
        put(params, (*bn_path, "scale"), gamma)
        put(params, (*bn_path, "bias"), beta)
        put(stats, (*bn_path, "mean"), mean - bias)  # fold the conv bias
        put(stats, (*bn_path, "var"), var)

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
    if head is not None:
        kernel, bias = head.get_weights()
        put(params, ("head", "kernel"), kernel)
        put(params, ("head", "bias"), bias)
    return {"params": params, "batch_stats": stats}
