"""Optimizer step time on ResNet-50's parameters (25.6M in 161 tensors): LARS multi-tensor vs
LARS per-parameter reference vs torch.optim.SGD(foreach=True), all with momentum and weight decay.

    .venv/bin/python benchmarks/lars_step.py [--device cuda] [--repeats 20] [--append docs/BENCHMARKS.md]

Each optimizer gets the same parameters and fresh random gradients; after 3 warm-up steps, each
timed step is synchronised (CUDA) and the median over ``--repeats`` is reported, interleaving the
three optimizers so that drift in machine load hits all of them alike. Goals (issue 2): LARS step
<= 1.5x SGD's and >= 2x faster than the per-parameter path.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from fastnet.models import build_model  # noqa: E402
from fastnet.optim import LARS, param_groups  # noqa: E402
from report import emit  # noqa: E402


def make(kind: str, device: torch.device):
    torch.manual_seed(0)
    model = build_model("resnet50", 1000, 224).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    if kind == "sgd_foreach":
        return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-5, foreach=True)
    return model, LARS(param_groups(model, 5e-5, "1d"), lr=0.1, momentum=0.9, trust_coefficient=0.001,
                       foreach=(kind == "lars_foreach"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--append", default=None)
    args = p.parse_args()
    dev = torch.device(args.device)
    kinds = ["sgd_foreach", "lars_foreach", "lars_reference"]
    setups = {k: make(k, dev) for k in kinds}
    n_params = sum(p.numel() for p in setups["sgd_foreach"][0].parameters())
    n_tensors = len(list(setups["sgd_foreach"][0].parameters()))
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for i in range(3 + args.repeats):
        for k in kinds:
            opt = setups[k][1]
            sync()
            t0 = time.perf_counter()
            opt.step()
            sync()
            if i >= 3:
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else \
        f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    lines = [f"### LARS step on ResNet-50's parameters ({n_params / 1e6:.1f}M, {n_tensors} tensors) — "
             f"{datetime.date.today()}", "",
             f"Command: `python benchmarks/lars_step.py {' '.join(sys.argv[1:])}`".rstrip(),
             f"Machine: {name}, torch {torch.__version__}; median of {args.repeats} steps after 3 warm-up.", "",
             "| optimizer | step (ms) | vs SGD foreach | speed-up over LARS reference |", "|---|---:|---:|---:|"]
    for k in kinds:
        lines.append(f"| {k} | {med[k]:.2f} | {med[k] / med['sgd_foreach']:.2f}x | "
                     f"{med['lars_reference'] / med[k]:.2f}x |")
    ok1 = med["lars_foreach"] <= 1.5 * med["sgd_foreach"]
    ok2 = med["lars_reference"] >= 2 * med["lars_foreach"]
    lines += ["", f"Goals: LARS <= 1.5x SGD: {'met' if ok1 else 'NOT met'} "
              f"({med['lars_foreach'] / med['sgd_foreach']:.2f}x); >= 2x faster than the reference: "
              f"{'met' if ok2 else 'NOT met'} ({med['lars_reference'] / med['lars_foreach']:.2f}x)."]
    emit(lines, args.append)


if __name__ == "__main__":
    main()
