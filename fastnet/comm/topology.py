"""Node topology and the sub-communicators the hierarchical algorithms need.

Ranks are grouped into nodes of ``ranks_per_node`` consecutive ranks (torchrun's layout: node =
rank // LOCAL_WORLD_SIZE); the last node may be smaller. Passing a ``ranks_per_node`` smaller than
the real one emulates several nodes on one machine.
"""

from __future__ import annotations

import dataclasses

import torch

from fastnet.comm.algorithms import hierarchical_all_reduce, leader_all_reduce, ring_all_reduce
from fastnet.comm.communicator import Communicator


@dataclasses.dataclass(frozen=True)
class Topology:
    """Where ``rank`` of ``size`` sits: ``node`` of ``num_nodes``, ``local_rank`` of ``local_size``."""

    rank: int
    size: int
    ranks_per_node: int
    node: int
    local_rank: int
    local_size: int
    num_nodes: int

    @classmethod
    def of(cls, rank: int, size: int, ranks_per_node: int) -> "Topology":
        """Raises ValueError unless ``1 <= ranks_per_node`` and ``0 <= rank < size``."""
        if ranks_per_node < 1:
            raise ValueError(f"Invalid ranks_per_node: {ranks_per_node} (must be >= 1)")
        if not 0 <= rank < size:
            raise ValueError(f"Invalid rank {rank} for size {size}")
        node, local_rank = divmod(rank, ranks_per_node)
        num_nodes = -(-size // ranks_per_node)
        local_size = min(ranks_per_node, size - node * ranks_per_node)
        return cls(rank, size, ranks_per_node, node, local_rank, local_size, num_nodes)

    @property
    def uniform(self) -> bool:
        """Every node has ``ranks_per_node`` ranks."""
        return self.size % self.ranks_per_node == 0


DEFAULT_SEGMENT_BYTES = 4 << 20
"""Pipeline segment of the hierarchical all-reduce, bytes: large enough that a step's latency is
small against its transfer (4 MiB is 34 ms at 1 Gbit/s), small enough that filling and draining
the pipeline (steps − 1 segments) costs little on a 25 MiB fusion bucket."""


class Hierarchy:
    """Intra-node, inter-node (equal local rank) and leaders communicators of ``comm``.

    Built collectively (every rank of ``comm`` must call it with the same ``ranks_per_node``).
    ``leaders`` is None on ranks that do not lead their node. ``segment_bytes``: the hierarchical
    all-reduce pipelines messages longer than this in segments of this size (0: no pipelining).

    Raises:
        ValueError: invalid ``ranks_per_node`` or negative ``segment_bytes``.
    """

    def __init__(self, comm: Communicator, ranks_per_node: int, segment_bytes: int = DEFAULT_SEGMENT_BYTES) -> None:
        if segment_bytes < 0:
            raise ValueError(f"Invalid segment_bytes: {segment_bytes} (must be >= 0; 0: no pipelining)")
        self.topology = Topology.of(comm.rank, comm.size, ranks_per_node)
        t = self.topology
        self.comm, self.segment_bytes = comm, segment_bytes
        self.intra = comm.split(t.node, t.local_rank)
        self.inter = comm.split(t.local_rank, t.node)
        self.leaders = comm.split(0 if t.local_rank == 0 else None, t.node)

    def all_reduce(self, x: torch.Tensor, algorithm: str = "hierarchical") -> torch.Tensor:
        """SUM all-reduce of the 1-D ``x`` in place with ``hierarchical`` (reduce-scatter /
        all-reduce / all-gather, pipelined in segments of ``segment_bytes``), ``leader`` (Jia et
        al.'s reduce / ring / broadcast) or ``ring``.

        Raises:
            ValueError: an unknown algorithm (valid ones listed), or ``hierarchical`` with nodes of
                unequal size (use ``leader``).
        """
        if algorithm == "ring":
            return ring_all_reduce(self.comm, x)
        if algorithm == "leader":
            return leader_all_reduce(self.intra, self.leaders, x)
        if algorithm == "hierarchical":
            if not self.topology.uniform:
                raise ValueError(f"hierarchical all-reduce needs equal ranks per node; world size "
                                 f"{self.topology.size} is not a multiple of ranks_per_node "
                                 f"{self.topology.ranks_per_node}: use algorithm 'leader'")
            return hierarchical_all_reduce(self.intra, self.inter, x, 
                                           max(1, self.segment_bytes // x.element_size()) if self.segment_bytes else 0)
        raise ValueError(f"Unknown all-reduce algorithm {algorithm!r}; valid algorithms: hierarchical, leader, ring")
