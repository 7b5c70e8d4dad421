"""A communication thread: one worker that runs submitted calls in FIFO order, so every rank issues
its collectives in the same order while the caller (backward) goes on. Used by
:class:`~fastnet.comm.gradients.synchronizer.GradientSynchronizer`, the DDP hook and the backend.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from typing import Callable


class CommThread:
    """One daemon thread running submitted callables in submission order (FIFO keeps every rank's
    collectives in the same order). Daemon: a collective stuck on a dead peer cannot block exit."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="fastnet-comm", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, fut = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:  # handed to synchronize(), which re-raises it
                fut.set_exception(exc)

    def submit(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((fn, fut))
        return fut

    def close(self, timeout_s: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout_s)  # a thread stuck on a dead peer is left to die with the process
