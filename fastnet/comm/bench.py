"""fastnet-bench: all-reduce microbenchmarks in the style of nccl-tests.

    torchrun --standalone --nproc_per_node=2 -m fastnet.comm.bench -b 8 -e 64M -f 2 -a all
    mpiexec -n 4 python -m fastnet.comm.bench --backend mpi -a all --ranks-per-node 2
    torchrun --standalone --nproc_per_node=2 -m fastnet.comm.bench --model resnet50

**Sweep mode.** For each message size from ``-b`` to ``-e`` (bytes, growing by factor ``-f``),
every rank fills a buffer with the index- and rank-dependent integers ``(i + rank) mod p + 1``
(:func:`fill_pattern`; p = 7, or smaller where 7·n would not be exact in the dtype, so the sum is
exact in every dtype and a chunk that lands in the wrong place counts as wrong), runs
``--warmup`` untimed and ``--iters`` timed SUM all-reduces with a barrier before each, and reports
the median. Columns (nccl-tests, doc/PERFORMANCE.md): size (B), count (elements), type, algorithm,
time (µs, median over iterations, max over ranks), algbw = size / time (GB/s), busbw = algbw ×
2(n−1)/n (GB/s), #wrong (elements differing from :func:`expected_sum` after the last iteration,
summed over ranks). ``--calibrate FILE`` fits the α-β cost model to the rows and writes it (YAML) for
``--allreduce hybrid --cost-model FILE``; ``--plot FILE`` draws busbw against size.

**Model mode** (``--model resnet50|alexnet|...``): the real gradient tensor list of a torchvision
model (filled with the same pattern, indexed across the whole list) is averaged per "step" as: one all-reduce of a flat buffer of the
same bytes (``single``, the floor), one blocking all-reduce per tensor (``per-tensor``), packed
into fusion buckets and unpacked (``fused-pack``, :class:`fastnet.comm.AlgorithmAllReduce`, with
``--wire-dtype``), and
bucket views of one persistent buffer without packing (``fused-views``, what
:class:`fastnet.comm.GradientSynchronizer` does), for each ``--fusion-mb`` threshold.

Backends (``--backend``): ``torch`` (torch.distributed: gloo on CPU, nccl on CUDA; under
torchrun), ``mpi`` (mpi4py; under mpiexec), ``nccl`` (CuPy's NCCL; under torchrun). Algorithms:
``native`` (the backend's own all-reduce), fastnet's ``ring``, ``hierarchical`` / ``leader`` (composed
of backend collectives), ``hierarchical_p2p`` / ``leader_p2p`` (fastnet's ring schedules), and
``hybrid`` (per message: by ``--cost-model``, or without one chosen online per size class —
every candidate measured in untimed all-reduces before the timed ones, :mod:`fastnet.comm.planning.autotune`;
the choices are printed under the table). Exit status 1 if any result is wrong.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import torch

from fastnet.comm.planning.cost_model import CostModel, calibrate
from fastnet.comm.gradients.reducer import ALGORITHMS, WIRE_DTYPES
from fastnet.comm.planning.hierarchy import DEFAULT_SEGMENT_BYTES

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
          "int32": torch.int32}
BACKENDS = ("torch", "mpi", "nccl")
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


class Bench:
    """The communicator under test and how to time on it."""

    def __init__(self, backend: str, device: str, timeout_s: float, ranks_per_node: int | None,
                 cost_model: CostModel | None, segment_bytes: int = DEFAULT_SEGMENT_BYTES) -> None:
        self.backend_name = backend
        if backend == "mpi":
            from fastnet.comm.communicators.mpi import MPICommunicator

            self.comm: Any = MPICommunicator()
            self.device = torch.device("cpu")
            self.label = "mpi"
        else:
            from fastnet.comm.communicators.torchdist import TorchCommunicator
            from fastnet.distributed import setup

            world = setup(device, "auto", timeout_s)
            self.device = world.device
            if world.distributed:
                self.comm = TorchCommunicator()
                self.label = self.comm.backend
            else:
                self.comm, self.label = None, "none"
            if backend == "nccl":
                from fastnet.comm.communicators.nccl import NcclCommunicator

                self.comm, self.label = NcclCommunicator.from_torch(timeout_s=timeout_s), "nccl-cupy"
        self.rank = self.comm.rank if self.comm else 0
        self.size = self.comm.size if self.comm else 1
        self.override = ranks_per_node  # None: nodes from the hosts (BucketReducer)
        if ranks_per_node is None and self.comm is not None:
            from fastnet.comm.planning.topology import Topology, gather_hosts

            ranks_per_node = Topology.from_hosts(self.rank, gather_hosts(self.comm)).ranks_per_node
        self.ranks_per_node = ranks_per_node or 1  # the largest node: the cost model's node size
        self.cost_model = cost_model  # None: hybrid chooses online (fastnet.comm.planning.autotune)
        self.segment_bytes = segment_bytes
        self._reducers: dict[str, Any] = {}

    def reducer(self, algorithm: str) -> Callable[[torch.Tensor], None]:
        """SUM all-reduce in place of a 1-D tensor with ``algorithm`` (``hybrid``: per message), via
        :meth:`fastnet.comm.gradients.reducer.BucketReducer.sum_`; one reducer per algorithm, built once."""
        from fastnet.comm.gradients.reducer import BucketReducer

        if self.size == 1:
            return lambda buf: None
        if algorithm not in self._reducers:
            self._reducers[algorithm] = BucketReducer(self.comm, algorithm, "none", self.override,
                                                      self.cost_model, self.segment_bytes)
        return self._reducers[algorithm].sum_

    def chosen(self, algorithm: str, nbytes: int) -> str:
        """The algorithm that ran an all-reduce of ``nbytes`` bytes for ``algorithm``: itself, or
        ``hybrid``'s choice (online, or from the cost model)."""
        red = self._reducers.get(algorithm)
        return red.algorithm_for(nbytes) if algorithm == "hybrid" and red is not None else algorithm

    def settled(self, algorithm: str) -> Callable[[], bool] | None:
        """For ``hybrid`` choosing online: a function that is True while the reducer of
        :meth:`reducer` still explores a size class (so timing waits for its choice); else None."""
        tuner = getattr(self._reducers.get(algorithm), "tuner", None)
        return None if tuner is None else tuner.exploring

    def segment_bytes_of(self, algorithm: str) -> int:
        """The pipeline segment ``algorithm`` runs with here (:func:`fastnet.comm.planning.hierarchy.pipeline_segment_bytes`)."""
        from fastnet.comm.planning.hierarchy import pipeline_segment_bytes

        return pipeline_segment_bytes(algorithm, self.segment_bytes, self.comm)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def barrier(self) -> None:
        if self.comm is not None:
            self.comm.barrier()
        self.sync()

    def timed(self, fn: Callable[[], None], prepare: Callable[[], None], iters: int, warmup: int,
              exploring: Callable[[], bool] | None = None) -> float:
        """Median seconds of ``fn`` over ``iters`` runs after ``warmup``, max over ranks. With
        ``exploring`` (``hybrid`` choosing online), ``fn`` first runs untimed until it returns False,
        so the timed runs use the agreed choice (the same on every rank: the exploration is)."""
        if exploring is not None:
            prepare()
            fn()
            while exploring():
                prepare()
                fn()
        times = []
        for i in range(warmup + iters):
            prepare()
            self.barrier()
            t0 = time.perf_counter()
            fn()
            self.sync()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        return self.reduce_scalar(statistics.median(times), "max")

    def reduce_scalar(self, value: float, op: str = "sum") -> float:
        if self.comm is None:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        self.comm.all_reduce(t, op=op)
        self.sync()
        return float(t.item())

    def teardown(self) -> None:
        if self.backend_name != "mpi":
            from fastnet.distributed import teardown

            teardown()


