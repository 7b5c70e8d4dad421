"""The one place that builds a communicator by name: :func:`build_communicator` (``torch``,
``nccl``, ``mpi``; the optional packages imported only when chosen) and :func:`world_communicator`.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from fastnet.comm.communicators.base import Communicator
from fastnet.comm.communicators.torchdist import TorchCommunicator

COMMUNICATORS = ("torch", "nccl", "mpi")


def build_communicator(name: str, *, group: dist.ProcessGroup | None = None,
                       timeout_s: float | None = None) -> Communicator:
    """The communicator that carries gradient buckets, by name (Conventions 5 and 6):

    * ``torch``: :class:`TorchCommunicator` over ``group`` (default: the world; gloo on CPU, nccl on
      CUDA, as initialised).
    * ``nccl``: :class:`fastnet.comm.communicators.nccl.NcclCommunicator` (CuPy's NCCL, its own side stream) over
      the ranks of ``group``; CUDA tensors only; the unique id travels over torch.distributed.
    * ``mpi``: :class:`fastnet.comm.communicators.mpi.MPICommunicator` over ``MPI.COMM_WORLD``; CPU tensors; the
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
        from fastnet.comm.communicators.nccl import NcclCommunicator

        if not torch.cuda.is_available():
            raise RuntimeError("communicator 'nccl' (CuPy NCCL) needs CUDA; on CPU use --communicator torch or mpi")
        return NcclCommunicator.from_torch(group, **({"timeout_s": timeout_s} if timeout_s else {}))
    from fastnet.comm.communicators.mpi import MPICommunicator

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
