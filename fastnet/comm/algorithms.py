"""All-reduce algorithms built only from :class:`fastnet.comm.communicator.Communicator` primitives
(send/recv, reduce, broadcast), so they run on every backend.

All take a 1-D contiguous tensor ``x`` (any length, 0 included; any dtype the backend can send)
and reduce it in place with SUM over the communicator's ranks. For an average, divide by the
world size first (no FP16 overflow in the sum). Results are bitwise identical on every rank:
each element's final sum is computed on one rank and then copied to the others.

* :func:`ring_all_reduce` — Patarasuk & Yuan 2009 / Baidu ring: reduce-scatter then all-gather,
  2(n−1) steps, each rank sending 2(n−1)/n of the data. Chunks are as equal as the length allows.
* :func:`hierarchical_all_reduce` — intra-node ring reduce-scatter → inter-node ring all-reduce
  between ranks of equal local rank → intra-node ring all-gather (needs equal ranks per node).
* :func:`leader_all_reduce` — the variant of Jia et al. 2018 (§4.2, "hierarchical all-reduce"):
  intra-node reduce to a leader → ring all-reduce among the leaders → intra-node broadcast; with k
  ranks per node and N ranks, 4(k−1) + 2(N/k − 1) steps instead of the flat ring's 2(N−1).
"""

from __future__ import annotations

from typing import Sequence

import torch

from fastnet.comm.communicator import Communicator, split_sizes


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


def _exchange(comm: Communicator, send: torch.Tensor, recv: torch.Tensor) -> None:
    """Send ``send`` to the right neighbour while receiving ``recv`` from the left one (empty
    tensors are skipped on both sides, which agree on the sizes)."""
    right, left = (comm.rank + 1) % comm.size, (comm.rank - 1) % comm.size
    works = []
    if recv.numel():
        works.append(comm.irecv(recv, left))
    if send.numel():
        works.append(comm.isend(send, right))
    for w in works:
        w.wait()


def ring_reduce_scatter(comm: Communicator, x: torch.Tensor) -> tuple[int, int]:
    """Ring reduce-scatter in place over ``comm.size`` chunks of ``x``. Afterwards this rank's chunk
    ``(rank + 1) mod size`` holds the full sum; returns its ``(offset, length)``. n−1 steps."""
    _check(x)
    n, r = comm.size, comm.rank
    sizes = split_sizes(x.numel(), n)
    offs = _offsets(sizes)
    if n > 1:
        tmp = torch.empty(max(sizes), dtype=x.dtype, device=x.device)
        for s in range(n - 1):
            send_c, recv_c = (r - s) % n, (r - s - 1) % n
            buf = tmp[:sizes[recv_c]]
            _exchange(comm, x[offs[send_c]:offs[send_c] + sizes[send_c]], buf)
            x[offs[recv_c]:offs[recv_c] + sizes[recv_c]].add_(buf)
    own = (r + 1) % n
    return offs[own], sizes[own]


def ring_all_gather(comm: Communicator, x: torch.Tensor) -> None:
    """Ring all-gather in place: rank r starts owning chunk ``(r + 1) mod size`` (as left by
    :func:`ring_reduce_scatter`) and ends with every chunk. n−1 steps."""
    _check(x)
    n, r = comm.size, comm.rank
    sizes = split_sizes(x.numel(), n)
    offs = _offsets(sizes)
    for s in range(n - 1):
        send_c, recv_c = (r + 1 - s) % n, (r - s) % n
        _exchange(comm, x[offs[send_c]:offs[send_c] + sizes[send_c]],
                  x[offs[recv_c]:offs[recv_c] + sizes[recv_c]])


def ring_all_reduce(comm: Communicator, x: torch.Tensor) -> torch.Tensor:
    """SUM all-reduce of ``x`` in place by the ring algorithm (2(n−1) steps). Returns ``x``."""
    ring_reduce_scatter(comm, x)
    ring_all_gather(comm, x)
    return x


def hierarchical_all_reduce(intra: Communicator, inter: Communicator, x: torch.Tensor) -> torch.Tensor:
    """SUM all-reduce in place: ring reduce-scatter inside the node, ring all-reduce of the owned
    chunk across nodes (``inter`` joins the ranks of equal local rank), ring all-gather inside the
    node. Every node must have the same number of ranks (the chunk a rank owns depends on its local
    rank). Steps: 2(k−1) intra + 2(N/k − 1) inter, with 1/k of the data crossing nodes per rank."""
    off, length = ring_reduce_scatter(intra, x)
    if inter.size > 1 and length:
        ring_all_reduce(inter, x[off:off + length])
    ring_all_gather(intra, x)
    return x


def leader_all_reduce(intra: Communicator, leaders: Communicator | None, x: torch.Tensor) -> torch.Tensor:
    """SUM all-reduce in place, Jia et al. 2018's hierarchical scheme: reduce to the node leader
    (intra rank 0), ring all-reduce among leaders (``leaders`` is None on non-leaders), broadcast
    from the leader inside the node. Nodes may have different numbers of ranks."""
    _check(x)
    if x.numel() == 0:
        return x
    if intra.size > 1:
        intra.reduce(x, dst=0)
    if intra.rank == 0:
        if leaders is None:
            raise ValueError("leader_all_reduce: this rank leads its node but got no leaders communicator")
        if leaders.size > 1:
            ring_all_reduce(leaders, x)
    if intra.size > 1:
        intra.broadcast(x, src=0)
    return x
