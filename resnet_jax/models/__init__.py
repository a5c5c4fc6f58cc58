"""The networks: blocks, :class:`ResNet`, the model table and MAC counting.

* :mod:`~resnet_jax.models.layers`: :class:`GroupedBatchNorm`, :class:`Shortcut`,
  :class:`BasicBlock`, :class:`BottleneckBlock` (with the options of the later
  ResNets), :class:`SqueezeExcite`, :class:`DropPath`, :func:`materialize`.
* :mod:`~resnet_jax.models.resnet`: :class:`ResNet` and its :class:`Features`.
* :mod:`~resnet_jax.models.table`: the name -> :class:`ModelSpec` table,
  :func:`create_model`, :func:`list_models`, :func:`model_spec`.
* :mod:`~resnet_jax.models.flops`: :func:`count_macs`.
"""

from resnet_jax.models.flops import count_macs
from resnet_jax.models.layers import (
    SHORTCUTS,
    VARIANTS,
    BasicBlock,
    BottleneckBlock,
    DropPath,
    GroupedBatchNorm,
    Shortcut,
    SqueezeExcite,
    conv_kernel_init,
    materialize,
)
from resnet_jax.models.resnet import CIFAR_WIDTHS, IMAGENET_WIDTHS, STEMS, Features, ResNet
from resnet_jax.models.table import (
    CIFAR_DEPTHS,
    CIFAR_MODELS,
    IMAGENET_MODELS,
    OPTIONS,
    ModelSpec,
    ResNet18,
    ResNet34,
    ResNet50,
    ResNet101,
    ResNet152,
    create_model,
    list_models,
    model_spec,
)

__all__ = [
    "CIFAR_DEPTHS",
    "CIFAR_MODELS",
    "CIFAR_WIDTHS",
    "IMAGENET_MODELS",
    "IMAGENET_WIDTHS",
    "OPTIONS",
    "SHORTCUTS",
    "STEMS",
    "VARIANTS",
    "BasicBlock",
    "BottleneckBlock",
    "DropPath",
    "Features",
    "GroupedBatchNorm",
    "ModelSpec",
    "ResNet",
    "ResNet18",
    "ResNet34",
    "ResNet50",
    "ResNet101",
    "ResNet152",
    "Shortcut",
    "SqueezeExcite",
    "conv_kernel_init",
    "count_macs",
    "create_model",
    "list_models",
    "materialize",
    "model_spec",
]
