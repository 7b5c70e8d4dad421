"""The trainer's gradient-averaging seam and its baseline: torch.distributed's own all-reduce."""

from __future__ import annotations

import time
from typing import Protocol, Sequence

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


class GradientSync(Protocol):
    """Averages gradients over the data-parallel ranks, in place.

    ``__call__(params)`` replaces each ``p.grad`` by the mean over all ranks and returns the seconds
    spent communicating (wall clock, including the wait for the slowest rank).
    """

    def __call__(self, params: Sequence[torch.nn.Parameter]) -> float: ...


class NativeAllReduce:
    """Gradient averaging with one ``torch.distributed.all_reduce`` (SUM) per gradient dtype.

    Steps: 1) flatten the gradients of one dtype into a 1-D buffer; 2) divide by world size (before
    the sum, so FP16 cannot overflow in the sum that the mean would fit in); 3) all-reduce SUM;
    4) copy back into each ``p.grad``. Parameters with ``grad is None`` are skipped; every rank
    must have the same set. Blocking: returns after the all-reduce completes (one sync point).
    """

    __slots__ = ("world_size", "group")

    def __init__(self, world_size: int, group: dist.ProcessGroup | None = None) -> None:
        self.world_size, self.group = world_size, group

    def __call__(self, params: Sequence[torch.nn.Parameter]) -> float:
        if self.world_size == 1:
            return 0.0
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in params:
            if p.grad is not None:
                by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        start = time.perf_counter()
        for grads in by_dtype.values():
            flat = _flatten_dense_tensors(grads)
            flat.div_(self.world_size)
            dist.all_reduce(flat, group=self.group)
            for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
                g.copy_(reduced)
        return time.perf_counter() - start
