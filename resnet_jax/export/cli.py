r"""Writes a trained or converted ResNet as a deployable file.

    python -m resnet_jax.export --format onnx|stablehlo|savedmodel|tflite --output PATH \
        (--config C [--config.key=value ...] --workdir W [--step N] [--ema] \
         | --weights PATH [--source auto|torchvision|transformers] [--image_size S]) \
        [--batch_size N] [--uint8] [--dtype float32|bfloat16] [--platforms cpu,cuda,tpu] [--force]

The model is taken as :mod:`resnet_jax.evaluate` takes it: a ``train.py``
run's checkpoint (its ``--config`` and overrides, checked against the
checkpoint's fingerprint; the run's dataset must be readable here, since its
pipeline gives the image shape and the mean), or converted weights (the image
size from their preprocessing record, or ``--image_size`` for weights that
have none). The file's input is what ``module.apply(variables, x,
train=False)`` takes (NHWC float32, normalised as the weights expect: a run's
``pixels / 255 - mean``, converted weights' mean/std); with ``--uint8`` it
takes uint8 pixels and does the normalisation itself. Its output is the
logits. The batch is dynamic unless ``--batch_size`` fixes it.

A user's mistake is one line ``export: error: ...`` on stderr, exit status 2;
an existing ``--output`` is replaced only with ``--force``, and only once the
new file is complete (see :mod:`resnet_jax.export.formats`).
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags
from ml_collections import config_flags

from resnet_jax import data as data_lib
from resnet_jax import evaluate, launch
from resnet_jax.errors import UserError
from resnet_jax.export import formats

PROG = "export"


def from_workdir(config, workdir: str, step: int | None, ema: bool):
    """``(module, variables, image_shape, mean, step)`` of a run's checkpoint."""
    exp, state, restored = evaluate.restore_run(config, workdir, step, ema, ten_crop=False)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return exp.model, variables, tuple(exp.pipeline.info.image_shape), exp.pipeline.mean, restored


def from_weights(path: str, source: str, image_size: int | None):
    """``(module, variables, image_shape, preprocessing)`` of converted weights."""
    converted, _ = evaluate.load_weights(path, source)
    p = converted.preprocessing
    size = image_size or p.crop
    if not size:
        raise UserError(
            f"--weights {path} record no image size; give --image_size (e.g. 32 for CIFAR)."
        )
    module, variables = converted
    return module, variables, (int(size), int(size), 3), p


def _flags():
    flags.DEFINE_enum("format", None, list(formats.FORMATS), "The file's format.")
    flags.DEFINE_string("output", None, "The file (a directory for savedmodel) to write.")
    flags.DEFINE_string("workdir", None, "A train.py run's workdir: export its checkpoint.")
    flags.DEFINE_integer("step", None, "With --workdir: this step's checkpoint (default newest).")
    flags.DEFINE_bool("ema", False, "With --workdir: its EMA weights.")
    flags.DEFINE_string("weights", None, "A converted file or directory (torchvision, HF).")
    flags.DEFINE_enum("source", "auto", list(evaluate.SOURCES), "The layout of --weights.")
    flags.DEFINE_integer("image_size", None, "With --weights: the input's height and width.")
    flags.DEFINE_integer("batch_size", None, "Fix the batch (default: dynamic).")
    flags.DEFINE_bool("uint8", False, "Take uint8 pixels; the normalisation is in the file.")
    flags.DEFINE_enum("dtype", "float32", list(formats.DTYPES), "The computation dtype.")
    flags.DEFINE_list(
        "platforms", list(formats.PLATFORMS), "stablehlo/savedmodel: lower for these."
    )
    flags.DEFINE_bool("force", False, "Replace an existing --output.")
    config_flags.DEFINE_config_file(
        "config", None, "With --workdir: the run's configs/*.py.", lock_config=True
    )
    launch.define_absl_flags(flags)
    return flags.FLAGS


def _check_flags(F) -> None:
    if F.format is None or F.output is None:
        launch.fail(PROG, "--format and --output are required.")
    if (F.workdir is None) == (F.weights is None):
        launch.fail(PROG, "give exactly one of --workdir (a training run) and --weights.")
    if F.workdir is not None and F.config is None:
        launch.fail(PROG, "--workdir needs the run's --config (a configs/*.py file).")
    if (F.step is not None or F.ema) and F.workdir is None:
        launch.fail(PROG, "--step and --ema select a checkpoint of --workdir; --weights has none.")
    if F.image_size is not None and F.weights is None:
        launch.fail(PROG, "--image_size is for --weights; a run's image size is its config's.")
    if F.image_size is not None and F.image_size < 1:
        launch.fail(PROG, f"--image_size={F.image_size}: give a positive size.")


def _parse_flags(argv):
    rest = launch.parse_absl_flags(PROG, flags, argv)
    _check_flags(flags.FLAGS)
    return rest


def _main(argv) -> None:
    del argv
    F = flags.FLAGS

    def run():
        formats.check_output(F.output, F.force)  # before any work
        launch.start(launch.options_from(F))
        t0 = time.perf_counter()
        if F.workdir is not None:
            data_lib.configure_tensorflow()
            module, variables, shape, mean, step = from_workdir(F.config, F.workdir, F.step, F.ema)
            norm = dict(mean=mean, std=1.0, channels="RGB")
            source = {"workdir": F.workdir, "step": step, "weights": "ema" if F.ema else "model"}
        else:
            module, variables, shape, p = from_weights(F.weights, F.source, F.image_size)
            norm = dict(mean=p.mean, std=p.std, channels=p.channels)
            source = {"weights": F.weights}
        formats.export(
            module, variables, F.output, F.format, image_shape=shape, batch_size=F.batch_size,
            uint8=F.uint8, dtype=F.dtype, platforms=F.platforms, force=F.force, **norm,
        )  # fmt: skip
        size = (
            os.path.getsize(F.output)
            if os.path.isfile(F.output)
            else sum(
                os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(F.output) for f in fs
            )
        )
        result = {
            "output": F.output, "format": F.format, "bytes": size, "input_shape": [F.batch_size, *shape],
            "input_dtype": "uint8" if F.uint8 else "float32", "seconds": round(time.perf_counter() - t0, 2),
            **source,
        }  # fmt: skip
        print(f"wrote {F.output} ({F.format}, {size / 2**20:.1f} MiB)", flush=True)
        print(json.dumps(result), flush=True)

    launch.run(PROG, run)


def main() -> None:
    """The command line (see the module doc; ``--help`` lists the flags)."""
    _flags()
    app.run(_main, flags_parser=_parse_flags)


if __name__ == "__main__":
    main()
