"""Where the hierarchical all-reduce's time goes: each phase alone, gloo's collective vs fastnet's
ring, beside gloo's flat all-reduce (what torch's ``fp16_compress_hook`` runs), on the emulated
cluster (issue #19; measured: docs/BENCHMARKS.md).

    python benchmarks/topology/cluster.py run --nodes 2 --ranks-per-node 2 --rate 1gbit -- \\
        benchmarks/hook_phases.py --append docs/BENCHMARKS.md

One message of ``--mb`` MB in ``--dtype`` (default: 33.5 MB of FP16, the 4 × Linear(2048, 2048)
model's gradients on an FP16 wire), N ranks in nodes of k (``--ranks-per-node``, default torchrun's
LOCAL_WORLD_SIZE). Rows: gloo's all-reduce over all N; fastnet's ``hierarchical`` (intra-node
reduce-scatter, inter-node all-reduce of the owned 1/k, intra-node all-gather; 4 MiB segments) and
``hierarchical_p2p``; then each phase alone — the intra-node reduce-scatter and all-gather by gloo's
tensor collectives and by fastnet's ring (``TorchCommunicator`` uses the ring on gloo), the
inter-node all-reduce of the 1/k chunk by gloo and by fastnet's ring with all k local ranks at once,
and by gloo with one local rank only (the node's link to itself); the hook's pack and unpack (the
FP32 bucket narrowed to the wire dtype in a reused buffer, and widened back). Times: median of ``--iters``
after one warm-up, from a barrier, max over ranks. Every result is checked against the exact sum.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from fastnet.comm.algorithms import (collective_hierarchical_all_reduce, hierarchical_all_reduce,  # noqa: E402
                                    ring_all_gather_into, ring_all_reduce, ring_reduce_scatter_into)
from fastnet.comm.communicators.torchdist import TorchCommunicator  # noqa: E402
from fastnet.comm.planning.hierarchy import DEFAULT_SEGMENT_BYTES, Hierarchy  # noqa: E402
from ranks import ranks_per_node, relaunch_under_torchrun  # noqa: E402
from report import emit  # noqa: E402

DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


def _timed(fn, setup, iters: int) -> float:
    times = []
    for i in range(iters + 1):
        setup()
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        if i:
            times.append(time.perf_counter() - t0)
    t = torch.tensor([statistics.median(times)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def measure(nbytes: int, dtype: torch.dtype, k: int, iters: int) -> list[tuple[str, float, bool]]:
    comm = TorchCommunicator().split(0, dist.get_rank())  # fastnet's own groups, as the DDP hook has
    n = comm.size
    h = Hierarchy(comm, k)
    numel = nbytes // dtype.itemsize // (n * k) * (n * k)  # whole chunks at both levels
    seg = DEFAULT_SEGMENT_BYTES // dtype.itemsize
    x = torch.empty(numel, dtype=dtype)
    own = torch.empty(numel // k, dtype=dtype)
    own_sum, local_sum = float(n), float(k)  # ones everywhere: each element sums to N (k inside a node)

    def fill(v: float = 1.0):
        x.fill_(v)
        own.fill_(v)

    cases = [
        ("gloo all-reduce over all N ranks (torch's fp16 hook)", lambda: dist.all_reduce(x), lambda: x, own_sum),
        ("fastnet hierarchical (collectives, 4 MiB segments)",
         lambda: collective_hierarchical_all_reduce(h.intra, h.inter, x, seg), lambda: x, own_sum),
        ("fastnet hierarchical_p2p (ring schedules, 4 MiB segments)",
         lambda: hierarchical_all_reduce(h.intra, h.inter, x, seg), lambda: x, own_sum),
        ("intra reduce-scatter: gloo reduce_scatter_tensor",
         lambda: dist.reduce_scatter_tensor(own, x, group=h.intra.group), lambda: own, local_sum),
        ("intra reduce-scatter: fastnet ring", lambda: ring_reduce_scatter_into(h.intra, own, x), lambda: own, local_sum),
        ("intra all-gather: gloo all_gather_into_tensor",
         lambda: dist.all_gather_into_tensor(x, own, group=h.intra.group), lambda: x, 1.0),
        ("intra all-gather: fastnet ring", lambda: ring_all_gather_into(h.intra, x, own), lambda: x, 1.0),
        ("inter all-reduce of the 1/k chunk, k at once: gloo", lambda: h.inter.all_reduce(own), lambda: own,
         float(h.inter.size)),
        ("inter all-reduce of the 1/k chunk, k at once: fastnet ring", lambda: ring_all_reduce(h.inter, own),
         lambda: own, float(h.inter.size)),
        ("inter all-reduce of the 1/k chunk, local rank 0 only: gloo",
         lambda: h.inter.all_reduce(own) if h.topology.local_rank == 0 else None,
         lambda: own if h.topology.local_rank == 0 else None, float(h.inter.size)),
    ]
    if dtype != torch.float32:  # the hook's pack and unpack: the FP32 bucket narrowed to the wire and back
        grads = torch.ones(numel, dtype=torch.float32)
        cases += [(f"pack: FP32 gradients -> {str(dtype).removeprefix('torch.')} wire (reused buffer)",
                   lambda: x.copy_(grads), lambda: x, 1.0),
                  (f"unpack: {str(dtype).removeprefix('torch.')} wire -> FP32 gradients",
                   lambda: grads.copy_(x), lambda: grads, 1.0)]
    rows = []
    for name, fn, result, want in cases:
        if k == 1 and name.startswith("intra"):
            continue
        t = _timed(fn, fill, iters)
        fill()
        fn()
        out = result()
        ok = torch.tensor([1.0 if out is None or bool((out == want).all()) else 0.0])
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        rows.append((name, t, bool(ok.item())))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=33.5, help="message size, MB (10^6 bytes)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    p.add_argument("--ranks-per-node", type=int, default=None, help="k (default: torchrun's LOCAL_WORLD_SIZE)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--append")
    args = p.parse_args()
    relaunch_under_torchrun(__file__, nproc=4)
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    k = ranks_per_node(args.ranks_per_node) or 1
    rows = measure(int(args.mb * 1e6), DTYPES[args.dtype], k, args.iters)
    world = dist.get_world_size()
    dist.destroy_process_group()
    if int(os.environ["RANK"]) != 0:
        return
    base = rows[0][1]
    lines = [f"### Hierarchical all-reduce phase by phase vs gloo's flat all-reduce (issue 19) — {datetime.date.today()}",
             "", f"Command: `python benchmarks/hook_phases.py {' '.join(sys.argv[1:])}` (torchrun)",
             f"Machine: {platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}; {world} ranks gloo "
             f"({k} per node), 1 thread each; {args.mb:g} MB of {args.dtype}; median of {args.iters} after 1 "
             "(from a barrier, max over ranks); each result checked against the exact sum.", "",
             "| what | time (ms) | ÷ gloo flat all-reduce | exact |", "|---|---:|---:|---|"]
    for name, t, ok in rows:
        lines.append(f"| {name} | {t * 1e3:.1f} | {t / base:.2f} | {'yes' if ok else 'NO'} |")
    emit(lines, args.append)
    if not all(ok for _, _, ok in rows):
        raise SystemExit("a phase gave a wrong sum")


if __name__ == "__main__":
    main()