_EXACT_INTEGERS = {torch.float16: 2048, torch.bfloat16: 256, torch.uint8: 255, torch.int8: 127}


def pattern_period(size: int, dtype: torch.dtype) -> int:
    """The fill pattern's period: 7, or 3 or 1 where the sum over ``size`` ranks of values up to 7
    would not be an exact integer in ``dtype`` (fp16 holds integers exactly up to 2048, bf16 256)."""
    limit = _EXACT_INTEGERS.get(dtype, 1 << 24)
    return next((p for p in (7, 3) if p * size <= limit), 1)


def fill_pattern(count: int, rank: int, size: int, dtype: torch.dtype, device: torch.device | str = "cpu",
                 offset: int = 0) -> torch.Tensor:
    """Rank ``rank``'s input: element i is ``(i + offset + rank) mod p + 1`` (``p``:
    :func:`pattern_period`), shape (count,), ``dtype``. Index- and rank-dependent as nccl-tests'
    data, so a misplaced chunk shows as #wrong where a constant fill would hide it."""
    p = pattern_period(size, dtype)
    idx = torch.arange(offset, offset + count, device=device)
    return ((idx + rank) % p + 1).to(dtype)


def expected_sum(count: int, size: int, dtype: torch.dtype, device: torch.device | str = "cpu",
                 offset: int = 0) -> torch.Tensor:
    """The SUM over ``size`` ranks of :func:`fill_pattern`, float64, shape (count,)."""
    p = pattern_period(size, dtype)
    table = torch.tensor([sum((j + r) % p + 1 for r in range(size)) for j in range(p)], dtype=torch.float64,
                         device=device)
    return table[torch.arange(offset, offset + count, device=device) % p]


