"""All-reduce algorithms built only from :class:`fastnet.comm.communicator.Communicator` primitives
(grouped point-to-point ``exchange``, and collectives), so they run on every backend.

All take a 1-D contiguous tensor ``x`` (any length, 0 included; any dtype the backend can send)
and reduce it in place with SUM over the communicator's ranks. For an average, divide by the
world size first (no FP16 overflow in the sum). Results are bitwise identical on every rank:
each element's final sum is computed on one rank and then copied to the others.

* :func:`ring_all_reduce` — Patarasuk & Yuan 2009 / Baidu ring: reduce-scatter then all-gather,
  2(n−1) steps, each rank sending 2(n−1)/n of the data. Chunks are as equal as the length allows.
* :func:`hierarchical_all_reduce` — intra-node ring reduce-scatter → inter-node ring all-reduce
  between ranks of equal local rank → intra-node ring all-gather (needs equal ranks per node);
  long messages run as a pipeline of segments (:func:`run_pipelined`), so the intra-node steps of
  one segment overlap the inter-node steps of the previous ones (where the two communicators may
  run at the same time: NCCL's may not, :func:`fastnet.comm.communicator.serial`).
* :func:`leader_all_reduce` — the variant of Jia et al. 2018 (§4.2, "hierarchical all-reduce"):
  intra-node reduce to a leader → all-reduce among the leaders (fastnet's ring, or the backend's
  collective) → intra-node broadcast; with k ranks per node and N ranks, 4(k−1) + 2(N/k − 1) steps
  instead of the flat ring's 2(N−1).
* :func:`collective_hierarchical_all_reduce` — the same three phases as the hierarchical ring, each
  one backend collective on a sub-communicator (reduce-scatter inside the node → all-reduce across
  nodes → all-gather inside the node), the way Horovod's hierarchical all-reduce and Jia et al.'s
  system run on NCCL: O(1) launches per bucket instead of O(k + m) Python steps.

Registry names (:data:`fastnet.comm.sync.ALGORITHMS`): ``hierarchical`` and ``leader`` are the
collective-composed variants, ``hierarchical_p2p`` and ``leader_p2p`` the ring schedules of this
module (``ring`` is always fastnet's point-to-point ring).
"""

from __future__ import annotations

from typing import Any, Generator, NamedTuple, Sequence

import torch

from fastnet.comm import scratch, trace
from fastnet.comm.communicator import Communicator, Work, serial, split_sizes


def _check(x: torch.Tensor) -> None:
    if x.dim() != 1 or not x.is_contiguous():
        raise ValueError(f"all-reduce algorithms take a 1-D contiguous tensor, got shape {tuple(x.shape)}"
                         f"{'' if x.is_contiguous() else ' (non-contiguous)'}: flatten it (a fusion bucket) first")


def _offsets(sizes: Sequence[int]) -> list[int]:
    out, acc = [], 0
    for s in sizes:
        out.append(acc)
        acc += s
    return out


class RingStep(NamedTuple):
    """One ring step on ``comm``: send ``send`` to the right neighbour, receive ``recv`` from the
    left one (empty tensors carry no message; both sides agree on the sizes)."""

    comm: Communicator
    send: torch.Tensor
    recv: torch.Tensor


Steps = Generator[list[RingStep], None, Any]
"""A schedule of message steps: each ``next()`` yields one step's :class:`RingStep` messages
(described, not posted); it is resumed (to finish the step, e.g. add what arrived, and describe the
next) once the driver has posted them and they completed. Its return value is the phase's result.
:func:`run_steps` drives one, :func:`run_pipelined` many."""


def post(messages: Sequence[RingStep]) -> list[Work]:
    """Post ``messages`` with one grouped ``exchange`` per communicator (in order of first
    appearance, the same on every rank), so no unbatched send/recv is ever issued. When the
    communicators must not overlap (:func:`fastnet.comm.communicator.serial`: NCCL), each exchange
    is ordered after the previous communicator's (its ``wait()``: a stream wait on NCCL), so a
    round's exchanges run one communicator after the other, in the same order on every rank."""
    by_comm: dict[int, tuple[Communicator, list, list]] = {}
    for m in messages:
        entry = by_comm.setdefault(id(m.comm), (m.comm, [], []))
        n = m.comm.size
        entry[1].append((m.send, (m.comm.rank + 1) % n))
        entry[2].append((m.recv, (m.comm.rank - 1) % n))
    one_at_a_time = len(by_comm) > 1 and serial(*(entry[0] for entry in by_comm.values()))
    works = []
    for comm, sends, recvs in by_comm.values():
        if one_at_a_time and works:
            works[-1].wait()
        works.append(comm.exchange(sends, recvs))
    return works


