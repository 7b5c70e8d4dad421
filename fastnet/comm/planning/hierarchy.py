"""The sub-communicators a hierarchical all-reduce needs (intra-node, inter-node, leaders), split
once from a :class:`~fastnet.comm.planning.topology.Topology`, and the pipeline segment size:
:class:`Hierarchy` runs ``hierarchical(_p2p)`` and ``leader(_p2p)`` (:mod:`fastnet.comm.algorithms`)
over them.
"""

from __future__ import annotations

import torch

from fastnet.comm.algorithms import (
    collective_hierarchical_all_reduce,
    hierarchical_all_reduce,
    leader_all_reduce,
    ring_all_reduce,
)
from fastnet.comm.communicators.base import Communicator, serial
from fastnet.comm.planning.topology import Topology, gather_hosts

DEFAULT_SEGMENT_BYTES = 4 << 20
"""Pipeline segment of the hierarchical all-reduce, bytes: large enough that a step's latency is
small against its transfer (4 MiB is 34 ms at 1 Gbit/s), small enough that filling and draining
the pipeline (steps − 1 segments) costs little on a 25 MiB fusion bucket."""


def pipeline_segment_bytes(algorithm: str, segment_bytes: int, *comms: Communicator | None) -> int:
    """The pipeline segment (bytes) ``algorithm`` runs with over ``comms``: ``segment_bytes``, but
    none for the hierarchical variants where the two levels cannot overlap (NCCL's communicators,
    :func:`fastnet.comm.communicators.base.serial`): there the segments would only add launches."""
    return 0 if algorithm.startswith("hierarchical") and serial(*comms) else segment_bytes


class Hierarchy:
    """Intra-node, inter-node (equal local rank) and leaders communicators of ``comm``.

    Built collectively (every rank of ``comm`` must call it with the same ``ranks_per_node``).
    ``ranks_per_node=None`` takes the nodes from the hosts (:func:`gather_hosts`, ``host_id``
    overriding this rank's identity); an int emulates nodes of that many consecutive ranks.
    ``leaders`` is None on ranks that do not lead their node. ``segment_bytes``: the hierarchical
    all-reduce pipelines messages longer than this in segments of this size (0: no pipelining;
    never on communicators whose levels cannot overlap, NCCL's: :func:`fastnet.comm.communicators.base.serial`).

    Raises:
        ValueError: invalid ``ranks_per_node`` or negative ``segment_bytes``.
    """

    def __init__(self, comm: Communicator, ranks_per_node: int | None = None,
                 segment_bytes: int = DEFAULT_SEGMENT_BYTES, host_id: str | None = None) -> None:
        if segment_bytes < 0:
            raise ValueError(f"Invalid segment_bytes: {segment_bytes} (must be >= 0; 0: no pipelining)")
        if ranks_per_node is None:
            self.topology = Topology.from_hosts(comm.rank, gather_hosts(comm, host_id))
        else:
            self.topology = Topology.of(comm.rank, comm.size, ranks_per_node)
        t = self.topology
        self.comm, self.segment_bytes = comm, segment_bytes
        self.intra = comm.split(t.node, t.local_rank)
        self.inter = comm.split(t.local_rank, t.node)
        # The leaders (local rank 0 of each node, in node order) are exactly the inter-node group of
        # local rank 0: shared rather than split again (one NCCL communicator fewer per leader).
        self.leaders = self.inter if t.local_rank == 0 else None

    def communicators(self) -> list["Communicator"]:
        """This rank's communicators of the hierarchy, each once, in the same order on every rank:
        intra-node, inter-node (which is also the leaders' on a node's local rank 0). So with
        ``--communicator nccl`` and a hierarchical or leader algorithm a rank holds 4 NCCL
        communicators: the trainer's, the synchronizer's own split of it, intra and inter."""
        return [c for c in (self.intra, self.inter) if c is not None]

    def close(self) -> None:
        """Close :meth:`communicators` (intra, then inter; the same order on every rank)."""
        for c in self.communicators():
            c.close()

    ALGORITHMS = ("hierarchical", "hierarchical_p2p", "leader", "leader_p2p", "ring")

    def all_reduce(self, x: torch.Tensor, algorithm: str = "hierarchical") -> torch.Tensor:
        """SUM all-reduce of the 1-D ``x`` in place with ``hierarchical`` (reduce-scatter /
        all-reduce / all-gather, one backend collective each, segments of ``segment_bytes`` in a
        two-stage pipeline), ``hierarchical_p2p`` (the same phases as fastnet's ring schedules,
        pipelined in segments of ``segment_bytes``), ``leader`` (Jia et
        al.'s reduce / all-reduce among leaders / broadcast, backend collectives), ``leader_p2p``
        (the leaders' all-reduce by fastnet's ring) or ``ring``.

        Raises:
            ValueError: an unknown algorithm (valid ones listed), or a ``hierarchical`` variant with
                nodes of unequal size (the message lists the ranks per host; use ``leader``).
        """
        if algorithm not in self.ALGORITHMS:
            raise ValueError(f"Unknown all-reduce algorithm {algorithm!r}; valid algorithms: "
                             f"{', '.join(self.ALGORITHMS)}")
        if algorithm == "ring":
            return ring_all_reduce(self.comm, x)
        if algorithm.startswith("leader"):
            return leader_all_reduce(self.intra, self.leaders, x, p2p=algorithm == "leader_p2p")
        if not self.topology.uniform:
            raise ValueError(f"hierarchical all-reduce needs equal ranks per node; ranks per host: "
                             f"{self.topology.describe()}: use algorithm 'leader' or 'hybrid'")
        segment_bytes = pipeline_segment_bytes(algorithm, self.segment_bytes, self.intra, self.inter)
        segment = max(1, segment_bytes // x.element_size()) if segment_bytes else 0
        if algorithm == "hierarchical":
            return collective_hierarchical_all_reduce(self.intra, self.inter, x, segment)
        return hierarchical_all_reduce(self.intra, self.inter, x, segment)
