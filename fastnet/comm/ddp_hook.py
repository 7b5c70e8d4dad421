"""Deprecated path: moved to fastnet.comm.gradients.ddp_comm_hook (issue 38); removed in fastnet 0.3."""

from fastnet.comm._deprecated_paths import forward

__getattr__, __dir__ = forward(__name__, {
    "AlgorithmAllReduce": "fastnet.comm.gradients.allreduce",
    "CommThread": "fastnet.comm.gradients.comm_thread",
    "Communicator": "fastnet.comm.communicators.base",
    "CostModel": "fastnet.comm.planning.cost_model",
    "HookState": "fastnet.comm.gradients.ddp_comm_hook",
    "TorchCommunicator": "fastnet.comm.communicators.torchdist",
    "build_communicator": "fastnet.comm.communicators.factory",
    "ddp_hook": "fastnet.comm.gradients.ddp_comm_hook",
    "fastnet_allreduce_hook": "fastnet.comm.gradients.ddp_comm_hook",
})
