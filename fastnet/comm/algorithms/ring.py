"""The ring all-reduce (Patarasuk & Yuan 2009; Baidu's ring allreduce): reduce-scatter then
all-gather, 2(n−1) steps, each rank sending 2(n−1)/n of the data; chunks as equal as the length
allows (:func:`split_sizes`). The reduce-scatter and all-gather schedules are also the phases of
the hierarchical algorithms (:mod:`fastnet.comm.algorithms.hierarchical`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from fastnet.comm import scratch, trace
from fastnet.comm.algorithms.steps import Steps, run_steps
from fastnet.comm.communicators.base import Communicator, Work
from fastnet.comm.communicators.p2p import RingStep, _check


def split_sizes(length: int, parts: int) -> Sequence[int]:
    """``length`` elements in ``parts`` chunks as equal as possible, the larger ones first."""
    base, extra = divmod(length, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _offsets(sizes: Sequence[int]) -> list[int]:
    out, acc = [], 0
    for s in sizes:
        out.append(acc)
        acc += s
    return out


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
