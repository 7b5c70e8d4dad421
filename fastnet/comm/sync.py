"""Gradient averaging with fastnet's own all-reduce algorithms, tensor fusion and wire compression.

:class:`AlgorithmAllReduce` implements the trainer's ``GradientSync`` seam:

  1. group the gradient tensors by dtype; a dtype given as one contiguous tensor (the flat buffer
     of :class:`fastnet.precision.MasterWeights`) is used in place, several tensors are packed into
     a persistent flat buffer allocated once per layout (fusion);
  2. cut each flat buffer into buckets of at most ``fusion_threshold_bytes`` (bytes on the wire);
  3. per bucket: cast to the wire dtype (``fp16``/``bf16``) while dividing by the world size
     before the sum (Jia et al. 2018, §3.1: no overflow), run the algorithm (``ring``,
     ``hierarchical``, ``leader``, or the backend's ``native`` all-reduce), cast back;
  4. unpack into the gradients.

On the first call with a layout, every rank's layout (dtypes and element counts) is compared; a
mismatch raises ValueError naming the ranks and their layouts instead of corrupting or hanging.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from fastnet.comm.algorithms import ring_all_reduce
from fastnet.comm.communicator import Communicator
from fastnet.comm.topology import Hierarchy

ALGORITHMS = ("native", "ring", "hierarchical", "leader")
_DTYPE_CODES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8]
_MAX_DTYPES = 8
WIRE_DTYPES = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}


class AlgorithmAllReduce:
    """Averages gradients in place over ``comm`` with one of :data:`ALGORITHMS`.

    Args:
        comm: the data-parallel communicator (its ``split`` builds the hierarchy when needed).
        algorithm: ``native`` | ``ring`` | ``hierarchical`` | ``leader``.
        fusion_threshold_bytes: bucket size on the wire, bytes (> 0).
        wire_dtype: ``none`` (the gradients' own dtype) | ``fp16`` | ``bf16``.
        ranks_per_node: node size for the hierarchical algorithms (default: all ranks one node).

    Raises:
        ValueError: unknown algorithm or wire dtype (valid ones listed), a non-positive threshold,
            ``hierarchical`` with unequal nodes, or gradient layouts that differ across ranks.
    """

    __slots__ = ("comm", "algorithm", "fusion_threshold_bytes", "wire_dtype", "hierarchy", "_buffers", "_checked")

    def __init__(self, comm: Communicator, algorithm: str = "ring", fusion_threshold_bytes: int = 64 << 20,
                 wire_dtype: str = "none", ranks_per_node: int | None = None) -> None:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"Unknown all-reduce algorithm {algorithm!r}; valid algorithms: {', '.join(ALGORITHMS)}")
        if wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"Unknown wire dtype {wire_dtype!r}; valid wire dtypes: {', '.join(WIRE_DTYPES)}")
        if fusion_threshold_bytes <= 0:
            raise ValueError(f"Invalid fusion threshold: {fusion_threshold_bytes} bytes (must be > 0)")
        self.comm, self.algorithm, self.fusion_threshold_bytes = comm, algorithm, fusion_threshold_bytes
        self.wire_dtype = WIRE_DTYPES[wire_dtype]
        self.hierarchy = None
        if algorithm in ("hierarchical", "leader"):
            self.hierarchy = Hierarchy(comm, ranks_per_node or comm.size)
            if algorithm == "hierarchical" and not self.hierarchy.topology.uniform:
                raise ValueError(f"hierarchical all-reduce needs equal ranks per node: world size {comm.size}, "
                                 f"ranks_per_node {ranks_per_node}; use 'leader'")
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._checked: set[tuple] = set()

    def _check_layout(self, layout: tuple) -> None:
        """Compare (dtype, elements) per dtype across ranks with one small all_gather of int64."""
        if layout in self._checked or self.comm.size == 1:
            return
        if len(layout) > _MAX_DTYPES:
            raise ValueError(f"at most {_MAX_DTYPES} gradient dtypes per call, got {len(layout)}")
        mine = torch.full((1 + 2 * _MAX_DTYPES,), -1, dtype=torch.int64)
        mine[0] = len(layout)
        for i, (d, n) in enumerate(layout):
            mine[1 + 2 * i], mine[2 + 2 * i] = _DTYPE_CODES.index(d) if d in _DTYPE_CODES else 99, n
        device = getattr(self.comm, "device", None) or torch.device("cpu")
        gathered = torch.empty(self.comm.size * mine.numel(), dtype=torch.int64, device=device)
        self.comm.all_gather(gathered, mine.to(device))
        rows = gathered.cpu().view(self.comm.size, -1)
        if not bool((rows == rows[0]).all()):
            def show(row: torch.Tensor) -> str:
                return str([(str(_DTYPE_CODES[c]) if c < len(_DTYPE_CODES) else "other", int(n))
                            for c, n in row[1:1 + 2 * int(row[0])].view(-1, 2).tolist()])
            diff = "; ".join(f"rank {r}: {show(rows[r])}" for r in range(self.comm.size)
                             if not bool((rows[r] == rows[0]).all()))
            raise ValueError(f"gradient layouts differ across ranks (dtype, elements per dtype): rank 0: "
                             f"{show(rows[0])}; {diff}. Every rank must all-reduce the same tensors.")
        self._checked.add(layout)

    def _reduce_bucket(self, bucket: torch.Tensor) -> None:
        n = self.comm.size
        wire = bucket if self.wire_dtype in (None, bucket.dtype) else None
        if wire is None:
            wire = bucket.div(n).to(self.wire_dtype)  # divide before the sum, then narrow
        else:
            wire.div_(n)
        if self.algorithm == "native":
            self.comm.all_reduce(wire)
        elif self.algorithm == "ring":
            ring_all_reduce(self.comm, wire)
        else:
            self.hierarchy.all_reduce(wire, self.algorithm)
        if wire is not bucket:
            bucket.copy_(wire)

    def __call__(self, grads: Sequence[torch.Tensor]) -> float:
        """Average ``grads`` in place over all ranks; returns the seconds spent (one sync point)."""
        if self.comm.size == 1:
            return 0.0
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        layout = tuple((d, sum(g.numel() for g in gs)) for d, gs in by_dtype.items())
        self._check_layout(layout)
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
            per_bucket = max(1, self.fusion_threshold_bytes // (self.wire_dtype or dtype).itemsize)
            for lo in range(0, flat.numel(), per_bucket):
                self._reduce_bucket(flat[lo:lo + per_bucket])
            if packed:
                off = 0
                for g in same:
                    g.copy_(flat[off:off + g.numel()].view(g.shape))
                    off += g.numel()
        return time.perf_counter() - start
