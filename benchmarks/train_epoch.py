"""One epoch of ResNet-20 on CIFAR-10 with fastnet-train, 1 process (the baseline) vs N processes.

    .venv/bin/python benchmarks/train_epoch.py                 # CIFAR-10 from ../shared/data if there, else synthetic
    .venv/bin/python benchmarks/train_epoch.py --nprocs 1 2 --precision fp32 amp --append docs/BENCHMARKS.md

Each configuration runs ``fastnet-train`` for one epoch (torchrun on loopback, gloo) at the same
global batch; images/s is the median of the trainer's per-10-step windows (excluding the first
window, which holds start-up), and "vs 1 proc" is the ratio to the 1-process run of the same
precision in this same invocation. Top-1 is reported only on real data.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from fastnet.metrics import read_metrics  # noqa: E402
from report import emit  # noqa: E402


def find_cifar() -> str | None:
    from fastnet.data import cifar10_present  # the trainer's own layouts, JPEG re-encodings included

    shared = REPO.parent / "shared" / "data"
    return str(shared) if shared.is_dir() and cifar10_present(shared) else None


def run(nproc: int, precision: str, data_args: list[str], args, out: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "fastnet.train", "--model", "resnet20", *data_args, "--global-batch-size", str(args.global_batch),
           "--micro-batch-size", str(args.global_batch // max(args.nprocs)), "--epochs", "1",
           "--precision", precision, "--channels-last", "--workers", str(args.workers), "--progress", "none",
           "--base-lr", "0.1", "--warmup-epochs", "0.2", "--out-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"run failed ({' '.join(cmd)}):\n{res.stderr[-3000:]}")
    recs = read_metrics(out / "metrics.jsonl")
    windows = [r["images_per_s"] for r in recs if r["kind"] == "step"]
    windows = windows[1:] or windows
    summary = next(r for r in recs if r["kind"] == "summary")
    epoch = next(r for r in recs if r["kind"] == "epoch")
    return {"nproc": nproc, "precision": precision, "images_per_s": statistics.median(windows),
            "train_s": summary["steps"] * args.global_batch / summary["mean_images_per_s"],
            "top1": epoch["top1"], "comm_s": epoch["comm_s"], "steps": summary["steps"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--precision", nargs="+", default=["fp32", "amp"])
    p.add_argument("--global-batch", type=int, default=256)
    p.add_argument("--data-dir", default=None, help="CIFAR-10 directory (default: ../shared/data if it has it)")
    p.add_argument("--synthetic-samples", type=int, default=50000)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--append", default=None, help="append the markdown table to this file")
    args = p.parse_args()
    data_dir = args.data_dir or find_cifar()
    real = data_dir is not None
    official = real and any((Path(data_dir) / n).exists() for n in ("cifar-10-batches-py", "cifar-10-python.tar.gz"))
    data_name = "CIFAR-10" if official else "CIFAR-10 (JPEG q≈75 re-encoding)"
    data_args = ["--dataset", "cifar10", "--data-dir", data_dir] if real else \
        ["--dataset", "synthetic", "--image-size", "32", "--synthetic-samples", str(args.synthetic_samples)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for prec in args.precision:
            for n in args.nprocs:
                rows.append(run(n, prec, data_args, args, Path(tmp) / f"{prec}-{n}"))
                print(rows[-1], file=sys.stderr, flush=True)
    if torch.cuda.is_available():
        device, backend = torch.cuda.get_device_name(), "nccl"
    else:
        device, backend = f"{platform.machine()} CPU (capability {torch.backends.cpu.get_cpu_capability()})", "gloo"
    base = {r["precision"]: r["images_per_s"] for r in rows if r["nproc"] == min(args.nprocs)}
    lines = [
        f"### ResNet-20, one epoch of {data_name if real else 'synthetic CIFAR-shaped data'}, "
        f"global batch {args.global_batch} — {datetime.date.today()}",
        "",
        f"Command: `.venv/bin/python benchmarks/train_epoch.py {' '.join(sys.argv[1:])}`".rstrip(),
        f"Machine: {device}, {os.cpu_count()} CPU cores, torch {torch.__version__}, {backend} between processes, "
        f"channels_last, OMP threads = cores / processes.",
        "",
        "| processes | precision | steps | images/s (median of 10-step windows) | vs 1 proc | train s | comm s | top-1 |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        top1 = f"{r['top1']:.2f}%" if real else "n/a (synthetic)"
        lines.append(f"| {r['nproc']} | {r['precision']} | {r['steps']} | {r['images_per_s']:.0f} | "
                     f"{r['images_per_s'] / base[r['precision']]:.2f}x | {r['train_s']:.1f} | {r['comm_s']:.1f} | {top1} |")
    emit(lines, args.append)


if __name__ == "__main__":
    main()
