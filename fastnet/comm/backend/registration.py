"""Registration with torch.distributed: :func:`register` (the ``torch.distributed.backends`` entry
point ``fastnet``) and, on a torch whose ``batch_isend_irecv`` does not batch subclasses of
``ProcessGroup``, the wrapper that routes fastnet groups' batches (:func:`_batch_isend_irecv`).
"""

from __future__ import annotations

import datetime
import inspect

import torch.distributed as dist

from fastnet.comm.backend.process_group import FastnetProcessGroup
from fastnet.comm.backend.settings import BACKEND_NAME


def batch_groups_subclasses(source: str) -> bool:
    """Whether ``torch.distributed.batch_isend_irecv`` (its ``source``) groups the point-to-point ops
    of a ``ProcessGroup`` subclass such as fastnet's: torch 2.14 checks ``isinstance(group,
    ProcessGroup)``; torch 2.11 checks ``type(group) is ProcessGroup`` (torch/distributed/
    distributed_c10d.py, v2.11.0), which is False for a subclass, so the ops went out one by one and a
    two-way NCCL exchange could deadlock (each send waiting for a receive queued behind the peer's send)."""
    return "type(group) is ProcessGroup" not in source


def _batch_isend_irecv(p2p_op_list):
    """``torch.distributed.batch_isend_irecv`` where torch's own does not group a subclass's ops
    (:func:`batch_groups_subclasses`): on fastnet's group with a base backend that supports
    coalescing (ProcessGroupNCCL), the ops are issued inside ``_coalescing_manager`` as torch 2.14
    does (one NCCL group; :meth:`FastnetProcessGroup._start_coalescing`); anything else goes to
    torch's own function unchanged."""
    c10d = dist.distributed_c10d
    c10d._check_p2p_op_list(p2p_op_list)
    group = p2p_op_list[0].group or c10d._get_default_group()
    device = p2p_op_list[0].tensor.device
    if not isinstance(group, FastnetProcessGroup) or \
            not getattr(group._get_backend(device), "supports_coalescing", False):
        return _TORCH_BATCH_ISEND_IRECV(p2p_op_list)
    with c10d._coalescing_manager(group, device, async_ops=True) as cm:
        for p2p in p2p_op_list:
            p2p.op(p2p.tensor, p2p.peer, p2p.group, p2p.tag)
    return cm.works


_TORCH_BATCH_ISEND_IRECV = dist.distributed_c10d.batch_isend_irecv


def _create(store, rank: int, size: int, timeout: datetime.timedelta) -> FastnetProcessGroup:
    return FastnetProcessGroup(store, rank, size, timeout)


_registered = False


def register() -> None:
    """Register the ``fastnet`` backend with torch.distributed (idempotent)."""
    global _registered
    if _registered or BACKEND_NAME.upper() in dist.Backend._plugins:
        _registered = True
        return
    dist.Backend.register_backend(BACKEND_NAME, _create, devices=["cpu", "cuda"])
    if not batch_groups_subclasses(inspect.getsource(_TORCH_BATCH_ISEND_IRECV)):  # torch 2.11 (see above)
        dist.batch_isend_irecv = dist.distributed_c10d.batch_isend_irecv = _batch_isend_irecv
    _registered = True
