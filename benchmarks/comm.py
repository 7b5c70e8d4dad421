"""Communication benchmarks of the comm issue, in one run, with ratios against the baseline of the same run.

    .venv/bin/python benchmarks/comm.py --append docs/BENCHMARKS.md

1. **Fusion** (ResNet-50's 161 gradient tensors, 102 MB fp32, 2 ranks, gloo): ``fastnet-bench
   --model resnet50``: one all-reduce of the same bytes (``single``, the floor) vs one blocking
   all-reduce per tensor vs fused (pack/unpack, and bucket views). Goals: fused ≤ 1.15× single,
   ≥ 2× faster than per-tensor.
2. **Ring vs native** at 16–256 MiB, 2 ranks, over gloo (torchrun) and MPICH (mpiexec): busbw of
   fastnet's ring over send/recv ÷ the backend's own all-reduce. Goal ≥ 0.9×.

Every row is checked (#wrong must be 0). Each launch is a separate ``fastnet-bench`` process;
times are medians of ``--iters`` iterations (max over ranks).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from report import emit  # noqa: E402


def bench(launcher: list[str], args: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        res = subprocess.run([*launcher, "-m", "fastnet.comm.bench", *args, "--json", str(out)], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=3600)
        if res.returncode != 0:
            raise SystemExit(f"fastnet-bench failed:\n{res.stdout}\n{res.stderr[-3000:]}")
        return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=15)
    p.add_argument("--append", help="append the tables to this markdown file")
    args = p.parse_args()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent))
    it = ["-n", str(args.iters), "-w", "3"]
    lines = [f"### Communication: fusion and ring vs native — {datetime.date.today()}", "",
             "Command: `python benchmarks/comm.py --append docs/BENCHMARKS.md`",
             f"Machine: {platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, 2 ranks on loopback, "
             f"OMP_NUM_THREADS=1; medians of {args.iters} iterations (max over ranks).", "",
             "**ResNet-50 gradient list** (`fastnet-bench --model resnet50 --fusion-mb 4,25,64 -a native`, gloo):", "",
             "| mode | fusion (MiB) | time (ms) | vs single | per-tensor ÷ this | #wrong |", "|---|---:|---:|---:|---:|---:|"]
    model = bench(torchrun, ["--model", "resnet50", "--fusion-mb", "4,25,64", "-a", "native", *it])["rows"]
    per_tensor = next(r["time_ms"] for r in model if r["mode"] == "per-tensor")
    for r in model:
        mb = "-" if r["fusion_mb"] is None else f"{r['fusion_mb']:g}"
        lines.append(f"| {r['mode']} | {mb} | {r['time_ms']:.1f} | {r['vs_single']:.2f}x | "
                     f"{per_tensor / r['time_ms']:.2f}x | {r['wrong']} |")
    lines += ["", "**Ring over send/recv vs the backend's all-reduce**, 16–256 MiB fp32:", "",
              "| backend | size (MiB) | native busbw (GB/s) | ring busbw (GB/s) | ring ÷ native | #wrong |",
              "|---|---:|---:|---:|---:|---:|"]
    sweep = ["-b", "16M", "-e", "256M", "-f", "4", "-a", "all", "--ranks-per-node", "1"]
    runs = [("gloo", torchrun)] + ([("mpich", [mpiexec, "-n", "2", sys.executable])] if mpiexec else [])
    for name, launcher in runs:
        rows = bench(launcher, [*sweep, *it, *(["--backend", "mpi"] if name == "mpich" else [])])["rows"]
        for size in sorted({r["size"] for r in rows}):
            nat = next(r for r in rows if r["size"] == size and r["algorithm"] == "native")
            ring = next(r for r in rows if r["size"] == size and r["algorithm"] == "ring")
            lines.append(f"| {name} | {size >> 20} | {nat['busbw']:.2f} | {ring['busbw']:.2f} | "
                         f"{ring['busbw'] / nat['busbw']:.2f}x | {nat['wrong'] + ring['wrong']} |")
    emit(lines, args.append)


if __name__ == "__main__":
    main()
