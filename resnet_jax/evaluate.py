r"""Evaluates a trained or converted ResNet on a dataset's evaluation split.

    python -m resnet_jax.evaluate --config configs/imagenet.py [--config.key=value ...] \
        (--workdir W [--step N] [--ema] | --weights PATH [--source auto|torchvision|transformers]) \
        [--ten_crop] [--output FILE]

* ``--workdir``: the newest (or ``--step``) checkpoint of a training run of
  ``train.py``; with ``--ema``, its EMA weights (a run with ``ema_decay``). Give the run's own ``--config`` and overrides: the model is
  built from them and the checkpoint must match their fingerprint (model,
  dataset, classes, ...; see :mod:`resnet_jax.training.checkpoints`). The input is the
  pipeline's own (``image / 255 - mean``), and the numbers are those the
  trainer's evaluation reports for that checkpoint, exactly.
* ``--weights``: a file or directory converted with
  :func:`resnet_jax.weights.from_torchvision` (``.pth``/``.pt``/``.bin``/
  ``.safetensors`` in torchvision's or timm's layout) or
  :func:`~resnet_jax.weights.from_transformers` (a Hugging Face checkpoint
  directory); ``--source=auto`` takes a directory for transformers and a file
  for torchvision, and switches when the converter recognises the other
  layout. The input is the converted model's ``.preprocessing`` record:
  ImageNet images are resized to shorter side ``resize``, centre-cropped to
  ``crop`` (``config.eval_resize`` and ``config.image_size`` are set from it)
  and leave the host as uint8 pixels; the mean/std normalisation (and the
  BGR order of Caffe weights) runs on the devices, in the jitted evaluation.

Where the crops differ from the source frameworks' (torchvision's
``Resize(256)`` + ``CenterCrop(224)`` on a PIL image): the pipeline decodes
only the source window that the centre crop's resampling reads and resamples
it with the scale and offset of the whole-image resize, with torchvision's
sizes and offsets (``data._center_crop``), so the geometry is torchvision's;
TF's antialiased bilinear kernel against PIL's leaves 0.12 to 0.18 grey
levels a pixel on the miniature ImageNet (``tests/test_evaluate.py``). The
10-crop path resizes the whole image to torchvision's size and takes the four
corners, the centre and their mirror images. A record asking for bicubic
interpolation (Hugging Face's ``microsoft/resnet-*``) is resized bilinearly
here. Accuracies can therefore differ slightly from those measured with the
source framework's transforms (not measured here: that needs the real
ImageNet); the model itself computes what the source model computes on the
same crops (tested against torch).

The split is the recipe's evaluation split (ImageNet ``validation``; CIFAR
``test``, or the held-out end of ``train`` with ``config.validation_split``;
digits' stratified test split), or ``--config.eval_split=`` (any tfds split
of ImageNet or CIFAR, e.g. ``validation[:10000]``). Every example is counted once: batches are
padded to a multiple of the devices and the padding is masked
(:func:`resnet_jax.training.experiment.evaluate`), data-parallel over every device
with the trainer's ``Mesh`` and ``NamedSharding``. ``--ten_crop`` (or
``--config.ten_crop=True``, ImageNet only) averages the softmax of 10 crops.

Output: one human line, then one JSON line on stdout (``top1``, ``top5``,
``loss``, ``count``, ``crops``, ``dataset``, ``split``, ``model``, ...);
``--output FILE`` also writes the JSON to FILE, which must not exist yet. A
user's mistake (a missing workdir or checkpoint, both or neither of
``--workdir`` and ``--weights``, a weights file of the wrong kind) is one line
``evaluate: error: ...`` on stderr with exit status 2.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from typing import Any

import jax
import numpy as np
from absl import app, flags
from etils import epath
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags

import resnet_jax as rj
from resnet_jax import data as data_lib
from resnet_jax import launch
from resnet_jax.errors import UserError, one_line
from resnet_jax.training import checkpoints, experiment, recipe
from resnet_jax.training import steps as train_steps
from resnet_jax.training import workdir as layout
from resnet_jax.training.checks import pad_eval_batch, validate_config
from resnet_jax.weights.torch_layout import WeightsFileError

log = logging.getLogger("resnet_jax.evaluate")  # also when run as __main__

SOURCES = ("auto", "torchvision", "transformers")


class EvalState(struct.PyTreeNode):
    """What :func:`resnet_jax.training.steps.eval_step` reads of a train state."""

    params: Any
    batch_stats: Any
    apply_fn: Any = struct.field(pytree_node=False)


# --------------------------------------------------------------------------- #
# Configuration shared by both paths
# --------------------------------------------------------------------------- #


def _prepare_config(config: Any, ten_crop: bool | None) -> Any:
    """A copy of ``config`` with ``ten_crop`` applied and checked."""
    c = config.copy_and_resolve_references()
    data_lib.check_dataset(c.dataset)
    if ten_crop is not None:
        c.ten_crop = bool(ten_crop)
    if c.ten_crop and c.dataset != "imagenet2012":
        raise UserError(
            f"10-crop testing crops ImageNet's full-size images; {c.dataset} images are "
            "evaluated whole. Drop --ten_crop (or --config.ten_crop)."
        )
    return c


def split_name(config: Any) -> str:
    """The name of the split a recipe evaluates on (``config.eval_split`` if set)."""
    return data_lib.eval_split(config)


def _run(
    config: Any, state: Any, pipeline: Any, eval_fn: Any, mesh: Any
) -> dict[str, float | int | str]:
    """One exact pass over the eval split; the result's common keys."""
    t0 = time.perf_counter()
    m = experiment.evaluate(
        state, pipeline.eval_batches(), eval_fn, NamedSharding(mesh, P("data")), top5=True
    )
    seconds = time.perf_counter() - t0
    crops = 10 if config.ten_crop else 1
    return {
        "top1": m["eval_accuracy"],
        "top5": m["eval_top5_accuracy"],
        "loss": m["eval_loss"],
        "count": int(m["eval_count"]),
        "crops": crops,
        "dataset": config.dataset,
        "split": split_name(config),
        "seconds": seconds,
        "images_per_sec": m["eval_count"] * crops / max(seconds, 1e-9),
    }


