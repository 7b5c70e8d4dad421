"""Bucket reduction, the cross-rank layout check, and list-of-gradients averaging.

* :class:`BucketReducer` averages one fusion bucket: divide by the world size, cast to the wire
  dtype (``fp16``/``bf16``; Jia et al. 2018, §3.1), run ``ring``, ``hierarchical(_p2p)``, ``leader(_p2p)``, the
  backend's ``native`` all-reduce, or ``hybrid`` (per bucket, by the α-β cost model), cast back.
  Both :class:`AlgorithmAllReduce` and :class:`fastnet.comm.GradientSynchronizer` use it.
* :func:`check_layout` compares every rank's (dtype, elements) layout once, so a mismatch raises
  ValueError naming the ranks and their layouts instead of corrupting results or hanging.
* :class:`AlgorithmAllReduce` averages a list of gradients after backward (fusion into persistent
  flat buffers, buckets up to a fusion threshold).
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import Sequence

import torch

from fastnet.comm import scratch, trace
from fastnet.comm.algorithms import ring_all_reduce
from fastnet.comm.communicator import Communicator, serial
from fastnet.comm.autotune import OnlineChooser
from fastnet.comm.cost_model import RUNNABLE, CostModel
from fastnet.comm.topology import DEFAULT_SEGMENT_BYTES, Hierarchy, Topology

ALGORITHMS = ("native", "ring", "hierarchical", "hierarchical_p2p", "leader", "leader_p2p", "hybrid")
WIRE_DTYPES = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def _item_hash(name: str, value: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{name}\0{value}".encode()).digest()[:8], "little", signed=True)


def _gather(comm: Communicator, mine: torch.Tensor) -> torch.Tensor:
    """All-gather a 1-D tensor of equal length on every rank; returns (size, length) on the CPU."""
    device = getattr(comm, "device", None) or torch.device("cpu")
    out = torch.empty(comm.size * mine.numel(), dtype=mine.dtype, device=device)
    comm.all_gather(out, mine.to(device))
    return out.cpu().view(comm.size, -1)


def check_consistency(comm: Communicator, items: Sequence[tuple[str, str]], what: str, advice: str = "") -> None:
    """Collective: check that every rank of ``comm`` holds the same ``items`` — ``(name, value)``
    text pairs such as ``("parameter 3", "(64, 3, 7, 7) float16")`` — and raise naming the first
    item that differs, with each differing rank's value, instead of hanging or corrupting results
    later (DDP's parameter-shape verification does the same at construction).

    Steps: 1) all-gather each rank's item count (one int64); 2) all-gather one 64-bit SHA-256 digest
    per item (padded to the largest count); 3) only on a difference, all-gather the first differing
    item's text (512 bytes per rank). Every rank sees the same gathered tables, so every rank takes
    the same branch and raises the same error: no rank is left waiting. Put count items (e.g.
    "number of parameters") first so that a structural difference is reported as such.

    Raises:
        ValueError: the items differ (message: ``"{what}: ranks disagree on {item}: rank 0: ...;
            rank r: ... {advice}"``).
    """
    if comm.size == 1:
        return
    counts = _gather(comm, torch.tensor([len(items)], dtype=torch.int64)).view(-1)
    width = int(counts.max())
    mine = torch.full((max(width, 1),), -1, dtype=torch.int64)
    for i, (name, value) in enumerate(items):
        mine[i] = _item_hash(name, value)
    rows = _gather(comm, mine)
    differs = (rows != rows[0]).any(dim=0).nonzero()
    if differs.numel() == 0:
        return
    k = int(differs[0])
    text = (f"{items[k][0]} = {items[k][1]}" if k < len(items) else "(no such item)").encode()[:512]
    buf = torch.zeros(512, dtype=torch.uint8)
    if text:
        buf[:len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    texts = [bytes(r.tolist()).rstrip(b"\0").decode(errors="replace") for r in _gather(comm, buf)]
    shown = [0] + [r for r in range(comm.size) if r != 0 and rows[r, k] != rows[0, k]]
    name = items[k][0] if k < len(items) else texts[0].split(" = ")[0]
    raise ValueError(f"{what}: ranks disagree on {name}: "
                     + "; ".join(f"rank {r}: {texts[r].removeprefix(name + ' = ')}" for r in shown)
                     + (f". {advice}" if advice else ""))


def check_layout(comm: Communicator, layout: Sequence[tuple[torch.dtype, int]], what: str = "gradient") -> None:
    """Collective: compare ``layout`` (a list of (dtype, element count)) across the ranks of ``comm``
    (:func:`check_consistency`).

    Raises:
        ValueError: the layouts differ; the message says "{what} layouts differ across ranks" and
            names each differing rank and its entry.
    """
    items = [("number of buffers", str(len(layout)))]
    items += [(f"buffer {i}", f"{str(d).removeprefix('torch.')} x {n}") for i, (d, n) in enumerate(layout)]
    check_consistency(comm, items, f"{what} layouts differ across ranks",
                      "Every rank must all-reduce the same tensors.")


class BucketReducer:
    """Averages one fusion bucket (1-D tensor) in place over ``comm`` with one of :data:`ALGORITHMS`.

    Steps: 1) divide by ``predivide_factor`` f (default: the world size n) and, with a wire dtype,
    cast to it (Jia et al. 2018, §3.1: dividing before the sum keeps FP16 from overflowing); 2) run
    the algorithm — ``ring``, ``hierarchical``, ``hierarchical_p2p``, ``leader``, ``leader_p2p``
    (:mod:`fastnet.comm.algorithms`), the backend's ``native`` all-reduce, or ``hybrid``: the one of those with the smallest time
    predicted by ``cost_model`` (:mod:`fastnet.comm.cost_model`) for the bucket's bytes on the wire;
    3) cast back into the bucket and divide by n / f (nothing when f = n). A smaller f keeps more
    precision in FP16 for small gradients at the risk of overflow in the sum (Apex DDP's
    ``gradient_predivide_factor``, Horovod's ``prescale_factor``/``postscale_factor``).

    Construction is collective (the hierarchical algorithms split ``comm``). Nodes come from the
    hosts unless ``ranks_per_node`` gives blocks of consecutive ranks
    (:class:`fastnet.comm.topology.Hierarchy`; ``host_id`` overrides this rank's host identity).
    ``segment_bytes``: pipeline segment of ``ring`` and ``hierarchical``, bytes (0: none).

    Raises:
        ValueError: unknown algorithm or wire dtype (valid ones listed), ``hierarchical`` with
            unequal nodes (the ranks per host listed), a negative ``segment_bytes``, or a
            ``predivide_factor`` that is not finite and > 0.
    """

    __slots__ = ("comm", "algorithm", "wire_dtype", "hierarchy", "topology", "cost_model", "segment_bytes",
                 "predivide_factor", "tuner")

    def __init__(self, comm: Communicator, algorithm: str = "ring", wire_dtype: str = "none",
                 ranks_per_node: int | None = None, cost_model: CostModel | None = None,
                 segment_bytes: int = DEFAULT_SEGMENT_BYTES, predivide_factor: float | None = None,
                 host_id: str | None = None) -> None:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"Unknown all-reduce algorithm {algorithm!r}; valid algorithms: {', '.join(ALGORITHMS)}")
        if wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"Unknown wire dtype {wire_dtype!r}; valid wire dtypes: {', '.join(WIRE_DTYPES)}")
        if segment_bytes < 0:
            raise ValueError(f"Invalid segment_bytes: {segment_bytes} (must be >= 0; 0: no pipelining)")
        if predivide_factor is not None and not (math.isfinite(predivide_factor) and predivide_factor > 0):
            raise ValueError(f"Invalid predivide_factor: {predivide_factor} (must be finite and > 0; "
                             f"None divides by the world size before the sum)")
        self.comm, self.algorithm, self.wire_dtype = comm, algorithm, WIRE_DTYPES[wire_dtype]
        self.segment_bytes = segment_bytes
        self.predivide_factor = float(predivide_factor) if predivide_factor is not None else float(comm.size)
        self.cost_model = cost_model or CostModel()
        self.hierarchy = None
        if algorithm not in ("native", "ring") and comm.size > 1:
            self.hierarchy = Hierarchy(comm, ranks_per_node, segment_bytes, host_id)
            self.topology = self.hierarchy.topology
            if algorithm.startswith("hierarchical") and not self.topology.uniform:
                raise ValueError(f"hierarchical all-reduce needs equal ranks per node; ranks per host: "
                                 f"{self.topology.describe()}: use 'leader' or 'hybrid'")
        else:
            self.topology = Topology.of(comm.rank, comm.size, ranks_per_node or comm.size)
        # hybrid without a cost-model file: chosen online on the real buckets (fastnet.comm.autotune)
        self.tuner = OnlineChooser(comm, self._candidates()) \
            if algorithm == "hybrid" and cost_model is None and comm.size > 1 else None

    @property
    def ranks_per_node(self) -> int:
        """The largest node's size (the cost model's node size)."""
        return self.topology.ranks_per_node

    def _candidates(self) -> tuple[str, ...]:
        return RUNNABLE if self.topology.uniform else tuple(a for a in RUNNABLE if not a.startswith("hierarchical"))

    def algorithm_for(self, nbytes: int, modelled: bool = False) -> str:
        """The algorithm used for a bucket of ``nbytes`` bytes on the wire (resolves ``hybrid``;
        ``hierarchical`` is not a candidate when nodes are unequal). Without a cost-model file
        ``hybrid`` is chosen online (:mod:`fastnet.comm.autotune`): ``"hybrid"`` until the size's
        class is decided, then the agreed algorithm; ``modelled``: the cost model's prediction
        instead. On communicators whose operations run one after the other (NCCL,
        :func:`fastnet.comm.communicator.serial`) the two levels cannot overlap, so the
        hierarchical variants run, and are predicted, unsegmented."""
        if self.algorithm != "hybrid":
            return self.algorithm
        if self.tuner is not None and not modelled:
            return self.tuner.choice(nbytes) or "hybrid"
        return self.cost_model.choose(nbytes, self.comm.size, self.ranks_per_node, candidates=self._candidates(),
                                      segment_bytes=self.segment_bytes, pipelined_levels=not serial(self.comm))

    def describe(self) -> list[tuple[str, str]]:
        """``(name, value)`` items that must agree across ranks (:func:`check_consistency`): the
        algorithm, wire dtype, pre-division, pipeline segment, nodes and cost model."""
        return [("algorithm", self.algorithm), ("wire dtype", str(self.wire_dtype)),
                ("predivide factor", repr(self.predivide_factor)), ("segment bytes", str(self.segment_bytes)),
                ("nodes", self.topology.describe() if self.hierarchy else "not used"),
                ("cost model", "not used" if self.algorithm != "hybrid" else "online (no file)" if self.tuner
                 else repr(sorted(self.cost_model.to_dict().items())))]

    def __call__(self, bucket: torch.Tensor, algorithm: str | None = None) -> None:
        """Average the 1-D ``bucket`` in place (any floating dtype); ``algorithm`` overrides the choice.

        One wire rule for SUM (:meth:`sum_wire_`) and AVG, at every world size: the values are
        rounded to the wire dtype even with one rank (as torch's ``fp16_compress_hook``), so a
        result never depends on whether a peer was there to send to."""
        n = self.comm.size
        if bucket.numel() == 0:
            return
        if n == 1:
            if self.wire_dtype not in (None, bucket.dtype):
                bucket.copy_(bucket.to(self.wire_dtype))
            return
        pre = self.predivide_factor
        bucket.div_(pre)  # divide before the sum (in place: the bucket is overwritten by the result anyway)
        self.sum_wire_(bucket, algorithm)
        if pre != n:
            bucket.div_(n / pre)

    def sum_wire_(self, bucket: torch.Tensor, algorithm: str | None = None) -> None:
        """SUM all-reduce of the 1-D ``bucket`` in place, sent in the wire dtype: narrowed into a
        reused buffer (:mod:`fastnet.comm.scratch`: a fresh tensor of tens of MB is a fresh mmap
        whose page faults cost more than the cast itself — measured: 50 ms to narrow 25.6 M floats
        into a new tensor, 7 ms into a reused one; CUDA: a new tensor from the caching allocator),
        summed, widened back. No division."""
        if self.wire_dtype in (None, bucket.dtype):
            self.sum_(bucket, algorithm)
            return
        wire = scratch.take(bucket.numel(), self.wire_dtype, bucket.device)
        with trace.span("cast to wire", "phase", dtype=str(self.wire_dtype)):
            wire.copy_(bucket)
        self.sum_(wire, algorithm)
        with trace.span("cast back", "phase"):
            bucket.copy_(wire)
        scratch.give(wire)

    def close(self) -> None:
        """Close the hierarchy's communicators (:meth:`fastnet.comm.topology.Hierarchy.close`); not
        ``comm``, which the caller owns."""
        if self.hierarchy is not None:
            self.hierarchy.close()

    def sum_(self, x: torch.Tensor, algorithm: str | None = None) -> None:
        """SUM all-reduce of the 1-D ``x`` in place with this reducer's algorithm (``hybrid``
        resolved for ``x``'s bytes) or ``algorithm``; no division, no wire cast."""
        if self.comm.size == 1:
            return
        nbytes = x.numel() * x.element_size()
        if algorithm in (None, "hybrid") and self.tuner is not None:
            self.tuner.run(nbytes, lambda alg: self._sum_with(x, alg), x.device)
            return
        self._sum_with(x, algorithm if algorithm not in (None, "hybrid") else self.algorithm_for(nbytes))

    def _sum_with(self, x: torch.Tensor, alg: str) -> None:
        with trace.span(alg, "algorithm", bytes=x.numel() * x.element_size()):
            self._run(x, alg)

    def _run(self, x: torch.Tensor, alg: str) -> None:
        if alg == "native":
            self.comm.all_reduce(x)
        elif alg == "ring":
            ring_all_reduce(self.comm, x, self.segment_bytes // x.element_size() if self.segment_bytes else 0)
        else:
            self.hierarchy.all_reduce(x, alg)


class AlgorithmAllReduce:
    """Averages a list of gradients in place over ``comm`` (the trainer's ``GradientSync`` seam for
    code that all-reduces after backward; :class:`fastnet.comm.GradientSynchronizer` overlaps it
    with backward instead).

    Args:
        comm: the data-parallel communicator (its ``split`` builds the hierarchy when needed).
        algorithm: one of :data:`ALGORITHMS` (``hybrid``: per bucket, by ``cost_model``, or
            without one chosen online, :mod:`fastnet.comm.autotune`).
        fusion_threshold_bytes: bucket size on the wire, bytes (> 0).
        wire_dtype: ``none`` (the gradients' own dtype) | ``fp16`` | ``bf16``.
        ranks_per_node: emulated node size for the hierarchical algorithms (default: nodes from
            the hosts, :class:`fastnet.comm.topology.Hierarchy`).
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
