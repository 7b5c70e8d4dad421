"""Node topology and the sub-communicators the hierarchical algorithms need.

Node membership comes from the hosts (Horovod's local/cross communicators; MPI's
``MPI_COMM_TYPE_SHARED``): every rank contributes its host identity (default
:func:`socket.gethostname`) to one all-gather, ranks on the same host form a node, nodes are
numbered in order of their lowest rank and ranks inside a node by global rank. Any placement
works (``mpiexec --map-by node``, a scheduler's rank order), not only torchrun's contiguous one.
``ranks_per_node=k`` overrides the hosts with blocks of ``k`` consecutive ranks (node = rank // k;
the last node may be smaller), which emulates several nodes on one machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import socket

import torch

from fastnet.comm.algorithms import (collective_hierarchical_all_reduce, hierarchical_all_reduce, leader_all_reduce,
                                    ring_all_reduce)
from fastnet.comm.communicator import Communicator, serial

_HOST_BYTES = 128  # per rank in the host all-gather: 8 bytes of SHA-256 of the identity, then its first 120 bytes


@dataclasses.dataclass(frozen=True)
class Topology:
    """Where ``rank`` of ``size`` sits: ``node`` of ``num_nodes``, ``local_rank`` of ``local_size``.

    ``nodes`` lists each node's global ranks (ascending); ``hosts`` names each node (its host
    identity, or ``block i`` for the ``ranks_per_node`` override); ``ranks_per_node`` is the
    largest node's size.
    """

    rank: int
    size: int
    nodes: tuple[tuple[int, ...], ...]
    hosts: tuple[str, ...]

    @classmethod
    def of(cls, rank: int, size: int, ranks_per_node: int) -> "Topology":
        """Blocks of ``ranks_per_node`` consecutive ranks. Raises ValueError unless
        ``1 <= ranks_per_node`` and ``0 <= rank < size``."""
        if ranks_per_node < 1:
            raise ValueError(f"Invalid ranks_per_node: {ranks_per_node} (must be >= 1)")
        if not 0 <= rank < size:
            raise ValueError(f"Invalid rank {rank} for size {size}")
        nodes = tuple(tuple(range(lo, min(lo + ranks_per_node, size))) for lo in range(0, size, ranks_per_node))
        return cls(rank, size, nodes, tuple(f"block {i}" for i in range(len(nodes))))

    @classmethod
    def from_hosts(cls, rank: int, hosts: list[str]) -> "Topology":
        """Ranks with equal ``hosts[r]`` form a node. Raises ValueError for a rank out of range."""
        if not 0 <= rank < len(hosts):
            raise ValueError(f"Invalid rank {rank} for size {len(hosts)}")
        members: dict[str, list[int]] = {}
        for r, h in enumerate(hosts):
            members.setdefault(h, []).append(r)
        return cls(rank, len(hosts), tuple(tuple(m) for m in members.values()), tuple(members))

    @property
    def node(self) -> int:
        return next(i for i, m in enumerate(self.nodes) if self.rank in m)

    @property
    def local_rank(self) -> int:
        return self.nodes[self.node].index(self.rank)

    @property
    def local_size(self) -> int:
        return len(self.nodes[self.node])

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    @property
    def ranks_per_node(self) -> int:
        return max(len(m) for m in self.nodes)

    @property
    def uniform(self) -> bool:
        """Every node has the same number of ranks."""
        return len({len(m) for m in self.nodes}) == 1

    def describe(self) -> str:
        """``host: ranks [..]`` per node, e.g. for error messages."""
        return "; ".join(f"{h}: ranks {list(m)}" for h, m in zip(self.hosts, self.nodes))


def gather_hosts(comm: Communicator, host_id: str | None = None) -> list[str]:
    """Collective: every rank's host identity (``host_id``, default :func:`socket.gethostname`),
    indexed by rank, with one uint8 all-gather of 128 bytes per rank. Identities are compared by
    SHA-256 and shown by their first 120 bytes."""
    name = (host_id if host_id is not None else socket.gethostname()).encode()
    mine = torch.zeros(_HOST_BYTES, dtype=torch.uint8)
    mine[:8] = torch.frombuffer(bytearray(hashlib.sha256(name).digest()[:8]), dtype=torch.uint8)
    shown = name[:_HOST_BYTES - 8]
    mine[8:8 + len(shown)] = torch.frombuffer(bytearray(shown), dtype=torch.uint8) if shown else mine[8:8]
    if comm.size == 1:
        return [name.decode(errors="replace")]
    device = getattr(comm, "device", None) or torch.device("cpu")
    out = torch.empty(comm.size * _HOST_BYTES, dtype=torch.uint8, device=device)
    comm.all_gather(out, mine.to(device))
    rows = out.cpu().view(comm.size, _HOST_BYTES)
    labels, names = {}, []
    for row in rows:
        key = bytes(row[:8].tolist())
        label = bytes(row[8:].tolist()).rstrip(b"\0").decode(errors="replace")
        if key not in labels:  # two identities sharing their first 120 bytes are told apart by the hash
            labels[key] = label if label not in labels.values() else f"{label}#{key.hex()}"
        names.append(labels[key])
    return names


DEFAULT_SEGMENT_BYTES = 4 << 20
"""Pipeline segment of the hierarchical all-reduce, bytes: large enough that a step's latency is
small against its transfer (4 MiB is 34 ms at 1 Gbit/s), small enough that filling and draining
the pipeline (steps − 1 segments) costs little on a 25 MiB fusion bucket."""


def pipeline_segment_bytes(algorithm: str, segment_bytes: int, *comms: Communicator | None) -> int:
    """The pipeline segment (bytes) ``algorithm`` runs with over ``comms``: ``segment_bytes``, but
    none for the hierarchical variants where the two levels cannot overlap (NCCL's communicators,
    :func:`fastnet.comm.communicator.serial`): there the segments would only add launches."""
    return 0 if algorithm.startswith("hierarchical") and serial(*comms) else segment_bytes


class Hierarchy:
    """Intra-node, inter-node (equal local rank) and leaders communicators of ``comm``.

    Built collectively (every rank of ``comm`` must call it with the same ``ranks_per_node``).
    ``ranks_per_node=None`` takes the nodes from the hosts (:func:`gather_hosts`, ``host_id``
    overriding this rank's identity); an int emulates nodes of that many consecutive ranks.
    ``leaders`` is None on ranks that do not lead their node. ``segment_bytes``: the hierarchical
    all-reduce pipelines messages longer than this in segments of this size (0: no pipelining;
    never on communicators whose levels cannot overlap, NCCL's: :func:`fastnet.comm.communicator.serial`).

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
