"""The backend's CUDA path (``FASTNET_BASE_BACKEND=nccl``) on one GPU (`pytest -m gpu`).

One GPU holds one NCCL rank (NCCL refuses two ranks on a device), so these run world size 1 with
fastnet's routing forced on (``_MIN_SIZE = 1``; normally one rank goes to the base backend, having
nothing to reduce). What that checks: fastnet's NCCL communicator created from the group's store at
the first CUDA collective, the side stream ordered after the caller's stream and the caller's after
it (an FP16 wire rounds on the side stream, so a missing wait shows as unrounded or zero values),
the CUDA future DDP chains on, delegation of the rest to ProcessGroupNCCL in the side stream's one
NCCL order, and the watchdog ending a process whose collective outlives the timeout. What it cannot check: NCCL between ranks (the ring's
grouped sends and receives across devices), which is correct by construction (one
``ncclGroupStart``/``ncclGroupEnd`` per exchange, :mod:`fastnet.comm.communicators.nccl`) and tested on CPU.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, child_env, spawn_ranks

# DDP through the backend (check 5): layers whose weights pass the 1 KB bucket cap, so that after DDP's
# bucket rebuild each step has 3 buckets (the first step has 1: DDP's first bucket is 1 MiB). A model
# under the cap (676 parameters) gets one bucket per step. Counted on CPU with gloo by
# tests/comm/test_backend.py::test_gpu_ddp_check_gets_several_buckets_per_step.
DDP_DIMS, DDP_BUCKET_CAP_MB, DDP_STEPS, DDP_MIN_CALLS = (64, 64, 64, 4), 0.001, 3, 1 + 3 + 3


def ddp_model() -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [m for a, b in zip(DDP_DIMS[:-1], DDP_DIMS[1:]) for m in (torch.nn.Linear(a, b), torch.nn.ReLU())]
    return torch.nn.Sequential(*layers[:-1])

pytestmark = pytest.mark.gpu


def _worker(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import fastnet.comm.backend  # noqa: F401 - registers "fastnet" (torch < 2.14 has no entry-point lookup)
    from fastnet.comm.backend import _serialized

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), FASTNET_BASE_BACKEND="nccl",
                      FASTNET_WIRE_DTYPE="fp16", FASTNET_ALGORITHM="ring")
    torch.cuda.set_device(0)
    dist.init_process_group("fastnet", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        pg = dist.group.WORLD
        pg._MIN_SIZE = 1  # route one rank through fastnet (see the module docstring)
        dev = torch.device("cuda", 0)
        out = {}
        # 1) stream order: the fill is queued behind a sleep on the caller's stream; the side stream
        #    must round it to FP16 (the wire) after the fill, and the read after the rounding
        x = torch.zeros(1 << 20, device=dev)
        torch.cuda._sleep(50_000_000)
        x.fill_(1.0 + 2.0 ** -12)  # not an FP16 value: the wire makes it 1.0
        work = dist.all_reduce(x, async_op=True)
        work.wait()
        out["rounded"] = bool((x == 1.0).all())
        # 2) several tensors in one call (fused into one flat buffer), AVG: filled behind a sleep
        #    with a value the FP16 wire rounds (2 + 2**-11 -> 2), so a missing wait shows
        ts = [torch.zeros(n, device=dev) for n in (3, 1000, 17)]
        torch.cuda._sleep(20_000_000)
        for t in ts:
            t.fill_(2.0 + 2.0 ** -11)
        dist.all_reduce_coalesced(ts, op=dist.ReduceOp.AVG)
        out["coalesced"] = all(bool((t == 2.0).all()) for t in ts)
        # 2b) inside an open NCCL group (_coalescing_manager with a device: ProcessGroupNCCL's
        #     ncclGroupStart) CUDA all-reduces go to ProcessGroupNCCL, batched, not to fastnet's ring
        def counts(prefix):
            return sum(v for k, v in pg.routed.items() if k.startswith(prefix))

        before = (counts("base:"), counts("fastnet:"))
        us = [torch.full((n,), 3.0 + 2.0 ** -11, device=dev) for n in (5, 6)]
        with dist._coalescing_manager(device=dev, async_ops=True) as cm:
            for u in us:
                dist.all_reduce(u)  # torch >= 2.2: captured, then one allreduce_coalesced at the end
        cm.wait()
        out["group_delegated"] = (counts("base:") - before[0], counts("fastnet:") - before[1])
        out["group_values"] = all(bool((u == 3.0 + 2.0 ** -11).all()) for u in us)  # NCCL: no FP16 wire
        # 3) reduce-scatter / all-gather into tensors through fastnet's ring
        a, b = torch.arange(7.0, device=dev), torch.empty(7, device=dev)
        dist.reduce_scatter_tensor(b, a)
        c = torch.empty(7, device=dev)
        dist.all_gather_into_tensor(c, b)
        out["ring"] = bool(torch.equal(c, a))
        # 4) delegated to ProcessGroupNCCL: broadcast, an integer all-reduce; barrier (gloo)
        i = torch.arange(5, device=dev)
        dist.broadcast(i, 0)
        dist.all_reduce(i)
        dist.barrier()
        out["delegated"] = bool(torch.equal(i, torch.arange(5, device=dev)))
        # 4b) one NCCL order: _serialized makes the side stream (fastnet's next collective) wait
        #     for the delegated call's end. The call's end is an event behind a sleep on another
        #     stream, which the side stream reaches only through the Work's wait()
        torch.cuda.synchronize()
        other = torch.cuda.Stream(dev)
        with torch.cuda.stream(other):
            torch.cuda._sleep(200_000_000)
            end = torch.cuda.Event()
            end.record(other)

        class _EndWork:
            def wait(self):
                torch.cuda.current_stream(dev).wait_event(end)

        _serialized(pg._stream, _EndWork, [i])
        out["side_waits_for_base"] = not pg._stream.query()
        torch.cuda.synchronize()
        out["side_idle_after"] = pg._stream.query()
        # 5) DDP on CUDA through the backend: the same parameters as local training (one rank, AVG is
        #    the identity up to the FP16 wire's rounding of the gradients)
        model, ref = ddp_model().to(dev), ddp_model().to(dev)
        ddp = DDP(model, device_ids=[0], bucket_cap_mb=DDP_BUCKET_CAP_MB)
        opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ddp, ref)]
        before = pg.routed["fastnet:all_reduce"]
        g = torch.Generator(device=dev).manual_seed(1)
        for _ in range(DDP_STEPS):
            xb = torch.randn(8, DDP_DIMS[0], device=dev, generator=g)
            for m, o in zip((ddp, ref), opts):
                o.zero_grad()
                m(xb).square().mean().backward()
                o.step()
        out["ddp_calls"] = pg.routed["fastnet:all_reduce"] - before
        out["ddp_diff"] = max(float((p - q).abs().max()) for p, q in zip(model.parameters(), ref.parameters()))
        out["routed"] = dict(pg.routed)
        queue.put(out)
    finally:
        dist.destroy_process_group()


def test_backend_cuda_path_on_one_gpu():
    (out,) = spawn_ranks(_worker, 1, timeout=300)
    assert out["rounded"] and out["coalesced"] and out["ring"] and out["delegated"], out
    assert out["group_delegated"][0] >= 1 and out["group_delegated"][1] == 0 and out["group_values"], out
    assert out["side_waits_for_base"] and out["side_idle_after"], out
    assert out["ddp_calls"] >= DDP_MIN_CALLS, out  # DDP's buckets went through fastnet (tests/comm/test_backend.py)
    assert out["ddp_diff"] < 1e-3, out
    assert "base:all_reduce" in out["routed"], out  # the integer all-reduce was delegated


_WATCHDOG = """
import datetime, torch, torch.distributed as dist
from fastnet.comm.backend import _CudaPath
dev = torch.device("cuda", 0)
path = _CudaPath(dist.HashStore(), 0, 1, torch.cuda.Stream(dev), datetime.timedelta(seconds=1), lambda comm: None)
x = torch.ones(4, device=dev)
path.run("a collective that never ends", [x], lambda: torch.cuda._sleep(10 ** 12), [x])
import time; time.sleep(60)
print("still running")
"""


def test_watchdog_ends_a_process_whose_collective_outlives_the_timeout():
    proc = subprocess.run([sys.executable, "-c", _WATCHDOG], cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    assert "still running" not in proc.stdout
    assert "a collective that never ends did not complete within the group's timeout" in proc.stderr, proc.stderr
