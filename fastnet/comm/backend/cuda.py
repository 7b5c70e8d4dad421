"""The backend's CUDA path (``FASTNET_BASE_BACKEND=nccl``): :class:`_CudaPath` holds fastnet's own
NCCL communicator (CuPy's bindings) per device, its side stream and the watchdog that aborts a
stuck collective; :func:`_serialized` orders ProcessGroupNCCL's delegated collectives on that
stream. **Not yet run on a GPU.**
"""

from __future__ import annotations

import collections
import datetime
import os
import sys
import threading
import time
from typing import Sequence

import torch

from fastnet.comm.backend.adapter import FastnetWork


def _cuda_nccl_missing() -> str:
    """Why fastnet's CUDA path cannot run in this process ('' when it can)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        from fastnet.comm.communicators.nccl import _nccl

        _nccl()
    except RuntimeError as exc:
        return str(exc)
    return ""


def _serialized(stream: torch.cuda.Stream, call, tensors: Sequence[torch.Tensor]):
    """Issue ``call()`` (a ProcessGroupNCCL collective, returning its ``Work``) in a group's one
    NCCL order, kept by the group's side ``stream``. NCCL's rule for several communicators in one
    process ("Using multiple NCCL communicators concurrently", NCCL user guide: their operations
    should not run at the same time and must be issued in the same order on every rank) then holds
    for a group's collectives, fastnet's and the base backend's: the call is issued with the side
    stream current, after the caller's stream (ProcessGroupNCCL's stream waits for the current
    one), and the side stream then waits for the call's end, so fastnet's next collective starts
    after it. The caller's stream is not blocked: it waits when the caller waits on the returned
    Work, as with NCCL alone.

    ``tensors`` (every input and output of the call) are recorded on the side stream: the wait
    above releases ProcessGroupNCCL's own hold on an async call's tensors (its allocator-safety
    stash is freed when a stream has waited for the work), while the caller's stream has not yet
    waited, so without the record a temporary input (``torch.cat(...)`` passed to an async
    all-to-all) could be reused while NCCL still reads it."""
    stream.wait_stream(torch.cuda.current_stream(stream.device))
    with torch.cuda.stream(stream):
        work = call()
        if work is not None:
            work.wait()  # without TORCH_NCCL_BLOCKING_WAIT no host block: the current stream waits for its end
        for t in tensors:
            if t.is_cuda:
                t.record_stream(stream)
    return work


class _CudaPath:
    """fastnet's collectives on the CUDA tensors of one group on one device (module docstring):
    fastnet's NCCL communicator from the group's ``store``, a :class:`fastnet.comm.gradients.reducer.BucketReducer`
    over it, the group's side ``stream`` (:func:`_serialized`), and the watchdog. Construction is
    collective over the group."""

    def __init__(self, store, rank: int, size: int, stream: torch.cuda.Stream, timeout: datetime.timedelta,
                 make_reducer, attempt: int = 0) -> None:
        from fastnet.comm.communicators.nccl import NcclCommunicator

        self.device, self.rank, self.timeout, self.stream = stream.device, rank, timeout, stream
        with torch.cuda.device(self.device):
            # one key per creation attempt: a retry after a failed creation must not read the old id
            self.comm = NcclCommunicator.from_store(store, rank, size, key=f"unique_id/{attempt}", device=self.device,
                                                    timeout_s=timeout.total_seconds())
            self.reducer = make_reducer(self.comm)
        hierarchy = getattr(self.reducer, "hierarchy", None)  # the hierarchical algorithms' split communicators
        subs = hierarchy.communicators() if hierarchy else []
        self.communicators = [*subs, self.comm]  # watched, aborted and destroyed together
        self._unfinished: collections.deque = collections.deque()  # (event, deadline, what), in order
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="fastnet-nccl-watchdog", daemon=True)
        self._watchdog.start()

    def run(self, what: str, tensors: Sequence[torch.Tensor], fn, result) -> FastnetWork:
        """Enqueue ``fn()`` (fastnet's kernels and NCCL calls) on the side stream after the
        caller's current stream; the Work's CUDA future holds ``result``."""
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)
        fut: torch.futures.Future = torch.futures.Future(devices=[self.device])
        with torch.cuda.stream(self.stream):
            for t in tensors:
                t.record_stream(self.stream)  # the caller may drop them before the side stream is done
            fn()
            fut.set_result(result)  # records CUDA events on the side stream (the current one here)
            event = torch.cuda.Event()
            event.record(self.stream)
        with self._lock:
            self._unfinished.append((event, time.monotonic() + self.timeout.total_seconds(), what))
        return FastnetWork(fut, event)

    def _watch(self) -> None:
        torch.cuda.set_device(self.device)
        while not self._closed.wait(0.05):
            try:
                with self._lock:
                    while self._unfinished and self._unfinished[0][0].query():
                        self._unfinished.popleft()
                    oldest = self._unfinished[0] if self._unfinished else None
            except Exception as exc:  # noqa: BLE001 - a sticky CUDA error: the watchdog must not die silently
                self._fail(f"CUDA reported an error: {exc}")
                return
            if self._closed.is_set():  # stop() while this round ran: the communicator may be aborted
                return
            try:
                for comm in self.communicators:
                    comm._comm.check_async_error()
            except Exception as exc:  # noqa: BLE001 - NCCL's error, whatever CuPy wraps it in
                self._fail(f"NCCL reported an error: {exc}")
                return
            if oldest is not None and time.monotonic() > oldest[1]:
                self._fail(f"{oldest[2]} did not complete within the group's timeout {self.timeout}: a peer "
                           f"rank may have died or stopped")
                return

    def _fail(self, why: str) -> None:
        """Abort the communicators and end the process (ProcessGroupNCCL's default error handling):
        the aborted collectives' contents are undefined, so this rank must not go on."""
        sys.stderr.write(f"[fastnet] rank {self.rank} on {self.device}: {why}; aborting the NCCL communicators "
                         f"and ending the process\n")
        sys.stderr.flush()
        # ncclCommAbort frees device memory and can wait behind running kernels: the process ends
        # within 10 s whatever abort does (ProcessGroupNCCL has a heartbeat monitor for the same)
        threading.Timer(10.0, os._exit, (1,)).start()
        try:
            self._abort_all()
        finally:
            os._exit(1)

    def _abort_all(self) -> None:
        """``ncclCommAbort`` on every communicator (the hierarchical algorithms' split ones too:
        their kernels may be the ones waiting on a dead peer); the first error is raised after."""
        error = None
        for comm in self.communicators:
            try:
                comm._comm.abort()
            except Exception as exc:  # noqa: BLE001 - abort the others first
                error = error or exc
        if error is not None:
            raise error

    def stop(self) -> None:
        """Stop the watchdog (before the communicators are aborted or destroyed: its polls must not
        see an aborted communicator as an error)."""
        self._closed.set()
        if threading.current_thread() is not self._watchdog:
            self._watchdog.join(5.0)

    def close(self) -> None:
        """Stop the watchdog and destroy the communicators once their work is done; when one does
        not finish (an error, its timeout), abort them all and raise its error (no communicator is
        left to a destroy that would wait on a dead peer)."""
        self.stop()
        try:
            for comm in self.communicators:
                comm.synchronize()
        except BaseException:
            try:
                self._abort_all()
            except Exception:  # noqa: BLE001 - the synchronize error is the one to report
                pass
            raise
        for comm in self.communicators:
            comm.close()

    def abort(self) -> None:
        """Stop the watchdog, then abort the communicators (``ncclCommAbort``)."""
        self.stop()
        self._abort_all()
