"""Deprecated path: moved to fastnet.comm.planning.topology and fastnet.comm.planning.hierarchy (issue 38); removed in fastnet 0.3."""

from fastnet.comm._deprecated_paths import forward

__getattr__, __dir__ = forward(__name__, {
    "Communicator": "fastnet.comm.communicators.base",
    "DEFAULT_SEGMENT_BYTES": "fastnet.comm.planning.hierarchy",
    "Hierarchy": "fastnet.comm.planning.hierarchy",
    "Topology": "fastnet.comm.planning.topology",
    "_HOST_BYTES": "fastnet.comm.planning.topology",
    "collective_hierarchical_all_reduce": "fastnet.comm.algorithms.hierarchical",
    "gather_hosts": "fastnet.comm.planning.topology",
    "hierarchical_all_reduce": "fastnet.comm.algorithms.hierarchical",
    "leader_all_reduce": "fastnet.comm.algorithms.leader",
    "pipeline_segment_bytes": "fastnet.comm.planning.hierarchy",
    "ring_all_reduce": "fastnet.comm.algorithms.ring",
    "serial": "fastnet.comm.communicators.base",
})
