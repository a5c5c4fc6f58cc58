"""A network as a file that runs without this project: StableHLO, SavedModel, ONNX, LiteRT.

:func:`serving_function` turns ``(module, variables)`` into the function that
is exported: ``x -> module.apply(variables, x, train=False)`` on NHWC float32
inputs normalised as the weights expect, or, with ``uint8=True``, on NHWC
uint8 pixels with the normalisation (``pixels / 255``, the channel order, the
mean and the std) folded in. :func:`export` writes it:

* ``stablehlo``: :func:`jax.export.export` serialized (``jax.export.deserialize(
  open(f, 'rb').read()).call(x)`` runs it with jax alone), lowered for
  ``platforms`` (default cpu, cuda and tpu);
* ``savedmodel``: a TensorFlow SavedModel through :mod:`jax.experimental.jax2tf`,
  its parameters tf.Variables, one ``serving_default`` signature
  (``images`` -> ``logits``);
* ``onnx``: an ONNX graph (opset 17) written from the jaxpr by
  :mod:`resnet_jax.export.onnx_graph`, BatchNorm folded into the convolutions;
* ``tflite``: LiteRT's flatbuffer, the SavedModel converted by
  ``tf.lite.TFLiteConverter`` (float32, no quantisation).

The batch is dynamic unless ``batch_size`` fixes it. A bfloat16 network
exports in float32 (its float32 parameters, computed in float32) unless
``dtype='bfloat16'`` is asked, which StableHLO and the SavedModel can hold and
ONNX and LiteRT refuse. The file (or SavedModel directory) is written under a
temporary name next to ``path`` and renamed into place, so a failure leaves no
partial file and an existing one is replaced only with ``force=True``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.errors import UserError
from resnet_jax.export import onnx_graph

FORMATS = ("stablehlo", "savedmodel", "onnx", "tflite")
SUFFIXES = {"stablehlo": ".stablehlo", "savedmodel": "", "onnx": ".onnx", "tflite": ".tflite"}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
PLATFORMS = ("cpu", "cuda", "tpu")


def _float32_variables(variables: Any, xp: Any = np) -> dict[str, Any]:
    """The ``params`` and ``batch_stats`` of ``variables`` as float32 arrays of
    ``xp`` (numpy, or jax.numpy where they may be traced)."""
    return {
        k: jax.tree.map(lambda a: xp.asarray(a, xp.float32), variables[k])
        for k in ("params", "batch_stats")
        if k in variables
    }


def serving_function(
    module: Any,
    variables: Any,
    *,
    uint8: bool = False,
    mean: Any = 0.0,
    std: Any = 1.0,
    channels: str = "RGB",
    dtype: str = "float32",
) -> Callable[[jax.Array], jax.Array]:
    """The inference function of ``module`` with ``variables`` closed over.

    ``dtype``: the network's computation dtype in the file (float32 by
    default, whatever the module was trained in). With ``uint8``, the
    function takes uint8 pixels and applies ``(pixels / 255 [BGR] - mean) /
    std`` first (``mean`` and ``std`` broadcast against an image: per channel,
    or per pixel as the CIFAR recipes' mean).
    """
    if dtype not in DTYPES:
        raise UserError(f"--dtype={dtype!r}; valid: {', '.join(DTYPES)}.")
    if channels not in ("RGB", "BGR"):
        raise UserError(f"channels={channels!r}; valid: 'RGB' or 'BGR'.")
    fields = {"dtype": DTYPES[dtype]}
    if getattr(module, "materialize", False):
        fields["materialize"] = False  # a trainer's fusion boundary, not part of the function
    net = module.clone(**fields)
    variables = _float32_variables(variables, jnp)
    mean32 = np.asarray(mean, np.float32)
    std32 = np.asarray(std, np.float32)

    def apply(x: jax.Array) -> jax.Array:
        if uint8:
            x = x.astype(jnp.float32) / 255.0
            if channels == "BGR":
                x = x[..., ::-1]
            x = (x - mean32) / std32
        out = net.apply(variables, x, train=False)
        return out.astype(jnp.float32)

    return apply


# --------------------------------------------------------------------------- #
# The formats
# --------------------------------------------------------------------------- #


def _spec(image_shape: Sequence[int], batch_size: int | None, dtype: Any) -> jax.ShapeDtypeStruct:
    if batch_size is None:
        (batch,) = jax.export.symbolic_shape("batch")
    else:
        batch = int(batch_size)
    return jax.ShapeDtypeStruct((batch, *map(int, image_shape)), dtype)


def stablehlo_bytes(
    fn: Callable,
    image_shape: Sequence[int],
    *,
    batch_size: int | None = None,
    input_dtype: Any = np.float32,
    platforms: Sequence[str] = PLATFORMS,
) -> bytes:
    """``fn`` as a serialized :class:`jax.export.Exported`."""
    exported = jax.export.export(jax.jit(fn), platforms=tuple(platforms))(
        _spec(image_shape, batch_size, input_dtype)
    )
    return bytes(exported.serialize())


def _tf_module(
    module_fn: Callable,
    variables: Any,
    image_shape: Sequence[int],
    batch_size: int | None,
    input_dtype: Any,
    platforms: Sequence[str],
) -> Any:
    """A tf.Module whose ``serving`` tf.function computes ``module_fn(variables, x)``."""
    # TensorFlow only for the formats that are TensorFlow's (import resnet_jax needs jax + flax).
    import tensorflow as tf
    from jax.experimental import jax2tf

    shape = "(b, " + ", ".join(map(str, image_shape)) + ")" if batch_size is None else None
    converted = jax2tf.convert(
        module_fn,
        polymorphic_shapes=[None, shape],
        with_gradient=False,
        native_serialization_platforms=tuple(platforms),
    )
    holder = tf.Module()
    holder.variables_ = tf.nest.map_structure(
        lambda a: tf.Variable(np.asarray(a), trainable=False), variables
    )
    signature = tf.TensorSpec(
        [batch_size, *map(int, image_shape)], tf.as_dtype(np.dtype(input_dtype)), name="images"
    )
    holder.serving = tf.function(
        lambda images: {"logits": converted(holder.variables_, images)},
        autograph=False,
        input_signature=[signature],
    )
    return holder


def write_savedmodel(
    directory: str,
    module_fn: Callable,
    variables: Any,
    image_shape: Sequence[int],
    *,
    batch_size: int | None = None,
    input_dtype: Any = np.float32,
    platforms: Sequence[str] = PLATFORMS,
) -> None:
    """A SavedModel of ``module_fn(variables, images)`` in ``directory``."""
    import tensorflow as tf  # only this format's

    holder = _tf_module(module_fn, variables, image_shape, batch_size, input_dtype, platforms)
    tf.saved_model.save(holder, directory, signatures={"serving_default": holder.serving})


def tflite_bytes(
    module_fn: Callable,
    variables: Any,
    image_shape: Sequence[int],
    *,
    batch_size: int | None = None,
    input_dtype: Any = np.float32,
) -> bytes:
    """LiteRT's flatbuffer of ``module_fn(variables, images)`` (float32)."""
    import tensorflow as tf  # only this format's

    with tempfile.TemporaryDirectory() as tmp:
        write_savedmodel(
            tmp, module_fn, variables, image_shape, batch_size=batch_size,
            input_dtype=input_dtype, platforms=("cpu",),
        )  # fmt: skip
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
        return bytes(converter.convert())


def onnx_bytes(
    fn: Callable,
    image_shape: Sequence[int],
    *,
    batch_size: int | None = None,
    input_dtype: Any = np.float32,
) -> bytes:
    """``fn`` as an ONNX model (:func:`resnet_jax.export.onnx_graph.jaxpr_to_onnx`)."""
    model = onnx_graph.jaxpr_to_onnx(fn, (1, *image_shape), input_dtype, batch_size=batch_size)
    return model.SerializeToString()


# --------------------------------------------------------------------------- #
# Writing
# --------------------------------------------------------------------------- #


def check_output(path: str, force: bool = False) -> None:
    """Refuses an output path before any work: a remote path, an existing file
    or directory (without ``force``), a folder that does not exist or cannot
    be written."""
    if "://" in path:
        raise UserError(
            f"--output {path}: export writes local files; write it here and copy it "
            "(e.g. gcloud storage cp)."
        )
    if os.path.lexists(path) and not force:
        raise UserError(f"--output {path} exists; give --force to replace it, or another path.")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"--output {path}: the folder {folder} does not exist; create it first.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"--output {path}: the folder {folder} is not writable.")


def _replace(tmp: str, path: str) -> None:
    """Moves ``tmp`` to ``path``; an existing ``path`` is removed only once ``tmp`` is complete."""
    if os.path.isdir(path) and not os.path.islink(path):
        old = tempfile.mkdtemp(prefix=".old-", dir=os.path.dirname(os.path.abspath(path)))
        os.rename(path, os.path.join(old, "x"))
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def export(
    module: Any,
    variables: Any,
    path: str,
    fmt: str,
    *,
    image_shape: Sequence[int],
    batch_size: int | None = None,
    uint8: bool = False,
    mean: Any = 0.0,
    std: Any = 1.0,
    channels: str = "RGB",
    dtype: str = "float32",
    platforms: Sequence[str] = PLATFORMS,
    force: bool = False,
) -> str:
    """Writes ``(module, variables)`` to ``path`` in ``fmt`` (see the module doc).

    Returns ``path``.

    Raises:
      UserError: an unknown format, a path that exists (without ``force``) or
        cannot be written, a batch size below 1, a dtype the format cannot
        hold, a network the format cannot express.
    """
    if fmt not in FORMATS:
        raise UserError(f"--format={fmt!r}; valid: {', '.join(FORMATS)}.")
    if batch_size is not None and int(batch_size) < 1:
        raise UserError(f"--batch_size={batch_size}: give a positive batch, or none (dynamic).")
    if dtype != "float32" and fmt in ("onnx", "tflite"):
        raise UserError(
            f"--dtype={dtype}: {fmt} files are written in float32 here; drop --dtype (the "
            "float32 parameters are exported computing in float32)."
        )
    bad = [p for p in platforms if p not in PLATFORMS]
    if bad or not platforms:
        raise UserError(f"--platforms={','.join(platforms)}; valid: {', '.join(PLATFORMS)}.")
    check_output(path, force)
    input_dtype = np.uint8 if uint8 else np.float32
    fn = serving_function(
        module, variables, uint8=uint8, mean=mean, std=std, channels=channels, dtype=dtype
    )
    kw = dict(batch_size=batch_size, input_dtype=input_dtype)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=folder)
    try:
        if fmt in ("savedmodel", "tflite"):
            # The variables are tf.Variables of the file (not constants of the graph).
            module_fn, tf_vars = _with_variables(
                module, variables, uint8, mean, std, channels, dtype
            )
        if fmt == "stablehlo":
            data = stablehlo_bytes(fn, image_shape, platforms=platforms, **kw)
        elif fmt == "onnx":
            data = _onnx_or_refuse(fn, image_shape, **kw)
        elif fmt == "tflite":
            data = tflite_bytes(module_fn, tf_vars, image_shape, **kw)
        else:
            data = None
            write_savedmodel(
                os.path.join(tmp, "model"), module_fn, tf_vars, image_shape,
                platforms=platforms, **kw,
            )  # fmt: skip
        if data is not None:
            with open(os.path.join(tmp, "model"), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        check_output(path, force)  # again: something may have appeared meanwhile
        _replace(os.path.join(tmp, "model"), path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _onnx_or_refuse(fn: Callable, image_shape: Sequence[int], **kw: Any) -> bytes:
    try:
        return onnx_bytes(fn, image_shape, **kw)
    except onnx_graph.UnsupportedError as e:
        raise UserError(f"this network cannot be written as ONNX here: {e}.") from e
    except ImportError as e:
        raise UserError("--format=onnx needs the onnx package: pip install onnx.") from e


def _with_variables(
    module: Any, variables: Any, uint8: bool, mean: Any, std: Any, channels: str, dtype: str
) -> tuple[Callable, Any]:
    """``(fn(variables, x), variables)``: the serving function with its
    variables an argument (they become the SavedModel's tf.Variables)."""
    params = _float32_variables(variables)

    def module_fn(v, x):
        return serving_function(
            module, v, uint8=uint8, mean=mean, std=std, channels=channels, dtype=dtype
        )(x)

    return module_fn, params
