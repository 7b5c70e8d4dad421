"""Bucket reduction, the cross-rank layout check, and list-of-gradients averaging.

* :class:`BucketReducer` averages one fusion bucket: divide by the world size, cast to the wire
  dtype (``fp16``/``bf16``; Jia et al. 2018, §3.1), run ``ring``, ``hierarchical``, ``leader``, the
  backend's ``native`` all-reduce, or ``hybrid`` (per bucket, by the α-β cost model), cast back.
  Both :class:`AlgorithmAllReduce` and :class:`fastnet.comm.GradientSynchronizer` use it.
* :func:`check_layout` compares every rank's (dtype, elements) layout once, so a mismatch raises
  ValueError naming the ranks and their layouts instead of corrupting results or hanging.
* :class:`AlgorithmAllReduce` averages a list of gradients after backward (fusion into persistent
  flat buffers, buckets up to a fusion threshold).
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from fastnet.comm.algorithms import ring_all_reduce
from fastnet.comm.communicator import Communicator
from fastnet.comm.cost_model import CostModel
from fastnet.comm.topology import DEFAULT_SEGMENT_BYTES, Hierarchy

ALGORITHMS = ("native", "ring", "hierarchical", "leader", "hybrid")
_DTYPE_CODES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8]
_MAX_DTYPES = 8
WIRE_DTYPES = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def check_layout(comm: Communicator, layout: Sequence[tuple[torch.dtype, int]], what: str = "gradient") -> None:
    """Collective: compare ``layout`` (a list of (dtype, element count)) across the ranks of ``comm``
    with one small int64 all-gather.

    Raises:
        ValueError: the layouts differ (the message names each differing rank and its layout), or
            more than 8 entries.
    """
    if comm.size == 1:
        return
    if len(layout) > _MAX_DTYPES:
        raise ValueError(f"at most {_MAX_DTYPES} {what} buffers per layout check, got {len(layout)}")
    mine = torch.full((1 + 2 * _MAX_DTYPES,), -1, dtype=torch.int64)
    mine[0] = len(layout)
    for i, (d, n) in enumerate(layout):
        mine[1 + 2 * i], mine[2 + 2 * i] = _DTYPE_CODES.index(d) if d in _DTYPE_CODES else 99, n
    device = getattr(comm, "device", None) or torch.device("cpu")
    gathered = torch.empty(comm.size * mine.numel(), dtype=torch.int64, device=device)
    comm.all_gather(gathered, mine.to(device))
    rows = gathered.cpu().view(comm.size, -1)
    if not bool((rows == rows[0]).all()):
        def show(row: torch.Tensor) -> str:
            return str([(str(_DTYPE_CODES[c]) if c < len(_DTYPE_CODES) else "other", int(n))
                        for c, n in row[1:1 + 2 * int(row[0])].view(-1, 2).tolist()])
        diff = "; ".join(f"rank {r}: {show(rows[r])}" for r in range(comm.size) if not bool((rows[r] == rows[0]).all()))
        raise ValueError(f"{what} layouts differ across ranks (dtype, elements): rank 0: {show(rows[0])}; {diff}. "
                         f"Every rank must all-reduce the same tensors.")


class BucketReducer:
    """Averages one fusion bucket (1-D tensor) in place over ``comm`` with one of :data:`ALGORITHMS`.

    Steps: 1) divide by the world size and, with a wire dtype, cast to it (Jia et al. 2018, §3.1:
    dividing before the sum keeps FP16 from overflowing); 2) run the algorithm — ``ring``,
    ``hierarchical``, ``leader`` (:mod:`fastnet.comm.algorithms`), the backend's ``native``
    all-reduce, or ``hybrid``: the one of those with the smallest time predicted by ``cost_model``
    (:mod:`fastnet.comm.cost_model`) for the bucket's bytes on the wire; 3) cast back into the bucket.

    Construction is collective (the hierarchical algorithms split ``comm``). ``segment_bytes``:
    pipeline segment of ``hierarchical`` (:class:`fastnet.comm.topology.Hierarchy`; 0: none).

    Raises:
        ValueError: unknown algorithm or wire dtype (valid ones listed), ``hierarchical`` with
            unequal nodes, or a negative ``segment_bytes``.
    """

    __slots__ = ("comm", "algorithm", "wire_dtype", "hierarchy", "ranks_per_node", "cost_model", "segment_bytes")

    def __init__(self, comm: Communicator, algorithm: str = "ring", wire_dtype: str = "none",
                 ranks_per_node: int | None = None, cost_model: CostModel | None = None,
                 segment_bytes: int = DEFAULT_SEGMENT_BYTES) -> None:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"Unknown all-reduce algorithm {algorithm!r}; valid algorithms: {', '.join(ALGORITHMS)}")
        if wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"Unknown wire dtype {wire_dtype!r}; valid wire dtypes: {', '.join(WIRE_DTYPES)}")
        if segment_bytes < 0:
            raise ValueError(f"Invalid segment_bytes: {segment_bytes} (must be >= 0; 0: no pipelining)")
        self.comm, self.algorithm, self.wire_dtype = comm, algorithm, WIRE_DTYPES[wire_dtype]
        self.segment_bytes = segment_bytes
        self.ranks_per_node = ranks_per_node or comm.size
        self.cost_model = cost_model or CostModel()
        self.hierarchy = None
        if algorithm in ("hierarchical", "leader", "hybrid") and comm.size > 1:
            self.hierarchy = Hierarchy(comm, self.ranks_per_node, segment_bytes)
            if algorithm == "hierarchical" and not self.hierarchy.topology.uniform:
                raise ValueError(f"hierarchical all-reduce needs equal ranks per node: world size {comm.size}, "
                                 f"ranks_per_node {ranks_per_node}; use 'leader' or 'hybrid'")

    def algorithm_for(self, nbytes: int) -> str:
        """The algorithm used for a bucket of ``nbytes`` bytes on the wire (resolves ``hybrid``)."""
        if self.algorithm != "hybrid":
            return self.algorithm
        return self.cost_model.choose(nbytes, self.comm.size, self.ranks_per_node, segment_bytes=self.segment_bytes)

    def __call__(self, bucket: torch.Tensor, algorithm: str | None = None) -> None:
        """Average the 1-D ``bucket`` in place (any floating dtype); ``algorithm`` overrides the choice."""
        n = self.comm.size
        if n == 1 or bucket.numel() == 0:
            return
        wire = bucket if self.wire_dtype in (None, bucket.dtype) else None
        if wire is None:
            wire = bucket.div(n).to(self.wire_dtype)  # divide before the sum, then narrow
        else:
            wire.div_(n)
        self.sum_(wire, algorithm)
        if wire is not bucket:
            bucket.copy_(wire)

    def sum_(self, x: torch.Tensor, algorithm: str | None = None) -> None:
        """SUM all-reduce of the 1-D ``x`` in place with this reducer's algorithm (``hybrid``
        resolved for ``x``'s bytes) or ``algorithm``; no division, no wire cast."""
        if self.comm.size == 1:
            return
        alg = algorithm or self.algorithm_for(x.numel() * x.element_size())
        if alg == "native":
            self.comm.all_reduce(x)
        elif alg == "ring":
            ring_all_reduce(self.comm, x)
        else:
            self.hierarchy.all_reduce(x, alg)


