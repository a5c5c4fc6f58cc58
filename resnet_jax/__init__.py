"""resnet_jax: the networks of *Deep Residual Learning for Image Recognition* in Flax.

>>> import resnet_jax as rj
>>> model = rj.create_model("resnet50", num_classes=1000)

Importing this package needs only jax and flax. TensorFlow is imported only by
the training input pipeline (``resnet_jax.data``) and the TensorBoard writer
(``resnet_jax.training.runtime``);
Keras is never imported (``rj.weights.from_keras`` receives a Keras model).
"""

from resnet_jax import weights
from resnet_jax.models import (
    BasicBlock,
    BottleneckBlock,
    Features,
    GroupedBatchNorm,
    ModelSpec,
    ResNet,
    ResNet18,
    ResNet34,
    ResNet50,
    ResNet101,
    ResNet152,
    Shortcut,
    count_macs,
    create_model,
    list_models,
    materialize,
    model_spec,
)

__version__ = "0.1.0"

__all__ = [
    "BasicBlock",
    "BottleneckBlock",
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
    "count_macs",
    "create_model",
    "list_models",
    "materialize",
    "model_spec",
    "weights",
]
