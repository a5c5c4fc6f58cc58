"""The workdir of a training run, named once: where its checkpoints, metrics
and quarantined checkpoints live, and how a path is taken (local paths made
absolute, URLs such as ``gs://bucket/run`` kept as given).

    WORKDIR/
      checkpoints/<step>/      orbax checkpoints (the newest keep_checkpoints)
      checkpoints_corrupt/<step>/  checkpoints that could not be restored, kept
      metrics.jsonl            one JSON line per log or evaluation
      tensorboard/             TensorBoard events (local workdirs)
      .lock                    held by the live run
"""

from __future__ import annotations

import os
import tempfile

from etils import epath

from resnet_jax.errors import UserError

CHECKPOINTS = "checkpoints"
QUARANTINE_SUFFIX = "_corrupt"
METRICS = "metrics.jsonl"


def is_remote(path: str | os.PathLike) -> bool:
    """True for URLs such as ``gs://bucket/run``."""
    return "://" in os.fspath(path)


def workdir_path(path: str | os.PathLike) -> epath.Path:
    """``path`` as an ``epath.Path``: a local path made absolute, a URL kept as given."""
    return epath.Path(path) if is_remote(path) else epath.Path(path).resolve()


def checkpoints_dir(workdir: str | os.PathLike) -> epath.Path:
    """``WORKDIR/checkpoints`` as an ``epath.Path`` (local paths made absolute)."""
    return workdir_path(workdir) / CHECKPOINTS


def quarantine_dir(checkpoints: str | os.PathLike) -> epath.Path:
    """Where checkpoints that could not be restored are moved: ``checkpoints_corrupt``."""
    path = epath.Path(checkpoints)
    return path.with_name(path.name + QUARANTINE_SUFFIX)


def metrics_path(workdir: str | os.PathLike) -> epath.Path:
    """``WORKDIR/metrics.jsonl``."""
    return epath.Path(workdir) / METRICS


def is_workdir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a training run's workdir (it has ``checkpoints/``)."""
    return (epath.Path(path) / CHECKPOINTS).is_dir()


def prepare_workdir(workdir: str) -> None:
    """Creates a local workdir, or says why it cannot be one.

    A remote workdir is left as it is: an object store has no directories to
    create (and creating a bucket is the user's decision, not a side effect);
    only its bucket must exist.
    """
    if is_remote(workdir):
        scheme, rest = os.fspath(workdir).split("://", 1)
        bucket = f"{scheme}://{rest.split('/', 1)[0]}"
        if not epath.Path(bucket).exists():
            raise UserError(
                f"The bucket of --workdir {workdir} ({bucket}) does not exist or cannot be "
                "read with these credentials; create it or fix the path."
            )
        return
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(
            f"--workdir {workdir} exists and is not a directory; give a directory path "
            "(it is created if missing)."
        )
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"Cannot create the workdir {workdir} ({e.strerror}); choose a writable --workdir."
        ) from e
    try:  # a read-only workdir (or mount) stops here, before anything is read or written
        fd, probe = tempfile.mkstemp(prefix=".write_test_", dir=workdir)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserError(
            f"The workdir {workdir} is not writable ({e.strerror}); make it writable (e.g. "
            "chmod u+w, or mount it read-write) or choose another --workdir. Nothing was changed."
        ) from e
