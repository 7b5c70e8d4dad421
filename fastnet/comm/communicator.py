"""The communicator protocol and its torch.distributed backend.

fastnet's algorithms (:mod:`fastnet.comm.algorithms`) are written against :class:`Communicator`
only, so they run on every backend that implements it. Tensors are contiguous; ``all_reduce``,
``reduce``, ``broadcast`` and ``recv`` work in place. Methods with ``async_op=True`` return a
:class:`Work` handle (``wait()``, ``is_completed()``); otherwise they return None when done.

Backends: :class:`TorchCommunicator` (a torch.distributed process group: gloo on CPU, nccl on
CUDA). The CuPy-NCCL and mpi4py backends of the comm issue implement the same protocol.
"""

from __future__ import annotations

import datetime
import inspect
from typing import Protocol, Sequence

import torch
import torch.distributed as dist

OPS = ("sum", "avg", "max", "min")
_TORCH_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


class Work(Protocol):
    def wait(self) -> object: ...

    def is_completed(self) -> bool: ...


class Communicator(Protocol):
    """A group of ``size`` processes; this one is ``rank`` (0-based, in the group).

    ``concurrent_safe`` (optional, default True): False when this communicator's operations must
    not run at the same time as another communicator's in this process. NCCL's rule ("Using
    multiple NCCL communicators concurrently", NCCL user guide): NCCL kernels spin until their
    peers' data arrives, so two communicators' kernels running at once on one GPU "might work"
    only while both fit on it; operations on different communicators must be serialized and issued
    in the same order on every rank. fastnet's algorithms that drive two communicators at once
    (the pipelined hierarchical all-reduces) then order each operation after the previous one
    (:func:`serial`); on NCCL that is a stream wait, not a host wait.
    """

    rank: int
    size: int

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", async_op: bool = False) -> Work | None: ...

    def reduce_scatter(self, output: torch.Tensor, input: torch.Tensor, op: str = "sum") -> None:
        """``output`` (n elements) = the reduction over ranks of ``input[rank*n:(rank+1)*n]`` (``input``: size×n)."""

    def all_gather(self, output: torch.Tensor, input: torch.Tensor) -> None:
        """``output[r*n:(r+1)*n]`` = rank ``r``'s ``input`` (n elements) for every r."""

    def reduce(self, tensor: torch.Tensor, dst: int, op: str = "sum") -> None: ...

    def broadcast(self, tensor: torch.Tensor, src: int) -> None: ...

    def send(self, tensor: torch.Tensor, dst: int) -> None: ...

    def recv(self, tensor: torch.Tensor, src: int) -> None: ...

    def isend(self, tensor: torch.Tensor, dst: int) -> Work: ...

    def irecv(self, tensor: torch.Tensor, src: int) -> Work: ...

    def exchange(self, sends: Sequence[tuple[torch.Tensor, int]],
                 recvs: Sequence[tuple[torch.Tensor, int]]) -> Work:
        """Grouped point-to-point: post every ``(tensor, dst)`` send and ``(tensor, src)`` receive
        as one group and return one handle for all of them. Paired sends and receives inside one
        group cannot deadlock whatever order the ranks post them in (NCCL's rule: point-to-point
        pairs inside one ``ncclGroupStart``/``ncclGroupEnd``; torch's ``batch_isend_irecv``; MPI's
        ``Isend``/``Irecv`` + ``Waitall``). Empty tensors are skipped (both sides must agree on
        sizes). fastnet's algorithms use only this for point-to-point traffic."""

    def barrier(self) -> None: ...

    def close(self) -> None:
        """Release the communicator (NCCL: ``ncclCommDestroy``; torch.distributed and MPI groups:
        nothing, their library frees them at shutdown). Every rank closes its communicators in the
        same order (the owners' ``close`` methods do), so a destroy that waits on peers cannot stall."""

    def split(self, color: int | None, key: int = 0) -> "Communicator | None":
        """Collective over this group: ranks passing the same ``color`` form a new communicator,
        ordered by ``key`` (ties by rank); ``color=None`` joins none and gets None (MPI_Comm_split).
        TorchCommunicator splits the world communicator only (RuntimeError otherwise)."""


def serial(*comms: "Communicator | None") -> bool:
    """True when the operations of ``comms`` (None entries ignored) must not overlap each other:
    one of them is not ``concurrent_safe`` (:class:`Communicator`; NCCL's rule for several
    communicators in one process)."""
    return not all(getattr(c, "concurrent_safe", True) for c in comms if c is not None)


_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_NEW_GROUP_SORTS_ONLY = "sort_ranks" not in inspect.signature(dist.new_group).parameters


class WorkList:
    """One handle for several: ``wait()`` waits for each, ``is_completed()`` when all are (an empty
    list is complete)."""

    __slots__ = ("works",)

    def __init__(self, works: Sequence[Work]) -> None:
        self.works = list(works)

    def wait(self) -> None:
        for w in self.works:
            w.wait()

    def is_completed(self) -> bool:
        return all(w.is_completed() for w in self.works)


