"""The trainer's gradient-averaging seam and its baseline: torch.distributed's own all-reduce."""

from __future__ import annotations

import time
from typing import Protocol, Sequence

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


class GradientSync(Protocol):
    """Averages gradients over the data-parallel ranks, in place.

    ``__call__(grads)`` replaces each gradient tensor (any shape; e.g. every ``p.grad``, or the flat
    FP16 buffers of :class:`fastnet.precision.MasterWeights`) by its mean over all ranks and returns
    the seconds spent communicating (wall clock, including the wait for the slowest rank).
    """

    def __call__(self, grads: Sequence[torch.Tensor]) -> float: ...


class NativeAllReduce:
    """Gradient averaging with one ``torch.distributed.all_reduce`` (SUM) per gradient dtype.

    Steps: 1) flatten the gradients of one dtype into a 1-D buffer (skipped when that dtype has a
    single contiguous tensor, e.g. a flat buffer, which is reduced in place); 2) divide by world size
    (before the sum, so FP16 cannot overflow in the sum that the mean would fit in); 3) all-reduce
    SUM; 4) copy back. Every rank must pass the same list of shapes and dtypes. Blocking: returns
    after the all-reduce completes (one sync point).
    """

    __slots__ = ("world_size", "group")

    def __init__(self, world_size: int, group: dist.ProcessGroup | None = None) -> None:
        self.world_size, self.group = world_size, group

    def __call__(self, grads: Sequence[torch.Tensor]) -> float:
        if self.world_size == 1:
            return 0.0
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        start = time.perf_counter()
        for same in by_dtype.values():
            if len(same) == 1 and same[0].is_contiguous():
                same[0].div_(self.world_size)
                dist.all_reduce(same[0], group=self.group)
                continue
            flat = _flatten_dense_tensors(same)
            flat.div_(self.world_size)
            dist.all_reduce(flat, group=self.group)
            for g, reduced in zip(same, _unflatten_dense_tensors(flat, same)):
                g.copy_(reduced)
        return time.perf_counter() - start
