"""Deprecated path: moved to fastnet.comm.gradients.synchronizer and .comm_thread (issue 38); removed in fastnet 0.3."""

from fastnet.comm._deprecated_paths import forward

__getattr__, __dir__ = forward(__name__, {
    "Bucket": "fastnet.comm.gradients.synchronizer",
    "BucketReducer": "fastnet.comm.gradients.reducer",
    "CommThread": "fastnet.comm.gradients.comm_thread",
    "Communicator": "fastnet.comm.communicators.base",
    "CostModel": "fastnet.comm.planning.cost_model",
    "GradientSynchronizer": "fastnet.comm.gradients.synchronizer",
    "REBUILD_STEP": "fastnet.comm.gradients.synchronizer",
    "WIRE_DTYPES": "fastnet.comm.gradients.reducer",
    "_elapsed_s": "fastnet.comm.gradients.synchronizer",
    "_sq_norm": "fastnet.comm.gradients.synchronizer",
    "check_consistency": "fastnet.comm.gradients.consistency",
    "plan_buckets": "fastnet.comm.planning.buckets",
})