def run_steps(steps: Steps) -> Any:
    """Drive ``steps`` to the end, one step at a time; returns the schedule's return value."""
    while True:
        try:
            messages = next(steps)
        except StopIteration as stop:
            return stop.value
        for w in post(messages):
            w.wait()


def _advance(steps: Steps, messages: list[RingStep]) -> bool:
    """Add ``steps``' next step's messages to ``messages``; False once it has ended."""
    try:
        messages.extend(next(steps))
        return True
    except StopIteration:
        return False


def run_pipelined(schedules: Sequence[Steps], depth: int) -> None:
    """Drive ``schedules`` (e.g. one per segment of a message) in lockstep rounds. Each round
    advances every running schedule by one step (a schedule that ends frees its place), starts at
    most one new schedule while fewer than ``depth`` run, then waits for all the round's messages.
    With ``depth`` ≥ the steps per schedule, schedule i takes step j in round i + j: the phases of
    consecutive segments overlap (segment i's inter-node steps while segment i+1 does its
    intra-node ones), as NCCL pipelines the chunks of its rings, and S schedules of s steps take
    S + s − 1 rounds instead of S·s. Every rank runs the same rounds, so messages on each
    communicator are posted in the same order everywhere. Raises ValueError for ``depth < 1``."""
    if depth < 1:
        raise ValueError(f"Invalid pipeline depth: {depth} (must be >= 1)")
    waiting, running = list(reversed(schedules)), []
    while waiting or running:
        messages: list[RingStep] = []
        running = [steps for steps in running if _advance(steps, messages)]  # oldest first, on every rank
        if waiting and len(running) < depth:
            steps = waiting.pop()
            if _advance(steps, messages):
                running.append(steps)
        for w in post(messages):  # one grouped exchange per communicator per round
            w.wait()


def _ring_chunks(r: int, n: int, t: int) -> tuple[int, int]:
    """The (sent, received) chunk of rank ``r`` of ``n`` in ring step ``t``: steps 0..n−2 are the
    reduce-scatter, n−1..2n−3 the all-gather (rank r ends the reduce-scatter owning chunk r+1)."""
    if t < n - 1:
        return (r - t) % n, (r - t - 1) % n
    s = t - (n - 1)
    return (r + 1 - s) % n, (r - s) % n


def ring_reduce_scatter_steps(comm: Communicator, x: torch.Tensor) -> Steps:
    """:func:`ring_reduce_scatter` as a step schedule (n−1 steps; returns ``(offset, length)``)."""
    _check(x)
    n, r = comm.size, comm.rank
    sizes = split_sizes(x.numel(), n)
    offs = _offsets(sizes)
    if n > 1:
        tmp = scratch.take(max(sizes), x.dtype, x.device)
        for s in range(n - 1):
            send_c, recv_c = _ring_chunks(r, n, s)
            buf = tmp[:sizes[recv_c]]
            yield [RingStep(comm, x[offs[send_c]:offs[send_c] + sizes[send_c]], buf)]
            x[offs[recv_c]:offs[recv_c] + sizes[recv_c]].add_(buf)
        scratch.give(tmp)
    own = (r + 1) % n
    return offs[own], sizes[own]


def ring_all_gather_steps(comm: Communicator, x: torch.Tensor) -> Steps:
    """:func:`ring_all_gather` as a step schedule (n−1 steps)."""
    _check(x)
    n, r = comm.size, comm.rank
    sizes = split_sizes(x.numel(), n)
    offs = _offsets(sizes)
    for s in range(n - 1):
        send_c, recv_c = _ring_chunks(r, n, n - 1 + s)
        yield [RingStep(comm, x[offs[send_c]:offs[send_c] + sizes[send_c]],
                        x[offs[recv_c]:offs[recv_c] + sizes[recv_c]])]


def ring_reduce_scatter(comm: Communicator, x: torch.Tensor) -> tuple[int, int]:
    """Ring reduce-scatter in place over ``comm.size`` chunks of ``x``. Afterwards this rank's chunk
    ``(rank + 1) mod size`` holds the full sum; returns its ``(offset, length)``. n−1 steps."""
    return run_steps(ring_reduce_scatter_steps(comm, x))


