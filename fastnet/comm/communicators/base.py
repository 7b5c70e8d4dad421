"""The :class:`Communicator` protocol every backend implements, and the helpers they share.

fastnet's algorithms (:mod:`fastnet.comm.algorithms`) are written against :class:`Communicator`
only, so they run on every backend that implements it. Tensors are contiguous; ``all_reduce``,
``reduce``, ``broadcast`` and ``recv`` work in place. Methods with ``async_op=True`` return a
:class:`Work` handle (``wait()``, ``is_completed()``); otherwise they return None when done.

Implementations: :class:`fastnet.comm.communicators.torchdist.TorchCommunicator` (a torch.distributed
process group), :class:`fastnet.comm.communicators.nccl.NcclCommunicator` (CuPy's NCCL),
:class:`fastnet.comm.communicators.mpi.MPICommunicator` (mpi4py) and
:class:`fastnet.comm.communicators.c10d.C10dCommunicator` (the backend's own base process group).
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

OPS = ("sum", "avg", "max", "min")


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


def check_reduce_scatter(size: int, output: torch.Tensor, input: torch.Tensor) -> None:
    """Raises ValueError unless ``input`` has ``size`` × ``output.numel()`` elements (reduce-scatter:
    each of ``size`` ranks receives one ``output``-sized chunk of the reduced ``input``)."""
    if input.numel() != output.numel() * size:
        raise ValueError(f"reduce_scatter: input has {input.numel()} elements, expected size {size} × "
                         f"output {output.numel()}")


def check_op(op: str, dtype: torch.dtype | None = None) -> None:
    """Raises ValueError for an op not in :data:`OPS` (the valid ones named), and TypeError for
    ``avg`` of a non-floating ``dtype`` (the communicators divide before the sum, which would
    leave a floating buffer where the integer one is expected)."""
    if op not in OPS:
        raise ValueError(f"Unknown reduction op {op!r}; valid ops: {', '.join(OPS)}")
    if op == "avg" and dtype is not None and not (dtype.is_floating_point or dtype.is_complex):
        raise TypeError(f"op 'avg' needs a floating-point tensor, got {dtype}; use 'sum' and divide")
