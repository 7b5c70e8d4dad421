"""fastnet.comm: communicators, all-reduce algorithms and gradient synchronisation, in layers that
import only downward (tests/test_imports.py checks it):

0. :mod:`~fastnet.comm.trace`, :mod:`~fastnet.comm.scratch` — support: Chrome-trace spans, a
   per-thread pool of scratch buffers.
1. :mod:`fastnet.comm.communicators` — the ``Communicator`` protocol and its torch.distributed,
   CuPy-NCCL, mpi4py and c10d implementations; :func:`build_communicator` by name.
2. :mod:`fastnet.comm.algorithms` — ring, hierarchical and leader (Jia et al. 2018) all-reduce,
   built only from the protocol's primitives.
3. :mod:`fastnet.comm.planning` — topology and sub-communicators, the α-β cost model and the hybrid
   choice, bucket plans, the simulator.
4. :mod:`fastnet.comm.gradients` — the gradient paths: :class:`BucketReducer` (one bucket),
   :class:`AlgorithmAllReduce` (a list of gradients), :class:`GradientSynchronizer` (the trainer's,
   overlapped with backward), :func:`ddp_hook` (DDP), :class:`NativeAllReduce` (the baseline);
   and :mod:`fastnet.comm.backend` (``init_process_group("fastnet")``) above them.

:mod:`fastnet.comm.bench` (``fastnet-bench``) is a tool on top. The names below are the public
ones; import them from here or from the module that defines them.
"""

# The deprecated module fastnet.comm.ddp_hook is imported before the function of the same name is
# bound here: imported later, the import system would rebind fastnet.comm.ddp_hook to the module.
import fastnet.comm.ddp_hook  # noqa: F401
from fastnet.comm.gradients.allreduce import AlgorithmAllReduce
from fastnet.comm.gradients.ddp_comm_hook import ddp_hook, fastnet_allreduce_hook
from fastnet.comm.gradients.native import GradientSync, NativeAllReduce
from fastnet.comm.gradients.reducer import ALGORITHMS, WIRE_DTYPES, BucketReducer
from fastnet.comm.gradients.synchronizer import GradientSynchronizer
from fastnet.comm.planning.cost_model import CostModel, Link

__all__ = ["ALGORITHMS", "WIRE_DTYPES", "AlgorithmAllReduce", "BucketReducer", "CostModel", "GradientSync",
           "GradientSynchronizer", "Link", "NativeAllReduce", "ddp_hook", "fastnet_allreduce_hook"]
