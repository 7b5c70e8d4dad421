"""Step-time simulator for data-parallel training at scale (the α-β cost model + the bucket schedule).

    python -m fastnet.comm.simulate --model resnet50 --nodes 256 --gpus-per-node 8 --global-batch 65536 \\
        --gpu-images-per-s 1000 --intra 10us,10GB/s --inter 5us,12.5GB/s --wire fp16 --fusion-mb 64

One step on every GPU (Jia et al. 2018, §4: fusion and overlap; Li et al. 2020, §3.2):

1. forward of the local batch (``1/3`` of the compute time: backward costs about twice forward);
2. backward, layer by layer in reverse order; a layer's gradients are ready when its backward ends.
   Layer times are the compute time split in proportion to each layer's FLOPs
   (``torch.utils.flop_counter``) unless given;
3. buckets: gradients in backward order, closed at the fusion threshold (bytes on the wire);
4. one communication channel: bucket ``b`` starts at ``max(ready_b, end_{b−1})`` and takes the cost
   model's all-reduce time for its bytes (:class:`fastnet.comm.planning.cost_model.CostModel`);
5. step = forward + max(end of backward, end of the last all-reduce) + optimizer time.

Scaling efficiency = single-GPU step time (no communication) ÷ simulated step time; time to train
= epochs × ceil(dataset / global batch) steps × step time. What it leaves out: stragglers, the
input pipeline, evaluation, and contention between compute and communication for memory bandwidth.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
from typing import Sequence

from fastnet.comm.planning.cost_model import CostModel, Link

IMAGENET_TRAIN = 1_281_167


@dataclasses.dataclass(frozen=True)
class SimResult:
    """Seconds per step and its parts; ``buckets`` = (bytes on the wire, ready s, start s, end s)."""

    step_s: float
    compute_s: float
    comm_s: float
    exposed_comm_s: float
    scaling_efficiency: float
    buckets: list[tuple[int, float, float, float]]

    def time_to_train_s(self, epochs: float, dataset: int, global_batch: int) -> float:
        return epochs * math.ceil(dataset / global_batch) * self.step_s


def layer_profile(model_name: str, image_size: int | None = None) -> list[tuple[int, float]]:
    """Per parameterised module in registration order: (parameter elements, share of the model's FLOPs).

    FLOPs of one forward pass of a batch of 1 (``torch.utils.flop_counter.FlopCounterMode``),
    attributed to the module that owns the parameters; modules with parameters but no counted FLOPs
    (normalisation) get a share in proportion to their elements only through the rounding floor."""
    import torch

    from fastnet.models import build_model

    size = image_size or (224 if model_name in ("resnet50", "alexnet", "alexnet_bn") else 32)
    model = build_model(model_name, 1000 if size == 224 else 10, size)
    owners = [(name, m) for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(torch.randn(1, 3, size, size))
    flops = counter.get_flop_counts()
    total = sum(flops.get("Global", {}).values()) or 1
    out = []
    for name, m in owners:
        key = f"{type(model).__name__}.{name}" if name else type(model).__name__  # the counter's module names
        f = sum(flops.get(key, {}).values()) if name else 0
        out.append((sum(p.numel() for p in m.parameters(recurse=False)), max(f / total, 1e-6)))
    s = sum(x[1] for x in out)
    return [(n, f / s) for n, f in out]


def simulate(layers: Sequence[tuple[int, float]], compute_s: float, world_size: int, ranks_per_node: int,
             model: CostModel, algorithm: str = "hierarchical", fusion_threshold_bytes: int = 64 << 20,
             wire_bytes: int = 2, optimizer_s: float = 0.0) -> SimResult:
    """Simulate one step (module docstring).

    Args:
        layers: (gradient elements, share of compute) per layer in registration (forward) order.
        compute_s: forward + backward seconds of one step on one GPU at the local batch.
        world_size, ranks_per_node: the cluster (GPUs, GPUs per node).
        model: link parameters; algorithm: as in :meth:`CostModel.time` or ``hybrid`` (per bucket).
        fusion_threshold_bytes: bucket size on the wire; wire_bytes: bytes per element (2: FP16).
        optimizer_s: seconds of the optimizer step after communication.

    Raises:
        ValueError: non-positive compute time or threshold, or an unknown algorithm.
    """
    if compute_s <= 0 or fusion_threshold_bytes <= 0:
        raise ValueError(f"Invalid compute_s {compute_s} / fusion_threshold_bytes {fusion_threshold_bytes} "
                         f"(both must be > 0)")
    forward = compute_s / 3
    t = forward
    buckets: list[tuple[int, float, float, float]] = []
    pending, channel_free, comm_total = 0, 0.0, 0.0

    def flush(nbytes: int, ready: float) -> None:
        nonlocal channel_free, comm_total
        alg = model.choose(nbytes, world_size, ranks_per_node) if algorithm == "hybrid" else algorithm
        dur = model.time(alg, nbytes, world_size, ranks_per_node)
        start = max(ready, channel_free)
        channel_free = start + dur
        comm_total += dur
        buckets.append((nbytes, ready, start, channel_free))

    for elements, share in reversed(layers):
        t += 2 * compute_s / 3 * share
        pending += elements * wire_bytes
        if pending >= fusion_threshold_bytes:
            flush(pending, t)
            pending = 0
    if pending:
        flush(pending, t)
    backward_end = t
    end = max(backward_end, channel_free) if world_size > 1 else backward_end
    step = end + optimizer_s
    single = compute_s + optimizer_s
    return SimResult(step, compute_s, comm_total if world_size > 1 else 0.0, end - backward_end, single / step,
                     buckets if world_size > 1 else [])


def simulate_plan(buckets: Sequence[tuple[int, float, str]], backward_s: float, world_size: int,
                  ranks_per_node: int, model: CostModel, launch_order: Sequence[int] | None = None,
                  overlap: bool = True, forward_s: float = 0.0, optimizer_s: float = 0.0,
                  segment_bytes: int = 0, comm_cpu_s: float = 0.0, cpu_share: float = 0.0,
                  comm_stretch: float = 0.0) -> SimResult:
    """One step of :class:`fastnet.comm.GradientSynchronizer` with a measured bucket plan (its
    :meth:`~fastnet.comm.GradientSynchronizer.measured_plan`), instead of a FLOP-split profile.

    Args:
        buckets: per bucket, (bytes on the wire, ready time in seconds from the start of backward,
            resolved algorithm); any dtypes: each bucket is timed by its own bytes.
        backward_s: backward's duration, seconds (the last gradient's ready time, at least).
        world_size, ranks_per_node: the cluster; model: calibrated α-β (``p2p`` included).
        launch_order: the agreed order (default: index order). The synchronizer's rule: bucket
            ``k`` launches once it and every bucket before it in the order are ready
            (``launch_k = max(ready_k, launch_{k−1})``), and one communication thread runs them
            first in, first out (``start_k = max(launch_k, end_{k−1})``).
        overlap: False launches everything at the end of backward (``overlap=False``).
        forward_s, optimizer_s: seconds before backward / after the last all-reduce.
        segment_bytes: the ring / hierarchical pipeline segment (:meth:`CostModel.time`).
        comm_cpu_s, cpu_share: CPU contention on hosts whose cores the ranks' compute saturates
            (CPU training; 0 on GPUs). ``comm_cpu_s``: CPU seconds one step's communication costs a
            rank (measured, e.g. the CPU time of a step's ``synchronize()`` without overlap),
            spread over the buckets by bytes and over each all-reduce's duration. ``cpu_share``:
            seconds of compute lost per CPU second of communication that runs while compute does —
            W ranks sharing P busy cores: W / P (work conservation: the host's P cores must do the
            W ranks' communication work too). The compute after the first launch is stretched by
            the lost time, found as a fixed point: E' = E + cpu_share · Σ_k u_k · |[start_k,
            end_k] ∩ [first launch, E']| / (end_k − start_k).
        comm_stretch: the other direction of the same contention: seconds of communication wall
            time added per CPU second of communication that runs while compute does (its CPU work
            gets a smaller share of a core than in the calibration, which ran without compute).
            Bucket ``k``'s duration becomes ``d_k + comm_stretch · u_k · f_k`` with ``f_k`` the
            fraction of it that overlaps compute; solved jointly with the compute's delay. It is
            1 / s_overlap − 1 / s_alone for the communication thread's share s of a core. Fair share
            with the ranks' communication in lockstep (every rank sums the same ring step at once):
            the calibration's W communication threads get s_alone = min(1, P / W), W compute plus W
            communication threads during overlap s_overlap = P / (2W); for W ≥ P that is W / P, the
            same as ``cpu_share``.

    Returns:
        :class:`SimResult` (``compute_s`` includes the contention's delay; ``scaling_efficiency``:
        the step without communication ÷ the step; ``buckets`` in launch order).

    Raises:
        ValueError: a negative ``backward_s``, ``comm_cpu_s``, ``cpu_share`` or ``comm_stretch``, or ``launch_order``
            not a permutation of the buckets.
    """
    order = list(range(len(buckets))) if launch_order is None else list(launch_order)
    if sorted(order) != list(range(len(buckets))) or backward_s < 0:
        raise ValueError(f"simulate_plan: launch_order {order} must be a permutation of 0..{len(buckets) - 1} and "
                         f"backward_s {backward_s} >= 0")
    if not (comm_cpu_s >= 0 and cpu_share >= 0 and comm_stretch >= 0):
        raise ValueError(f"simulate_plan: comm_cpu_s {comm_cpu_s}, cpu_share {cpu_share} and comm_stretch "
                         f"{comm_stretch} must be >= 0")
    comm = world_size > 1 and bool(buckets)
    base = [model.time(alg, nbytes, world_size, ranks_per_node, segment_bytes) if comm else 0.0
            for nbytes, _, alg in buckets]
    total_bytes = sum(b[0] for b in buckets) or 1
    cpu = [comm_cpu_s * nbytes / total_bytes for nbytes, _, _ in buckets]  # u_k, CPU seconds per bucket
    first = min((r for _, r, _ in buckets), default=0.0) if overlap else backward_s
    end_compute = backward_s
    durations = list(base)
    for _ in range(200):  # the joint fixed point of both delays (one pass without contention)
        stretch = (end_compute - first) / (backward_s - first) if backward_s > first else 1.0
        timeline = _schedule(buckets, order, durations, overlap, first, stretch, end_compute)
        overlapped = [0.0] * len(buckets)  # f_k: the fraction of bucket k's all-reduce that runs during compute
        for k, (_, _, start, end) in zip(order, timeline):
            if end > start:
                overlapped[k] = max(0.0, min(end, end_compute) - max(start, first)) / (end - start)
        new_end = backward_s + cpu_share * sum(u * f for u, f in zip(cpu, overlapped))
        new_durations = [d + comm_stretch * u * f for d, u, f in zip(base, cpu, overlapped)]
        if abs(new_end - end_compute) <= 1e-12 and max((abs(a - b) for a, b in zip(new_durations, durations)),
                                                       default=0.0) <= 1e-12:
            break
        end_compute, durations = new_end, new_durations
    total = sum(durations) if comm else 0.0
    last_end = max((t[3] for t in timeline), default=float("-inf"))
    finish = max(end_compute, last_end) if comm else end_compute
    step = forward_s + finish + optimizer_s
    return SimResult(step, forward_s + end_compute, total, finish - end_compute,
                     (forward_s + backward_s + optimizer_s) / step if step > 0 else 1.0, timeline if comm else [])


def _schedule(buckets: Sequence[tuple[int, float, str]], order: Sequence[int], durations: Sequence[float],
              overlap: bool, first: float, stretch: float, end_compute: float) -> list[tuple[int, float, float, float]]:
    """The synchronizer's launch rule (:func:`simulate_plan`) with ready times after ``first``
    stretched by ``stretch``; per bucket in launch order (bytes, ready, start, end)."""
    launch = end = float("-inf")
    timeline = []
    for k in order:
        nbytes, ready, _ = buckets[k]
        ready = first + (ready - first) * stretch if ready > first else ready
        launch = max(ready if overlap else end_compute, launch)
        start = max(launch, end)
        end = start + durations[k]
        timeline.append((nbytes, ready, start, end))
    return timeline


def parse_link(text: str) -> Link:
    """``"10us,12.5GB/s"`` → Link (latency µs, bandwidth GB/s; also ``Gbit/s``)."""
    m = re.fullmatch(r"\s*([\d.]+)\s*us\s*,\s*([\d.]+)\s*(GB/s|Gbit/s)\s*", text)
    if not m:
        raise ValueError(f"Invalid link {text!r}; write latency and bandwidth as e.g. '10us,12.5GB/s' or "
                         f"'5us,100Gbit/s'")
    bw = float(m.group(2)) / (8 if m.group(3) == "Gbit/s" else 1)
    return Link.of(float(m.group(1)), bw)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastnet.comm.simulate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--global-batch", type=int, required=True)
    p.add_argument("--gpu-images-per-s", type=float, required=True, help="one GPU's training throughput at the "
                   "local batch, no communication (images/s)")
    p.add_argument("--intra", default="10us,10GB/s", help="intra-node link: latency,bandwidth")
    p.add_argument("--inter", default="5us,100Gbit/s", help="inter-node link: latency,bandwidth")
    p.add_argument("--p2p-us", type=float, default=0.0,
                   help="software cost per step of fastnet's point-to-point schedules, µs, added to the link's "
                        "α (default 0: on GPUs NCCL runs the steps in its kernels and --intra/--inter's α holds "
                        "them; gloo on a CPU measured 250-800 µs)")
    p.add_argument("--algorithm", default="hybrid")
    p.add_argument("--wire", default="fp16", choices=("fp16", "fp32"))
    p.add_argument("--fusion-mb", type=float, default=64.0)
    p.add_argument("--epochs", type=float, default=90)
    p.add_argument("--dataset", type=int, default=IMAGENET_TRAIN)
    args = p.parse_args(argv)
    try:
        intra, inter = parse_link(args.intra), parse_link(args.inter)
    except ValueError as exc:
        p.error(str(exc))
    world = args.nodes * args.gpus_per_node
    if args.global_batch % world:
        p.error(f"global batch {args.global_batch} is not a multiple of the {world} GPUs")
    local = args.global_batch // world
    if not math.isfinite(args.p2p_us) or args.p2p_us < 0:
        p.error(f"--p2p-us {args.p2p_us}: must be a finite number of microseconds >= 0")
    cm = CostModel(intra=intra, inter=inter, native=inter, p2p=Link(args.p2p_us * 1e-6, 0.0))
    layers = layer_profile(args.model)
    compute = local / args.gpu_images_per_s
    res = simulate(layers, compute, world, args.gpus_per_node, cm, args.algorithm, int(args.fusion_mb * 2**20),
                   2 if args.wire == "fp16" else 4)
    print(f"{args.model}: {world} GPUs ({args.nodes} x {args.gpus_per_node}), global batch {args.global_batch} "
          f"(local {local}), {sum(n for n, _ in layers) / 1e6:.1f} M parameters, {len(res.buckets)} buckets")
    print(f"step {res.step_s * 1e3:.1f} ms = compute {res.compute_s * 1e3:.1f} ms + exposed communication "
          f"{res.exposed_comm_s * 1e3:.1f} ms (all-reduce total {res.comm_s * 1e3:.1f} ms); scaling efficiency "
          f"{res.scaling_efficiency:.1%}; {args.global_batch / res.step_s:,.0f} images/s")
    print(f"time to train {args.epochs:g} epochs of {args.dataset:,} images: "
          f"{res.time_to_train_s(args.epochs, args.dataset, args.global_batch) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