def ring_all_gather(comm: Communicator, x: torch.Tensor) -> None:
    """Ring all-gather in place: rank r starts owning chunk ``(r + 1) mod size`` (as left by
    :func:`ring_reduce_scatter`) and ends with every chunk. n−1 steps."""
    run_steps(ring_all_gather_steps(comm, x))


_COMBINE = {"sum": torch.add, "max": torch.maximum, "min": torch.minimum}


def ring_reduce_scatter_into(comm: Communicator, output: torch.Tensor, input: torch.Tensor,
                             op: str = "sum") -> None:
    """Reduce-scatter with MPI/NCCL semantics by the ring (Patarasuk & Yuan 2009, the first half
    of the ring all-reduce): ``input`` (1-D, ``size × n`` elements, any dtype) is left unchanged and
    ``output`` (n elements, the same dtype) receives chunk ``rank`` of the reduction over ranks.
    n−1 grouped exchanges, each rank sending (size−1)·n elements. Rank r sends chunk r−s−1 in
    step s (its own input in step 0, then what it accumulated) and receives chunk r−s−2, so its
    last receive completes chunk r. Each chunk is reduced on one rank in a fixed order, so the
    result does not depend on timing. ``op``: ``sum``, ``max`` or ``min`` (divide first for an
    average).

    Raises:
        ValueError: ``input``/``output`` not 1-D contiguous, sizes that do not match, or an unknown
            ``op`` (valid ones listed).
    """
    _check(input)
    _check(output)
    if op not in _COMBINE:
        raise ValueError(f"Unknown reduction op {op!r} for the ring reduce-scatter; valid ops: {', '.join(_COMBINE)}")
    n, r, c = comm.size, comm.rank, output.numel()
    if input.numel() != n * c:
        raise ValueError(f"reduce_scatter: input has {input.numel()} elements, expected size {n} × output {c}")
    if n == 1 or c == 0:
        output.copy_(input)
        return
    chunk = input.view(n, c)
    recv = scratch.take(c, output.dtype, output.device)
    acc = scratch.take(c, output.dtype, output.device) if n > 2 else output
    send = chunk[(r - 1) % n]
    for s in range(n - 1):
        for w in post([RingStep(comm, send, recv)]):
            w.wait()
        last = s == n - 2
        send = _COMBINE[op](chunk[(r - s - 2) % n], recv, out=output if last else acc)
    scratch.give(recv, *([acc] if n > 2 else []))


def ring_all_gather_into(comm: Communicator, output: torch.Tensor, input: torch.Tensor) -> None:
    """All-gather with MPI/NCCL semantics by the ring: ``output`` (1-D, ``size × n`` elements)
    receives every rank's ``input`` (n elements, the same dtype), rank r's at ``[r·n, (r+1)·n)``.
    n−1 grouped exchanges, each rank sending (size−1)·n elements; every rank ends bitwise equal.

    Raises:
        ValueError: ``input``/``output`` not 1-D contiguous or sizes that do not match.
    """
    _check(input)
    _check(output)
    n, r, c = comm.size, comm.rank, input.numel()
    if output.numel() != n * c:
        raise ValueError(f"all_gather: output has {output.numel()} elements, expected size {n} × input {c}")
    chunk = output.view(n, c)
    chunk[r].copy_(input)
    if c == 0:
        return
    for s in range(n - 1):
        for w in post([RingStep(comm, chunk[(r - s) % n], chunk[(r - s - 1) % n])]):
            w.wait()


