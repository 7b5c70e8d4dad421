"""fastnet.comm: communicators, all-reduce algorithms and gradient synchronisation.

* :mod:`fastnet.comm.communicator` — the ``Communicator`` protocol and its torch.distributed backend.
* :mod:`fastnet.comm.algorithms` — ring, hierarchical and leader (Jia et al. 2018) all-reduce,
  built only from the protocol's primitives.
* :mod:`fastnet.comm.topology` — node layout and intra/inter/leader sub-communicators.
* :mod:`fastnet.comm.cost_model` — the α-β cost model, its calibration, the hybrid choice.
* :mod:`fastnet.comm.sync` — :class:`BucketReducer` (one bucket: wire dtype, algorithm), the
  cross-rank layout check, :class:`AlgorithmAllReduce` (a list of gradients after backward);
  :class:`NativeAllReduce` is the plain baseline.
* :mod:`fastnet.comm.synchronizer` — :class:`GradientSynchronizer`, the trainer's gradient path:
  persistent buckets, gradients as views, launch from backward hooks, overlap on a comm thread.
* :mod:`fastnet.comm.ddp_hook` — :func:`ddp_hook` for ``DistributedDataParallel.register_comm_hook``.
* :mod:`fastnet.comm.bench` — ``fastnet-bench``.
"""

from fastnet.comm.ddp_hook import ddp_hook, fastnet_allreduce_hook
from fastnet.comm.native import GradientSync, NativeAllReduce
from fastnet.comm.cost_model import CostModel, Link
from fastnet.comm.sync import ALGORITHMS, WIRE_DTYPES, AlgorithmAllReduce, BucketReducer
from fastnet.comm.synchronizer import GradientSynchronizer

__all__ = ["ALGORITHMS", "WIRE_DTYPES", "AlgorithmAllReduce", "BucketReducer", "CostModel", "GradientSync",
           "GradientSynchronizer", "Link", "NativeAllReduce", "ddp_hook", "fastnet_allreduce_hook"]
