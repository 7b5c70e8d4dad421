"""fastnet-bench: all-reduce microbenchmark in the style of nccl-tests.

    torchrun --standalone --nproc_per_node=2 -m fastnet.comm.bench -b 8 -e 64M -f 2

For each message size from ``-b`` to ``-e`` (bytes, growing by factor ``-f``) every rank fills a
buffer with ``rank + 1`` (integers, so the sum is exact in every dtype), runs ``--warmup`` untimed
and ``--iters`` timed all-reduces (SUM) with a barrier before each, and reports the median time.

Columns (nccl-tests, doc/PERFORMANCE.md):
  size (B), count (elements), type, algorithm, time (µs, median over iterations, max over ranks),
  algbw = size / time (GB/s), busbw = algbw × 2(n−1)/n (GB/s, the per-link load of a ring
  all-reduce), #wrong (elements differing from n(n+1)/2 after the last iteration, summed over ranks).

Algorithms: ``native`` (the backend's own all-reduce through torch.distributed), and fastnet's
``ring``, ``hierarchical`` and ``leader`` (:mod:`fastnet.comm.algorithms`, over send/recv) with
``--ranks-per-node`` emulating nodes. ``-a all`` runs each in turn.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from typing import Sequence

import torch
import torch.distributed as dist

from fastnet.distributed import setup, teardown

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
          "int32": torch.int32}
ALGORITHMS = ("native", "ring", "hierarchical", "leader")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """``"8"``, ``"64K"``, ``"256M"``, ``"1G"`` → bytes (binary units, as nccl-tests)."""
    t = text.strip().upper().removesuffix("B")
    unit = t[-1] if t and t[-1] in _UNITS else ""
    try:
        value = int(float(t[: len(t) - len(unit)]) * _UNITS[unit])
    except ValueError:
        raise ValueError(f"Invalid size {text!r}; use bytes with an optional K, M or G suffix, e.g. 64M") from None
    if value <= 0:
        raise ValueError(f"Invalid size {text!r} (must be > 0 bytes)")
    return value


def bus_factor(world_size: int) -> float:
    """busbw / algbw for all-reduce: 2(n−1)/n (nccl-tests PERFORMANCE.md)."""
    return 2.0 * (world_size - 1) / world_size


def sizes(begin: int, end: int, factor: float) -> list[int]:
    if begin > end:
        raise ValueError(f"Invalid size range: -b {begin} > -e {end}")
    if factor <= 1:
        raise ValueError(f"Invalid step factor -f {factor} (must be > 1)")
    out, s = [], begin
    while s <= end:
        out.append(s)
        s = max(s + 1, int(s * factor))
    return out


def run_one(nbytes: int, dtype: torch.dtype, algorithm: str, iters: int, warmup: int, device: torch.device,
            rank: int, world: int, reduce=None) -> dict:
    """One size: ``reduce(buf)`` (SUM in place; default: the backend's all-reduce), timed and checked."""
    elem = torch.tensor([], dtype=dtype).element_size()
    count = max(1, nbytes // elem)
    buf = torch.empty(count, dtype=dtype, device=device)
    times = []
    for i in range(warmup + iters):
        buf.fill_(rank + 1)
        if world > 1:
            dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        if world > 1:
            (reduce or dist.all_reduce)(buf)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    expected = world * (world + 1) // 2
    wrong = int((buf != expected).sum().item())
    med = statistics.median(times)
    stats = torch.tensor([med, float(wrong)], dtype=torch.float64, device=device)
    if world > 1:
        t_max = stats[:1].clone()
        dist.all_reduce(t_max, op=dist.ReduceOp.MAX)
        dist.all_reduce(stats)
        stats[0] = t_max[0]
    med, wrong = float(stats[0]), int(stats[1])
    size = count * elem
    algbw = size / med / 1e9
    return {"size": size, "count": count, "type": str(dtype).removeprefix("torch."), "algorithm": algorithm,
            "time_us": med * 1e6, "algbw": algbw, "busbw": algbw * bus_factor(world), "wrong": wrong}


def format_table(rows: list[dict]) -> str:
    head = f"{'size(B)':>12} {'count':>12} {'type':>9} {'algorithm':>10} {'time(us)':>10} {'algbw(GB/s)':>12} " \
           f"{'busbw(GB/s)':>12} {'#wrong':>7}"
    lines = [head]
    for r in rows:
        lines.append(f"{r['size']:>12} {r['count']:>12} {r['type']:>9} {r['algorithm']:>10} {r['time_us']:>10.1f} "
                     f"{r['algbw']:>12.3f} {r['busbw']:>12.3f} {r['wrong']:>7}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fastnet-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("-b", "--minbytes", default="8", help="smallest message, bytes (K/M/G suffixes), default 8")
    p.add_argument("-e", "--maxbytes", default="32M", help="largest message, bytes, default 32M")
    p.add_argument("-f", "--stepfactor", type=float, default=2.0, help="size multiplier per step, default 2")
    p.add_argument("-d", "--dtype", default="float32", help=f"element type: {', '.join(DTYPES)}")
    p.add_argument("-a", "--algorithm", default="native",
                   help=f"all-reduce algorithm: {', '.join(ALGORITHMS)}, or all")
    p.add_argument("--ranks-per-node", type=int, default=None, help="node size for hierarchical/leader "
                   "(default: LOCAL_WORLD_SIZE, i.e. one node)")
    p.add_argument("-n", "--iters", type=int, default=20, help="timed iterations per size, default 20")
    p.add_argument("-w", "--warmup", type=int, default=5, help="untimed iterations per size, default 5")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--timeout-s", type=float, default=300.0, help="collective timeout, seconds")
    p.add_argument("--json", help="also write the rows as JSON to this file")
    args = p.parse_args(argv)
    try:
        if args.dtype not in DTYPES:
            raise ValueError(f"Unknown dtype {args.dtype!r}; valid dtypes: {', '.join(DTYPES)}")
        if args.algorithm not in ALGORITHMS + ("all",):
            raise ValueError(f"Unknown algorithm {args.algorithm!r}; valid algorithms: {', '.join(ALGORITHMS)}")
        if args.iters < 1 or args.warmup < 0:
            raise ValueError(f"Invalid iters {args.iters} / warmup {args.warmup} (need iters >= 1, warmup >= 0)")
        todo = sizes(parse_size(args.minbytes), parse_size(args.maxbytes), args.stepfactor)
    except ValueError as exc:
        p.error(str(exc))
    world = setup(args.device, "auto", args.timeout_s)
    backend = dist.get_backend() if world.distributed else "none"
    algorithms = ALGORITHMS if args.algorithm == "all" else (args.algorithm,)
    reducers = {"native": None}
    if world.distributed and any(a != "native" for a in algorithms):
        from fastnet.comm.algorithms import ring_all_reduce
        from fastnet.comm.communicator import TorchCommunicator
        from fastnet.comm.topology import Hierarchy

        comm = TorchCommunicator()
        hierarchy = Hierarchy(comm, args.ranks_per_node or world.local_size)
        reducers["ring"] = lambda b: ring_all_reduce(comm, b)
        reducers["hierarchical"] = lambda b: hierarchy.all_reduce(b, "hierarchical")
        reducers["leader"] = lambda b: hierarchy.all_reduce(b, "leader")
    rows = [run_one(n, DTYPES[args.dtype], a, args.iters, args.warmup, world.device, world.rank, world.size,
                    reducers.get(a)) for a in algorithms for n in todo]
    if world.is_main:
        dev = torch.cuda.get_device_name(world.device) if world.device.type == "cuda" else platform.processor() or \
            platform.machine()
        print(f"# fastnet-bench all-reduce: world size {world.size}, backend {backend}, device {dev}, "
              f"torch {torch.__version__}, python {platform.python_version()}, host {platform.node()}")
        print(f"# median of {args.iters} iterations after {args.warmup} warm-up; busbw = algbw x 2(n-1)/n")
        print(format_table(rows))
        print(f"# out of bounds values : {sum(r['wrong'] for r in rows)} {'OK' if not any(r['wrong'] for r in rows) else 'FAILED'}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"world_size": world.size, "backend": backend, "rows": rows}, f, indent=1)
    wrong = sum(r["wrong"] for r in rows)
    teardown()
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
