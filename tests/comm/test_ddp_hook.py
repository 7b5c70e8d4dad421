"""fastnet's DDP communication hook in a real 2-process DDP loop (gloo)."""

from __future__ import annotations


import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from fastnet.comm import ddp_hook
from tests.conftest import init_gloo, spawn_ranks


def _train(rank: int, hook_args: dict | None) -> tuple[list[torch.Tensor], tuple | None]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    ddp = DDP(model, bucket_cap_mb=0.001)  # the smallest cap (DDP may still use one bucket for so small a model)
    state = None
    if hook_args is not None:
        state, hook = ddp_hook(**hook_args)
        ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    for _ in range(5):
        x, y = torch.randn(8, 10, generator=g), torch.randint(0, 4, (8,), generator=g)
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        opt.zero_grad()
    records = None
    if state is not None:  # every bucket of every step, in order of time
        recs = state.take_records()
        records = (len(recs), sum(r[0] for r in recs), all(r[1] <= r[2] <= r[3] for r in recs), state.take_records())
        state.close()
    return [p.detach().clone() for p in model.parameters()], records


def _worker(rank: int, world: int, port: int, queue) -> None:
    init_gloo(rank, world, port)
    try:
        plain, _ = _train(rank, None)
        out = {}
        for args in ({"algorithm": "ring"}, {"algorithm": "leader", "ranks_per_node": 1},
                     {"algorithm": "ring", "wire_dtype": "fp16", "fusion_mb": 0.0005}):
            params, records = _train(rank, args)
            out[str(args)] = (max((a - b).abs().max().item() for a, b in zip(params, plain)), [p.tolist() for p in params],
                              records)
        queue.put((rank, out))
    finally:
        dist.destroy_process_group()


def test_ddp_with_fastnet_hook_matches_plain_ddp():
    res = dict(spawn_ranks(_worker, 2))
    for key in res[0]:
        tol = 5e-3 if "fp16" in key else 1e-5
        assert res[0][key][0] < tol and res[1][key][0] < tol, (key, res[0][key][0])
        assert res[0][key][1] == res[1][key][1]  # ranks bitwise identical
        count, nbytes, ordered, left = res[0][key][2]
        assert count >= 5 and nbytes == 5 * 4 * (10 * 32 + 32 + 32 * 4 + 4) and ordered and left == []
