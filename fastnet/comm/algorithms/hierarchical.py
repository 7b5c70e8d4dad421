"""The hierarchical all-reduce: intra-node ring reduce-scatter → inter-node ring all-reduce between
ranks of equal local rank → intra-node ring all-gather (needs equal ranks per node), pipelined in
segments (:func:`hierarchical_all_reduce`); and the same three phases as one backend collective
each on the sub-communicators (:func:`collective_hierarchical_all_reduce`), the way Horovod's
hierarchical all-reduce and Jia et al. 2018's system (§4.2) run on NCCL.
"""

from __future__ import annotations

import torch

from fastnet.comm import scratch, trace
from fastnet.comm.algorithms.ring import ring_all_gather_steps, ring_reduce_scatter_steps
from fastnet.comm.algorithms.steps import Steps, run_pipelined, run_steps
from fastnet.comm.communicators.base import Communicator, serial
from fastnet.comm.communicators.p2p import _check


def hierarchical_steps(intra: Communicator, inter: Communicator, x: torch.Tensor) -> Steps:
    """One segment of :func:`hierarchical_all_reduce` as a step schedule: 2(k−1) intra-node and
    2(m−1) inter-node steps. The step count does not depend on ``x``'s length (an empty chunk still
    takes its steps, with no messages), so every rank runs the same rounds in a pipeline."""
    with trace.span("intra reduce-scatter", "phase", True, bytes=x.numel() * x.element_size()):
        off, length = yield from ring_reduce_scatter_steps(intra, x)
    if inter.size > 1:
        owned = x[off:off + length]
        with trace.span("inter reduce-scatter", "phase", True, bytes=owned.numel() * owned.element_size()):
            yield from ring_reduce_scatter_steps(inter, owned)
        with trace.span("inter all-gather", "phase", True):
            yield from ring_all_gather_steps(inter, owned)
    with trace.span("intra all-gather", "phase", True):
        yield from ring_all_gather_steps(intra, x)


def hierarchical_all_reduce(intra: Communicator, inter: Communicator, x: torch.Tensor,
                            segment_elems: int | None = None) -> torch.Tensor:
    """SUM all-reduce in place: ring reduce-scatter inside the node, ring all-reduce of the owned
    chunk across nodes (``inter`` joins the ranks of equal local rank), ring all-gather inside the
    node. Every node must have the same number of ranks (the chunk a rank owns depends on its local
    rank). Steps: 2(k−1) intra + 2(m−1) inter (m = nodes), with 1/k of the data crossing nodes per
    rank.

    ``segment_elems``: when ``x`` is longer, it is cut into segments of that many elements, run as
    a pipeline (:func:`run_pipelined`, depth = steps per segment): the intra-node phases of one
    segment overlap the inter-node ring of the previous ones, so the slower level (the network)
    sets the time instead of the sum of both. On communicators that must not overlap (NCCL's,
    :func:`post`) each round's exchanges run one communicator after the other, so segments gain
    nothing there (:class:`fastnet.comm.planning.hierarchy.Hierarchy` does not segment them). None or 0: one
    segment.

    Raises:
        ValueError: ``x`` not 1-D contiguous, or a negative ``segment_elems``.
    """
    _check(x)
    if segment_elems is not None and segment_elems < 0:
        raise ValueError(f"Invalid segment_elems: {segment_elems} (must be >= 0; 0 or None: no pipelining)")
    if not segment_elems or x.numel() <= segment_elems:
        run_steps(hierarchical_steps(intra, inter, x))
        return x
    depth = max(1, 2 * (intra.size - 1) + 2 * (inter.size - 1))  # steps per segment
    run_pipelined([hierarchical_steps(intra, inter, x[lo:lo + segment_elems])
                   for lo in range(0, x.numel(), segment_elems)], depth)
    return x


