"""Layer 4 — gradient paths: the ways fastnet averages a model's gradients over ranks.

* :mod:`~fastnet.comm.gradients.reducer` — :class:`BucketReducer`: one fusion bucket (wire dtype,
  algorithm); every path below reduces through it.
* :mod:`~fastnet.comm.gradients.consistency` — cross-rank checks of settings and layouts.
* :mod:`~fastnet.comm.gradients.allreduce` — :class:`AlgorithmAllReduce`: a list of gradients after
  backward (your own loop, no overlap).
* :mod:`~fastnet.comm.gradients.synchronizer` — :class:`GradientSynchronizer`: the trainer's path,
  buckets launched from backward hooks, overlapped on a communication thread.
* :mod:`~fastnet.comm.gradients.comm_thread` — :class:`CommThread`, the FIFO communication thread.
* :mod:`~fastnet.comm.gradients.ddp_comm_hook` — :func:`ddp_hook` for ``DistributedDataParallel``.
* :mod:`~fastnet.comm.gradients.native` — :class:`NativeAllReduce`, the torch.distributed baseline.

The torch.distributed backend (:mod:`fastnet.comm.backend`) is the one path above this layer.
Which to use when: docs/ARCHITECTURE.md, "Which gradient path to use".
"""

from fastnet.comm.gradients.allreduce import AlgorithmAllReduce
from fastnet.comm.gradients.comm_thread import CommThread
from fastnet.comm.gradients.consistency import check_consistency, check_layout
from fastnet.comm.gradients.ddp_comm_hook import HookState, ddp_hook, fastnet_allreduce_hook
from fastnet.comm.gradients.native import GradientSync, NativeAllReduce
from fastnet.comm.gradients.reducer import ALGORITHMS, WIRE_DTYPES, BucketReducer
from fastnet.comm.gradients.synchronizer import GradientSynchronizer

__all__ = ["ALGORITHMS", "WIRE_DTYPES", "AlgorithmAllReduce", "BucketReducer", "CommThread", "GradientSync",
           "GradientSynchronizer", "HookState", "NativeAllReduce", "check_consistency", "check_layout", "ddp_hook",
           "fastnet_allreduce_hook"]
