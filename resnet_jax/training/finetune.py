"""Fine-tuning: start a run from trained weights, freeze or slow down parts of it.

The trainer (:mod:`resnet_jax.training`) asks this module for three things,
each driven by a config key (``configs/common.py``, recipe ``configs/finetune.py``):

* ``init_from``: on a fresh start, the params and batch_stats of a resnet_jax
  workdir's newest checkpoint (not its optimizer state or step), or of a
  torchvision/timm state dict or Hugging Face transformers checkpoint read by
  :mod:`resnet_jax.weights`. Every parameter but the classifier (``head``)
  must have the shape the config's model gives it; the first one that does
  not is named in a one-line :class:`UserError`. The classifier is the loaded
  one when its shape fits and ``finetune_new_head`` is False, else the fresh
  initialisation. A workdir that already has a checkpoint resumes from it and
  ignores ``init_from`` (:func:`resnet_jax.training.experiment.restore_or_init`).
  A file that is not a readable state dict, or a workdir whose newest
  checkpoint is damaged, is one line naming it; :func:`check_init_from` checks
  all of this without writing anything, for the trainer to call before it
  creates the workdir.
* ``freeze_backbone`` / ``backbone_lr_multiplier``: two parameter groups,
  ``head`` and ``backbone`` (everything else), in one ``optax.multi_transform``:
  the backbone gets ``optax.set_to_zero()`` (no update, weight decay included)
  or the head's optimizer at a scaled learning rate (:func:`partition_optimizer`).
* ``freeze_bn_stats``: BatchNorm in inference mode in the training step (in
  :func:`resnet_jax.training.steps.train_step`), so it normalises with the running
  statistics and never changes them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from resnet_jax.errors import UserError, one_line
from resnet_jax.models import BottleneckBlock, model_spec
from resnet_jax.training import checkpoints
from resnet_jax.training import workdir as layout
from resnet_jax.weights import from_torchvision, from_transformers
from resnet_jax.weights.torch_layout import WeightsFileError

log = logging.getLogger(__name__)

HEAD = "head"  # the classifier's name in params (resnet_jax.models.ResNet)


# --------------------------------------------------------------------------- #
# The optimizer's parameter groups
# --------------------------------------------------------------------------- #


def param_labels(params: Any) -> Any:
    """``'head'`` for the classifier's parameters, ``'backbone'`` for all others
    (a pytree of ``params``' structure)."""

    def group(name: str, subtree: Any) -> Any:
        return jax.tree.map(lambda _: HEAD if name == HEAD else "backbone", subtree)

    return {name: group(name, subtree) for name, subtree in params.items()}


def uses_groups(config: Any) -> bool:
    """Whether the config's optimizer treats the backbone apart from the head."""
    return bool(config.freeze_backbone) or config.backbone_lr_multiplier != 1.0


def partition_optimizer(
    config: Any,
    make: Callable[[optax.Schedule], optax.GradientTransformation],
    learning_rate_fn: optax.Schedule,
) -> optax.GradientTransformation:
    """``make(learning_rate_fn)`` for the head; for the backbone nothing
    (``freeze_backbone``) or ``make`` at ``backbone_lr_multiplier`` times the rate.

    ``make`` builds the whole optimizer (weight decay and SGD) for a schedule,
    so a frozen backbone gets no weight decay either and a slower one gets it
    at its own rate (L2 decay is part of the gradient).
    """
    if config.freeze_backbone:
        backbone = optax.set_to_zero()
    else:
        m = float(config.backbone_lr_multiplier)
        backbone = make(lambda step: m * learning_rate_fn(step))
    return optax.multi_transform({HEAD: make(learning_rate_fn), "backbone": backbone}, param_labels)


# --------------------------------------------------------------------------- #
# init_from: reading weights
# --------------------------------------------------------------------------- #


def read_checkpoint_variables(workdir: str, ema: bool = False) -> tuple[int, dict[str, Any]]:
    """``(step, {'params', 'batch_stats'})`` of a resnet_jax workdir's newest
    checkpoint, as numpy arrays (its optimizer state and step are not read);
    with ``ema``, its EMA weights (a run with ``ema_decay``). Nothing in the
    workdir is changed.

    Raises:
      UserError: the workdir has no checkpoint, or its newest one cannot be
        read (files truncated or missing; naming its directory). An older one
        is not taken in its place: that would be other weights than asked for.
    """
    # Absolute: orbax reads no tree metadata through a relative path.
    directory = layout.checkpoints_dir(workdir)
    steps = checkpoints.saved_steps(workdir)
    if not steps:
        raise UserError(f"init_from={workdir!r} has no checkpoint in {directory}.")
    step = steps[-1]
    checkpoint = directory / str(step)
    path = checkpoint / "state"
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        tree = checkpointer.metadata(path).item_metadata
    except Exception as e:  # noqa: BLE001 - any read failure means a damaged checkpoint
        raise UserError(_damaged(workdir, checkpoint, steps, _error_detail(e))) from e
    tree = getattr(tree, "tree", tree)
    if tree is None:  # what orbax returns for most damage: it logs the error itself
        raise UserError(_damaged(workdir, checkpoint, steps, "no readable metadata"))
    if ema:
        if not isinstance(tree.get("ema"), dict):
            raise UserError(
                f"init_from={workdir!r}: the checkpoint {checkpoint} has no EMA weights (the "
                "run had ema_decay=0); set --config.init_from_ema=False to start from its weights."
            )
        tree = tree["ema"]
    missing = [k for k in ("params", "batch_stats") if k not in tree]
    if missing:
        raise UserError(
            f"init_from={workdir!r}: the checkpoint {checkpoint} has no "
            f"{' or '.join(missing)}; it is not a checkpoint of train.py."
        )
    item = {k: tree[k] for k in ("params", "batch_stats")}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    try:
        restored = checkpointer.restore(
            path,
            args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
        )
    except Exception as e:  # noqa: BLE001 - any read failure means a damaged checkpoint
        raise UserError(_damaged(workdir, checkpoint, steps, _error_detail(e))) from e
    return step, {k: restored[k] for k in ("params", "batch_stats")}


def _error_detail(error: Exception) -> str:
    """``'Type: first 200 characters'`` of an error, on one line."""
    detail = one_line(str(error))[:200]
    return f"{type(error).__name__}: {detail}" if detail else type(error).__name__


def _damaged(workdir: str, checkpoint: Any, steps: list[int], detail: str) -> str:
    """The line for a workdir whose newest checkpoint (``steps[-1]``) cannot be read."""
    older = (
        f"; resuming that run in its workdir moves the damaged checkpoint aside and goes on "
        f"from step {steps[-2]}"
        if len(steps) > 1
        else ""
    )
    return (
        f"init_from={workdir!r}: its newest checkpoint, {checkpoint} (step {steps[-1]}), cannot "
        f"be read ({detail}): files of it are truncated or missing. Give init_from a workdir "
        f"with a complete checkpoint{older}."
    )


def _convert(path: str) -> tuple[Any, dict[str, Any]]:
    """``(module, variables)`` of a weights file or directory (torchvision or transformers)."""
    if os.path.isdir(path):
        return from_transformers(path)
    try:
        return from_torchvision(path)
    except WeightsFileError:
        raise  # the file itself: the other converter would read it no better
    except ValueError as e:
        if "from_transformers" not in str(e):  # the converter says when the names are HF's
            raise
        return from_transformers(path)


def load_variables(path: str, ema: bool = False) -> tuple[str, dict[str, Any], Any]:
    """``(description, {'params', 'batch_stats'}, converted or None)`` of
    ``init_from``; ``converted`` is the converter's ``Converted`` (module,
    variables, ``.preprocessing``), None for a workdir. ``ema``: a workdir's
    EMA weights (converted weights have none: refused).

    A directory with ``checkpoints/`` is a resnet_jax workdir (module None);
    another directory is a transformers checkpoint; a file is a torchvision or
    timm state dict (or transformers weights, told apart by their names).

    Raises:
      UserError: nothing readable there (the converter's message, on one
        line): a weights file that is not a readable state dict names the
        file and what to do; a damaged checkpoint, its directory.
    """
    if not epath.Path(path).exists():  # checked here: a resume never reads it
        raise UserError(
            f"init_from={path!r} does not exist; give a resnet_jax workdir (with "
            "checkpoints/) or a torchvision/timm/transformers weights file or directory."
        )
    if layout.is_workdir(path):
        step, variables = read_checkpoint_variables(path, ema=ema)
        return f"resnet_jax checkpoint step {step}{' (EMA)' if ema else ''}", variables, None
    if ema:
        raise UserError(
            f"init_from_ema=True takes the EMA weights of a resnet_jax workdir; {path!r} is "
            "converted weights: set --config.init_from_ema=False."
        )
    try:
        converted = _convert(path)
    except WeightsFileError as e:
        raise UserError(f"init_from={path!r} cannot be read: {e.about(path)}") from e
    except (ValueError, ImportError, OSError) as e:
        raise UserError(f"init_from={path!r}: {e}") from e
    variables = {k: converted[1].get(k, {}) for k in ("params", "batch_stats")}
    return "converted weights", variables, converted


# --------------------------------------------------------------------------- #
# init_from: merging into the config's model
# --------------------------------------------------------------------------- #


def _name(key: tuple[str, ...]) -> str:
    return "/".join(key)


def _model_order(key: tuple[str, ...]) -> tuple:
    """params before batch_stats, the stem before the stages (pytrees come back
    with their keys sorted, which would put ``stage1`` before ``stem``)."""
    return (key[0] != "params", not key[1].startswith("stem"), key)


def merge_variables(
    target: dict[str, Any], loaded: dict[str, Any], *, new_head: bool, source: str
) -> tuple[dict[str, Any], bool]:
    """``target`` (the config's fresh ``{'params', 'batch_stats'}``) with every
    array of ``loaded`` but the classifier; the classifier too when its shapes
    fit and not ``new_head``. Returns ``(variables, head_loaded)``.

    Raises:
      UserError: naming the first parameter (stem, then stages) that is
        missing from ``loaded``, has another shape, or that only ``loaded`` has.
    """
    flat_t = dict(
        sorted(traverse_util.flatten_dict(target).items(), key=lambda kv: _model_order(kv[0]))
    )
    flat_l = dict(
        sorted(traverse_util.flatten_dict(loaded).items(), key=lambda kv: _model_order(kv[0]))
    )

    def is_head(key):
        return len(key) > 1 and key[1] == HEAD

    for key, value in flat_t.items():
        if is_head(key):
            continue
        if key not in flat_l:
            raise UserError(
                f"init_from={source!r} has no {_name(key)}, which the config's model needs; "
                "fine-tuning loads every parameter but the classifier ('head'), so "
                "--config.model and its options must be the weights' network."
            )
        if tuple(np.shape(flat_l[key])) != tuple(value.shape):
            raise UserError(
                f"init_from={source!r}: {_name(key)} has shape {tuple(np.shape(flat_l[key]))} "
                f"but the config's model needs {tuple(value.shape)}; every parameter but the "
                "classifier ('head') must match (--config.model and its options)."
            )
    extra = [k for k in flat_l if k not in flat_t and not is_head(k)]
    if extra:
        raise UserError(
            f"init_from={source!r} has {_name(extra[0])}, which the config's model lacks; "
            "every parameter but the classifier ('head') must match (--config.model and "
            "its options)."
        )
    head_t = {k: v for k, v in flat_t.items() if is_head(k)}
    head_loaded = (
        not new_head
        and bool(head_t)
        and all(
            k in flat_l and tuple(np.shape(flat_l[k])) == tuple(v.shape) for k, v in head_t.items()
        )
    )
    merged = {
        k: (v if is_head(k) and not head_loaded else np.asarray(flat_l[k], dtype=v.dtype))
        for k, v in flat_t.items()
    }
    return traverse_util.unflatten_dict(merged), head_loaded


def _check_variant(module: Any, model: Any, source: str) -> None:
    """Converted bottleneck weights are v1.5 (stride in the 3x3): the same
    shapes as v1, another function, so the shapes alone cannot tell."""
    if module is None or model.block_cls is not BottleneckBlock:
        return
    if module.variant != model.variant:
        raise UserError(
            f"init_from={source!r} holds variant {module.variant!r} bottlenecks; set "
            f"--config.variant={module.variant}."
        )


def to_trainer_input(loaded: dict[str, Any], preprocessing: Any, source: str) -> dict[str, Any]:
    """Converted weights expect ``(x/255 - mean) / std``; the trainer feeds
    ``x/255 - mean`` (no std). Dividing the stem kernel's input channels by
    ``std`` makes the two the same function (the padding is zero in both).

    Raises:
      UserError: weights that expect BGR channels (Caffe/Keras).
    """
    if preprocessing.channels != "RGB":
        raise UserError(
            f"init_from={source!r} expects {preprocessing.channels} input; the trainer "
            "feeds RGB. Fine-tune from RGB (torchvision, timm, Hugging Face) weights."
        )
    params = dict(loaded["params"])
    stem = dict(params["stem_conv"])
    std = np.asarray(preprocessing.std, np.float32).reshape(1, 1, -1, 1)
    stem["kernel"] = (np.asarray(stem["kernel"], np.float32) / std).astype(
        np.asarray(stem["kernel"]).dtype
    )
    params["stem_conv"] = stem
    return {**loaded, "params": params}


# The fingerprint keys that make another network of the same shapes (a v1
# bottleneck and a v1.5 one; plain20 and resnet20 with option-A shortcuts).
_NETWORK_KEYS = ("model", "variant", "shortcut")


def source_fingerprint(workdir: str) -> dict[str, Any] | None:
    """The config fingerprint a resnet_jax workdir's newest checkpoint was saved
    with (:func:`resnet_jax.training.checkpoints.fingerprint`), None if unreadable."""
    steps = checkpoints.saved_steps(workdir)
    if not steps:
        return None
    options = ocp.CheckpointManagerOptions(read_only=True)
    manager = ocp.CheckpointManager(layout.checkpoints_dir(workdir), options=options)
    try:
        meta = manager.restore(steps[-1], args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(meta["meta"].get("fingerprint", {}))
    except Exception:  # noqa: BLE001 - the weights' own reading names what is damaged
        return None
    finally:
        manager.close()


def _network(fp: dict[str, Any]) -> dict[str, Any]:
    """The network keys of a fingerprint, as the network sees them: the default
    shortcut filled in (A for CIFAR nets, B for ImageNet nets, none for plain
    nets), the variant only for bottleneck nets."""
    out = {k: fp[k] for k in _NETWORK_KEYS if k in fp}
    try:
        spec = model_spec(str(out.get("model")))
    except ValueError:
        return out
    if spec.block_cls is not BottleneckBlock:
        out["variant"] = None  # v1 and v1.5 differ in the bottleneck only
    if not spec.residual:
        out["shortcut"] = None
    elif out.get("shortcut") is None:
        out["shortcut"] = "A" if spec.family == "cifar" else "B"
    return out


def _check_source_network(config: Any, source: str) -> None:
    """A workdir source must be the config's network: its run's fingerprint says
    which it was (the shapes alone cannot tell a v1 bottleneck from a v1.5 one)."""
    theirs = source_fingerprint(source)
    if theirs is None:
        return
    theirs, ours = _network(theirs), _network(checkpoints.fingerprint(config))
    diff = [k for k in _NETWORK_KEYS if k in theirs and theirs[k] != ours[k]]
    if diff:
        was = ", ".join(f"{k}={theirs[k]!r}" for k in diff)
        now = ", ".join(f"{k}={ours[k]!r}" for k in diff)
        fix = " ".join(f"--config.{k}={theirs[k]}" for k in diff if theirs[k] is not None)
        fix = fix or "the run's own settings"
        raise UserError(
            f"init_from={source!r} was trained as {was}, but the config asks for {now}: "
            f"the same shapes, another network. Set {fix} (or start from a run of this network)."
        )


def _start_variables(config: Any, model: Any, target: dict[str, Any]) -> tuple[Any, ...]:
    """``(merged, head_loaded, description, converted)``: ``config.init_from``
    read, checked against ``model`` and merged into ``target`` (arrays or
    shapes of the config's ``{'params', 'batch_stats'}``)."""
    source = config.init_from
    description, loaded, converted = load_variables(source, bool(config.get("init_from_ema")))
    _check_variant(None if converted is None else converted[0], model, source)
    if converted is not None:
        loaded = to_trainer_input(loaded, converted.preprocessing, source)
    merged, head_loaded = merge_variables(
        target, loaded, new_head=bool(config.finetune_new_head), source=source
    )
    if converted is None:  # the same shapes: is it the same network?
        _check_source_network(config, source)
    return merged, head_loaded, description, converted


def check_init_from(
    config: Any, workdir: str, model: Any, abstract_state: Callable[[], Any]
) -> None:
    """Refuses what :func:`initial_state` would refuse of ``config.init_from``
    (a path that is missing or cannot be read, a damaged checkpoint, another
    network), against the shapes of ``abstract_state()`` (the run's train
    state), writing nothing: for the trainer to call before it creates the
    workdir. Reads nothing when init_from is unset or ``workdir`` has a
    checkpoint (a resume ignores it).

    Raises:
      UserError: as :func:`initial_state`.
    """
    if not config.init_from or checkpoints.saved_steps(workdir):
        return
    shapes = abstract_state()
    _start_variables(config, model, {"params": shapes.params, "batch_stats": shapes.batch_stats})


def initial_state(config: Any, model: Any, pixel_mean: Any, sharding: Any, state: Any) -> Any:
    """A fresh ``state`` of ``model`` started from ``config.init_from`` (when set):
    its params and batch_stats merged in (:func:`merge_variables`), the
    optimizer state initialised anew for them, step 0, placed with ``sharding``.

    ``pixel_mean`` is the mean the training pipeline subtracts (a converted
    model's own mean is compared with it).
    """
    if not config.init_from:
        return state
    source = config.init_from
    target = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    merged, head_loaded, description, converted = _start_variables(config, model, target)
    if converted is not None:
        p = converted.preprocessing
        mean = np.asarray(pixel_mean, np.float32)
        if mean.shape != (3,) or not np.allclose(mean, p.mean, atol=1e-3):
            log.warning(
                "init_from=%s was trained on inputs centred on %s; this dataset's "
                "inputs are centred on their own mean.",
                source,
                tuple(round(float(m), 3) for m in p.mean),
            )

    def start(state, variables):
        return state.replace(
            params=variables["params"],
            batch_stats=variables["batch_stats"],
            opt_state=state.tx.init(variables["params"]),
            ema=None if state.ema is None else jax.tree.map(jnp.copy, dict(variables)),
        )

    new = jax.jit(start, out_shardings=sharding)(state, merged)
    n = sum(np.size(x) for x in jax.tree.leaves(merged))
    log.info(
        "Initialised from %s (%s): %s values; classifier %s.",
        source,
        description,
        f"{n:,}",
        "loaded" if head_loaded else "freshly initialised",
    )
    return new


__all__ = [
    "check_init_from",
    "initial_state",
    "load_variables",
    "to_trainer_input",
    "merge_variables",
    "param_labels",
    "partition_optimizer",
    "read_checkpoint_variables",
    "uses_groups",
]
