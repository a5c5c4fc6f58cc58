"""Global batches assembled ahead of the step on a background thread.

The host pipeline yields this process's part of each batch as numpy arrays;
turning them into global ``jax.Array`` s copies them to the devices. Done on
the training thread, each copy would sit between two steps. :class:`Prefetcher`
does it ``size`` batches ahead on a thread of its own (the pattern of
big_vision's ``prefetch_iterator``), and waits there until the copy is
complete, so the time the training thread spends in ``next()`` is exactly the
time a step waited for data: the host pipeline and the host-to-device copy.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax

_END = object()


class Prefetcher(Iterator):
    """``to_device(batch)`` for each batch of ``batches``, ``size`` ahead.

    Batches come out in order. An exception raised by ``batches`` or
    ``to_device`` is raised again by the ``next()`` call that would have
    returned that batch. :meth:`close` stops the thread (also on ``with``
    exit); batches prefetched but not taken are dropped.

    Args:
      batches: host batches (an endless pipeline is fine).
      to_device: host batch -> device arrays (e.g. a global ``jax.Array`` dict).
      size: how many device batches may wait in the queue (>= 1).
    """

    def __init__(self, batches: Iterable[Any], to_device: Callable[[Any], Any], size: int = 2):
        if size < 1:
            raise ValueError(f"size={size}: at least 1 batch must fit in the queue.")
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._fill, args=(iter(batches), to_device), name="resnet_jax-prefetch"
        )
        self._thread.daemon = True  # never keeps a finished (or crashed) process alive
        self._thread.start()

    def _fill(self, batches: Iterator[Any], to_device: Callable[[Any], Any]) -> None:
        try:
            while not self._stop.is_set():
                try:
                    batch = next(batches)
                except StopIteration:
                    self._put((_END, None))
                    return
                # Wait for the copy here, not on the training thread.
                if not self._put((jax.block_until_ready(to_device(batch)), None)):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._put((None, e))

    def _put(self, item: tuple[Any, BaseException | None]) -> bool:
        """Blocks until there is room (True) or :meth:`close` was called (False)."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def __next__(self) -> Any:
        if self._stop.is_set():
            raise StopIteration
        value, error = self._queue.get()
        if error is not None:
            self.close()
            raise error
        if value is _END:
            self.close()
            raise StopIteration
        return value

    def close(self, timeout: float = 1.0) -> None:
        """Stops the thread and drops what it prefetched.

        A producer inside ``batches`` (e.g. a shuffle buffer filling) stops
        when that call returns; ``close`` waits at most ``timeout`` seconds
        for it (the thread is a daemon, so it never holds the process).
        """
        self._stop.set()
        self._drain()  # unblock a producer waiting for room
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=timeout)
        self._drain()  # a put that raced with the first drain

    def _drain(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Synchronous(Iterator):
    """The same interface without a thread: ``to_device(batch)`` on the
    caller's thread, waited for (``prefetch_batches=0``)."""

    def __init__(self, batches: Iterable[Any], to_device: Callable[[Any], Any]):
        self._batches, self._to_device = iter(batches), to_device

    def __next__(self) -> Any:
        return jax.block_until_ready(self._to_device(next(self._batches)))

    def close(self) -> None:
        self._batches = iter(())

    def __enter__(self) -> Synchronous:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def prefetch(batches: Iterable[Any], to_device: Callable[[Any], Any], size: int) -> Iterator[Any]:
    """:class:`Prefetcher` for ``size`` >= 1, :class:`Synchronous` for 0."""
    return Prefetcher(batches, to_device, size) if size else Synchronous(batches, to_device)
