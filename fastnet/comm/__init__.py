"""fastnet.comm: communicators, all-reduce algorithms and gradient synchronisation.

* :mod:`fastnet.comm.communicator` — the ``Communicator`` protocol and its torch.distributed backend.
* :mod:`fastnet.comm.algorithms` — ring, hierarchical and leader (Jia et al. 2018) all-reduce,
  built only from the protocol's primitives.
* :mod:`fastnet.comm.topology` — node layout and intra/inter/leader sub-communicators.
* :mod:`fastnet.comm.sync` — :class:`AlgorithmAllReduce`, the trainer's gradient sync (fusion
  buckets, FP16/BF16 wire, layout check); :class:`NativeAllReduce` is the plain baseline.
* :mod:`fastnet.comm.ddp_hook` — :func:`ddp_hook` for ``DistributedDataParallel.register_comm_hook``.
* :mod:`fastnet.comm.bench` — ``fastnet-bench``.
"""

from fastnet.comm.ddp_hook import ddp_hook, fastnet_allreduce_hook
from fastnet.comm.native import GradientSync, NativeAllReduce
from fastnet.comm.sync import ALGORITHMS, WIRE_DTYPES, AlgorithmAllReduce

__all__ = ["ALGORITHMS", "WIRE_DTYPES", "AlgorithmAllReduce", "GradientSync", "NativeAllReduce", "ddp_hook",
           "fastnet_allreduce_hook"]
