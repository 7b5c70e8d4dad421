"""fastnet's fused CUDA kernels vs the PyTorch ``_foreach`` equivalents on ResNet-50's parameter set
(unscale + inf check against torch's fused ``_amp_foreach_non_finite_check_and_unscale_``, the
kernel ``GradScaler.unscale_`` uses).

    python benchmarks/kernels.py --append docs/BENCHMARKS.md          # on a GPU with CuPy

For each operation, the fused kernel (``fastnet.kernels``, one or two launches for all 161 tensors)
and the ``torch._foreach_*`` / ``torch.cat`` baseline run on the same inputs in the same process;
times are medians of ``--repeats`` CUDA-event timings after warm-up. Achieved bandwidth counts the
bytes each operation must read and write once, and is compared with a measured device-to-device
copy of 1 GiB (bytes read + written). Goals (issue #6): pack/unpack and the LARS step each ≥ 1.5×
faster than ``_foreach`` and ≥ 70% of the measured copy bandwidth.

Needs CUDA and CuPy; sets ``FASTNET_KERNELS=1`` for itself.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
from pathlib import Path

os.environ["FASTNET_KERNELS"] = "1"
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

from fastnet import kernels  # noqa: E402
from fastnet.models import build_model  # noqa: E402
from fastnet.optim.lars import lars  # noqa: E402
from report import emit  # noqa: E402


def timed(fn, repeats: int, warmup: int = 5) -> float:
    """Median seconds of ``fn`` (CUDA events)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) / 1e3)
    return statistics.median(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--append")
    a = p.parse_args()
    dev = torch.device("cuda")
    if not torch.cuda.is_available() or not kernels.use_cuda_kernels([torch.zeros(1, device=dev)]):
        raise SystemExit("benchmarks/kernels.py needs CUDA and CuPy (pip install 'fastnet[gpu]')")
    shapes = [q.shape for q in build_model("resnet50", 1000, 224).parameters()]
    g = torch.Generator(device=dev).manual_seed(0)
    grads16 = [torch.randn(s, generator=g, device=dev).half() for s in shapes]
    grads32 = [x.float() for x in grads16]
    masters = [torch.randn(s, generator=g, device=dev) for s in shapes]
    bufs = [torch.zeros_like(m) for m in masters]
    copies = [torch.empty(s, device=dev, dtype=torch.float16) for s in shapes]
    n = sum(x.numel() for x in masters)
    flat16 = torch.empty(n, device=dev, dtype=torch.float16)
    big = torch.empty(1 << 28, device=dev)  # 1 GiB fp32
    big2 = torch.empty_like(big)
    copy_bw = 2 * big.numel() * 4 / timed(lambda: big2.copy_(big), a.repeats)
    excluded = [len(s) <= 1 for s in shapes]
    flat_views = list(torch.split(torch.empty(n, device=dev), [x.numel() for x in masters]))
    hp = dict(lr=1.0, momentum=0.9, weight_decay=5e-5, trust_coefficient=0.001, eps=1e-9, nesterov=False, clip=False)

    pack_tmp = torch.empty(n, device=dev)

    def foreach_pack() -> None:
        torch.cat([x.reshape(-1) for x in grads32], out=pack_tmp)
        flat16.copy_(pack_tmp.mul_(0.5))

    found_inf = torch.zeros(1, device=dev)
    inv_scale = torch.full((1,), 0.5, device=dev)

    def foreach_unpack() -> None:  # torch's own fused path: what GradScaler.unscale_ runs
        parts = list(torch.split(flat16, [x.numel() for x in masters]))
        torch._foreach_copy_(flat_views, parts)
        torch._amp_foreach_non_finite_check_and_unscale_(flat_views, found_inf, inv_scale)

    def foreach_lars() -> None:
        lars(masters, grads32, list(bufs), excluded, foreach=True, **hp)
        torch._foreach_copy_(copies, masters)

    cases = [
        ("pack fp32→fp16 (×scale)", 4 * n + 2 * n, foreach_pack, lambda: kernels.pack(grads32, flat16, 0.5)),
        ("unpack + unscale + inf check", 2 * n + 4 * n, foreach_unpack,
         lambda: kernels.unpack_unscale(flat16, flat_views, 0.5)),
        ("LARS step + FP16 copy", 4 * n * 5 + 2 * n, foreach_lars,
         lambda: kernels.lars_step(masters, grads32, bufs, excluded, model_copies=copies, **hp)),
        ("master→model copy", 4 * n + 2 * n, lambda: torch._foreach_copy_(copies, masters),
         lambda: kernels.copy_cast(masters, copies)),
    ]
    lines = [f"### Fused kernels vs _foreach, ResNet-50 parameters — {datetime.date.today()}", "",
             f"Command: `python benchmarks/kernels.py{' --append ' + a.append if a.append else ''}`",
             f"Machine: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}; {len(shapes)} tensors, "
             f"{n / 1e6:.1f} M elements; median of {a.repeats} CUDA-event timings; measured D2D copy "
             f"{copy_bw / 1e9:.0f} GB/s (read + write).", "",
             "| operation | _foreach (µs) | fused (µs) | speed-up | fused GB/s | % of copy |", "|---|---:|---:|---:|---:|---:|"]
    for name, nbytes, base, fused in cases:
        tb, tf = timed(base, a.repeats), timed(fused, a.repeats)
        lines.append(f"| {name} | {tb * 1e6:.0f} | {tf * 1e6:.0f} | {tb / tf:.2f}x | {nbytes / tf / 1e9:.0f} | "
                     f"{nbytes / tf / copy_bw:.0%} |")
    emit(lines, a.append)


if __name__ == "__main__":
    main()
