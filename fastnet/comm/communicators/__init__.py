"""Layer 1 — communicators: the :class:`~fastnet.comm.communicators.base.Communicator` protocol and
its implementations, each a thin wrapper over one library's primitives.

* :mod:`~fastnet.comm.communicators.base` — the protocol, :class:`Work`, :class:`WorkList`, ``check_op``.
* :mod:`~fastnet.comm.communicators.p2p` — ring reduce-scatter / all-gather over grouped ``exchange``.
* :mod:`~fastnet.comm.communicators.torchdist` — :class:`TorchCommunicator` (a torch.distributed group).
* :mod:`~fastnet.comm.communicators.nccl` — :class:`NcclCommunicator` (CuPy's NCCL; CUDA).
* :mod:`~fastnet.comm.communicators.mpi` — :class:`MPICommunicator` (mpi4py; ``mpiexec``).
* :mod:`~fastnet.comm.communicators.c10d` — :class:`C10dCommunicator` (a c10d ``Backend`` object).
* :mod:`~fastnet.comm.communicators.factory` — :func:`build_communicator` by name.

Imports only :mod:`fastnet.comm.scratch` and :mod:`fastnet.comm.trace` below it. CuPy and mpi4py
are imported when their communicator is built, never here.
"""

from fastnet.comm.communicators.base import OPS, Communicator, Work, WorkList, check_op, serial
from fastnet.comm.communicators.factory import COMMUNICATORS, build_communicator, world_communicator
from fastnet.comm.communicators.torchdist import TorchCommunicator

__all__ = ["COMMUNICATORS", "OPS", "Communicator", "TorchCommunicator", "Work", "WorkList", "build_communicator",
           "check_op", "serial", "world_communicator"]
