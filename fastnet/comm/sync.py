"""Deprecated path: moved to fastnet.comm.gradients.reducer, .consistency and .allreduce (issue 38); removed in fastnet 0.3."""

from fastnet.comm._deprecated_paths import forward

__getattr__, __dir__ = forward(__name__, {
    "ALGORITHMS": "fastnet.comm.gradients.reducer",
    "AlgorithmAllReduce": "fastnet.comm.gradients.allreduce",
    "BucketReducer": "fastnet.comm.gradients.reducer",
    "Communicator": "fastnet.comm.communicators.base",
    "CostModel": "fastnet.comm.planning.cost_model",
    "DEFAULT_SEGMENT_BYTES": "fastnet.comm.planning.hierarchy",
    "Hierarchy": "fastnet.comm.planning.hierarchy",
    "OnlineChooser": "fastnet.comm.planning.autotune",
    "RUNNABLE": "fastnet.comm.planning.cost_model",
    "Topology": "fastnet.comm.planning.topology",
    "WIRE_DTYPES": "fastnet.comm.gradients.reducer",
    "_gather": "fastnet.comm.gradients.consistency",
    "_item_hash": "fastnet.comm.gradients.consistency",
    "check_consistency": "fastnet.comm.gradients.consistency",
    "check_layout": "fastnet.comm.gradients.consistency",
    "ring_all_reduce": "fastnet.comm.algorithms.ring",
    "serial": "fastnet.comm.communicators.base",
})