# --------------------------------------------------------------------------- #
# A training run's checkpoint
# --------------------------------------------------------------------------- #


class _StepCheckpointer(checkpoints.Checkpointer):
    """A Checkpointer whose restore considers only ``step`` (with the same
    fingerprint check and quarantine of an unreadable checkpoint)."""

    def __init__(self, directory: Any, step: int, **kw: Any):
        self._only = int(step)
        super().__init__(directory, **kw)

    def all_steps(self) -> list[int]:
        return [s for s in super().all_steps() if s == self._only]


def checkpoint_steps(workdir: str, step: int | None = None) -> list[int]:
    """The steps of the checkpoints in ``workdir`` (nothing is created).

    Raises:
      UserError: no checkpoints there, or none of ``step``.
    """
    directory = layout.checkpoints_dir(workdir)
    if not directory.exists():
        raise UserError(
            f"--workdir {workdir} holds no checkpoints ({directory} does not exist); "
            "give the --workdir of a train.py run."
        )
    steps = checkpoints.saved_steps(workdir)
    if not steps:
        raise UserError(f"--workdir {workdir} holds no checkpoints (in {directory}).")
    if step is not None and step not in steps:
        raise UserError(
            f"--step={step}: {directory} holds no checkpoint of that step; it holds "
            f"steps {', '.join(map(str, steps))}."
        )
    return steps


def restore_checkpoint(exp: experiment.Experiment, step: int | None = None) -> tuple[Any, int]:
    """The newest readable checkpoint of ``exp.workdir`` (or the one of ``step``).

    Returns ``(state, step)``. Nothing is created; an unreadable checkpoint is
    moved aside as the trainer does (:meth:`Checkpointer.restore_latest`).

    Raises:
      UserError: no checkpoint (of ``step``), none readable, or a checkpoint
        of another experiment (IncompatibleCheckpointError).
    """
    checkpoint_steps(exp.workdir, step)
    directory = layout.checkpoints_dir(exp.workdir)
    kw = dict(max_to_keep=int(exp.config.keep_checkpoints), async_save=False)
    if step is None:
        ckpt = checkpoints.Checkpointer(directory, **kw)
    else:
        ckpt = _StepCheckpointer(directory, step, **kw)
    try:
        restored = ckpt.restore_latest(exp.abstract_state(), exp.fingerprint)
    finally:
        ckpt.close()
    if restored is None:
        raise UserError(
            f"No readable checkpoint{'' if step is None else f' of step {step}'} in "
            f"{directory} (unreadable ones were moved to {layout.quarantine_dir(directory)})."
        )
    state, _ = restored
    return state, int(jax.device_get(state.step))


