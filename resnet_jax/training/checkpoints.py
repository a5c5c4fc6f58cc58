"""Orbax checkpoints: save, restore the newest valid one, refuse foreign ones.

A checkpoint holds two items: ``state`` (the ``TrainState`` pytree: step,
params, batch_stats, opt_state) and ``meta`` (JSON: the config fingerprint and
the host-side progress, e.g. the partial metric window). The input pipeline
and all randomness are functions of the step, so nothing else is needed for
an exact resume.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from resnet_jax.errors import CheckpointSaveError, UserError
from resnet_jax.training import workdir as layout

log = logging.getLogger(__name__)

# Config keys that define the checkpoint's contents; a workdir whose checkpoint
# differs in one of them belongs to another experiment.
FINGERPRINT_KEYS = (
    "dataset",
    "model",
    "num_classes",
    "variant",
    "shortcut",
    "weight_decay_exclude_bn_bias",
)


def fingerprint(config: Any) -> dict[str, Any]:
    fp = {k: config.get(k) for k in FINGERPRINT_KEYS}
    # Fine-tuning's keys, None at their defaults so that checkpoints written
    # before them still match: a class subset is another dataset, and a
    # frozen or scaled backbone another optimizer state (resnet_jax.training.finetune).
    fp["classes"] = list(config.get("classes") or ()) or None
    backbone = None
    if config.get("freeze_backbone"):
        backbone = "frozen"
    elif config.get("backbone_lr_multiplier", 1.0) != 1.0:
        backbone = "scaled"
    fp["backbone_optimizer"] = backbone
    # The rest of fine-tuning's settings that change the data or the updates
    # (None at their defaults, for the same reason).
    fp["backbone_lr_multiplier"] = (
        float(config.get("backbone_lr_multiplier", 1.0))
        if config.get("backbone_lr_multiplier", 1.0) != 1.0
        else None
    )
    fp["freeze_bn_stats"] = True if config.get("freeze_bn_stats") else None
    n = int(config.get("train_examples_per_class") or 0)
    fp["train_subset"] = [n, int(config.get("train_subset_seed") or 0)] if n else None
    # The modern recipe's keys that change the state's structure (None at
    # their defaults): another optimizer's state, an EMA in the state.
    optimizer = config.get("optimizer", "sgd")
    fp["optimizer"] = None if optimizer == "sgd" else optimizer
    fp["ema"] = True if config.get("ema_decay") else None
    return fp


@functools.cache
def single_process_arrays() -> None:
    """In a single process, orbax writes each array whole from one device.

    Its default on the CPU and TPU (replica-parallel saving) has each replica
    of a replicated array write a slice of it, which spreads the writes over
    the hosts of a multi-host run; in one process the same host writes every
    slice, and each slice is a ``jax.Array`` slice that XLA compiles once per
    array shape and device, for nothing: the slowest part of a small run's
    first save. The bytes and the checkpoint's format are the
    same either way (either reads the other's). A multi-process run keeps
    orbax's default (on GPUs orbax already writes whole arrays). Sets orbax's
    process-wide handler of ``jax.Array``, once per process.
    """
    if jax.process_count() == 1:
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True
        )


class CheckpointUnreadableError(UserError, OSError):
    """A checkpoint that cannot be read for a reason other than damage (its
    permissions, a read-only or unreadable mount, an I/O error): nothing is
    moved, and the run stops."""


# errno values that say "this process may not read it", not "it is damaged".
_ACCESS_ERRNOS = (errno.EACCES, errno.EPERM, errno.EIO, errno.ENXIO, errno.ENODEV)
# What tensorstore and object stores put in their messages for the same.
_ACCESS_TEXT = ("permission denied", "permission_denied", "access denied", "forbidden", " 403 ")


def access_problem(error: BaseException) -> BaseException | None:
    """The error of ``error``'s chain that says access was refused (or the
    storage failed), not that the data is damaged; None if there is none."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, PermissionError) or (
            isinstance(error, OSError) and error.errno in _ACCESS_ERRNOS
        ):
            return error
        if any(t in str(error).lower() for t in _ACCESS_TEXT):
            return error
        error = error.__cause__ or error.__context__
    return None