def _collective_segment(intra: Communicator, inter: Communicator, x: torch.Tensor) -> tuple:
    """Reduce-scatter ``x`` inside the node and start the inter-node all-reduce of the owned chunk
    (asynchronous); returns what :func:`_finish_segment` needs."""
    k, n = intra.size, x.numel()
    chunk = -(-n // k)
    buf = x if chunk * k == n else scratch.take(chunk * k, x.dtype, x.device)
    if buf is not x:
        buf[:n].copy_(x)
        buf[n:].zero_()
    own = scratch.take(chunk, x.dtype, x.device)
    if k > 1:
        with trace.span("intra reduce-scatter", "phase", bytes=buf.numel() * buf.element_size()):
            intra.reduce_scatter(own, buf)
    else:
        own.copy_(buf)
    work = None
    if inter.size > 1:
        tracer = trace.current()
        issued = tracer.now_us() if tracer is not None else 0.0
        work = inter.all_reduce(own, async_op=True)
        work = _Traced(work, issued, own.numel() * own.element_size()) if tracer is not None else work
        if serial(intra, inter):  # NCCL: the next segment's intra-node phase must not overlap it
            work.wait()
    return x, buf, own, work


class _Traced:
    """An asynchronous inter-node all-reduce whose wait records ``inter all-reduce`` from its issue
    to its completion (as seen by the waiting thread)."""

    def __init__(self, work, issued_us: float, nbytes: int) -> None:
        self.work, self.issued_us, self.nbytes, self.recorded = work, issued_us, nbytes, False

    def wait(self) -> None:
        self.work.wait()
        tracer = trace.current()
        if tracer is not None and not self.recorded:
            self.recorded = True
            tracer.interval("inter all-reduce", "phase", self.issued_us, tracer.now_us(), bytes=self.nbytes)


def _finish_segment(intra: Communicator, segment: tuple) -> None:
    x, buf, own, work = segment
    if work is not None:
        work.wait()
    if intra.size > 1:
        with trace.span("intra all-gather", "phase"):
            intra.all_gather(buf, own)
    else:
        buf.copy_(own)
    if buf is not x:
        x.copy_(buf[:x.numel()])
        scratch.give(buf)
    scratch.give(own)


def collective_hierarchical_all_reduce(intra: Communicator, inter: Communicator, x: torch.Tensor,
                                       segment_elems: int | None = None) -> torch.Tensor:
    """SUM all-reduce in place from three backend collectives: reduce-scatter of ``x`` inside the
    node (the rank with local rank j owns chunk j), all-reduce of the owned chunk across nodes
    (``inter`` joins the ranks of equal local rank), all-gather inside the node. Every node must
    have the same number of ranks k. A length that k does not divide is padded with zeros to the
    next multiple (one copy). Bitwise identical on every rank: each chunk is reduced on one rank
    per node, all-reduced by the backend (identical results on its ranks) and copied.

    ``segment_elems``: a longer ``x`` runs in segments of that many elements as a two-stage
    pipeline: segment i's inter-node all-reduce is asynchronous and overlaps segment i+1's
    intra-node reduce-scatter (two communicators, so two streams on NCCL), then segment i's
    all-gather follows. Every rank issues the same collectives in the same order on each
    communicator. When the communicators must not overlap
    (:func:`fastnet.comm.communicators.base.serial`: NCCL's rule), the segments run one collective after
    the other. None or 0: one segment.

    Raises:
        ValueError: ``x`` not 1-D contiguous, or a negative ``segment_elems``.
    """
    _check(x)
    if segment_elems is not None and segment_elems < 0:
        raise ValueError(f"Invalid segment_elems: {segment_elems} (must be >= 0; 0 or None: no pipelining)")
    if x.numel() == 0:
        return x
    step = segment_elems if segment_elems and x.numel() > segment_elems else x.numel()
    pending = None
    for lo in range(0, x.numel(), step):
        segment = _collective_segment(intra, inter, x[lo:lo + step])
        if pending is not None:
            _finish_segment(intra, pending)
        pending = segment
    _finish_segment(intra, pending)
    return x
