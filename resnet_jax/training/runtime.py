"""The host side of a run: the workdir lock, the metrics file, signals, progress.

Nothing here touches the devices. A workdir is a local path or a URL that
etils.epath and orbax open (``gs://bucket/run``), used as given; a remote
workdir gets no lock (see docs/reliability.md).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import resource
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from typing import Any

import jax
from etils import epath
from jax.experimental import multihost_utils
from tqdm import tqdm

from resnet_jax.data import tf_setup
from resnet_jax.errors import UserError, WorkdirInUseError
from resnet_jax.training import workdir as layout

log = logging.getLogger(__name__)


def host_rss_mb() -> float:
    """Current resident memory of this process in MiB (peak where /proc is absent)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class WorkdirLock:
    """An exclusive lock on a local workdir for the life of this process.

    ``flock`` on ``WORKDIR/.lock``: the operating system releases it when the
    process ends, however it ends (``kill -9`` included), so no stale lock is
    left. A second run on the same workdir gets a :class:`WorkdirInUseError`
    naming the process that holds it. The lock file is never deleted (deleting
    it would let two runs lock two different files).
    """

    def __init__(self, workdir: str, enabled: bool = True):
        self.workdir, self.enabled = workdir, enabled and not layout.is_remote(workdir)
        self._fd: int | None = None

    def __enter__(self) -> WorkdirLock:
        if jax.process_index() == 0:  # the others write only through orbax, which creates its own
            layout.prepare_workdir(self.workdir)
        if not self.enabled:
            return self
        path = os.path.join(self.workdir, ".lock")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(
                f"Cannot open the workdir's lock file {path} ({e.strerror}); make the workdir "
                "writable or choose another --workdir. Nothing was changed."
            ) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise WorkdirInUseError(
                f"The workdir {self.workdir} is in use by a running training ({holder}). "
                "Wait for it to end or stop it, or use another --workdir."
            ) from None
        started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        holder = f"pid {os.getpid()} on {socket.gethostname()}, started {started}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class MetricWriter:
    """Writes ``WORKDIR/metrics.jsonl`` and TensorBoard events (process 0 only).

    On resume (``resume_step`` set) the file keeps every whole line up to the
    restored step: later lines are replayed identically by the resumed run,
    and a line torn by a kill is dropped. A fresh start moves an old file
    aside (``metrics.jsonl.<time>.bak``); nothing is deleted.

    A remote workdir (``gs://...``, through etils.epath) is an object store,
    which has no append: the lines are kept in memory and the whole file is
    uploaded again at most every ``upload_every`` seconds and at every
    :meth:`flush`, which the loop calls before each checkpoint, so every line
    up to a checkpoint's step is stored before the checkpoint. An object is
    replaced whole, so a kill never tears a line. TensorBoard events go
    through :class:`TensorBoardWriter`.
    """

    # Seconds between uploads of a remote metrics.jsonl (environment variable
    # RESNET_JAX_METRICS_UPLOAD_SECONDS; 0 uploads every line).
    upload_every = float(os.environ.get("RESNET_JAX_METRICS_UPLOAD_SECONDS", "60"))

    def __init__(self, workdir: str, resume_step: int | None, enabled: bool = True):
        self.enabled = enabled
        self.remote = layout.is_remote(workdir)
        self._path = layout.metrics_path(workdir)
        self.path = os.fspath(self._path)
        if not enabled:
            return
        self._lines: list[str] = []  # a remote file's whole content
        self._uploaded = time.monotonic()
        self._dirty = False
        if self._path.exists():
            if resume_step is None:
                self._path.replace(self._path.with_name(f"metrics.jsonl.{int(time.time())}.bak"))
            else:
                self._truncate_to(resume_step)
        self._tb = TensorBoardWriter(epath.Path(workdir) / "tensorboard", remote=self.remote)
        self._file = None if self.remote else open(self.path, "a")

    def _truncate_to(self, step: int) -> None:
        keep, torn = [], 0
        text = self._path.read_text()
        for line in text.splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                torn += 1  # torn by a kill, or not a line of this trainer's
                continue
            if record["step"] <= step:
                keep.append(json.dumps(record) + "\n")
        if torn:
            backup = self._path.with_name(f"metrics.jsonl.{int(time.time())}.bak")
            backup.write_text(text)  # the dropped lines are kept there
            log.warning(
                "Dropped %d line(s) of %s that are not this trainer's metrics (torn by a kill, "
                "or written by something else); the file as it was is kept in %s.",
                torn,
                self.path,
                backup,
            )
        if self.remote:
            self._lines = keep
            self._path.write_text("".join(keep))  # replaced whole
            return
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        line = json.dumps(record) + "\n"
        if self.remote:
            self._lines.append(line)
            self._dirty = True
            if time.monotonic() - self._uploaded >= self.upload_every:
                self.flush()
        else:
            self._file.write(line)
            self._file.flush()
        self._tb.write_scalars(step, metrics)

    def flush(self) -> None:
        """Stores every line written so far (a remote file is uploaded whole)."""
        if self.enabled and self.remote and self._dirty:
            self._path.write_text("".join(self._lines))
            self._uploaded, self._dirty = time.monotonic(), False

    def close(self) -> None:
        if self.enabled:
            self.flush()
            if self._file is not None:
                self._file.close()
            self._tb.close()


