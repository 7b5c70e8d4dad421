"""NativeAllReduce in real processes (gloo on loopback)."""

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastnet.comm import NativeAllReduce
from tests.conftest import free_port


def _worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=30))
    try:
        params = [torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.zeros(2, 3)),
                  torch.nn.Parameter(torch.zeros(4, dtype=torch.float64)), torch.nn.Parameter(torch.zeros(1))]
        # integer-valued gradients: rank r holds (r+1) * k, so sums are exact
        for k, p in enumerate(params[:3]):
            p.grad = torch.full_like(p, float((rank + 1) * (k + 1)))
        seconds = NativeAllReduce(world)([p.grad for p in params if p.grad is not None])
        queue.put((rank, [None if p.grad is None else p.grad.clone() for p in params], seconds))
    finally:
        dist.destroy_process_group()


def collect(queue, procs, timeout=120.0):
    """Next result from the queue; fails at once if a worker died instead of waiting out the timeout."""
    import queue as q
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return queue.get(timeout=0.5)
        except q.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            assert not dead, f"worker exited with {dead}"
    raise TimeoutError("no result from the workers")


@pytest.mark.parametrize("world", [2, 3])
def test_gradients_are_averaged_over_ranks(world):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = [collect(queue, procs) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    mean_factor = sum(r + 1 for r in range(world)) / world
    for rank, grads, seconds in results:
        assert seconds >= 0
        for k in range(3):
            assert torch.equal(grads[k], torch.full_like(grads[k], mean_factor * (k + 1)))
        assert grads[2].dtype == torch.float64
        assert grads[3] is None  # no gradient: not passed, not created


def test_single_process_is_a_no_op():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    assert NativeAllReduce(1)([p.grad]) == 0.0
    assert torch.equal(p.grad, torch.full((3,), 2.0))
