"""The host side of a run: the workdir lock, the metrics file, signals, progress.

Nothing here touches the devices. Local workdirs only for now: remote paths
(``gs://...``) get no lock (see README, "Running long jobs").
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import resource
import signal
import socket
import sys
import threading
import time
from typing import Any

import jax

from resnet_jax.errors import UserError, WorkdirInUseError

log = logging.getLogger(__name__)


def is_remote(path: str) -> bool:
    """True for URLs such as ``gs://bucket/run``."""
    return "://" in str(path)


def host_rss_mb() -> float:
    """Current resident memory of this process in MiB (peak where /proc is absent)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare_workdir(workdir: str) -> None:
    """Creates a local workdir, or says why it cannot be one."""
    if is_remote(workdir):
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


class WorkdirLock:
    """An exclusive lock on a local workdir for the life of this process.

    ``flock`` on ``WORKDIR/.lock``: the operating system releases it when the
    process ends, however it ends (``kill -9`` included), so no stale lock is
    left. A second run on the same workdir gets a :class:`WorkdirInUseError`
    naming the process that holds it. The lock file is never deleted (deleting
    it would let two runs lock two different files).
    """

    def __init__(self, workdir: str, enabled: bool = True):
        self.workdir, self.enabled = workdir, enabled and not is_remote(workdir)
        self._fd: int | None = None

    def __enter__(self) -> WorkdirLock:
        if jax.process_index() == 0:  # every process checks the path; one creates it
            prepare_workdir(self.workdir)
        if not self.enabled:
            return self
        path = os.path.join(self.workdir, ".lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
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
    """

    def __init__(self, workdir: str, resume_step: int | None, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        if not enabled:
            return
        if os.path.exists(self.path):
            if resume_step is None:
                os.replace(self.path, self.path + f".{int(time.time())}.bak")
            else:
                self._truncate_to(resume_step)
        from clu import metric_writers

        self._tb = metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard"))
        self._file = open(self.path, "a")

    def _truncate_to(self, step: int) -> None:
        keep, torn = [], 0
        with open(self.path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    torn += 1
                    continue
                if record["step"] <= step:
                    keep.append(json.dumps(record) + "\n")
        if torn:
            log.warning(
                "Dropped %d unreadable line(s) of %s (a run killed mid-write).", torn, self.path
            )
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self._tb.write_scalars(step, metrics)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._tb.flush()
            self._tb.close()


def progress_bar(total: int, initial: int) -> Any:
    """A tqdm progress bar over training steps, on stderr."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)


class PreemptionFlag:
    """Tells the loop when to save and stop.

    One process: set by SIGTERM (a preemption notice) or SIGINT (Ctrl-C; a
    second Ctrl-C interrupts at once). Several processes: JAX's preemption
    service (started by ``jax.distributed.initialize``) catches SIGTERM on any
    host and ``reached_preemption_sync_point`` turns true at the same step on
    every host, so all of them save the same step.
    """

    def __init__(self):
        self._event = threading.Event()
        self._old: dict[int, Any] = {}
        self._multi = jax.process_count() > 1

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        signals = (signal.SIGINT,) if self._multi else (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            self._old[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def _handle(self, signum, frame):
        if self._event.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        log.warning(
            "Received signal %d: saving a checkpoint at the next step, then stopping.", signum
        )
        self._event.set()

    def reached(self, step: int) -> bool:
        if self._multi:
            from jax.experimental import multihost_utils

            try:
                return bool(multihost_utils.reached_preemption_sync_point(step))
            except RuntimeError:  # no preemption service (not started by jax.distributed)
                return False
        return self._event.is_set()
