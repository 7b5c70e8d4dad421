"""Reused scratch buffers for the all-reduce algorithms' temporaries on the CPU.

A ring step receives into a temporary before adding it (:mod:`fastnet.comm.algorithms`). A fresh
CPU tensor of tens of MiB is a fresh ``mmap`` (glibc serves allocations above its mmap threshold,
at most 32 MiB, straight from the kernel and unmaps them on free), so every call pays a page fault
per 4 KiB page on first touch: measured here, writing 128 MiB into a new tensor takes 127 ms, into
a reused one 12 ms — while a 2-rank ring of 256 MiB moves its bytes in about 185 ms. The pool keeps
the temporaries of a thread between calls, as CUDA's caching allocator does on the GPU (CUDA
tensors bypass the pool).

Buffers are per thread (each communication thread its own pool, no locking), handed out by best
fit and returned explicitly by the algorithm once its last receive into them has completed. A
buffer is not returned when the algorithm raises (a failed receive may still be writing into it).
At most :data:`MAX_BUFFERS` buffers and :data:`MAX_BYTES` bytes are kept per thread; past that,
the smallest are dropped. ``ENABLED = False`` turns the pool off (every take a new tensor): for
the benchmark that measures what it saves (``benchmarks/p2p_floor.py --fresh``).
"""

from __future__ import annotations

import threading

import torch

MAX_BUFFERS = 8
MAX_BYTES = 1 << 30  # 1 GiB per thread
ENABLED = True

_local = threading.local()


def _free() -> list[torch.Tensor]:
    free = getattr(_local, "free", None)
    if free is None:
        free = _local.free = []
    return free


def take(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 1-D tensor of ``numel`` elements of ``dtype`` on ``device`` with undefined contents: a view
    of the smallest kept buffer that fits, else a new one. Give it back with :func:`give`."""
    if device.type != "cpu" or not ENABLED:
        return torch.empty(numel, dtype=dtype, device=device)
    free = _free()
    fits = [i for i, b in enumerate(free) if b.dtype == dtype and b.numel() >= numel]
    if not fits:
        return torch.empty(numel, dtype=dtype)
    return free.pop(min(fits, key=lambda i: free[i].numel()))[:numel]


def give(*bufs: torch.Tensor) -> None:
    """Return buffers from :func:`take` to this thread's pool (CUDA tensors are dropped)."""
    if not ENABLED:
        return
    free = _free()
    for b in bufs:
        if b.device.type != "cpu":
            continue
        base = b._base if b._base is not None else b
        if base.dim() != 1 or any(base is f for f in free):
            continue
        free.append(base)
    free.sort(key=lambda t: t.numel() * t.element_size(), reverse=True)
    while len(free) > MAX_BUFFERS or sum(t.numel() * t.element_size() for t in free) > MAX_BYTES:
        free.pop()  # the smallest


def kept_bytes() -> int:
    """Bytes this thread's pool holds now."""
    return sum(t.numel() * t.element_size() for t in _free())
