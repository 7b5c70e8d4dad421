"""GradientSynchronizer's CUDA path with world size 2 on one GPU (`pytest -m gpu`).

NCCL refuses two ranks on one device, but gloo takes CUDA tensors (staging them through the host),
so two processes on ``cuda:0`` exercise the synchronizer's side stream, its ready events, the
used-map and the CUDA-event exposed time with real peers. What one GPU cannot check: NCCL between
ranks (grouped p2p across devices, the collective-composed algorithms on NCCL sub-communicators).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from fastnet.comm import GradientSynchronizer
from fastnet.comm.communicators.torchdist import TorchCommunicator
from tests.conftest import init_gloo, spawn_ranks

pytestmark = pytest.mark.gpu


def _worker(rank: int, world: int, port: int, queue) -> None:
    init_gloo(rank, world, port)
    try:
        dev = torch.device("cuda", 0)
        torch.manual_seed(0)
        init = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).to(dev)
        ref = copy.deepcopy(init)
        model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).to(dev)
        model.load_state_dict(init.state_dict())
        ddp = DDP(ref, device_ids=None)
        sync = GradientSynchronizer(TorchCommunicator(), model.parameters(), algorithm="native",
                                    fusion_threshold_bytes=4096, timeout_s=60)
        opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (ref, model)]
        g = torch.Generator().manual_seed(rank)
        exposed = []
        for _ in range(4):
            x, y = torch.randn(16, 32, generator=g).to(dev), torch.randint(0, 8, (16,), generator=g).to(dev)
            nn.functional.cross_entropy(ddp(x), y).backward()
            nn.functional.cross_entropy(model(x), y).backward()
            sync.synchronize()
            for o in opts:
                o.step()
                o.zero_grad()
            exposed.append(sync.exposed_seconds())
        err = max((a - b).abs().max().item() for a, b in zip(model.parameters(), ref.parameters()))
        queue.put((rank, err, len(sync.buckets), exposed))
        sync.close()
    finally:
        dist.destroy_process_group()


def test_synchronizer_cuda_streams_with_two_ranks_on_one_gpu():
    for rank, err, nbuckets, exposed in spawn_ranks(_worker, 2):
        assert err < 1e-5 and nbuckets > 1
        assert all(e >= 0 for e in exposed)
