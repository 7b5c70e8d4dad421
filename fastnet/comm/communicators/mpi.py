"""The :class:`~fastnet.comm.communicators.base.Communicator` protocol over mpi4py, launched by ``mpiexec``.

    mpiexec -n 4 python -m fastnet.comm.bench --backend mpi -a all     # (see fastnet-bench)

CPU tensors are passed to MPI as zero-copy NumPy views (``Tensor.numpy()``); bfloat16, which NumPy
and MPI lack, travels as raw 16-bit words (send/recv/broadcast/all_gather) and is reduced through a
float32 copy (sum in float32, rounded once to bfloat16). Every rank therefore takes the same path
for every dtype: an error raised on only some ranks would leave the others waiting forever, since
MPI collectives have no timeout. CUDA tensors need a CUDA-aware MPI and are refused here. MPI has no collective timeout: a dead peer makes ``mpiexec``
abort the job, which is how MPI jobs end.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from fastnet.comm.communicators.base import WorkList, check_op, check_reduce_scatter


def _mpi() -> Any:
    try:
        from mpi4py import MPI
    except ImportError:
        raise RuntimeError("the MPI backend needs mpi4py and an MPI library: pip install 'fastnet[mpi]' "
                           "(mpi4py + mpich), then launch with mpiexec") from None
    return MPI


class _Request:
    """A :class:`Work` handle over an MPI request; keeps the buffer alive until completion."""

    __slots__ = ("request", "buffer")

    def __init__(self, request: Any, buffer: Any) -> None:
        self.request, self.buffer = request, buffer

    def wait(self) -> None:
        self.request.Wait()
        self.buffer = None

    def is_completed(self) -> bool:
        return bool(self.request.Test())


class MPICommunicator:
    """Communicator over an ``mpi4py`` communicator (default ``MPI.COMM_WORLD``).

    Raises:
        RuntimeError: mpi4py missing (names the extra to install).
        TypeError: a CUDA tensor, or a dtype NumPy has no type for (e.g. complex32).
        ValueError: unknown op or mismatched sizes.
    """

    def __init__(self, comm: Any = None) -> None:
        self.MPI = _mpi()
        self.comm = comm if comm is not None else self.MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self._ops = {"sum": self.MPI.SUM, "max": self.MPI.MAX, "min": self.MPI.MIN}

    def __repr__(self) -> str:
        return f"MPICommunicator(rank={self.rank}, size={self.size})"

    def _buf(self, t: torch.Tensor) -> Any:
        if t.is_cuda:
            raise TypeError("MPICommunicator takes CPU tensors; for CUDA tensors use the torch.distributed "
                            "(nccl) backend")
        if not t.is_contiguous():
            raise ValueError(f"MPICommunicator needs contiguous tensors, got strides {t.stride()}")
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy()
        try:
            return t.numpy()
        except TypeError:
            raise TypeError(f"dtype {t.dtype} is not supported by the mpi backend (no NumPy/MPI type)") from None

    def _op(self, op: str) -> Any:
        check_op(op)
        return self._ops["sum" if op == "avg" else op]

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", async_op: bool = False) -> _Request | None:
        mpi_op = self._op(op)
        if op == "avg":
            tensor.div_(self.size)
        if tensor.dtype == torch.bfloat16:  # via float32, synchronously
            wide = tensor.float()
            self.comm.Allreduce(self.MPI.IN_PLACE, wide.numpy(), op=mpi_op)
            tensor.copy_(wide)
            return _Request(self.MPI.REQUEST_NULL, None) if async_op else None
        buf = self._buf(tensor)
        if async_op:
            return _Request(self.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=mpi_op), buf)
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=mpi_op)
        return None

    def reduce_scatter(self, output: torch.Tensor, input: torch.Tensor, op: str = "sum") -> None:
        check_reduce_scatter(self.size, output, input)
        mpi_op = self._op(op)
        if input.dtype == torch.bfloat16:
            wide_out = output.float()
            self.comm.Reduce_scatter_block(input.float().numpy(), wide_out.numpy(), op=mpi_op)
            output.copy_(wide_out)
        else:
            self.comm.Reduce_scatter_block(self._buf(input), self._buf(output), op=mpi_op)
        if op == "avg":
            output.div_(self.size)

    def all_gather(self, output: torch.Tensor, input: torch.Tensor) -> None:
        if output.numel() != input.numel() * self.size:
            raise ValueError(f"all_gather: output has {output.numel()} elements, expected size {self.size} × "
                             f"input {input.numel()}")
        self.comm.Allgather(self._buf(input), self._buf(output))

    def reduce(self, tensor: torch.Tensor, dst: int, op: str = "sum") -> None:
        mpi_op = self._op(op)
        if op == "avg":
            tensor.div_(self.size)
        work = tensor.float() if tensor.dtype == torch.bfloat16 else tensor
        buf = self._buf(work)
        if self.rank == dst:
            self.comm.Reduce(self.MPI.IN_PLACE, buf, op=mpi_op, root=dst)
            if work is not tensor:
                tensor.copy_(work)
        else:
            self.comm.Reduce(buf, None, op=mpi_op, root=dst)

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        self.comm.Bcast(self._buf(tensor), root=src)

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self.comm.Send(self._buf(tensor), dest=dst)

    def recv(self, tensor: torch.Tensor, src: int) -> None:
        self.comm.Recv(self._buf(tensor), source=src)

    def isend(self, tensor: torch.Tensor, dst: int) -> _Request:
        buf = self._buf(tensor)
        return _Request(self.comm.Isend(buf, dest=dst), buf)

    def irecv(self, tensor: torch.Tensor, src: int) -> _Request:
        buf = self._buf(tensor)
        return _Request(self.comm.Irecv(buf, source=src), buf)

    def exchange(self, sends: Sequence[tuple[torch.Tensor, int]],
                 recvs: Sequence[tuple[torch.Tensor, int]]) -> WorkList:
        """``Isend``/``Irecv`` of the non-empty tensors, posted together; ``wait()`` is a Waitall."""
        works = [self.isend(t, peer) for t, peer in sends if t.numel()]
        works += [self.irecv(t, peer) for t, peer in recvs if t.numel()]
        return WorkList(works)

    def close(self) -> None:
        """Nothing: MPI frees its communicators at ``MPI_Finalize``."""

    def barrier(self) -> None:
        self.comm.Barrier()

    def split(self, color: int | None, key: int = 0) -> "MPICommunicator | None":
        sub = self.comm.Split(self.MPI.UNDEFINED if color is None else color, key)
        return None if sub == self.MPI.COMM_NULL else MPICommunicator(sub)

    def ranks_per_node(self) -> int:
        """Ranks sharing this rank's node (MPI_COMM_TYPE_SHARED split)."""
        local = self.comm.Split_type(self.MPI.COMM_TYPE_SHARED, key=self.rank)
        try:
            return local.Get_size()
        finally:
            local.Free()