def unreadable_file(directory: epath.Path) -> OSError | None:
    """The first file or folder under a local ``directory`` this process may not
    open for reading (its OSError), or None. Remote directories are not probed."""
    if layout.is_remote(directory):
        return None
    try:
        for root, dirs, files in os.walk(os.fspath(directory), onerror=_raise):
            for name in files:
                os.close(os.open(os.path.join(root, name), os.O_RDONLY))
            for name in dirs:
                os.listdir(os.path.join(root, name))
    except OSError as e:
        return e
    return None


def _raise(error: OSError) -> None:
    raise error


class IncompatibleCheckpointError(UserError):
    """The workdir holds a checkpoint of another experiment."""


def _is_out_of_space(error: BaseException) -> bool:
    """True when ``error`` (or one it was raised from) says the disk or quota is full."""
    seen = 0
    while error is not None and seen < 20:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(error)
        # tensorstore reports a full disk as RESOURCE_EXHAUSTED ("Failed writing").
        if "No space left" in text or "RESOURCE_EXHAUSTED" in text or "Disk quota" in text:
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def saved_steps(workdir: str | os.PathLike) -> list[int]:
    """The steps of the checkpoints orbax has committed in ``WORKDIR/checkpoints``,
    sorted; nothing is created (``[]`` when there is no such directory)."""
    directory = layout.checkpoints_dir(workdir)
    if not directory.exists():
        return []
    options = ocp.CheckpointManagerOptions(read_only=True)
    try:
        manager = ocp.CheckpointManager(directory, options=options)
        try:
            return sorted(manager.all_steps())
        finally:
            manager.close()
    except OSError as e:
        raise CheckpointUnreadableError(
            f"Cannot list the checkpoints in {directory} ({_describe(e)}); make them readable "
            "(e.g. chmod -R u+rX), then run the same command again."
        ) from e


