"""The :class:`~fastnet.comm.communicators.base.Communicator` protocol over a torch.distributed
process group (gloo on CPU, nccl on CUDA): :class:`TorchCommunicator`.
"""

from __future__ import annotations

import datetime
import inspect
from typing import Sequence

import torch
import torch.distributed as dist

from fastnet.comm.communicators.base import Work, WorkList, check_op, check_reduce_scatter
from fastnet.comm.communicators.p2p import ring_all_gather_into, ring_reduce_scatter_into

_TORCH_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_NEW_GROUP_SORTS_ONLY = "sort_ranks" not in inspect.signature(dist.new_group).parameters


class TorchCommunicator:
    """:class:`Communicator` over a torch.distributed process group (default: the world group).

    Ranks passed to methods are ranks in this group. ``reduce_scatter`` and ``all_gather`` use
    NCCL's tensor collectives on nccl and fastnet's ring (:func:`fastnet.comm.communicators.p2p.ring_reduce_scatter_into`,
    :func:`~fastnet.comm.communicators.p2p.ring_all_gather_into`) on gloo, whose own are several times slower
    (measured in issue 19's profile); point-to-point traffic of the algorithms goes through
    :meth:`exchange`. ``timeout_s`` bounds the groups :meth:`split` creates (their connection set-up
    included; torch's default for a new group is 30 minutes, whatever the world group's), and is
    inherited by them. Raises ValueError for an unknown op or mismatched sizes.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, timeout_s: float | None = None) -> None:
        self.timeout_s = timeout_s
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call fastnet.distributed.setup() or "
                               "torch.distributed.init_process_group() first")
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.size = dist.get_world_size(self.group)
        self._global = dist.get_process_group_ranks(self.group)
        self.backend = dist.get_backend(self.group)
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else None
        # NCCL's rule for several communicators (Communicator): only CPU-only backends may overlap
        # ("nccl", and mixed "cpu:gloo,cuda:nccl" or "undefined" groups, may put CUDA tensors on NCCL)
        self.concurrent_safe = self.backend in ("gloo", "mpi")

    def __repr__(self) -> str:
        return f"TorchCommunicator(rank={self.rank}, size={self.size}, backend={self.backend})"

    def global_rank(self, rank: int) -> int:
        return self._global[rank]

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", async_op: bool = False) -> Work | None:
        check_op(op)
        if op == "avg":
            tensor.div_(self.size)  # before the sum: no overflow in FP16
            op = "sum"
        return dist.all_reduce(tensor, op=_TORCH_OPS[op], group=self.group, async_op=async_op)

    def reduce_scatter(self, output: torch.Tensor, input: torch.Tensor, op: str = "sum") -> None:
        check_op(op, input.dtype)
        check_reduce_scatter(self.size, output, input)
        if op == "avg":
            input = input / self.size
            op = "sum"
        if self.backend == "nccl":
            _REDUCE_SCATTER(output, input, op=_TORCH_OPS[op], group=self.group)
            return
        # gloo: fastnet's ring. gloo's reduce_scatter_tensor took 137 ms for 33.5 MB of FP16 between
        # two ranks over loopback where the ring takes 23 ms (issue 19's profile, docs/BENCHMARKS.md)
        out = output.view(-1) if output.is_contiguous() else torch.empty(output.numel(), dtype=output.dtype)
        ring_reduce_scatter_into(self, out, input.reshape(-1).contiguous(), op)
        if out.data_ptr() != output.data_ptr():
            output.copy_(out.view(output.shape))

    def all_gather(self, output: torch.Tensor, input: torch.Tensor) -> None:
        if output.numel() != input.numel() * self.size:
            raise ValueError(f"all_gather: output has {output.numel()} elements, expected size {self.size} × "
                             f"input {input.numel()}")
        if self.backend == "nccl":
            dist.all_gather_into_tensor(output, input, group=self.group)
            return
        # gloo: fastnet's ring (gloo's list all_gather: 71 ms for 33.5 MB between two ranks over
        # loopback, the ring about a fifth of that; issue 19's profile)
        out = output.view(-1) if output.is_contiguous() else torch.empty(output.numel(), dtype=output.dtype)
        ring_all_gather_into(self, out, input.reshape(-1).contiguous())
        if out.data_ptr() != output.data_ptr():
            output.copy_(out.view(output.shape))

    def reduce(self, tensor: torch.Tensor, dst: int, op: str = "sum") -> None:
        check_op(op)
        if op == "avg":
            tensor.div_(self.size)
            op = "sum"
        dist.reduce(tensor, dst=self._global[dst], op=_TORCH_OPS[op], group=self.group)

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        dist.broadcast(tensor, src=self._global[src], group=self.group)

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        dist.send(tensor, dst=self._global[dst], group=self.group)

    def recv(self, tensor: torch.Tensor, src: int) -> None:
        dist.recv(tensor, src=self._global[src], group=self.group)

    def isend(self, tensor: torch.Tensor, dst: int) -> Work:
        return dist.isend(tensor, dst=self._global[dst], group=self.group)

    def irecv(self, tensor: torch.Tensor, src: int) -> Work:
        return dist.irecv(tensor, src=self._global[src], group=self.group)

    def exchange(self, sends: Sequence[tuple[torch.Tensor, int]],
                 recvs: Sequence[tuple[torch.Tensor, int]]) -> WorkList:
        """One ``torch.distributed.batch_isend_irecv`` of the non-empty sends and receives (NCCL:
        one coalesced group; gloo: the same ops, issued together)."""
        ops = [dist.P2POp(dist.isend, t, self._global[peer], self.group) for t, peer in sends if t.numel()]
        ops += [dist.P2POp(dist.irecv, t, self._global[peer], self.group) for t, peer in recvs if t.numel()]
        return WorkList(dist.batch_isend_irecv(ops) if ops else [])

    def close(self) -> None:
        """Nothing: torch.distributed destroys its groups in ``destroy_process_group``."""

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def split(self, color: int | None, key: int = 0) -> "TorchCommunicator | None":
        if self.size != dist.get_world_size():
            raise RuntimeError("TorchCommunicator.split works on the world communicator only (torch.distributed "
                               "needs every process to create every group); split the world with a color "
                               "that combines both levels instead")
        entries: list[tuple[int | None, int, int] | None] = [None] * self.size
        dist.all_gather_object(entries, (color, key, self.rank), group=self.group)
        colors = sorted({e[0] for e in entries if e is not None and e[0] is not None})
        mine = None
        # Every process creates every new group, in the same (sorted) order: torch names groups by a
        # per-process counter, which must advance alike everywhere.
        for c in colors:
            members = sorted((e for e in entries if e is not None and e[0] == c), key=lambda e: (e[1], e[2]))
            ranks = [self._global[e[2]] for e in members]
            if _NEW_GROUP_SORTS_ONLY and ranks != sorted(ranks):
                raise RuntimeError(f"this torch ({torch.__version__}) orders new groups by rank only; "
                                   f"split keys giving the order {ranks} need torch with new_group(sort_ranks=)")
            timeout = {"timeout": datetime.timedelta(seconds=self.timeout_s)} if self.timeout_s else {}
            group = dist.new_group(ranks, **timeout, **({} if _NEW_GROUP_SORTS_ONLY else {"sort_ranks": False}))
            if c == color:
                mine = TorchCommunicator(group, self.timeout_s)
        return mine
