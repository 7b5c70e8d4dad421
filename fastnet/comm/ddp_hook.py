"""fastnet's all-reduce as a ``DistributedDataParallel`` communication hook.

    from torch.nn.parallel import DistributedDataParallel as DDP
    from fastnet.comm import ddp_hook

    model = DDP(model)                                     # after init_process_group
    state, hook = ddp_hook(algorithm="ring", wire_dtype="fp16", fusion_mb=64)
    model.register_comm_hook(state, hook)                  # DDP's buckets now go through fastnet
    for x, y in loader:
        loss_fn(model(x), y).backward()                    # gradients averaged by fastnet's ring
        opt.step(); opt.zero_grad()

The hook follows torch's ``ddp_comm_hooks`` contract: ``hook(state, bucket) -> Future`` whose value
is the bucket's flat gradient buffer averaged over ranks. The reduction runs synchronously inside
the hook (the returned future is already complete); DDP still overlaps bucket reductions with the
rest of backward as far as its bucket order allows.
"""

# No ``from __future__ import annotations`` here: DDP checks the hook's annotations as live types.
from typing import Callable

import torch
import torch.distributed as dist

from fastnet.comm.communicator import TorchCommunicator
from fastnet.comm.sync import AlgorithmAllReduce


class HookState:
    """State of :func:`fastnet_allreduce_hook`: the :class:`AlgorithmAllReduce` it calls."""

    __slots__ = ("sync",)

    def __init__(self, sync: AlgorithmAllReduce) -> None:
        self.sync = sync


def fastnet_allreduce_hook(state: HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average ``bucket.buffer()`` (1-D, the bucket's gradients) in place with fastnet's algorithm."""
    buffer = bucket.buffer()
    state.sync([buffer])
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(buffer)
    return fut


def ddp_hook(algorithm: str = "ring", wire_dtype: str = "none", fusion_mb: float = 64.0,
             ranks_per_node: int | None = None, group: dist.ProcessGroup | None = None,
             ) -> tuple[HookState, Callable[[HookState, dist.GradBucket], torch.futures.Future]]:
    """``(state, hook)`` for ``DistributedDataParallel.register_comm_hook``.

    Args: see :class:`fastnet.comm.AlgorithmAllReduce` (``fusion_mb`` in MiB). Collective: every
    rank must call it in the same order (the hierarchical algorithms build sub-communicators).

    Raises:
        ValueError: unknown algorithm / wire dtype (valid ones listed). RuntimeError: no process group.
    """
    comm = TorchCommunicator(group)
    sync = AlgorithmAllReduce(comm, algorithm, int(fusion_mb * (1 << 20)), wire_dtype, ranks_per_node)
    return HookState(sync), fastnet_allreduce_hook
