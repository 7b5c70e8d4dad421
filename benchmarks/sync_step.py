"""A data-parallel training step: GradientSynchronizer vs DistributedDataParallel, 2 ranks, same batch.

    .venv/bin/python benchmarks/sync_step.py --append docs/BENCHMARKS.md

Model ResNet-18-CIFAR (11.2 M parameters), local batch ``--batch`` of 32×32 images, SGD momentum,
fp32, gloo on loopback. Each configuration runs ``--steps`` steps after ``--warmup``; the step time
is the median over steps (max over ranks: a step ends when the slowest rank has its gradients).
Baseline: ``DistributedDataParallel`` (its C++ reducer, 25 MiB buckets, overlap) configured for the
same work as the synchronizer: ``broadcast_buffers=False`` (the trainer syncs BN statistics only
before evaluation and checkpoints) and ``gradient_as_bucket_view=True`` (gradients live in the
buckets); also DDP with ``find_unused_parameters=True`` (its used-map and graph walk every step).
Goal: the synchronizer ≤ 1.0× DDP's step time. Both runs start from the same weights and data; the
table also reports the largest parameter difference after the timed steps (must be ~0: same maths).

The cost of fastnet's cross-rank agreement per step is measured directly, as medians over the timed
steps on rank 0: the used-map all-reduce (one int32 per parameter, every step: issue #13's checks
must cost ≤ 3% of the step) and ``prepare_for_backward``'s graph walk (``find_unused_parameters``).
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

CONFIGS = [("DDP", None), ("DDP find_unused_parameters", "find_unused"),
           ("sync native overlap", ("native", True, False)), ("sync native no-overlap", ("native", False, False)),
           ("sync native overlap find_unused_parameters", ("native", True, True)),
           ("sync ring overlap", ("ring", True, False))]


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
    probes: dict[str, list[float]] = {}
    for name, cfg in CONFIGS:
        torch.manual_seed(0)
        model = build_model("resnet18_cifar", 10, 32)
        sync = None
        if not isinstance(cfg, tuple):
            net = DDP(model, bucket_cap_mb=args.fusion_mb, broadcast_buffers=False, gradient_as_bucket_view=True,
                      find_unused_parameters=cfg == "find_unused")
        else:
            net = model
            sync = GradientSynchronizer(comm, model.parameters(), algorithm=cfg[0], overlap=cfg[1],
                                        fusion_threshold_bytes=int(args.fusion_mb * (1 << 20)),
                                        find_unused_parameters=cfg[2])
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        times = []
        for step in range(args.warmup + args.steps):
            x, y = data[step % len(data)]
            dist.barrier()
            t0 = time.perf_counter()
            loss = nn.functional.cross_entropy(net(x), y)
            if sync is not None:
                t_walk = time.perf_counter()
                sync.prepare_for_backward(loss)
                if step >= args.warmup and cfg[2]:
                    probes.setdefault("graph walk", []).append(time.perf_counter() - t_walk)
            loss.backward()
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
        if sync is not None and cfg == ("native", True, False):
            for _ in range(args.steps):  # the per-step agreement alone, on the same communicator
                dist.barrier()
                t_map = time.perf_counter()
                sync._used_map()
                probes.setdefault("used-map all-reduce", []).append(time.perf_counter() - t_map)
        if sync is not None:
            sync.close()
    diffs = {name: (finals[name] - finals["DDP"]).abs().max().item() for name in finals}
    if rank == 0:
        queue.put((results, diffs, {k: statistics.median(v) for k, v in probes.items()}))
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
    results, diffs, probes = queue.get(timeout=3600)
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
    step = results["sync native overlap"]
    lines += ["", "| per-step agreement (rank 0) | time (ms) | share of the sync native overlap step |",
              "|---|---:|---:|"]
    for name, t in probes.items():
        lines.append(f"| {name} | {t * 1e3:.2f} | {100 * t / step:.2f}% |")
    emit(lines, args.append)


if __name__ == "__main__":
    main()