def run_size(bench: Bench, nbytes: int, dtype: torch.dtype, algorithm: str, iters: int, warmup: int) -> dict:
    """One sweep row: ``nbytes`` of ``dtype`` all-reduced (SUM) with ``algorithm``, timed and checked."""
    elem = torch.tensor([], dtype=dtype).element_size()
    count = max(1, nbytes // elem)
    buf = torch.empty(count, dtype=dtype, device=bench.device)
    mine = fill_pattern(count, bench.rank, bench.size, dtype, bench.device)
    reduce = bench.reducer(algorithm)
    med = bench.timed(lambda: reduce(buf), lambda: buf.copy_(mine), iters, warmup, bench.settled(algorithm))
    expected = expected_sum(count, bench.size, dtype, bench.device)
    wrong = int(bench.reduce_scalar(float((buf.double() != expected).sum().item())))
    size = count * elem
    algbw = size / med / 1e9
    return {"size": size, "count": count, "type": str(dtype).removeprefix("torch."), "algorithm": algorithm,
            "time_us": med * 1e6, "algbw": algbw, "busbw": algbw * bus_factor(bench.size), "wrong": wrong,
            "segment_bytes": bench.segment_bytes_of(algorithm), "chosen": bench.chosen(algorithm, size)}  # what calibrate() models the row with


def model_shapes(name: str) -> list[torch.Size]:
    """Parameter shapes of a torchvision / fastnet model (the gradients data parallelism all-reduces)."""
    from fastnet.models import build_model

    size = 224 if name in ("resnet50", "alexnet", "alexnet_bn") else 32
    return [p.shape for p in build_model(name, 1000 if size == 224 else 10, size).parameters()]


def run_model(bench: Bench, name: str, dtype: torch.dtype, algorithm: str, fusion_mb: Sequence[float],
              iters: int, warmup: int, wire_dtype: str = "none") -> list[dict]:
    """Model-mode rows (module docstring): time per step of each way to average the gradient list."""
    from fastnet.comm.gradients.allreduce import AlgorithmAllReduce

    shapes = model_shapes(name)
    grads = [torch.empty(s, dtype=dtype, device=bench.device) for s in shapes]
    total = sum(g.numel() for g in grads)
    flat = torch.empty(total, dtype=dtype, device=bench.device)
    reduce = bench.reducer(algorithm)
    n = bench.size
    tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) or wire_dtype != "none" else 1e-5
    mine = fill_pattern(total, bench.rank, n, dtype, bench.device)  # indexed across the whole list
    mean = expected_sum(total, n, dtype, bench.device) / n if n > 1 else mine.double()

    def fill() -> None:
        off = 0
        for g in grads:
            g.view(-1).copy_(mine[off:off + g.numel()])
            off += g.numel()
        flat.copy_(mine)

    def wrong(tensors: Sequence[torch.Tensor]) -> int:
        got = torch.cat([t.reshape(-1).double() for t in tensors])
        return int(bench.reduce_scalar(float(((got - mean).abs() > tol * mean).sum().item())))

    def views(threshold: int) -> Callable[[], None]:
        per = max(1, threshold // flat.element_size())
        buckets = [flat[lo:lo + per] for lo in range(0, total, per)]

        def run() -> None:
            for b in buckets:
                b.div_(n)
                reduce(b)
        return run

    def per_tensor() -> None:
        for g in grads:
            g.div_(n)
            reduce(g.view(-1))

    cases: list[tuple[str, float | None, Callable[[], None], list[torch.Tensor], Any]] = [
        ("single", None, views(total * flat.element_size()), [flat], bench.settled(algorithm)),
        ("per-tensor", None, per_tensor, grads, bench.settled(algorithm))]
    for mb in fusion_mb:
        threshold = int(mb * (1 << 20))
        sync = AlgorithmAllReduce(bench.comm, algorithm, threshold, wire_dtype, ranks_per_node=bench.override,
                                  cost_model=bench.cost_model, segment_bytes=bench.segment_bytes) if bench.comm else None
        cases.append(("fused-pack", mb, (lambda s=sync: s(grads)) if sync else (lambda: None), grads,
                      sync.reducer.tuner.exploring if sync and sync.reducer.tuner else None))
        cases.append(("fused-views", mb, views(threshold), [flat], bench.settled(algorithm)))
    rows = []
    single = None
    for mode, mb, fn, out, exploring in cases:
        med = bench.timed(fn, fill, iters, warmup, exploring)
        single = single or med
        rows.append({"model": name, "tensors": len(grads), "bytes": total * flat.element_size(),
                     "wire": wire_dtype if mode == "fused-pack" else "none", "mode": mode,
                     "fusion_mb": mb, "algorithm": algorithm, "time_ms": med * 1e3, "vs_single": med / single,
                     "wrong": wrong(out)})
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'size(B)':>12} {'count':>12} {'type':>9} {'algorithm':>12} {'time(us)':>10} {'algbw(GB/s)':>12} " \
           f"{'busbw(GB/s)':>12} {'#wrong':>7}"
    lines = [head]
    for r in rows:
        lines.append(f"{r['size']:>12} {r['count']:>12} {r['type']:>9} {r['algorithm']:>12} {r['time_us']:>10.1f} "
                     f"{r['algbw']:>12.3f} {r['busbw']:>12.3f} {r['wrong']:>7}")
    return "\n".join(lines)