def restore_run(
    config: Any,
    workdir: str,
    step: int | None = None,
    ema: bool = False,
    ten_crop: bool | None = None,
) -> tuple[experiment.Experiment, Any, int]:
    """``(experiment, state, step)``: the run in ``workdir`` rebuilt from its
    ``config`` (with its overrides) and its checkpoint at ``step`` (default the
    newest) restored; with ``ema`` the state holds the run's EMA weights."""
    if ema and not config.ema_decay:
        raise UserError(
            "--ema takes the EMA weights of a run trained with ema_decay > 0; this "
            "config has ema_decay=0 (give the run's config, or drop --ema)."
        )
    c = _prepare_config(config, ten_crop)
    # The trainer's own parts (pipeline, model, jitted eval step); the on-device
    # training set of the fast path is not needed to evaluate or export.
    c.device_data, c.steps_per_call = False, 1
    checkpoint_steps(workdir, step)  # before the pipeline is built: a mistake stops at once
    exp = experiment.build_experiment(c, workdir)
    state, restored_step = restore_checkpoint(exp, step)
    if ema:
        state = train_steps.ema_state(state)
    return exp, state, restored_step


def evaluate_workdir(
    config: Any,
    workdir: str,
    step: int | None = None,
    ten_crop: bool | None = None,
    ema: bool = False,
) -> dict[str, Any]:
    """Evaluates the checkpoint of a training run in ``workdir`` (see the module doc).

    ``config`` is the run's config (with its overrides). Returns the result
    dict (``top1``, ``top5``, ``loss``, ``count``, ``crops``, ``step``,
    ``weights``: ``'ema'`` with ``ema`` (the run's EMA weights), else ``'model'``).
    """
    exp, state, restored_step = restore_run(config, workdir, step, ema, ten_crop)
    c = exp.config
    log.info(
        "Evaluating %s at step %d of %s on %s %s (%d examples).",
        exp.config.model,
        restored_step,
        workdir,
        c.dataset,
        split_name(c),
        exp.pipeline.info.eval_size,
    )
    result = _run(exp.config, state, exp.pipeline, exp.eval_fn, exp.mesh)
    return {
        **result,
        "model": exp.config.model,
        "workdir": str(workdir),
        "step": restored_step,
        "weights": "ema" if ema else "model",
    }


# --------------------------------------------------------------------------- #
# Converted weights
# --------------------------------------------------------------------------- #


# What a weights path the converters cannot take raises, besides a
# WeightsFileError (a ValueError): a refused layout (ValueError), a missing
# file or one that cannot be opened (OSError), torch or safetensors not installed.
_READ_ERRORS = (ValueError, OSError, ImportError)


def load_weights(path: str, source: str = "auto") -> tuple[rj.weights.Converted, str]:
    """``path`` converted by ``from_torchvision`` or ``from_transformers``, and
    which of the two (``'torchvision'`` or ``'transformers'``).

    ``source='auto'``: a directory is a transformers checkpoint, a file is in
    torchvision's layout; when the converter says the tensors are in the other
    layout, the other converter is used.

    Raises:
      UserError: an unknown source, a missing path, a file that is not a
        readable state dict (not a PyTorch or safetensors file, truncated, a
        pickled model, a .pth without torch, ...: naming the file and what to
        do) or one either converter refuses (naming the problem).
    """
    if source not in SOURCES:
        raise UserError(f"--source={source!r}; valid: {', '.join(SOURCES)}.")
    if not os.path.exists(path):
        raise UserError(f"--weights {path} does not exist.")
    converters = {
        "torchvision": rj.weights.from_torchvision,
        "transformers": rj.weights.from_transformers,
    }
    chosen = source
    if source == "auto":
        chosen = "transformers" if os.path.isdir(path) else "torchvision"
    try:
        try:
            return converters[chosen](path), chosen
        except WeightsFileError:
            raise  # the file itself, whichever converter reads it
        except ValueError as e:
            other = "transformers" if chosen == "torchvision" else "torchvision"
            if source != "auto" or f"rj.weights.from_{other}" not in str(e):
                raise
            return converters[other](path), other
    except WeightsFileError as e:
        raise UserError(f"--weights {path} cannot be read: {e.about(path)}") from e
    except _READ_ERRORS as e:
        message = one_line(str(e)) if str(e) else type(e).__name__
        raise UserError(
            f"--weights {path} cannot be read as {source if source != 'auto' else 'weights'} "
            f"of a ResNet: {message}"
        ) from e


def _normalise_fn(module: rj.ResNet, p: rj.weights.Preprocessing, pixel_mean: Any) -> Any:
    """``apply_fn`` of the converted model on the pipeline's images.

    The images reach it as ``pixels / 255 - pixel_mean`` (uint8 pipelines:
    ``pixel_mean`` 0); it undoes the mean, then applies the record's channel
    order, mean and std, on the device.
    """
    mean = np.asarray(p.mean, np.float32)
    std = np.asarray(p.std, np.float32)
    pixel_mean = np.asarray(pixel_mean, np.float32)

    def apply_fn(variables, images, train=False):
        x = images + pixel_mean
        if p.channels == "BGR":
            x = x[..., ::-1]
        return module.apply(variables, (x - mean) / std, train=train)

    return apply_fn


