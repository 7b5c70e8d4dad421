"""NativeAllReduce in real processes (gloo on loopback)."""


import pytest
import torch
import torch.distributed as dist

from fastnet.comm import NativeAllReduce
from tests.conftest import init_gloo, spawn_ranks


def _worker(rank: int, world: int, port: int, queue) -> None:
    init_gloo(rank, world, port)
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


@pytest.mark.parametrize("world", [2, 3])
def test_gradients_are_averaged_over_ranks(world):
    results = spawn_ranks(_worker, world)
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
