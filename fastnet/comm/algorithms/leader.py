"""The leader all-reduce of Jia et al. 2018 (§4.2, "hierarchical all-reduce"): intra-node reduce
to a leader → all-reduce among the leaders (fastnet's ring, or the backend's collective) →
intra-node broadcast; with k ranks per node and N ranks, 4(k−1) + 2(N/k − 1) steps instead of the
flat ring's 2(N−1).
"""

from __future__ import annotations

import torch

from fastnet.comm import trace
from fastnet.comm.algorithms.ring import ring_all_reduce
from fastnet.comm.communicators.base import Communicator
from fastnet.comm.communicators.p2p import _check


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
