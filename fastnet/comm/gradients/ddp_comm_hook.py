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
is the bucket's flat gradient buffer averaged over ranks. The hook only queues the bucket on the
state's communication thread (FIFO, so every rank reduces DDP's buckets in the same order, on a
communicator split off for the hook) and returns at once: the reduction overlaps the rest of
backward, and DDP waits for the futures before the step. On CUDA the thread's side stream first
waits for an event recorded on the backward stream and is synchronised before the future completes.

On NCCL the hook's communicator is not DDP's, and the one collective DDP itself issues during
backward — the used-map all-reduce of ``find_unused_parameters=True`` (and of ``static_graph``'s
first iteration), launched once every bucket is ready — may run while the hook's last buckets
are still being reduced. Two NCCL communicators running at once is the case NCCL's guide says
"might work" (it does while both fit on the GPU; "Using multiple NCCL communicators concurrently").
fastnet cannot order DDP's collective from the hook: where that matters, keep
``find_unused_parameters=False`` with the hook on NCCL, or use :class:`fastnet.comm.GradientSynchronizer`
(its used-map runs after its buckets, on their stream).
"""

# No ``from __future__ import annotations`` here: DDP checks the hook's annotations as live types.
import time
from typing import Callable

import torch
import torch.distributed as dist

from fastnet.comm.communicators.base import Communicator
from fastnet.comm.communicators.factory import build_communicator
from fastnet.comm.communicators.torchdist import TorchCommunicator
from fastnet.comm.gradients.allreduce import AlgorithmAllReduce
from fastnet.comm.gradients.comm_thread import CommThread
from fastnet.comm.planning.cost_model import CostModel


class HookState:
    """State of :func:`fastnet_allreduce_hook`: the :class:`AlgorithmAllReduce` it calls, the
    communication thread it runs on, and (CUDA) that thread's stream. ``close()`` stops the thread.

    ``records``: per bucket reduced since the last :meth:`take_records`, ``(bytes, submitted,
    started, ended)`` — the bucket's bytes and host ``time.perf_counter()`` seconds when DDP
    handed it over, when the communication thread began it and when it ended (on CUDA: after the
    stream's sync). ``started − submitted`` is the wait behind earlier buckets, ``ended − started``
    the reduction's own time (cast, algorithm, cast back)."""

    __slots__ = ("sync", "thread", "stream", "records", "comm")

    def __init__(self, sync: AlgorithmAllReduce, comm: "Communicator | None" = None) -> None:
        self.sync, self.thread, self.comm = sync, CommThread(), comm  # comm: the one ddp_hook made (closed here)
        self.stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        self.records: list[tuple[int, float, float, float]] = []

    def take_records(self) -> list[tuple[int, float, float, float]]:
        """The records so far (see the class docstring), and clear them."""
        out, self.records = self.records, []
        return out

    def close(self) -> None:
        """Stop the thread and close the communicators the hook made: the all-reduce's hierarchy, then
        the communicator ``ddp_hook`` built (the same order on every rank)."""
        self.thread.close()
        self.sync.close()
        if self.comm is not None:
            self.comm.close()
            self.comm = None


def fastnet_allreduce_hook(state: HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Queue the average of ``bucket.buffer()`` (1-D, the bucket's gradients; in place, fastnet's
    algorithm) on the communication thread; the returned future completes with the buffer."""
    buffer = bucket.buffer()
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    ready = None
    if buffer.is_cuda:
        ready = torch.cuda.Event()
        ready.record()
    submitted = time.perf_counter()

    def reduce() -> None:
        started = time.perf_counter()
        try:
            if ready is None:
                state.sync([buffer])
            else:
                with torch.cuda.stream(state.stream):
                    state.stream.wait_event(ready)
                    state.sync([buffer])
                state.stream.synchronize()
        except Exception as exc:  # DDP re-raises it from fut.wait()
            fut.set_exception(exc)
            return
        state.records.append((buffer.numel() * buffer.element_size(), submitted, started, time.perf_counter()))
        fut.set_result(buffer)

    state.thread.submit(reduce)
    return fut


def ddp_hook(algorithm: str = "ring", wire_dtype: str = "none", fusion_mb: float = 64.0,
             ranks_per_node: int | None = None, group: dist.ProcessGroup | None = None,
             predivide_factor: float | None = None, cost_model: "CostModel | None" = None,
             communicator: str = "torch") -> tuple[HookState, Callable[[HookState, dist.GradBucket], torch.futures.Future]]:
    """``(state, hook)`` for ``DistributedDataParallel.register_comm_hook``.

    Args: see :class:`fastnet.comm.AlgorithmAllReduce` (``fusion_mb`` in MiB; nodes from the hosts
    unless ``ranks_per_node``); ``communicator``: ``torch`` (a group split off DDP's), ``nccl``
    (CuPy NCCL, CUDA) or ``mpi`` (mpiexec launch) — :func:`fastnet.comm.communicators.factory.build_communicator`. Collective: every rank must call it in the same order (the
    hierarchical algorithms build sub-communicators) and with the same settings (checked).

    Raises:
        ValueError: unknown algorithm / wire dtype (valid ones listed), settings that differ across
            ranks (the first differing one named). RuntimeError: no process group.
    """
    if communicator == "torch":
        comm = TorchCommunicator(group)
        if comm.size > 1 and comm.size == dist.get_world_size():
            comm = comm.split(0, comm.rank)  # dedicated groups: never interleaves with DDP's own collectives
    else:  # its own communicator (CuPy NCCL or MPI): never interleaves with DDP's process group
        comm = build_communicator(communicator, group=group)
    sync = AlgorithmAllReduce(comm, algorithm, int(fusion_mb * (1 << 20)), wire_dtype, ranks_per_node, cost_model,
                              predivide_factor=predivide_factor)
    return HookState(sync, comm), fastnet_allreduce_hook
