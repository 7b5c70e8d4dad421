"""The c10d side of the backend: :class:`FastnetWork` (a ``Work`` completed from the communication
thread or a CUDA stream) and the helpers that map c10d's options, ops and tensor lists onto
fastnet's calls.
"""

from __future__ import annotations

import datetime
import time
from typing import Sequence

import torch
import torch.distributed as dist


def _op_name(op) -> str | None:
    """``sum``/``avg``/``max``/``min`` for a c10d reduce op (options hold ``ReduceOp`` objects,
    which compare equal to, but do not hash like, the ``RedOpType`` members); None for the rest."""
    for name in ("SUM", "AVG", "MAX", "MIN"):
        if op == getattr(dist.ReduceOp, name):
            return name.lower()
    return None


def _device_of(tensors: Sequence[torch.Tensor]) -> torch.device | None:
    """The one device all ``tensors`` are on, or None (none given, or several devices)."""
    devices = {t.device for t in tensors}
    return devices.pop() if len(devices) == 1 else None


class FastnetWork(dist._Work):
    """The ``Work`` of a collective run on fastnet's communication thread: ``wait()`` blocks
    until it is done and raises what the thread raised (torch's future-wrapping work does not,
    so a dead peer would go unnoticed); ``wait(timeout)`` raises RuntimeError once ``timeout``
    passes; ``get_future()`` (what DDP chains on) completes with the output tensors."""

    def __init__(self, fut: torch.futures.Future, event: "torch.cuda.Event | None" = None) -> None:
        super().__init__()
        self._fut, self._event = fut, event  # event: the end of a CUDA collective on the side stream

    def _done(self) -> bool:
        return self._fut.done() and (self._event is None or self._event.query())

    def wait(self, timeout: datetime.timedelta | None = None) -> bool:
        """Without ``timeout``: CPU, block until done; CUDA, order the current stream after the
        result (no host block). With ``timeout``: block the host until done (CUDA too) or raise."""
        if timeout is not None and timeout.total_seconds() > 0:
            deadline = time.monotonic() + timeout.total_seconds()
            while not self._done():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"fastnet: the collective did not complete within {timeout}")
                time.sleep(0.001)
        self._fut.wait()  # raises the communication thread's error; CUDA: the stream wait
        return True

    def is_completed(self) -> bool:
        return self._done()

    def is_success(self) -> bool:
        if not self._fut.done():
            return False
        try:
            self._fut.value()
        except Exception:  # noqa: BLE001 - any failure of the collective
            return False
        return True

    def get_future(self) -> torch.futures.Future:
        return self._fut


class _Works(dist._Work):
    """Several base-backend Works as one: ``wait`` waits for each, ``get_future`` completes with
    ``result`` once all have (:func:`_coalesced_or_each`)."""

    def __init__(self, works: list, result) -> None:
        super().__init__()
        self._works, self._result = works, result

    def wait(self, timeout: datetime.timedelta | None = None) -> bool:
        for w in self._works:
            w.wait(timeout) if timeout is not None else w.wait()
        return True

    def is_completed(self) -> bool:
        return all(w.is_completed() for w in self._works)

    def get_future(self) -> torch.futures.Future:
        return torch.futures.collect_all([w.get_future() for w in self._works]).then(lambda _: self._result)


def _coalesced_or_each(base, name: str, each: str, outputs, inputs, opts):
    """``base.<name>(outputs, inputs, opts)`` (``all_gather_single_coalesced`` /
    ``reduce_scatter_single_coalesced``) where the base backend has it; torch 2.11's ``Backend``
    has neither (``.ci/gpu`` prints the hasattr lines), so there one ``base.<each>(out, in, opts)``
    (``_allgather_base`` / ``_reduce_scatter_base``) per pair, their Works waited together."""
    fn = getattr(base, name, None)
    if fn is not None:
        return fn(outputs, inputs, opts)
    return _Works([getattr(base, each)(o, i, opts) for o, i in zip(outputs, inputs)], list(outputs))


def _flat(*items) -> list[torch.Tensor]:
    """The tensors in ``items`` (tensors and nested lists/tuples of them), in order."""
    out: list[torch.Tensor] = []
    for item in items:
        if isinstance(item, torch.Tensor):
            out.append(item)
        elif isinstance(item, (list, tuple)):
            out.extend(_flat(*item))
    return out
