"""Deprecated path: moved to fastnet.comm.communicators.nccl (issue 38); removed in fastnet 0.3."""

from fastnet.comm._deprecated_paths import forward

__getattr__, __dir__ = forward(__name__, {
    "NcclCommunicator": "fastnet.comm.communicators.nccl",
    "UNIQUE_ID_BYTES": "fastnet.comm.communicators.nccl",
    "_NCCL_DTYPES": "fastnet.comm.communicators.nccl",
    "_NCCL_OPS": "fastnet.comm.communicators.nccl",
    "_Work": "fastnet.comm.communicators.nccl",
    "_nccl": "fastnet.comm.communicators.nccl",
    "check_op": "fastnet.comm.communicators.base",
    "decode_unique_id": "fastnet.comm.communicators.nccl",
    "encode_unique_id": "fastnet.comm.communicators.nccl",
    "unique_id_bytes": "fastnet.comm.communicators.nccl",
    "unique_id_for_cupy": "fastnet.comm.communicators.nccl",
})
