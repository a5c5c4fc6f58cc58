"""Input data: the datasets, the host pipeline, the device-resident fast path.

* :mod:`~resnet_jax.data.datasets`: digits, CIFAR and ImageNet (tfds), their
  :class:`DatasetInfo`, ImageNet's preparation, the TensorFlow set-up.
* :mod:`~resnet_jax.data.transforms`: the augmentation and the ImageNet crop
  and resize geometry (TensorFlow ops).
* :mod:`~resnet_jax.data.pipeline`: :class:`InputPipeline`, this process's
  training and evaluation batches, a pure function of ``(seed, step)``.
* :mod:`~resnet_jax.data.device`: the training set and its augmentation on the
  devices (the CIFAR fast path).
* :mod:`~resnet_jax.data.prefetch`: global batches assembled ahead on a thread.

TensorFlow feeds the input pipeline; the trainer's TensorBoard writer takes it
from :func:`tf_setup.tensorflow_module` too, and only the SavedModel and LiteRT
exports import it themselves. No module here imports it at import time
(:func:`configure_tensorflow` runs first).
"""

from resnet_jax.data.datasets import (
    DATASETS,
    IMAGENET_MEAN_RGB,
    IN_MEMORY,
    DatasetInfo,
    Split,
    check_dataset,
    dataset_info,
    epoch_seed,
    eval_split,
    imagenet_preflight,
    load_digits,
    load_in_memory,
    pixel_mean,
    prepare_for_processes,
)
from resnet_jax.data.pipeline import IMAGE_DTYPES, ImageNetSource, InMemorySource, InputPipeline
from resnet_jax.data.tf_setup import configure_tensorflow, mock_data_scope, tfds_module
from resnet_jax.data.transforms import TRAIN_CROPS

__all__ = [
    "DATASETS",
    "IMAGENET_MEAN_RGB",
    "IMAGE_DTYPES",
    "IN_MEMORY",
    "TRAIN_CROPS",
    "DatasetInfo",
    "ImageNetSource",
    "InMemorySource",
    "InputPipeline",
    "Split",
    "check_dataset",
    "configure_tensorflow",
    "dataset_info",
    "epoch_seed",
    "eval_split",
    "imagenet_preflight",
    "load_digits",
    "load_in_memory",
    "mock_data_scope",
    "pixel_mean",
    "prepare_for_processes",
    "tfds_module",
]
