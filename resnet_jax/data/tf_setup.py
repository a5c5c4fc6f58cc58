"""TensorFlow's set-up for feeding JAX, done once before its first use: quiet
C++ logs and every GPU hidden from it (:func:`configure_tensorflow`);
TensorFlow and tfds imported after it (:func:`tensorflow_module`,
:func:`tfds_module`); input functions traced without AutoGraph
(:func:`without_autograph`). Importing this module imports neither.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from typing import Any

log = logging.getLogger(__name__)


@functools.cache
def configure_tensorflow() -> None:
    """Sets TensorFlow up to feed JAX: quiet C++ logs and no GPUs.

    Sets ``TF_CPP_MIN_LOG_LEVEL=2`` unless it is set (it acts only before
    TensorFlow's first import) and hides every GPU from TensorFlow so that it
    never takes accelerator memory. Idempotent. Call it where a program starts;
    :class:`InputPipeline` and the tfds helpers here call it before they import
    TensorFlow. If TensorFlow has already initialised its GPUs they can no
    longer be hidden, and this logs a warning. (``configure_tensorflow.cache_clear()``
    makes the next call run again.)
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    tf = _import_tensorflow()

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # raised only when GPUs are visible and already initialised
        log.warning(
            "TensorFlow initialised its GPUs before configure_tensorflow(); "
            "it may hold accelerator memory that JAX needs."
        )


# TensorFlow's __init__ imports these eagerly, only to register Keras's
# optimizers for loading Keras models from SavedModels, and carries on without
# them (it catches the ImportError). The import brings in all of Keras 3 and,
# through Keras's scikit-learn wrappers, scikit-learn: about a third of
# TensorFlow's import time, for nothing here, which loads no Keras model
# through TensorFlow. ``keras`` itself still imports as usual afterwards.
_KERAS_EAGER_IMPORTS = ("keras.src.optimizers", "tf_keras.src.optimizers")


def _import_tensorflow():
    """``import tensorflow`` without its eager import of Keras's optimizers.

    A module set to ``None`` in ``sys.modules`` fails to import at once
    (Python's documented way); the entries are removed again right after, so
    nothing else sees them. A no-op when TensorFlow or Keras is already
    imported.
    """
    if "tensorflow" not in sys.modules:
        skipped = [m for m in _KERAS_EAGER_IMPORTS if m not in sys.modules]
        sys.modules.update(dict.fromkeys(skipped))
        try:
            import tensorflow  # noqa: F401  (lazy: only after configure_tensorflow())
        finally:
            for m in skipped:
                if sys.modules.get(m, 0) is None:
                    del sys.modules[m]
    import tensorflow as tf  # lazy: only after configure_tensorflow()

    return tf


def tensorflow_module():
    """The ``tensorflow`` module, imported after :func:`configure_tensorflow`."""
    configure_tensorflow()
    return _import_tensorflow()


def tfds_module():
    """The ``tensorflow_datasets`` module, imported after :func:`configure_tensorflow`."""
    configure_tensorflow()
    import tensorflow_datasets as tfds  # lazy: it imports TensorFlow

    return tfds


def without_autograph(fn):
    """``fn`` marked for tf.data and ``tf.function`` to trace as written, without
    AutoGraph.

    AutoGraph rewrites a function's Python source so that ``if`` and loops on
    tensors become graph control flow; it parses and transforms every function
    reached from ``fn``: about half the time it took to build an ImageNet
    pipeline, a fifth for CIFAR's. This package's input functions branch only
    on the config and on static shapes, and loop only over Python lists, so
    the rewrite had nothing to convert and the traced graph is the same
    without it. A branch on a tensor in such a function is an error at trace
    time, never a silent change.
    """
    tf = tensorflow_module()
    return tf.autograph.experimental.do_not_convert(fn)


def mock_data_scope(config: Any):
    """``tfds.testing.mock_data`` when ``config.mock_data``, else a scope that does nothing."""
    if config.mock_data:
        return tfds_module().testing.mock_data(num_examples=int(config.mock_num_examples))
    return contextlib.nullcontext()
