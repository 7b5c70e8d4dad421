"""Reduce-scatter and all-gather with MPI/NCCL semantics by the ring, built on one primitive of
the protocol: the grouped point-to-point ``exchange`` (:meth:`Communicator.exchange`).

:class:`RingStep` describes one ring step's messages and :func:`post` issues them, one grouped
exchange per communicator; :func:`ring_reduce_scatter_into` and :func:`ring_all_gather_into`
(Patarasuk & Yuan 2009: the two halves of the ring all-reduce) are what the communicators without
a fast native collective (gloo, the backend's base group) use for ``reduce_scatter`` and
``all_gather``. The all-reduce schedules of :mod:`fastnet.comm.algorithms` post through
:func:`post` as well.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from fastnet.comm import scratch
from fastnet.comm.communicators.base import Communicator, Work, serial


def _check(x: torch.Tensor) -> None:
    if x.dim() != 1 or not x.is_contiguous():
        raise ValueError(f"all-reduce algorithms take a 1-D contiguous tensor, got shape {tuple(x.shape)}"
                         f"{'' if x.is_contiguous() else ' (non-contiguous)'}: flatten it (a fusion bucket) first")


class RingStep(NamedTuple):
    """One ring step on ``comm``: send ``send`` to the right neighbour, receive ``recv`` from the
    left one (empty tensors carry no message; both sides agree on the sizes)."""

    comm: Communicator
    send: torch.Tensor
    recv: torch.Tensor


def post(messages: Sequence[RingStep]) -> list[Work]:
    """Post ``messages`` with one grouped ``exchange`` per communicator (in order of first
    appearance, the same on every rank), so no unbatched send/recv is ever issued. When the
    communicators must not overlap (:func:`fastnet.comm.communicators.base.serial`: NCCL), each exchange
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
