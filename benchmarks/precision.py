"""Training throughput by precision policy: fp32 vs amp (autocast + GradScaler) vs fp16 (FP16
model, FP32 master weights, flat buffers, dynamic loss scaling) vs bf16, in one run.

    python benchmarks/precision.py                       # CPU defaults (small batches)
    python benchmarks/precision.py --device cuda --batch 256 --steps 30 --append docs/BENCHMARKS.md

Synthetic data, channels_last, SGD with momentum; one training step = forward, backward, the
policy's step (unscale, overflow check, optimizer on masters, copy back), zero_grad. Each step is
synchronised (CUDA); images/s is the batch over the median step time after warm-up. "vs fp32"
and "vs amp" are ratios within this run. Goals (issue 3): fp16 >= 1.0x amp and >= 2.5x fp32.
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
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from fastnet.models import build_model  # noqa: E402
from fastnet.precision import Precision  # noqa: E402
from report import emit  # noqa: E402

MODELS = {"resnet18_cifar": (32, 10), "resnet50": (224, 1000)}


def measure(model_name: str, precision: str, batch: int, steps: int, warmup: int, device: torch.device) -> float:
    """Images/s of one policy. ``fp32-strict``: fp32 with TF32 disabled for convolutions and matmuls
    (PyTorch's default lets cuDNN run FP32 convolutions in TF32 on Ampere and newer)."""
    strict = precision == "fp32-strict"
    tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = not strict and tf32[0]
    try:
        return _measure(model_name, "fp32" if strict else precision, batch, steps, warmup, device)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def _measure(model_name: str, precision: str, batch: int, steps: int, warmup: int, device: torch.device) -> float:
    size, classes = MODELS[model_name]
    torch.manual_seed(0)
    model = build_model(model_name, classes, size).to(device).to(memory_format=torch.channels_last)
    prec = Precision(precision, device)
    model = prec.prepare(model)
    opt = torch.optim.SGD(prec.optimizer_params([{"params": list(model.parameters())}]), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), device=device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        with prec.autocast():
            loss = nn.functional.cross_entropy(model(prec.cast_input(x)).float(), y)
        prec.backward(loss)
        prec.step(opt)
        prec.zero_grad(opt)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--precisions", nargs="+", default=None,
                   help="default: fp32 amp fp16 bf16, plus fp32-strict (TF32 off) on CUDA")
    p.add_argument("--batch", type=int, default=None, help="default: 256 on CUDA; 32 (ResNet-18) / 4 (ResNet-50) on CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 30 on CUDA, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--append", default=None)
    args = p.parse_args()
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    precisions = args.precisions or (["fp32-strict"] if cuda else []) + ["fp32", "amp", "fp16", "bf16"]
    if cuda:
        torch.backends.cudnn.benchmark = True
    rows = []
    for m in args.models:
        batch = args.batch or (256 if cuda else (32 if m == "resnet18_cifar" else 4))
        steps = args.steps or (30 if cuda else 3)
        warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
        ips = {}
        for prec in precisions:
            ips[prec] = measure(m, prec, batch, steps, warmup, dev)
            print(f"{m} {prec}: {ips[prec]:.1f} img/s", file=sys.stderr, flush=True)
        for prec in precisions:
            rows.append((m, batch, prec, ips[prec], ips[prec] / ips.get("fp32", float("nan")),
                         ips[prec] / ips.get("amp", float("nan"))))
    name = torch.cuda.get_device_name(dev) if cuda else \
        f"{platform.machine()} CPU ({torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} cores"
    lines = [f"### Training throughput by precision — {datetime.date.today()}", "",
             f"Command: `python benchmarks/precision.py {' '.join(sys.argv[1:])}`".rstrip(),
             f"Machine: {name}, torch {torch.__version__}; synthetic data, channels_last, SGD momentum; "
             f"median step time after warm-up.", "",
             "| model | batch | precision | images/s | vs fp32 | vs amp |", "|---|---:|---|---:|---:|---:|"]
    lines += [f"| {m} | {b} | {p} | {v:.1f} | {r32:.2f}x | {ramp:.2f}x |" for m, b, p, v, r32, ramp in rows]
    emit(lines, args.append)


if __name__ == "__main__":
    main()
