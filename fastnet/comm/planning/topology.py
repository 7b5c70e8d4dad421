"""Node topology: which ranks share a node, from the hosts or from a fixed ranks-per-node.

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

from fastnet.comm.communicators.base import Communicator

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
