"""Deprecated path: moved to fastnet.comm.communicators (issue 38); removed in fastnet 0.3."""

from fastnet.comm._deprecated_paths import forward

__getattr__, __dir__ = forward(__name__, {
    "COMMUNICATORS": "fastnet.comm.communicators.factory",
    "Communicator": "fastnet.comm.communicators.base",
    "OPS": "fastnet.comm.communicators.base",
    "TorchCommunicator": "fastnet.comm.communicators.torchdist",
    "Work": "fastnet.comm.communicators.base",
    "WorkList": "fastnet.comm.communicators.base",
    "_NEW_GROUP_SORTS_ONLY": "fastnet.comm.communicators.torchdist",
    "_REDUCE_SCATTER": "fastnet.comm.communicators.torchdist",
    "_TORCH_OPS": "fastnet.comm.communicators.torchdist",
    "build_communicator": "fastnet.comm.communicators.factory",
    "check_op": "fastnet.comm.communicators.base",
    "serial": "fastnet.comm.communicators.base",
    "split_sizes": "fastnet.comm.algorithms.ring",
    "world_communicator": "fastnet.comm.communicators.factory",
})