class AlgorithmAllReduce:
    """Averages a list of gradients in place over ``comm`` (the trainer's ``GradientSync`` seam for
    code that all-reduces after backward; :class:`fastnet.comm.GradientSynchronizer` overlaps it
    with backward instead).

    Args:
        comm: the data-parallel communicator (its ``split`` builds the hierarchy when needed).
        algorithm: one of :data:`ALGORITHMS` (``hybrid``: per bucket, by ``cost_model``).
        fusion_threshold_bytes: bucket size on the wire, bytes (> 0).
        wire_dtype: ``none`` (the gradients' own dtype) | ``fp16`` | ``bf16``.
        ranks_per_node: node size for the hierarchical algorithms (default: all ranks one node).
        cost_model: link parameters for ``hybrid`` (default :class:`CostModel`'s placeholders).
        segment_bytes: pipeline segment of ``hierarchical``, bytes (0: no pipelining).

    Raises:
        ValueError: unknown algorithm or wire dtype (valid ones listed), a non-positive threshold,
            ``hierarchical`` with unequal nodes, a negative ``segment_bytes``, or gradient layouts
            that differ across ranks.
    """

    __slots__ = ("comm", "fusion_threshold_bytes", "reducer", "_buffers", "_checked")

    def __init__(self, comm: Communicator, algorithm: str = "ring", fusion_threshold_bytes: int = 64 << 20,
                 wire_dtype: str = "none", ranks_per_node: int | None = None,
                 cost_model: CostModel | None = None, segment_bytes: int = DEFAULT_SEGMENT_BYTES) -> None:
        if fusion_threshold_bytes <= 0:
            raise ValueError(f"Invalid fusion threshold: {fusion_threshold_bytes} bytes (must be > 0)")
        self.reducer = BucketReducer(comm, algorithm, wire_dtype, ranks_per_node, cost_model, segment_bytes)
        self.comm, self.fusion_threshold_bytes = comm, fusion_threshold_bytes
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._checked: set[tuple] = set()

    @property
    def algorithm(self) -> str:
        return self.reducer.algorithm

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
