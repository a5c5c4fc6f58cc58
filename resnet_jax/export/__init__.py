"""Export for deployment: StableHLO, TensorFlow SavedModel, ONNX and LiteRT files.

* :mod:`~resnet_jax.export.formats`: :func:`export` (one call, one file),
  :func:`serving_function` (what is exported) and one function a format.
* :mod:`~resnet_jax.export.onnx_graph`: the ONNX writer (from the jaxpr).
* ``python -m resnet_jax.export`` (:mod:`~resnet_jax.export.cli`): the command.

Nothing here imports TensorFlow or onnx until a format that needs it is written.
"""

from resnet_jax.export.formats import (
    DTYPES,
    FORMATS,
    PLATFORMS,
    SUFFIXES,
    export,
    onnx_bytes,
    serving_function,
    stablehlo_bytes,
    tflite_bytes,
    write_savedmodel,
)

__all__ = [
    "DTYPES",
    "FORMATS",
    "PLATFORMS",
    "SUFFIXES",
    "export",
    "onnx_bytes",
    "serving_function",
    "stablehlo_bytes",
    "tflite_bytes",
    "write_savedmodel",
]