class Checkpointer:
    """Saves and restores ``TrainState`` + metadata under ``directory``.

    Args:
      directory: ``WORKDIR/checkpoints``: a local path (made absolute) or a URL
        that orbax and etils.epath open (``gs://bucket/run/checkpoints``),
        used as given.
      max_to_keep: newest checkpoints kept; older ones are deleted by orbax.
      async_save: write in a background thread (the device-to-host copy is
        synchronous, so the donated state can be reused at once).
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3, async_save: bool = True):
        self.path = layout.workdir_path(directory)
        self.directory = os.fspath(self.path)
        self.max_to_keep = max_to_keep
        self.async_save = async_save
        self._in_flight: int | None = None  # the step being saved in the background
        self._failed = False
        self._open()

    def _open(self) -> None:
        try:
            self._open_manager()
        except OSError as e:
            raise CheckpointUnreadableError(
                f"Cannot open the checkpoints in {self.directory} ({_describe(e)}); nothing was "
                "changed. Make them readable and writable (e.g. chmod -R u+rwX), or use another "
                "--workdir, then run the same command again."
            ) from e

    def _open_manager(self) -> None:
        single_process_arrays()
        self.manager = ocp.CheckpointManager(
            self.path,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=self.max_to_keep,
                create=True,
                enable_async_checkpointing=self.async_save,
            ),
        )

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Starts saving ``step`` (asynchronously); first finishes the save before it.

        Raises:
          CheckpointSaveError: a save failed for lack of space (this one or the
            one before it, which may only report its failure now).
        """
        self._finish()
        self._in_flight = step
        with self._translating_errors(step):
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                ),
                force=True,
            )

    def _finish(self) -> None:
        step, self._in_flight = self._in_flight, None
        if step is not None:
            with self._translating_errors(step):
                self.manager.wait_until_finished()

    @contextlib.contextmanager
    def _translating_errors(self, step: int):
        try:
            yield
        except Exception as e:
            if not _is_out_of_space(e):
                raise
            good = [s for s in self.all_steps() if s != step]
            last = f"step {good[-1]} in {self.directory}" if good else "none"
            self._failed = True
            raise CheckpointSaveError(
                f"Could not save the checkpoint of step {step}: no space left on the device "
                f"of {self.directory}. The last good checkpoint is {last}; free space (or lower "
                "--config.keep_checkpoints), then run the same command to resume from it."
            ) from None

    def close(self) -> None:
        """Waits for the last save and closes the manager."""
        try:
            if not self._failed:
                self._finish()
        finally:
            if not self._failed:
                self.manager.close()

    def read_meta(self, step: int) -> dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]

    def restore_latest(
        self, abstract_state: Any, expected_fingerprint: dict[str, Any]
    ) -> tuple[Any, dict[str, Any]] | None:
        """Restores the newest checkpoint that reads back, onto ``abstract_state``'s shardings.

        A checkpoint that fails to read because it is damaged (truncated or
        missing files) is moved to ``<directory>_corrupt/<step>`` (kept, never
        deleted or overwritten) with a warning, and the next older one is
        tried. One that cannot be read because of its permissions, a mount or
        an I/O error is not damaged: nothing is moved and the run stops.

        Raises:
          CheckpointUnreadableError: a checkpoint this process may not read.
          IncompatibleCheckpointError: the newest readable checkpoint belongs to
            a different model or config; nothing is touched.

        Returns:
          ``(state, meta)`` or None when there is no checkpoint.
        """
        for step in reversed(self.all_steps()):
            try:
                meta = self.read_meta(step)
            except Exception as e:  # noqa: BLE001 - damaged, unless access was refused
                self._quarantine_if_damaged(step, e)
                continue
            theirs = meta.get("fingerprint", {})
            diff = {
                k: (theirs.get(k), v) for k, v in expected_fingerprint.items() if theirs.get(k) != v
            }
            if diff:
                details = ", ".join(
                    f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items()
                )
                raise IncompatibleCheckpointError(
                    f"The workdir {self.path.parent} holds a checkpoint (step {step}) "
                    f"of a different experiment ({details}). Nothing was changed; use another "
                    "--workdir, or restore the original config to resume it."
                )
            try:
                restored = self.manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
                )
            except Exception as e:  # noqa: BLE001 - damaged, unless access was refused
                self._quarantine_if_damaged(step, e)
                continue
            return restored["state"], meta
        return None

    def all_steps(self) -> list[int]:
        try:
            self.manager.reload()
            return sorted(self.manager.all_steps())
        except OSError as e:
            raise CheckpointUnreadableError(
                f"Cannot list the checkpoints in {self.directory} ({_describe(e)}); nothing was "
                "changed. Make it readable and writable (e.g. chmod -R u+rwX), then run the same "
                "command again."
            ) from e

    def _quarantine_if_damaged(self, step: int, error: Exception) -> None:
        """Moves the checkpoint of ``step`` aside, unless it is only unreadable."""
        refused = unreadable_file(self.path / str(step)) or access_problem(error)
        if refused is not None:
            raise CheckpointUnreadableError(
                f"Cannot read the checkpoint of step {step} in {self.directory} "
                f"({_describe(refused)}); it is not damaged, so nothing was moved or changed. "
                "Make it readable (e.g. chmod -R u+rX, or mount it read-write), then run the "
                "same command again."
            ) from error
        self._quarantine(step, error)

    def _quarantine(self, step: int, error: Exception) -> None:
        src = self.path / str(step)
        dst = _free_name(layout.quarantine_dir(self.path), str(step))
        if jax.process_index() == 0:
            _move_tree(src, dst)
        log.warning(
            "Checkpoint at step %d cannot be read (%s: %s); moved it to %s and trying an older one.",
            step,
            type(error).__name__,
            str(error).splitlines()[0][:200] if str(error) else "",
            dst,
        )
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"resnet_jax_quarantine_{step}")
        self.manager.close()
        self._open()


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        where = f": {error.filename}" if error.filename else ""
        return f"{error.strerror}{where}"
    return f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"


def _free_name(folder: epath.Path, name: str) -> epath.Path:
    """``folder/name``, or ``folder/name.1``, ``.2``, ... if taken: a quarantine
    never replaces what an earlier one kept."""
    candidate, n = folder / name, 0
    while candidate.exists():
        n += 1
        candidate = folder / f"{name}.{n}"
    return candidate


def _move_tree(src: epath.Path, dst: epath.Path) -> None:
    """Moves the directory ``src`` to ``dst`` (which must not exist), on any
    filesystem epath opens."""
    if not layout.is_remote(src):
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(os.fspath(src), os.fspath(dst))  # a rename
        return
    # An object store has no directories to rename: copy every object, then delete.
    _copy_tree(src, dst)
    src.rmtree()


def _copy_tree(src: epath.Path, dst: epath.Path) -> None:
    # No mkdir: an object store needs none (and gcsfs's would create a missing bucket).
    for child in src.iterdir():
        if child.is_dir():
            _copy_tree(child, dst / child.name)
        else:
            child.copy(dst / child.name)