class TensorBoardWriter:
    """TensorBoard scalars on ``logdir`` (``tf.summary``); a remote ``logdir``
    gets a local mirror.

    Written with TensorFlow's own ``tf.summary`` file writer, which is what
    clu's ``SummaryWriter`` wraps; clu's module also imports TensorBoard's
    hparams plugin, and through it all of Keras and scikit-learn (as long to
    import as a third of TensorFlow), for scalars alone.

    TensorFlow writes through its own filesystems: ``gs://`` only, and TF's
    GCS client can be pointed neither at another store nor at an emulator. So
    for a remote ``logdir`` the events are written to a local temporary
    directory and each file is copied whole to ``logdir`` through etils.epath
    (as TF's own GCS writer uploads a whole file on each flush), at most every
    ``SYNC_SECONDS`` and at ``close``; the mirror is then deleted. A run
    killed without ``close`` loses at most the last ``SYNC_SECONDS`` of
    TensorBoard events (``metrics.jsonl`` loses nothing).
    """

    SYNC_SECONDS = 60.0

    def __init__(self, logdir: epath.Path, remote: bool):
        self._tf = tf_setup.tensorflow_module()
        self.logdir = logdir
        self._mirror = tempfile.mkdtemp(prefix="resnet_jax_tensorboard_") if remote else None
        self._writer = self._tf.summary.create_file_writer(self._mirror or os.fspath(logdir))
        self._synced = time.monotonic()

    def write_scalars(self, step: int, metrics: dict[str, float]) -> None:
        with self._writer.as_default():
            for key, value in metrics.items():
                self._tf.summary.scalar(key, value, step=step)
        if self._mirror and time.monotonic() - self._synced >= self.SYNC_SECONDS:
            self._writer.flush()
            self._upload()

    def _upload(self) -> None:
        for entry in sorted(os.scandir(self._mirror), key=lambda e: e.name):
            if entry.is_file():
                with open(entry.path, "rb") as f:
                    (self.logdir / entry.name).write_bytes(f.read())
        self._synced = time.monotonic()

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()
        if self._mirror:
            try:
                self._upload()
            finally:
                shutil.rmtree(self._mirror, ignore_errors=True)


def progress_bar(total: int, initial: int) -> Any:
    """A tqdm progress bar over training steps, on stderr."""

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)


SECOND_INTERRUPT = (
    "interrupted by a second Ctrl-C: stopped at once, without saving; the workdir's "
    "newest checkpoint is kept: run the same command to resume from it.\n"
)


class PreemptionFlag:
    """Tells the loop when to save and stop.

    One process: set by SIGTERM (a preemption notice) or SIGINT (Ctrl-C).
    Several processes: JAX's preemption service (started by
    ``jax.distributed.initialize``) catches SIGTERM on any host, tells every
    host, and ``reached_preemption_sync_point`` turns true at the same step on
    all of them, so all save the same step. Ctrl-C reaches only the processes
    of one terminal, so there it is turned into that same notice: this process
    sends itself SIGTERM, which the preemption service handles. In both cases a
    second Ctrl-C interrupts at once, without saving.
    """

    def __init__(self):
        self._event = threading.Event()
        self._old: dict[int, Any] = {}
        self._multi = jax.process_count() > 1

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        # Several processes: SIGTERM stays with JAX's preemption service.
        signals = (signal.SIGINT,) if self._multi else (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            self._old[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, old in self._old.items():
            # After a first signal the run is on its way out: a Ctrl-C now
            # (while the process shuts down, after the save) still leaves at
            # once with one line, not a KeyboardInterrupt at interpreter exit.
            stopping = self._event.is_set() and sig == signal.SIGINT
            signal.signal(sig, self._handle if stopping else old)
        self._old = {}

    def _handle(self, signum, frame):
        if self._event.is_set() and signum == signal.SIGINT:
            # A KeyboardInterrupt raised here can land in a finalizer or a
            # callback that swallows it, and the run would go on: leave at once.
            os.write(2, SECOND_INTERRUPT.encode())
            os._exit(130)
        self._event.set()
        log.warning(
            "Received signal %d: saving a checkpoint at the next step, then stopping "
            "(Ctrl-C again to stop without saving).",
            signum,
        )
        if self._multi:
            os.kill(os.getpid(), signal.SIGTERM)  # the preemption service's notice

    def reached(self, sync_id: int) -> bool:
        """True when the loop must save and stop after the call numbered
        ``sync_id`` (it must grow by one per call, equally on every process)."""
        if self._multi:
            try:
                return bool(multihost_utils.reached_preemption_sync_point(sync_id))
            except RuntimeError:  # no preemption service (not started by jax.distributed)
                return self._event.is_set()
        return self._event.is_set()
