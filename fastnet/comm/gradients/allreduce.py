""":class:`AlgorithmAllReduce` averages a list of gradients after backward with fastnet's algorithms:
fusion into persistent flat buffers, buckets up to a fusion threshold, each averaged by a
:class:`~fastnet.comm.gradients.reducer.BucketReducer`. The plain call for your own loop (no hooks,
no overlap); :class:`~fastnet.comm.gradients.synchronizer.GradientSynchronizer` overlaps with backward.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from fastnet.comm.communicators.base import Communicator
from fastnet.comm.gradients.consistency import check_consistency, check_layout
from fastnet.comm.gradients.reducer import BucketReducer
from fastnet.comm.planning.cost_model import CostModel
from fastnet.comm.planning.hierarchy import DEFAULT_SEGMENT_BYTES


class AlgorithmAllReduce:
    """Averages a list of gradients in place over ``comm`` (the trainer's ``GradientSync`` seam for
    code that all-reduces after backward; :class:`fastnet.comm.GradientSynchronizer` overlaps it
    with backward instead).

    Args:
        comm: the data-parallel communicator (its ``split`` builds the hierarchy when needed).
        algorithm: one of :data:`ALGORITHMS` (``hybrid``: per bucket, by ``cost_model``, or
            without one chosen online, :mod:`fastnet.comm.planning.autotune`).
        fusion_threshold_bytes: bucket size on the wire, bytes (> 0).
        wire_dtype: ``none`` (the gradients' own dtype) | ``fp16`` | ``bf16``.
        ranks_per_node: emulated node size for the hierarchical algorithms (default: nodes from
            the hosts, :class:`fastnet.comm.planning.hierarchy.Hierarchy`).
        cost_model: link parameters for ``hybrid`` (default None: chosen online).
        segment_bytes: pipeline segment of ``ring`` and ``hierarchical``, bytes (0: no pipelining).
        predivide_factor: divide by this before the sum and by world size / it after
            (:class:`BucketReducer`; default: the world size, all before).

    Construction is collective and checks that every rank chose the same settings (algorithm, wire
    dtype, threshold, nodes, cost model: :func:`check_consistency`).

    Raises:
        ValueError: unknown algorithm or wire dtype (valid ones listed), a non-positive threshold,
            ``hierarchical`` with unequal nodes, a negative ``segment_bytes``, settings or gradient
            layouts that differ across ranks.
    """

    __slots__ = ("comm", "fusion_threshold_bytes", "reducer", "_buffers", "_checked")

    def __init__(self, comm: Communicator, algorithm: str = "ring", fusion_threshold_bytes: int = 64 << 20,
                 wire_dtype: str = "none", ranks_per_node: int | None = None,
                 cost_model: CostModel | None = None, segment_bytes: int = DEFAULT_SEGMENT_BYTES,
                 predivide_factor: float | None = None, host_id: str | None = None) -> None:
        if fusion_threshold_bytes <= 0:
            raise ValueError(f"Invalid fusion threshold: {fusion_threshold_bytes} bytes (must be > 0)")
        self.reducer = BucketReducer(comm, algorithm, wire_dtype, ranks_per_node, cost_model, segment_bytes,
                                     predivide_factor, host_id)
        check_consistency(comm, [*self.reducer.describe(), ("fusion threshold bytes", str(fusion_threshold_bytes))],
                          "AlgorithmAllReduce", "Give every rank the same settings and cost-model file.")
        self.comm, self.fusion_threshold_bytes = comm, fusion_threshold_bytes
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._checked: set[tuple] = set()

    @property
    def algorithm(self) -> str:
        return self.reducer.algorithm

    def close(self) -> None:
        """Close the communicators this all-reduce split off ``comm`` (the hierarchy's)."""
        self.reducer.close()

    def __call__(self, grads: Sequence[torch.Tensor]) -> float:
        """Average ``grads`` in place over all ranks; returns the seconds spent (one sync point).

        Steps: group by dtype; a dtype given as one contiguous tensor is reduced in place, several
        are packed into a persistent flat buffer (fusion) allocated once per layout; cut into
        buckets of at most ``fusion_threshold_bytes`` on the wire; reduce each
        (:class:`BucketReducer`); unpack. The first call with a layout checks it across ranks.
        """
        if self.comm.size == 1:
            return 0.0
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        layout = tuple((d, sum(g.numel() for g in gs)) for d, gs in by_dtype.items())
        if layout not in self._checked:
            check_layout(self.comm, layout)
            self._checked.add(layout)
        start = time.perf_counter()
        for dtype, same in by_dtype.items():
            packed = len(same) > 1 or not same[0].is_contiguous()
            if packed:
                key = (dtype, tuple(g.numel() for g in same), same[0].device)
                flat = self._buffers.get(key)
                if flat is None:
                    flat = self._buffers[key] = torch.empty(sum(g.numel() for g in same), dtype=dtype,
                                                            device=same[0].device)
                torch.cat([g.reshape(-1) for g in same], out=flat)
            else:
                flat = same[0].view(-1)
            per_bucket = max(1, self.fusion_threshold_bytes // (self.reducer.wire_dtype or dtype).itemsize)
            for lo in range(0, flat.numel(), per_bucket):
                self.reducer(flat[lo:lo + per_bucket])
            if packed:
                off = 0
                for g in same:
                    g.copy_(flat[off:off + g.numel()].view(g.shape))
                    off += g.numel()
        return time.perf_counter() - start