def check_op(op: str, dtype: torch.dtype | None = None) -> None:
    """Raises ValueError for an op not in :data:`OPS` (the valid ones named), and TypeError for
    ``avg`` of a non-floating ``dtype`` (the communicators divide before the sum, which would
    leave a floating buffer where the integer one is expected)."""
    if op not in OPS:
        raise ValueError(f"Unknown reduction op {op!r}; valid ops: {', '.join(OPS)}")
    if op == "avg" and dtype is not None and not (dtype.is_floating_point or dtype.is_complex):
        raise TypeError(f"op 'avg' needs a floating-point tensor, got {dtype}; use 'sum' and divide")


class TorchCommunicator:
    """:class:`Communicator` over a torch.distributed process group (default: the world group).

    Ranks passed to methods are ranks in this group. ``reduce_scatter`` and ``all_gather`` use
    NCCL's tensor collectives on nccl and fastnet's ring (:func:`fastnet.comm.algorithms.ring_reduce_scatter_into`,
    :func:`~fastnet.comm.algorithms.ring_all_gather_into`) on gloo, whose own are several times slower
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
        if input.numel() != output.numel() * self.size:
            raise ValueError(f"reduce_scatter: input has {input.numel()} elements, expected size {self.size} × "
                             f"output {output.numel()}")
        if op == "avg":
            input = input / self.size
            op = "sum"
        if self.backend == "nccl":
            _REDUCE_SCATTER(output, input, op=_TORCH_OPS[op], group=self.group)
            return
        # gloo: fastnet's ring. gloo's reduce_scatter_tensor took 137 ms for 33.5 MB of FP16 between
        # two ranks over loopback where the ring takes 23 ms (issue 19's profile, docs/BENCHMARKS.md)
        from fastnet.comm.algorithms import ring_reduce_scatter_into

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
        from fastnet.comm.algorithms import ring_all_gather_into

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


COMMUNICATORS = ("torch", "nccl", "mpi")


def build_communicator(name: str, *, group: dist.ProcessGroup | None = None,
                       timeout_s: float | None = None) -> Communicator:
    """The communicator that carries gradient buckets, by name (Conventions 5 and 6):

    * ``torch``: :class:`TorchCommunicator` over ``group`` (default: the world; gloo on CPU, nccl on
      CUDA, as initialised).
    * ``nccl``: :class:`fastnet.comm.nccl.NcclCommunicator` (CuPy's NCCL, its own side stream) over
      the ranks of ``group``; CUDA tensors only; the unique id travels over torch.distributed.
    * ``mpi``: :class:`fastnet.comm.mpi.MPICommunicator` over ``MPI.COMM_WORLD``; CPU tensors; the
      job is launched by ``mpiexec`` (``group`` must be the world).

    Collective over the ranks of ``group``. Raises ValueError for an unknown name (valid ones
    listed), RuntimeError when the backend's package is missing (naming the extra) or, for
    ``nccl``, without CUDA.
    """
    if name not in COMMUNICATORS:
        raise ValueError(f"Unknown communicator {name!r}; valid communicators: {', '.join(COMMUNICATORS)}")
    if name == "torch":
        return TorchCommunicator(group, timeout_s)
    if name == "nccl":
        from fastnet.comm.nccl import NcclCommunicator

        if not torch.cuda.is_available():
            raise RuntimeError("communicator 'nccl' (CuPy NCCL) needs CUDA; on CPU use --communicator torch or mpi")
        return NcclCommunicator.from_torch(group, **({"timeout_s": timeout_s} if timeout_s else {}))
    from fastnet.comm.mpi import MPICommunicator

    comm = MPICommunicator()
    if dist.is_initialized() and comm.size != dist.get_world_size(group):
        raise RuntimeError(f"communicator 'mpi' spans MPI.COMM_WORLD ({comm.size} ranks) but the torch.distributed "
                           f"group has {dist.get_world_size(group)}: launch every rank with mpiexec")
    return comm


def world_communicator(timeout_s: float | None = None) -> TorchCommunicator:
    """The world group as a communicator (initialising torch.distributed from torchrun's env if
    needed, gloo on CPU / nccl on CUDA, with ``timeout_s``)."""
    if not dist.is_initialized():
        from fastnet.distributed import setup

        setup(timeout_s=timeout_s or 300.0)
        if not dist.is_initialized():  # world size 1: a one-rank gloo group keeps the API uniform
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=datetime.timedelta(seconds=timeout_s or 300.0))
    return TorchCommunicator(timeout_s=timeout_s)


def split_sizes(length: int, parts: int) -> Sequence[int]:
    """``length`` elements in ``parts`` chunks as equal as possible, the larger ones first."""
    base, extra = divmod(length, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]
