"""A data-parallel training step: GradientSynchronizer vs DistributedDataParallel, 2 ranks, same batch.

    .venv/bin/python benchmarks/sync_step.py --append docs/BENCHMARKS.md

Model ResNet-18-CIFAR (11.2 M parameters), local batch ``--batch`` of 32×32 images, SGD momentum,
fp32, gloo on loopback. Each configuration runs ``--steps`` steps after ``--warmup``; the step time
is the median over steps (max over ranks: a step ends when the slowest rank has its gradients).
Baseline: ``DistributedDataParallel`` (its C++ reducer, 25 MiB buckets, overlap). Goal: the
synchronizer ≤ 1.0× DDP's step time. Both runs start from the same weights and data; the table
also reports the largest parameter difference after the timed steps (must be ~0: same maths).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from fastnet.comm import GradientSynchronizer  # noqa: E402
from fastnet.comm.communicator import TorchCommunicator  # noqa: E402
from fastnet.models import build_model  # noqa: E402
from report import emit  # noqa: E402

CONFIGS = [("DDP", None), ("sync native overlap", ("native", True)), ("sync native no-overlap", ("native", False)),
           ("sync ring overlap", ("ring", True))]


def worker(rank: int, world: int, port: int, args, queue) -> None:
    torch.set_num_threads(args.threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    comm = TorchCommunicator()
    g = torch.Generator().manual_seed(rank)
    data = [(torch.randn(args.batch, 3, 32, 32, generator=g), torch.randint(0, 10, (args.batch,), generator=g))
            for _ in range(4)]
    results = {}
    finals = {}
    for name, cfg in CONFIGS:
        torch.manual_seed(0)
        model = build_model("resnet18_cifar", 10, 32)
        sync = None
        if cfg is None:
            net = DDP(model, bucket_cap_mb=args.fusion_mb)
        else:
            net = model
            sync = GradientSynchronizer(comm, model.parameters(), algorithm=cfg[0], overlap=cfg[1],
                                        fusion_threshold_bytes=int(args.fusion_mb * (1 << 20)))
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        times = []
        for step in range(args.warmup + args.steps):
            x, y = data[step % len(data)]
            dist.barrier()
            t0 = time.perf_counter()
            nn.functional.cross_entropy(net(x), y).backward()
            if sync is not None:
                sync.synchronize()
            opt.step()
            if sync is not None:
                sync.zero_grad()
            else:
                opt.zero_grad(set_to_none=True)
            t = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            if step >= args.warmup:
                times.append(t.item())
        results[name] = statistics.median(times)
        finals[name] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        if sync is not None:
            sync.close()
    diffs = {name: (finals[name] - finals["DDP"]).abs().max().item() for name in finals}
    if rank == 0:
        queue.put((results, diffs))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32, help="local batch per rank")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    p.add_argument("--fusion-mb", type=float, default=25.0)
    p.add_argument("--append")
    args = p.parse_args()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, 2, port, args, queue)) for r in range(2)]
    for pr in procs:
        pr.start()
    results, diffs = queue.get(timeout=3600)
    for pr in procs:
        pr.join()
    base = results["DDP"]
    lines = [f"### Training step: GradientSynchronizer vs DDP — {datetime.date.today()}", "",
             f"Command: `python benchmarks/sync_step.py{' --append docs/BENCHMARKS.md' if args.append else ''}`",
             f"Machine: {platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}; 2 ranks gloo, "
             f"{args.threads} thread(s) each; ResNet-18-CIFAR fp32, local batch {args.batch}, fusion "
             f"{args.fusion_mb:g} MiB; median of {args.steps} steps after {args.warmup} (max over ranks).", "",
             "| configuration | step (ms) | vs DDP | max param diff vs DDP |", "|---|---:|---:|---:|"]
    for name, _ in CONFIGS:
        lines.append(f"| {name} | {results[name] * 1e3:.1f} | {results[name] / base:.2f}x | {diffs[name]:.1e} |")
    emit(lines, args.append)


if __name__ == "__main__":
    main()