def _weights_config(config: Any, converted: rj.weights.Converted, path: str) -> Any:
    """``config`` with the crop sizes of the weights' preprocessing."""
    p, c = converted.preprocessing, config
    if converted.module.num_classes == 0:
        raise UserError(
            f"--weights {path} has no classifier (a headless network): nothing to score."
        )
    if c.dataset == "imagenet2012":
        if p.resize is None or p.crop is None:
            raise UserError(
                f"--weights {path} expect images as they are (preprocessing {p}), not resized "
                "and cropped ImageNet photographs: evaluate them on their own dataset "
                "(e.g. --config configs/cifar10.py)."
            )
        c.image_size, c.eval_resize = int(p.crop), int(p.resize)
        c.eval_image_size = 0
    elif p.resize is not None or p.crop is not None:
        raise UserError(
            f"--weights {path} expect images resized to {p.resize} and cropped to {p.crop} "
            f"pixels; {c.dataset} images are evaluated as they are. Use an ImageNet config."
        )
    # The pipeline needs a training batch that fits; it never makes one here.
    c.batch_size = jax.process_count()
    c.num_classes = 0  # the pipeline's label check; the classifier is checked below
    return c


def evaluate_weights(
    config: Any, path: str, source: str = "auto", ten_crop: bool | None = None
) -> dict[str, Any]:
    """Evaluates converted weights at ``path`` on ``config``'s dataset (see the module doc)."""
    c = _prepare_config(config, ten_crop)
    mesh = recipe.create_mesh()
    validate_config(c, mesh.devices.size)  # before the weights or any data are read
    converted, kind = load_weights(path, source)
    module, variables = converted
    c = _weights_config(c, converted, path)
    c = pad_eval_batch(c, mesh.devices.size)
    pi, pc = jax.process_index(), jax.process_count()
    data_lib.prepare_for_processes(c, pi, pc)
    uint8 = c.dataset not in data_lib.IN_MEMORY
    pipeline = data_lib.InputPipeline(c, pi, pc, image_dtype="uint8" if uint8 else "float32")
    info = pipeline.info
    if module.num_classes < info.num_classes:
        raise UserError(
            f"--weights {path} classify into {module.num_classes} classes; {c.dataset} has "
            f"{info.num_classes}."
        )
    if info.image_shape[-1] != 3:
        raise UserError(f"{c.dataset} images have {info.image_shape[-1]} channel(s); RGB needed.")
    replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    # uint8 images become pixels / 255 in eval_step (mean 0): the record's
    # normalisation follows in apply_fn. Float images arrive minus the mean.
    zero = np.zeros(3, np.float32)
    state = EvalState(
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        apply_fn=_normalise_fn(module, converted.preprocessing, zero if uint8 else pipeline.mean),
    )
    state = jax.device_put(state, replicated)
    step_kw = {"mean": zero} if uint8 else {}
    eval_fn = jax.jit(
        functools.partial(train_steps.eval_step, num_classes=module.num_classes, **step_kw),
        in_shardings=(replicated, data),
        out_shardings=replicated,
    )
    log.info(
        "Evaluating %s on %s %s (%d examples).", path, c.dataset, split_name(c), info.eval_size
    )
    result = _run(c, state, pipeline, eval_fn, mesh)
    return {**result, "model": _describe(module), "weights": str(path), "source": kind}


def _describe(module: rj.ResNet) -> str:
    """A short name of a converted network, e.g. ``resnet(2,2,2,2) basic, 1000 classes``."""
    block = "bottleneck" if module.block_cls is rj.BottleneckBlock else "basic"
    stages = ",".join(map(str, module.stage_sizes))
    return f"ResNet({stages}) {block} {module.stem}-stem, {module.num_classes} classes"


# --------------------------------------------------------------------------- #
# Output
# --------------------------------------------------------------------------- #


def summary_line(result: dict[str, Any]) -> str:
    """The human line of a result."""
    where = (
        f"step {result['step']} of {result['workdir']}"
        if "workdir" in result
        else f"{result['weights']} ({result['source']})"
    )
    crops = "10 crops" if result["crops"] == 10 else "1 crop"
    return (
        f"{where} on {result['dataset']} {result['split']}: top-1 {100 * result['top1']:.2f}%, "
        f"top-5 {100 * result['top5']:.2f}%, loss {result['loss']:.4f} on {result['count']} "
        f"examples ({crops}), {result['seconds']:.1f} s"
    )


