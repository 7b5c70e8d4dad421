""":class:`BucketReducer` averages one fusion bucket: divide by the world size, cast to the wire
dtype (``fp16``/``bf16``; Jia et al. 2018, §3.1), run ``ring``, ``hierarchical(_p2p)``,
``leader(_p2p)``, the backend's ``native`` all-reduce, or ``hybrid`` (per bucket, by the α-β cost
model or the online chooser), cast back. :data:`ALGORITHMS` and :data:`WIRE_DTYPES` are the valid
names. :class:`~fastnet.comm.gradients.allreduce.AlgorithmAllReduce`,
:class:`~fastnet.comm.gradients.synchronizer.GradientSynchronizer`, the DDP hook and the backend
all reduce through it.
"""

from __future__ import annotations

import math

import torch

from fastnet.comm import scratch, trace
from fastnet.comm.algorithms import ring_all_reduce
from fastnet.comm.communicators.base import Communicator, serial
from fastnet.comm.planning.autotune import OnlineChooser
from fastnet.comm.planning.cost_model import RUNNABLE, CostModel
from fastnet.comm.planning.hierarchy import DEFAULT_SEGMENT_BYTES, Hierarchy
from fastnet.comm.planning.topology import Topology

ALGORITHMS = (*RUNNABLE, "hybrid")  # hybrid chooses among the runnable ones, per bucket
WIRE_DTYPES = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}


class BucketReducer:
    """Averages one fusion bucket (1-D tensor) in place over ``comm`` with one of :data:`ALGORITHMS`.

    Steps: 1) divide by ``predivide_factor`` f (default: the world size n) and, with a wire dtype,
    cast to it (Jia et al. 2018, §3.1: dividing before the sum keeps FP16 from overflowing); 2) run
    the algorithm — ``ring``, ``hierarchical``, ``hierarchical_p2p``, ``leader``, ``leader_p2p``
    (:mod:`fastnet.comm.algorithms`), the backend's ``native`` all-reduce, or ``hybrid``: the one of those with the smallest time
    predicted by ``cost_model`` (:mod:`fastnet.comm.planning.cost_model`) for the bucket's bytes on the wire;
    3) cast back into the bucket and divide by n / f (nothing when f = n). A smaller f keeps more
    precision in FP16 for small gradients at the risk of overflow in the sum (Apex DDP's
    ``gradient_predivide_factor``, Horovod's ``prescale_factor``/``postscale_factor``).

    Construction is collective (the hierarchical algorithms split ``comm``). Nodes come from the
    hosts unless ``ranks_per_node`` gives blocks of consecutive ranks
    (:class:`fastnet.comm.planning.hierarchy.Hierarchy`; ``host_id`` overrides this rank's host identity).
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
        # hybrid without a cost-model file: chosen online on the real buckets (fastnet.comm.planning.autotune)
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
        ``hybrid`` is chosen online (:mod:`fastnet.comm.planning.autotune`): ``"hybrid"`` until the size's
        class is decided, then the agreed algorithm; ``modelled``: the cost model's prediction
        instead. On communicators whose operations run one after the other (NCCL,
        :func:`fastnet.comm.communicators.base.serial`) the two levels cannot overlap, so the
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
        """Close the hierarchy's communicators (:meth:`fastnet.comm.planning.hierarchy.Hierarchy.close`); not
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
