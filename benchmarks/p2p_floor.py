"""Is gloo's point-to-point path what keeps fastnet's ring below gloo's own all-reduce at 64–256
MiB? The floor that path sets for any send/recv schedule, vs the ring at several segment sizes
(issue #16; measured: docs/BENCHMARKS.md).

    .venv/bin/python benchmarks/p2p_floor.py --append docs/BENCHMARKS.md

Runs itself under ``torchrun --standalone --nproc_per_node=2`` (gloo on loopback). Per size S
(fp32), with 2 ranks: the backend's all-reduce of S bytes (``native``), fastnet's ring of S bytes
(4 MiB pipelined segments, the default), and one grouped exchange of S/2 bytes each way
(``batch_isend_irecv``: each rank sends half and receives half, the ring's one reduce-scatter step
at N = 2; its all-gather step is the same exchange again). With 2 ranks the ring moves exactly
those two exchanges' bytes, so 2 × exchange is the ring's floor on this transport whatever its
schedule (segments only overlap the additions with the transfer), and native ÷ (2 × exchange) is
the highest ring ÷ native ratio any send/recv schedule can reach over gloo. busbw = S / time
(N = 2: algbw × 2(N−1)/N). Times: median of ``--iters`` after 2 warm-up, max over ranks; the three
kinds alternate within each iteration, so drift hits them alike. ``--fresh`` adds each ring with
:mod:`fastnet.comm.scratch` turned off (new receive temporaries per call, as before the pool):
what the page faults of fresh tens-of-MiB tensors cost.
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
from fastnet.comm import scratch  # noqa: E402
from fastnet.comm.algorithms import ring_all_reduce  # noqa: E402
from fastnet.comm.communicators.torchdist import TorchCommunicator  # noqa: E402
from fastnet.comm.planning.hierarchy import DEFAULT_SEGMENT_BYTES  # noqa: E402
from ranks import relaunch_under_torchrun  # noqa: E402
from report import emit  # noqa: E402


def _timed(fn) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _fresh(fn):
    def run():
        scratch.ENABLED = False
        try:
            fn()
        finally:
            scratch.ENABLED = True
    return run


def measure(sizes_mib: list[int], iters: int, segments: list[float], fresh: bool) -> list[dict]:
    comm = TorchCommunicator()
    peer = 1 - comm.rank
    rows = []
    for mib in sizes_mib:
        n = (mib << 20) // 4
        x = torch.full((n,), float(comm.rank + 1))
        half_out, half_in = x[: n // 2].clone(), torch.empty(n // 2)
        kinds = {"native": lambda: dist.all_reduce(x),
                 **{f"ring {mb:g}": (lambda e=int(mb * (1 << 20)) // 4: ring_all_reduce(comm, x, e)) for mb in segments},
                 "exchange": lambda: comm.exchange([(half_out, peer)], [(half_in, peer)]).wait()}
        if fresh:
            kinds.update({f"fresh {mb:g}": _fresh(kinds[f"ring {mb:g}"]) for mb in segments})
        times: dict[str, list[float]] = {k: [] for k in kinds}
        for it in range(2 + iters):
            for kind, fn in kinds.items():
                x.fill_(float(comm.rank + 1))
                t = _timed(fn)
                if it >= 2:
                    times[kind].append(t)
                if kind != "exchange" and not bool((x == 3.0).all()):  # 1 + 2 everywhere (native, rings)
                    raise SystemExit(f"{kind}: wrong sum at {mib} MiB")
                if kind == "exchange" and not bool((half_in == float(peer + 1)).all()):
                    raise SystemExit(f"exchange: wrong data at {mib} MiB")
        rows.append({"mib": mib, **{k: statistics.median(v) for k, v in times.items()}})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes-mib", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--iters", type=int, default=7)
    p.add_argument("--segment-mb", type=float, nargs="+", default=[DEFAULT_SEGMENT_BYTES / (1 << 20)],
                   help="the ring's pipeline segments to measure, MiB (0: one piece); default: fastnet's")
    p.add_argument("--fresh", action="store_true", help="also each ring with new temporaries per call "
                   "(fastnet.comm.scratch off)")
    p.add_argument("--append")
    args = p.parse_args()
    relaunch_under_torchrun(__file__)
    dist.init_process_group("gloo")
    if dist.get_world_size() != 2:
        raise SystemExit(f"p2p_floor needs exactly 2 ranks, got {dist.get_world_size()}")
    torch.set_num_threads(1)
    rows = measure(args.sizes_mib, args.iters, args.segment_mb, args.fresh)
    dist.destroy_process_group()
    if int(os.environ["RANK"]) != 0:
        return
    label = {mb: f"{mb:g} MiB segments" if mb else "one piece" for mb in args.segment_mb}
    cols = [f"ring, {label[mb]} ÷ native" for mb in args.segment_mb]
    cols += [f"ring, {label[mb]}, fresh temporaries ÷ native" for mb in (args.segment_mb if args.fresh else [])]
    lines = [f"### gloo's point-to-point floor under the ring (issue 16) — {datetime.date.today()}", "",
             f"Command: `python benchmarks/p2p_floor.py {' '.join(sys.argv[1:])}`",
             f"Machine: {platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}; 2 ranks gloo on "
             f"loopback, 1 thread each; fp32; median of {args.iters} iterations after 2 (max over ranks), the "
             "kinds alternating.", "",
             "| size (MiB) | native busbw (GB/s) | exchange of S/2 each way (ms) | floor busbw, S / (2 × exchange) "
             "(GB/s) | floor ÷ native | " + " | ".join(cols) + " |", "|---:|---:|---:|---:|---:|" + "---:|" * len(cols)]
    for r in rows:
        s = r["mib"] * (1 << 20) / 1e9
        native, floor = s / r["native"], s / (2 * r["exchange"])
        lines.append(f"| {r['mib']} | {native:.2f} | {r['exchange'] * 1e3:.1f} | {floor:.2f} | {floor / native:.2f}x | "
                     + " | ".join(f"{r['native'] / r[f'ring {mb:g}']:.2f}x" for mb in args.segment_mb) + " |"
                     + "".join(f" {r['native'] / r[f'fresh {mb:g}']:.2f}x |" for mb in (args.segment_mb if args.fresh else [])))
    emit(lines, args.append)


if __name__ == "__main__":
    main()