def format_model_table(rows: list[dict]) -> str:
    lines = [f"{'model':>10} {'tensors':>8} {'bytes':>11} {'mode':>12} {'wire':>5} {'fusion(MiB)':>11} {'algorithm':>10} "
             f"{'time(ms)':>9} {'vs single':>9} {'#wrong':>7}"]
    for r in rows:
        mb = "-" if r["fusion_mb"] is None else f"{r['fusion_mb']:g}"
        lines.append(f"{r['model']:>10} {r['tensors']:>8} {r['bytes']:>11} {r['mode']:>12} {r['wire']:>5} {mb:>11} "
                     f"{r['algorithm']:>10} {r['time_ms']:>9.2f} {r['vs_single']:>9.2f} {r['wrong']:>7}")
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str) -> None:
    """busbw (GB/s) against message size (bytes, log scale), one line per algorithm (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for alg in dict.fromkeys(r["algorithm"] for r in rows):
        pts = [(r["size"], r["busbw"]) for r in rows if r["algorithm"] == alg]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=alg)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("busbw (GB/s)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def calibration_table(model: CostModel, rows: list[dict], world: int, ranks_per_node: int,
                      segment_bytes: int = 0) -> str:
    lines = [f"{'size(B)':>12} {'algorithm':>12} {'measured(us)':>13} {'model(us)':>10} {'error':>7}"]
    for r in rows:
        if r["algorithm"] == "hybrid":
            continue
        pred = model.time(r["algorithm"], r["size"], world, ranks_per_node, r.get("segment_bytes", segment_bytes)) * 1e6
        lines.append(f"{r['size']:>12} {r['algorithm']:>12} {r['time_us']:>13.1f} {pred:>10.1f} "
                     f"{(pred - r['time_us']) / r['time_us']:>+7.1%}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fastnet-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("-b", "--minbytes", default="8", help="smallest message, bytes (K/M/G suffixes), default 8")
    p.add_argument("-e", "--maxbytes", default="32M", help="largest message, bytes, default 32M")
    p.add_argument("-f", "--stepfactor", type=float, default=2.0, help="size multiplier per step, default 2")
    p.add_argument("-d", "--dtype", default="float32", help=f"element type(s), comma-separated: {', '.join(DTYPES)}")
    p.add_argument("--wire-dtype", default="none", help="model mode: gradients on the wire (none, fp16, bf16)")
    p.add_argument("-a", "--algorithm", default="native",
                   help=f"all-reduce algorithm(s), comma-separated: {', '.join(ALGORITHMS)}, or all")
    p.add_argument("--backend", default="torch", help=f"communicator: {', '.join(BACKENDS)} (default torch)")
    p.add_argument("--ranks-per-node", type=int, default=None, help="node size for hierarchical/leader/hybrid "
                   "(default: LOCAL_WORLD_SIZE, or MPI's shared-memory split)")
    p.add_argument("--segment-mb", type=float, default=DEFAULT_SEGMENT_BYTES / (1 << 20),
                   help="ring and hierarchical: pipeline segment, MiB (0: no pipelining); default %(default)g")
    p.add_argument("--cost-model", help="YAML cost model for hybrid (from --calibrate); without it hybrid chooses "
                   "online per size class, measuring every candidate in untimed runs first")
    p.add_argument("--model", help="model mode: all-reduce this model's gradient list (e.g. resnet50, alexnet)")
    p.add_argument("--fusion-mb", default="1,4,16,64", help="model mode: fusion thresholds, MiB, comma-separated")
    p.add_argument("-n", "--iters", type=int, default=20, help="timed iterations per size, default 20")
    p.add_argument("-w", "--warmup", type=int, default=5, help="untimed iterations per size, default 5")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--timeout-s", type=float, default=300.0, help="collective timeout, seconds")
    p.add_argument("--json", help="also write the rows as JSON to this file")
    p.add_argument("--csv", help="also write the rows as CSV to this file")
    p.add_argument("--plot", help="sweep mode: write a PNG of busbw against size per algorithm")
    p.add_argument("--calibrate", help="sweep mode: fit the α-β cost model to the rows and write it (YAML)")
    args = p.parse_args(argv)
    try:
        dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
        for d in dtypes or [args.dtype]:
            if d not in DTYPES:
                raise ValueError(f"Unknown dtype {d!r}; valid dtypes: {', '.join(DTYPES)}")
        if args.wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"Unknown wire dtype {args.wire_dtype!r}; valid wire dtypes: {', '.join(WIRE_DTYPES)}")
        for a in ([] if args.algorithm == "all" else args.algorithm.split(",")):
            if a.strip() not in ALGORITHMS:
                raise ValueError(f"Unknown algorithm {a.strip()!r}; valid algorithms: {', '.join(ALGORITHMS)}, all")
        if args.backend not in BACKENDS:
            raise ValueError(f"Unknown backend {args.backend!r}; valid backends: {', '.join(BACKENDS)}")
        if args.iters < 1 or args.warmup < 0:
            raise ValueError(f"Invalid iters {args.iters} / warmup {args.warmup} (need iters >= 1, warmup >= 0)")
        todo = sizes(parse_size(args.minbytes), parse_size(args.maxbytes), args.stepfactor)
        fusion = [float(x) for x in args.fusion_mb.split(",") if x.strip()]
        if not fusion or any(x <= 0 for x in fusion):
            raise ValueError(f"Invalid --fusion-mb {args.fusion_mb!r} (positive MiB values, comma-separated)")
        if args.segment_mb < 0:
            raise ValueError(f"Invalid --segment-mb {args.segment_mb} (MiB >= 0; 0: no pipelining)")
        cost_model = CostModel.load(args.cost_model) if args.cost_model else None
        if args.model:
            model_shapes(args.model)  # validates the name
    except (ValueError, FileNotFoundError) as exc:
        p.error(str(exc))
    bench = Bench(args.backend, args.device, args.timeout_s, args.ranks_per_node, cost_model,
                  int(args.segment_mb * (1 << 20)))
    if args.algorithm == "all":
        algorithms = ALGORITHMS
    else:
        algorithms = tuple(a.strip() for a in args.algorithm.split(","))
    if args.model:
        rows = [r for d in dtypes for a in algorithms for r in
                run_model(bench, args.model, DTYPES[d], a, fusion, args.iters, args.warmup, args.wire_dtype)]
        table = format_model_table(rows)
    else:
        rows = [run_size(bench, n, DTYPES[d], a, args.iters, args.warmup) for d in dtypes for a in algorithms
                for n in todo]
        table = format_table(rows)
    wrong = sum(r["wrong"] for r in rows)
    if bench.rank == 0:
        dev = torch.cuda.get_device_name(bench.device) if bench.device.type == "cuda" else \
            platform.processor() or platform.machine()
        header = (f"fastnet-bench all-reduce: world size {bench.size}, ranks per node {bench.ranks_per_node}, "
                  f"hierarchical_p2p segment {bench.segment_bytes} B, backend {bench.label}, device {dev}, "
                  f"torch {torch.__version__}, python {platform.python_version()}, host {platform.node()}")
        print(f"# {header}")
        print(f"# median of {args.iters} iterations after {args.warmup} warm-up; busbw = algbw x 2(n-1)/n")
        print(table)
        picks = [f"{r['size']} B: {r['chosen']}" for r in rows if r.get("chosen") and r["algorithm"] == "hybrid"]
        if picks:
            how = f"cost model {args.cost_model}" if args.cost_model else \
                "online, no --cost-model (fastnet.comm.planning.autotune)"
            print(f"# hybrid chose ({how}): " + ", ".join(picks))
        print(f"# out of bounds values : {wrong} {'OK' if not wrong else 'FAILED'}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"world_size": bench.size, "ranks_per_node": bench.ranks_per_node, "backend": bench.label,
                           "segment_bytes": bench.segment_bytes, "header": header, "rows": rows}, f, indent=1)
        if args.csv:
            with open(args.csv, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
        if args.plot and not args.model:
            plot(rows, args.plot, header)
        if args.calibrate and not args.model:
            fitted = calibrate(rows, bench.size, bench.ranks_per_node, segment_bytes=bench.segment_bytes)
            fitted.save(args.calibrate)
            print(f"# cost model written to {args.calibrate}: " + ", ".join(
                f"{lv} α={getattr(fitted, lv).alpha_s * 1e6:.1f} µs, {getattr(fitted, lv).bandwidth_gbps:.3g} GB/s"
                for lv in ("intra", "inter", "native")))
            print(calibration_table(fitted, rows, bench.size, bench.ranks_per_node, bench.segment_bytes))
    bench.teardown()
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