def ring_all_reduce(comm: Communicator, x: torch.Tensor, segment_elems: int | None = None) -> torch.Tensor:
    """SUM all-reduce of ``x`` in place by the ring algorithm (2(n−1) steps). Returns ``x``.

    ``segment_elems``: when a chunk (``x.numel() / n``) is longer, each step's chunk travels as
    G = ⌈max chunk / segment_elems⌉ segments, each its own grouped exchange, and the ring is
    pipelined per segment (NCCL's ring does the same with its slices): as soon as segment j of
    step t has arrived it is added (reduce-scatter) and sent on as segment j of step t + 1, while
    segments j + 1, … of step t are still on the wire. The addition of one segment overlaps the
    transfer of the next, and step t + 1 starts before step t has ended, instead of each step
    waiting for its whole chunk and then adding it (α: 2(n−1)·G exchanges instead of 2(n−1)).
    Reduce-scatter receives alternate between two chunk-sized buffers. Every rank posts its
    exchanges in the same (step, segment) order, each pairing one send to the right with one
    receive from the left, so the schedule is deadlock-free on every backend (grouped p2p). The
    result is bitwise the same as without segments (the same additions in the same order).
    None or 0: one exchange per step.

    Raises:
        ValueError: ``x`` not 1-D contiguous, or a negative ``segment_elems``.
    """
    _check(x)
    if segment_elems is not None and segment_elems < 0:
        raise ValueError(f"Invalid segment_elems: {segment_elems} (must be >= 0; 0 or None: no pipelining)")
    n = comm.size
    sizes = split_sizes(x.numel(), n)
    if n == 1 or not segment_elems or max(sizes) <= segment_elems:
        with trace.span("reduce-scatter", "phase"):
            ring_reduce_scatter(comm, x)
        with trace.span("all-gather", "phase"):
            ring_all_gather(comm, x)
        return x
    _segmented_ring(comm, x, sizes, -(-max(sizes) // segment_elems))
    return x


def _segmented_ring(comm: Communicator, x: torch.Tensor, sizes: list[int], g: int) -> None:
    """:func:`ring_all_reduce` pipelined in ``g`` segments per chunk (every chunk, whatever its
    length, is cut into the same ``g`` near-equal segments, so sender and receiver agree)."""
    n, r = comm.size, comm.rank
    right, left = (r + 1) % n, (r - 1) % n
    offs = _offsets(sizes)
    seg_sizes = [split_sizes(s, g) for s in sizes]
    seg_offs = [_offsets(s) for s in seg_sizes]
    steps = 2 * (n - 1)
    tmp = [scratch.take(max(sizes), x.dtype, x.device) for _ in range(2)]

    def piece(c: int, j: int) -> tuple[int, int]:  # (offset within the chunk, length)
        return seg_offs[c][j], seg_sizes[c][j]

    def post(t: int, j: int) -> Work:
        sc, rc = _ring_chunks(r, n, t)
        so, sl = piece(sc, j)
        ro, rl = piece(rc, j)
        send = x[offs[sc] + so:offs[sc] + so + sl]
        recv = tmp[t % 2][ro:ro + rl] if t < n - 1 else x[offs[rc] + ro:offs[rc] + ro + rl]
        return comm.exchange([(send, right)], [(recv, left)])

    works = [post(0, j) for j in range(g)]
    for t in range(steps):
        _, rc = _ring_chunks(r, n, t)
        for j in range(g):
            works[j].wait()
            if t < n - 1:
                ro, rl = piece(rc, j)
                x[offs[rc] + ro:offs[rc] + ro + rl].add_(tmp[t % 2][ro:ro + rl])
            if t + 1 < steps:
                works[j] = post(t + 1, j)
    scratch.give(*tmp)


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
    nothing there (:class:`fastnet.comm.topology.Hierarchy` does not segment them). None or 0: one
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


def leader_all_reduce(intra: Communicator, leaders: Communicator | None, x: torch.Tensor,
                      p2p: bool = True) -> torch.Tensor:
    """SUM all-reduce in place, Jia et al. 2018's hierarchical scheme: reduce to the node leader
    (intra rank 0), all-reduce among leaders (``leaders`` is None on non-leaders) — fastnet's ring
    with ``p2p``, else the backend's all-reduce —, broadcast from the leader inside the node. Nodes
    may have different numbers of ranks."""
    _check(x)
    if x.numel() == 0:
        return x
    if intra.size > 1:
        with trace.span("reduce to leader", "phase"):
            intra.reduce(x, dst=0)
    if intra.rank == 0:
        if leaders is None:
            raise ValueError("leader_all_reduce: this rank leads its node but got no leaders communicator")
        if leaders.size > 1:
            with trace.span("leaders all-reduce", "phase"):
                if p2p:
                    ring_all_reduce(leaders, x)
                else:
                    leaders.all_reduce(x)
    if intra.size > 1:
        with trace.span("broadcast from leader", "phase"):
            intra.broadcast(x, src=0)
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
    (:func:`fastnet.comm.communicator.serial`: NCCL's rule), the segments run one collective after
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
