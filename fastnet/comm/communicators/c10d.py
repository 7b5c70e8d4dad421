"""The :class:`~fastnet.comm.communicators.base.Communicator` protocol over a c10d ``Backend``
object (the fastnet backend's base gloo group, used without a ProcessGroup wrapper):
:class:`C10dCommunicator`, with ``split`` by store prefixes.
"""

from __future__ import annotations

import datetime
from typing import Sequence

import torch
import torch.distributed as dist

from fastnet.comm.communicators.base import WorkList, check_op
from fastnet.comm.communicators.p2p import ring_all_gather_into, ring_reduce_scatter_into

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


class _C10dWork:
    """A :class:`fastnet.comm.communicators.base.Work` over a c10d ``Work``."""

    __slots__ = ("work",)

    def __init__(self, work) -> None:
        self.work = work

    def wait(self) -> None:
        self.work.wait()

    def is_completed(self) -> bool:
        return self.work.is_completed()


class C10dCommunicator:
    """:class:`fastnet.comm.communicators.base.Communicator` over a raw c10d backend object (a
    ``ProcessGroupGloo`` built from a store, not registered with torch.distributed), so fastnet's
    algorithms can run inside a backend. ``split`` builds new gloo backends from the same store.
    Point-to-point: gloo's ``send``/``recv`` are non-blocking and need no grouping, so
    :meth:`exchange` posts them one by one (every rank in the same order).

    Raises ValueError for an unknown op or mismatched sizes.
    """

    def __init__(self, backend, rank: int, size: int, store, timeout: datetime.timedelta, name: str = "") -> None:
        self.backend, self.rank, self.size = backend, rank, size
        self.store, self.timeout, self.name = store, timeout, name
        self.device = None
        self._splits = 0
        self._tag = 0

    def __repr__(self) -> str:
        return f"C10dCommunicator(rank={self.rank}, size={self.size}, {self.name or 'world'})"

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", async_op: bool = False):
        check_op(op)
        if op == "avg":
            tensor.div_(self.size)
            op = "sum"
        opts = dist.AllreduceOptions()
        opts.reduceOp = _OPS[op]
        work = self.backend.allreduce([tensor], opts)
        if async_op:
            return _C10dWork(work)
        work.wait()
        return None

    def reduce_scatter(self, output: torch.Tensor, input: torch.Tensor, op: str = "sum") -> None:
        check_op(op, input.dtype)
        if op == "avg":
            input, op = input / self.size, "sum"
        ring_reduce_scatter_into(self, output.view(-1), input.reshape(-1).contiguous(), op)

    def all_gather(self, output: torch.Tensor, input: torch.Tensor) -> None:
        ring_all_gather_into(self, output.view(-1), input.reshape(-1).contiguous())

    def reduce(self, tensor: torch.Tensor, dst: int, op: str = "sum") -> None:
        check_op(op)
        if op == "avg":
            tensor.div_(self.size)
            op = "sum"
        opts = dist.ReduceOptions()
        opts.rootRank, opts.reduceOp = dst, _OPS[op]
        self.backend.reduce([tensor], opts).wait()

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        self.backend.broadcast([tensor], opts).wait()

    def isend(self, tensor: torch.Tensor, dst: int):
        return _C10dWork(self.backend.send([tensor], dst, 0))

    def irecv(self, tensor: torch.Tensor, src: int):
        return _C10dWork(self.backend.recv([tensor], src, 0))

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self.isend(tensor, dst).wait()

    def recv(self, tensor: torch.Tensor, src: int) -> None:
        self.irecv(tensor, src).wait()

    def exchange(self, sends: Sequence[tuple[torch.Tensor, int]], recvs: Sequence[tuple[torch.Tensor, int]]):
        works = [self.irecv(t, src) for t, src in recvs if t.numel()]
        works += [self.isend(t, dst) for t, dst in sends if t.numel()]
        return WorkList(works)

    def barrier(self) -> None:
        self.backend.barrier(dist.BarrierOptions()).wait()

    def split(self, color: int | None, key: int = 0) -> "C10dCommunicator | None":
        """Collective: ranks with the same ``color`` get a new gloo backend, ordered by ``key``
        (ties by rank); ``color=None`` joins none and gets None."""
        mine = torch.tensor([-1 if color is None else color, key, self.rank], dtype=torch.int64)
        table = torch.empty(3 * self.size, dtype=torch.int64)
        self.all_gather(table, mine)
        rows = table.view(self.size, 3).tolist()
        self._splits += 1
        if color is None:
            return None
        members = sorted((k, r) for c, k, r in rows if c == color)
        new_rank = [r for _, r in members].index(self.rank)
        name = f"{self.name}/split{self._splits}/color{color}"
        store = dist.PrefixStore(name, self.store)
        backend = dist.ProcessGroupGloo(store, new_rank, len(members), self.timeout)
        return C10dCommunicator(backend, new_rank, len(members), self.store, self.timeout, name)
