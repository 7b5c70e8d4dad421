"""Deprecated path: moved to fastnet.comm.communicators.mpi (issue 38); removed in fastnet 0.3."""

from fastnet.comm._deprecated_paths import forward

__getattr__, __dir__ = forward(__name__, {
    "MPICommunicator": "fastnet.comm.communicators.mpi",
    "WorkList": "fastnet.comm.communicators.base",
    "_Request": "fastnet.comm.communicators.mpi",
    "_mpi": "fastnet.comm.communicators.mpi",
    "check_op": "fastnet.comm.communicators.base",
})