def check_output(path: str | None) -> None:
    """Refuses an ``--output`` that could not be written, before the evaluation:
    a file that exists (results never overwrite one), a folder that does not
    exist, is a file or is not writable, a path that names a folder. A remote
    path (``gs://...``) is only checked not to exist: an object store has no
    folders.
    """
    if not path:
        return
    remote = layout.is_remote(path)
    if not remote and (path.endswith(("/", os.sep)) or os.path.isdir(path)):
        raise UserError(f"--output {path} names a folder; give the path of a new file.")
    if epath.Path(path).exists():
        raise UserError(
            f"--output {path} exists; results never overwrite a file. Remove it or "
            "choose another name."
        )
    if remote:
        return
    folder = os.path.dirname(os.path.abspath(path))
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(
            f"--output {path}: {existing} is a file, not a folder; choose another path."
        )
    if existing != folder:
        raise UserError(
            f"--output {path}: the folder {folder} does not exist; create it (mkdir -p "
            f"{folder}) or choose another path."
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(
            f"--output {path}: the folder {folder} is not writable; choose another path."
        )


def write_output(path: str, result: dict[str, Any]) -> None:
    """Writes ``result`` as one JSON line to a new file ``path`` (:func:`check_output`).

    Raises:
      UserError: the file cannot be written (the result is already on stdout).
    """
    try:
        check_output(path)  # again: the evaluation took a while
        epath.Path(path).write_text(json.dumps(result) + "\n")
    except UserError as e:
        raise UserError(f"{e} The result is the JSON line printed above.") from None
    except OSError as e:
        raise UserError(
            f"--output {path} could not be written ({e.strerror or e}); the result is the "
            "JSON line printed above."
        ) from e


# --------------------------------------------------------------------------- #
# The command line
# --------------------------------------------------------------------------- #


PROG = "evaluate"


def _flags():
    flags.DEFINE_string("workdir", None, "A train.py run's workdir: evaluate its checkpoint.")
    flags.DEFINE_integer("step", None, "With --workdir: this step's checkpoint (default newest).")
    flags.DEFINE_string("weights", None, "A converted file or directory (torchvision, HF).")
    flags.DEFINE_enum("source", "auto", list(SOURCES), "The layout of --weights.")
    flags.DEFINE_bool("ten_crop", None, "10-crop testing (ImageNet); default: the config's.")
    flags.DEFINE_bool("ema", False, "With --workdir: its EMA weights (a run with ema_decay).")
    flags.DEFINE_string("output", None, "Also write the JSON result here (a new file).")
    config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
    launch.define_absl_flags(flags)
    return flags.FLAGS


def _check_flags(FLAGS) -> None:
    if FLAGS.config is None:
        launch.fail(PROG, "--config is required (a configs/*.py file).")
    if (FLAGS.workdir is None) == (FLAGS.weights is None):
        launch.fail(
            PROG,
            "give exactly one of --workdir (a training run) and --weights (converted weights).",
        )
    if FLAGS.step is not None and FLAGS.workdir is None:
        launch.fail(PROG, "--step selects a checkpoint of --workdir; --weights has none.")
    if FLAGS.ema and FLAGS.workdir is None:
        launch.fail(PROG, "--ema selects the EMA weights of a --workdir run; --weights has none.")
    if FLAGS.source != "auto" and FLAGS.weights is None:
        launch.fail(PROG, "--source describes --weights; a --workdir checkpoint has none.")


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing and the config file's loading; a mistake is one line."""
    rest = launch.parse_absl_flags(PROG, flags, argv)
    _check_flags(flags.FLAGS)
    return rest


def _main(argv: list[str]) -> None:
    del argv
    FLAGS = flags.FLAGS

    def evaluate():
        check_output(FLAGS.output)
        launch.start(launch.options_from(FLAGS))
        data_lib.configure_tensorflow()
        if FLAGS.workdir is not None:
            result = evaluate_workdir(
                FLAGS.config, FLAGS.workdir, FLAGS.step, FLAGS.ten_crop, ema=FLAGS.ema
            )
        else:
            result = evaluate_weights(FLAGS.config, FLAGS.weights, FLAGS.source, FLAGS.ten_crop)
        if jax.process_index() == 0:
            print(summary_line(result), flush=True)
            print(json.dumps(result), flush=True)
            if FLAGS.output:
                write_output(FLAGS.output, result)

    launch.run(PROG, evaluate)


def main() -> None:
    """The command line (see the module doc; ``--help`` lists the flags)."""
    _flags()
    app.run(_main, flags_parser=_parse_flags)


if __name__ == "__main__":
    main()
