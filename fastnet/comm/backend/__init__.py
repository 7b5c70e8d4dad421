"""fastnet as a torch.distributed backend: ``init_process_group("fastnet")``.

    import torch.distributed as dist
    dist.init_process_group("fastnet")        # instead of "gloo"; nothing else changes
    model = DistributedDataParallel(model)    # DDP's buckets now go through fastnet's all-reduce

The backend registers itself when torch.distributed first meets the name: fastnet's package
declares the ``torch.distributed.backends`` entry point ``fastnet`` (:func:`register`; torch
≥ 2.14 looks it up in ``init_process_group``/``new_group``); with an older torch,
``import fastnet.comm.backend`` registers it. So an unmodified script, a Lightning or Accelerate
project, FSDP, or any ``dist.all_reduce`` caller opts in by changing the backend string.

Each process group (the world, and every ``dist.new_group(..., backend="fastnet")``) is a
:class:`FastnetProcessGroup`. It holds two base backends built from the group's store: one that
every collective fastnet does not handle is delegated to (gloo; NCCL with
``FASTNET_BASE_BACKEND=nccl``), and one carrying only fastnet's own traffic, driven by one
communication thread in call order, so delegated and fastnet collectives never interleave on one
connection. Routed through fastnet:

* ``all_reduce`` with SUM or AVG of floating tensors: fastnet's algorithm
  (``FASTNET_ALGORITHM``: ring, hierarchical, hierarchical_p2p, leader, leader_p2p, native, hybrid
  by the cost model), buckets of at most ``FASTNET_FUSION_MB`` MiB, the wire dtype
  ``FASTNET_WIRE_DTYPE`` (none, fp16, bf16; opt-in, lossy); the tensors of one call
  (``all_reduce_coalesced``, DDP's multi-tensor calls) are fused into one flat buffer. Separate
  calls are never fused with each other: which calls are queued together depends on timing, so
  ranks could fuse differently;
* ``reduce_scatter_tensor`` (SUM, AVG, MAX, MIN), ``all_gather_into_tensor``, their coalesced
  forms (``_coalescing_manager``; the functional collectives of DTensor and FSDP2, e.g.
  ``full_tensor()``) and the list ``all_gather`` of one tensor per rank (FSDP1's parameter
  all-gather on CPU): fastnet's ring (:func:`fastnet.comm.communicators.p2p.ring_reduce_scatter_into`,
  ``ring_all_gather_into``);
* everything else (broadcast, barrier, reduce, gather, scatter, all-to-all, send/recv, list
  all-gather of CUDA tensors, integer or MAX/MIN/PRODUCT all-reduce): the base backend, unchanged
  (gloo for CPU tensors; NCCL for CUDA tensors with ``FASTNET_BASE_BACKEND=nccl``; barrier: gloo).

**CUDA tensors** (``FASTNET_BASE_BACKEND=nccl``; without it they go to gloo, unchanged). The
same routing, over fastnet's own NCCL communicator (:class:`fastnet.comm.communicators.nccl.NcclCommunicator`,
CuPy's bindings), created at the group's first CUDA collective on the tensors' device (as
ProcessGroupNCCL does; one device per rank per group), its unique id passed through the group's
store. A collective is enqueued from the caller's thread, not the communication thread (NCCL
kernels are asynchronous, the host does not wait): fastnet's side stream first waits for the
caller's current stream, the algorithm's kernels (casts, ring additions, NCCL calls) run on it,
and the ``Work``'s future is a CUDA future recorded on it, so ``wait()`` and DDP's callbacks order
the caller's stream after the result without blocking the host (torch.futures.Future semantics).
The tensors are recorded on the side stream so the caching allocator cannot reuse them early.
Delegated CUDA collectives (ProcessGroupNCCL) are issued in the same order through the side
stream (:func:`_serialized`), so the group's two NCCL communicators do not run collectives at the
same time, as NCCL asks of several communicators in one process; point-to-point calls and calls
inside an open NCCL group (``batch_isend_irecv``, ``_coalescing_manager`` with a device) go to
ProcessGroupNCCL directly, as without fastnet (serializing a send would deadlock the isend/irecv
exchange; :meth:`FastnetProcessGroup._delegate`), and may overlap fastnet's collectives, as
ProcessGroupNCCL's own point-to-point communicators overlap its collectives. A watchdog thread polls NCCL's asynchronous
error (of every fastnet NCCL communicator: the group's and the hierarchical algorithms' split ones)
and the oldest unfinished collective's age; on an error or the group's timeout it aborts them (``ncclCommAbort``: kernels waiting
on a dead peer return) and, as ProcessGroupNCCL's default error handling does, ends the process
with the error on stderr, so no rank goes on with an aborted collective's contents. **Not yet run
on a GPU.**

The returned ``Work`` (:class:`FastnetWork`) completes from the communication thread (CPU) or the
side stream (CUDA); an error there (a peer that died, the group's timeout) is raised by
``wait()``, as the base backend raises it.

Settings (environment, read when a group is created; every rank must use the same: construction
compares them across the group's ranks, :func:`fastnet.comm.gradients.consistency.check_consistency`, and raises
ValueError naming the variable and each differing rank's value): ``FASTNET_ALGORITHM`` (default
``ring``), ``FASTNET_WIRE_DTYPE`` (``none``), ``FASTNET_FUSION_MB`` (25), ``FASTNET_RANKS_PER_NODE``
(default: nodes from the hosts), ``FASTNET_COST_MODEL`` (a calibrated YAML for ``hybrid``),
``FASTNET_SEGMENT_MB`` (pipeline segment, 4), ``FASTNET_BASE_BACKEND`` (``gloo``, or ``nccl``:
CUDA tensors through NCCL, needs CuPy's NCCL, ``pip install 'fastnet[gpu]'``). A bad value raises
ValueError naming it and the valid choices.


Layer 4b, the one gradient path above :mod:`fastnet.comm.gradients`; its modules by concern:
:mod:`~fastnet.comm.backend.settings` (``FASTNET_*``), :mod:`~fastnet.comm.backend.adapter` (c10d's
Work and options), :mod:`~fastnet.comm.backend.cuda` (the CUDA path and its watchdog),
:mod:`~fastnet.comm.backend.process_group` (:class:`FastnetProcessGroup`) and
:mod:`~fastnet.comm.backend.registration` (:func:`register`, called when this package is imported).
"""

from fastnet.comm.backend.adapter import FastnetWork, _coalesced_or_each
from fastnet.comm.backend.cuda import _CudaPath, _serialized
from fastnet.comm.backend.process_group import FastnetProcessGroup
from fastnet.comm.backend.registration import (_TORCH_BATCH_ISEND_IRECV, _batch_isend_irecv, batch_groups_subclasses,
                                               register)
from fastnet.comm.backend.settings import BACKEND_NAME, BASE_BACKENDS, BackendConfig
from fastnet.comm.communicators.base import OPS
from fastnet.comm.communicators.c10d import C10dCommunicator

__all__ = ["BACKEND_NAME", "BASE_BACKENDS", "BackendConfig", "C10dCommunicator", "FastnetProcessGroup", "FastnetWork",
           "OPS", "_CudaPath", "_TORCH_BATCH_ISEND_IRECV", "_batch_isend_irecv", "_coalesced_or_each", "_serialized",
           "batch_groups_subclasses", "register"]

register()
