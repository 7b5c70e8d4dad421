"""Cost of measuring the gradient noise scale (``--grad-noise-scale``) on a ResNet-20 step.

    .venv/bin/python benchmarks/noise_scale.py [--micro-batch 128] [--repeats 15] [--append docs/BENCHMARKS.md]

What the measurement adds to a training step, timed against the step's own forward + backward
(ResNet-20, CIFAR-shaped inputs, FP32, this process's threads), all interleaved so that load
drift hits every row alike; medians over ``--repeats``:

* data-parallel (world size >= 2): two squared norms over the gradient buckets per step (this
  rank's gradient before the all-reduce, the averaged one after it;
  ``GradientSynchronizer(measure_grad_norms=True)``), relative to one micro-batch's forward +
  backward (the least compute a step can have);
* one process with gradient accumulation: :class:`fastnet.noise_scale.MicroBatchGradNorms` after
  each micro-batch (a float64 copy of the gradients, a difference and a norm), relative to the same
  micro-batch's forward + backward.

The issue's bound: at most 2% of a ResNet-20 step, else the option is off by default.
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
from fastnet.comm.gradients.synchronizer import _sq_norm  # noqa: E402
from fastnet.models import build_model  # noqa: E402
from fastnet.noise_scale import MicroBatchGradNorms  # noqa: E402
from report import emit  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--micro-batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--append", default=None)
    a = p.parse_args()
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 32).to(memory_format=torch.channels_last)
    x = torch.randn(a.micro_batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (a.micro_batch,))
    params = list(model.parameters())
    flat = torch.zeros(sum(q.numel() for q in params))  # the buckets' storage, as the synchronizer has it
    micro = MicroBatchGradNorms()
    times: dict[str, list[float]] = {"step": [], "sync": [], "micro": []}

    def fwd_bwd() -> None:
        model.zero_grad(set_to_none=False)
        nn.functional.cross_entropy(model(x), y).backward()

    def sync_norms() -> None:
        torch.cat([q.grad.reshape(-1) for q in params], out=flat)  # outside the timing below
        t0 = time.perf_counter()
        (_sq_norm(flat) + _sq_norm(flat)).item()  # before and after the all-reduce; one host read
        times["sync"].append(time.perf_counter() - t0)

    def micro_norms() -> None:
        micro.reset()
        t0 = time.perf_counter()
        micro.after_backward([q.grad for q in params])
        micro.after_backward([q.grad for q in params])
        times["micro"].append((time.perf_counter() - t0) / 2)

    for i in range(3 + a.repeats):
        t0 = time.perf_counter()
        fwd_bwd()
        dt = time.perf_counter() - t0
        if i >= 3:
            times["step"].append(dt)
        sync_norms()
        micro_norms()
    med = {k: statistics.median(v[-a.repeats:]) for k, v in times.items()}
    n = sum(q.numel() for q in params)
    lines = [f"## Gradient noise scale: cost on a ResNet-20 step (issue 34) — {datetime.date.today()}", "",
             f"Command: `.venv/bin/python benchmarks/noise_scale.py {' '.join(sys.argv[1:])}`",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads; ResNet-20 ({n:,} parameters), FP32, channels_last, "
             f"micro-batch {a.micro_batch}; medians of {a.repeats} interleaved repeats.", "",
             "| what | time (ms) | vs one micro-batch forward + backward |", "|---|---:|---:|",
             f"| forward + backward, one micro-batch of {a.micro_batch} | {med['step'] * 1e3:.1f} | 1.000 |",
             f"| data-parallel: local + averaged squared norms over the buckets | {med['sync'] * 1e3:.3f} | "
             f"{med['sync'] / med['step']:.4f} |",
             f"| one process: MicroBatchGradNorms, per micro-batch | {med['micro'] * 1e3:.3f} | "
             f"{med['micro'] / med['step']:.4f} |"]
    emit(lines, a.append)


if __name__ == "__main__":
    main()
