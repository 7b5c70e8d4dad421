"""Communication benchmarks of the comm issue, in one run, with ratios against the baseline of the same run.

    .venv/bin/python benchmarks/comm.py --append docs/BENCHMARKS.md

1. **Fusion** (ResNet-50's 161 gradient tensors, 102 MB fp32, 2 ranks, gloo): ``fastnet-bench
   --model resnet50``: one all-reduce of the same bytes (``single``, the floor) vs one blocking
   all-reduce per tensor vs fused (pack/unpack, and bucket views). Goals: fused ≤ 1.15× single,
   ≥ 2× faster than per-tensor.
2. **Ring vs native** at 16–256 MiB, 2 ranks, over gloo (torchrun) and MPICH (mpiexec): busbw of
   fastnet's ring over send/recv ÷ the backend's own all-reduce. Goal ≥ 0.9×.
3. **Ring segments** (issue #16), 2 and 4 ranks over gloo: the ring with each chunk in 4 MiB
   pipelined segments (``--segment-mb 4``, the default) and in one piece (``--segment-mb 0``)
   vs native, launches alternating, each busbw the median over ``--repeats`` launches.

``--sections`` picks some of them (default: all).

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
import statistics
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


def segments_table(args, it: list[str]) -> list[str]:
    """Section 3: native vs the ring in one piece vs the ring in 4 MiB segments, 2 and 4 ranks."""
    busbw: dict[tuple, list[float]] = {}
    wrong = 0
    for world in (2, 4):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
        for _ in range(args.repeats):
            for seg in ("0", "4"):  # alternating, so drift on a noisy machine hits both alike
                rows = bench(launcher, ["-b", "16M", "-e", "256M", "-f", "4", "-a", "native,ring", "--segment-mb",
                                        seg, *it])["rows"]
                for r in rows:
                    busbw.setdefault((world, r["size"], r["algorithm"] if r["algorithm"] == "native"
                                      else f"ring-{seg}"), []).append(r["busbw"])
                    wrong += r["wrong"]
    lines = [f"**Ring segments** (gloo, `fastnet-bench -b 16M -e 256M -f 4 -a native,ring --segment-mb 0|4`, "
             f"busbw medians over {args.repeats} alternating launches each; #wrong summed: {wrong}):", "",
             "| ranks | size (MiB) | native (GB/s) | ring, one piece (GB/s) | ring, 4 MiB segments (GB/s) | "
             "one piece ÷ native | segments ÷ native |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for world, size in sorted({(w, s) for w, s, _ in busbw}):
        nat, one, seg = (statistics.median(busbw[(world, size, k)]) for k in ("native", "ring-0", "ring-4"))
        lines.append(f"| {world} | {size >> 20} | {nat:.2f} | {one:.2f} | {seg:.2f} | {one / nat:.2f}x | "
                     f"{seg / nat:.2f}x |")
    return lines + [""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=15)
    p.add_argument("--repeats", type=int, default=3, help="ring segments: launches per configuration")
    p.add_argument("--sections", default="fusion,ring,segments", help="comma-separated: fusion, ring, segments")
    p.add_argument("--append", help="append the tables to this markdown file")
    args = p.parse_args()
    sections = set(args.sections.split(","))
    if sections - {"fusion", "ring", "segments"}:
        p.error(f"unknown --sections {sorted(sections - {'fusion', 'ring', 'segments'})}; valid: fusion, ring, segments")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent))
    it = ["-n", str(args.iters), "-w", "3"]
    lines = [f"### Communication: fusion and ring vs native — {datetime.date.today()}", "",
             f"Command: `python benchmarks/comm.py {' '.join(sys.argv[1:])}`",
             f"Machine: {platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, 2 ranks on loopback, "
             f"OMP_NUM_THREADS=1; medians of {args.iters} iterations (max over ranks).", ""]
    if "fusion" in sections:
        lines += ["**ResNet-50 gradient list** (`fastnet-bench --model resnet50 --fusion-mb 4,25,64 -a native`, gloo):",
                  "", "| mode | fusion (MiB) | time (ms) | vs single | per-tensor ÷ this | #wrong |",
                  "|---|---:|---:|---:|---:|---:|"]
        model = bench(torchrun, ["--model", "resnet50", "--fusion-mb", "4,25,64", "-a", "native", *it])["rows"]
        per_tensor = next(r["time_ms"] for r in model if r["mode"] == "per-tensor")
        for r in model:
            mb = "-" if r["fusion_mb"] is None else f"{r['fusion_mb']:g}"
            lines.append(f"| {r['mode']} | {mb} | {r['time_ms']:.1f} | {r['vs_single']:.2f}x | "
                         f"{per_tensor / r['time_ms']:.2f}x | {r['wrong']} |")
        lines.append("")
    if "segments" in sections:
        lines += segments_table(args, it)
    if "ring" not in sections:
        emit(lines, args.append)
        return
    lines += ["**Ring over send/recv vs the backend's all-reduce**, 16–256 MiB fp32:", "",
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
