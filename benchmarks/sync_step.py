"""A data-parallel training step: GradientSynchronizer vs DistributedDataParallel, and how much of
the step's communication is hidden behind backward.

    .venv/bin/python benchmarks/sync_step.py --append docs/BENCHMARKS.md
    python benchmarks/topology/cluster.py run --nodes 2 --ranks-per-node 2 --rate 1gbit -- \\
        benchmarks/sync_step.py --suite overlap --append docs/BENCHMARKS.md
    python benchmarks/topology/cluster.py run --nodes 2 --ranks-per-node 2 --rate 1gbit -- \\
        benchmarks/sync_step.py --suite validate --cost-model CM.yaml --wire-cost-model fp16=CM16.yaml

Without torchrun it runs itself under ``torchrun --standalone --nproc_per_node=2`` (gloo on
loopback); under torchrun (e.g. the emulated cluster of
``benchmarks/topology/cluster.py``) it runs on the launched ranks. Each configuration runs
``--steps`` steps after ``--warmup`` (≥ 2, so the synchronizer's bucket rebuild after step 2 is
done); every reported time is the median over steps of the maximum over ranks.

**Suite ``ddp``** (default): ResNet-18-CIFAR fp32, local batch ``--batch``, SGD momentum. Baseline:
``DistributedDataParallel`` (its C++ reducer, ``--fusion-mb`` buckets, overlap) configured for the
same work as the synchronizer: ``broadcast_buffers=False`` (the trainer syncs BN statistics only
before evaluation and checkpoints) and ``gradient_as_bucket_view=True`` (gradients live in the
buckets); also DDP with ``find_unused_parameters=True``. Goal: the synchronizer ≤ 1.0× DDP's step
time. Both start from the same weights and data; the table reports the largest parameter
difference after the timed steps (must be ~0: same maths). Also measured, on rank 0: the used-map
all-reduce (every step) and ``prepare_for_backward``'s graph walk.

**Suite ``overlap``** (issue #16's goal): ResNet-50 with FP16 master weights (FP16 gradients, FP32
BN/bias bucket), ``--image-size`` images (the gradients do not depend on it; it sets how long
backward runs), ``--algorithm`` (default hierarchical) at each ``--fusion-mb`` in ``--overlap-mb``:
no overlap (every bucket reduced after backward: the step's whole communication, C), overlap with
the fixed-threshold buckets (``rebuild_buckets=False``), and overlap with the buckets rebuilt from
measured ready times (the default). Per step, after a barrier that follows backward (on the default
group, not the synchronizer's communicator, so the buckets keep moving meanwhile; it keeps a
slower rank's backward — 4 ranks share 2 cores on the emulated cluster — out of the measure):
exposed = the time ``synchronize()`` then blocked (host wall clock), busy = the communication
thread's time. Hidden = 1 − exposed / C,
C from the no-overlap row of the same threshold. Forward, backward and synchronize only (no
optimizer step).

**Suite ``validate``** (issue #16): the step-time model against measured steps. Per model
(``--models``) × wire (``--wires``) × algorithm (``--algorithms``) × overlap off/on, fp32 models:
the measured step (forward, backward, synchronize) vs
:func:`fastnet.comm.planning.simulate.simulate_plan` on that run's buckets and launch order, with the
ready times and end of backward profiled in the model's *other* no-overlap runs (per parameter,
the median; seconds from the step's barrier, max over ranks) and the calibrated cost model
(``--cost-model``; ``--wire-cost-model fp16=PATH`` for the FP16 wire), once as independent
channels, once with CPU contention (the configuration's no-overlap ``synchronize()`` CPU
seconds, ``cpu_share`` = ranks on this host ÷ its cores when compute saturates them) and once with
two-way contention (also ``comm_stretch``: communication slowed while compute runs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from fastnet.comm import GradientSynchronizer  # noqa: E402
from fastnet.comm.communicators.torchdist import TorchCommunicator  # noqa: E402
from fastnet.models import build_model  # noqa: E402
from fastnet.precision import Precision  # noqa: E402
from ranks import (check_wire_cost_models, load_cost_models, max_over_ranks, ranks_per_node,  # noqa: E402
                   relaunch_under_torchrun)
from report import emit  # noqa: E402

DDP_CONFIGS = [("DDP", None), ("DDP find_unused_parameters", "find_unused"),
               ("sync native overlap", ("native", True, False)), ("sync native no-overlap", ("native", False, False)),
               ("sync native overlap find_unused_parameters", ("native", True, True)),
               ("sync ring overlap", ("ring", True, False))]
OVERLAP_MODES = [("no overlap", False, False), ("overlap, fixed buckets", True, False),
                 ("overlap, rebuilt buckets", True, True)]


def ddp_suite(rank: int, args) -> dict | None:
    comm = TorchCommunicator()
    g = torch.Generator().manual_seed(rank)
    data = [(torch.randn(args.batch, 3, 32, 32, generator=g), torch.randint(0, 10, (args.batch,), generator=g))
            for _ in range(4)]
    results, finals, probes = {}, {}, {}
    for name, cfg in DDP_CONFIGS:
        torch.manual_seed(0)
        model = build_model("resnet18_cifar", 10, 32)
        sync = None
        if not isinstance(cfg, tuple):
            net = DDP(model, bucket_cap_mb=args.fusion_mb, broadcast_buffers=False, gradient_as_bucket_view=True,
                      find_unused_parameters=cfg == "find_unused")
        else:
            net = model
            sync = GradientSynchronizer(comm, model.parameters(), algorithm=cfg[0], overlap=cfg[1],
                                        fusion_threshold_bytes=int(args.fusion_mb * (1 << 20)),
                                        find_unused_parameters=cfg[2])
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        times = []
        for step in range(args.warmup + args.steps):
            x, y = data[step % len(data)]
            dist.barrier()
            t0 = time.perf_counter()
            loss = nn.functional.cross_entropy(net(x), y)
            if sync is not None:
                t_walk = time.perf_counter()
                sync.prepare_for_backward(loss)
                if step >= args.warmup and cfg[2]:
                    probes.setdefault("graph walk", []).append(time.perf_counter() - t_walk)
            loss.backward()
            if sync is not None:
                sync.synchronize()
            opt.step()
            if sync is not None:
                sync.zero_grad()
            else:
                opt.zero_grad(set_to_none=True)
            (t,) = max_over_ranks(time.perf_counter() - t0)
            if step >= args.warmup:
                times.append(t)
        results[name] = statistics.median(times)
        finals[name] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        if sync is not None and cfg == ("native", True, False):
            for _ in range(args.steps):  # the per-step agreement alone, on the same communicator
                dist.barrier()
                t_map = time.perf_counter()
                sync._used_map()
                probes.setdefault("used-map all-reduce", []).append(time.perf_counter() - t_map)
        if sync is not None:
            sync.close()
    diffs = {name: (finals[name] - finals["DDP"]).abs().max().item() for name in finals}
    if rank != 0:
        return None
    base = results["DDP"]
    lines = ["| configuration | step (ms) | vs DDP | max param diff vs DDP |", "|---|---:|---:|---:|"]
    for name, _ in DDP_CONFIGS:
        lines.append(f"| {name} | {results[name] * 1e3:.1f} | {results[name] / base:.2f}x | {diffs[name]:.1e} |")
    step = results["sync native overlap"]
    lines += ["", "| per-step agreement (rank 0) | time (ms) | share of the sync native overlap step |",
              "|---|---:|---:|"]
    for name, t in probes.items():
        lines.append(f"| {name} | {statistics.median(t) * 1e3:.2f} | {100 * statistics.median(t) / step:.2f}% |")
    return {"lines": lines, "what": f"ResNet-18-CIFAR fp32, local batch {args.batch}, fusion {args.fusion_mb:g} MiB"}


def overlap_suite(rank: int, args) -> dict | None:
    comm = TorchCommunicator()
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g)
    y = torch.randint(0, 1000, (args.batch,), generator=g)
    rows = []
    for mb in args.overlap_mb:
        for mode, overlap, rebuild in OVERLAP_MODES:
            torch.manual_seed(0)
            precision = Precision("fp16", torch.device("cpu"), loss_scaling=False)
            model = precision.prepare(build_model("resnet50", 1000, args.image_size))
            sync = GradientSynchronizer(comm, model.parameters(), algorithm=args.algorithm, overlap=overlap,
                                        fusion_threshold_bytes=int(mb * (1 << 20)), rebuild_buckets=rebuild,
                                        storage=precision.masters.grad_location, ranks_per_node=args.ranks_per_node)
            if args.compute_nice:  # the compute (this thread) below the communication threads made above
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), args.compute_nice)
            per = []
            for step in range(args.warmup + args.steps):
                dist.barrier()
                t0 = time.perf_counter()
                loss = nn.functional.cross_entropy(model(x.half()).float(), y)
                precision.backward(loss)
                dist.barrier()  # the slowest rank's backward has ended (another communicator than the sync's)
                sync.synchronize()
                measured = max_over_ranks(time.perf_counter() - t0, sync.exposed_seconds(), sync.busy_seconds())
                precision.masters.zero_grad()
                if step >= args.warmup:
                    per.append(measured)
            sizes = [round(b["bytes"] / (1 << 20), 1) for b in sync.describe()]
            rows.append({"fusion_mb": mb, "mode": mode, "step": statistics.median(p[0] for p in per),
                         "exposed": statistics.median(p[1] for p in per), "busy": statistics.median(p[2] for p in per),
                         "buckets": sizes})
            sync.close()
            if args.compute_nice:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 0)  # back (needs root)
    if rank != 0:
        return None
    lines = ["| fusion threshold | mode | buckets (MiB, wire) | step (s) | exposed comm (s) | comm busy (s) | "
             "hidden (1 − exposed / C) |", "|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        c = next(q["exposed"] for q in rows if q["fusion_mb"] == r["fusion_mb"] and q["mode"] == "no overlap")
        shown = r["buckets"] if len(r["buckets"]) <= 8 else r["buckets"][:7] + [f"… {len(r['buckets'])} buckets"]
        lines.append(f"| {r['fusion_mb']:g} MiB | {r['mode']} | {', '.join(map(str, shown))} | {r['step']:.2f} | "
                     f"{r['exposed']:.3f} | {r['busy']:.3f} | {max(0.0, 1 - r['exposed'] / c):.0%} |")
    return {"lines": lines, "what": f"ResNet-50, FP16 master weights, {args.algorithm}, local batch {args.batch} of "
            f"{args.image_size}x{args.image_size}, compute thread nice {args.compute_nice}; "
            f"C = the no-overlap row's exposed time"}


VALIDATE_MODELS = {"resnet18_cifar": (10, 32), "resnet50": (1000, None)}  # classes, image side (None: --image-size)


def _timed_steps(model: nn.Module, sync: GradientSynchronizer, x: torch.Tensor, y: torch.Tensor, args,
                 steps: int | None = None) -> dict:
    """``--warmup`` + ``--steps`` steps of forward, backward, synchronize after a barrier; medians
    over the timed steps of the max over ranks: ``fwd``, ``bwd`` (backward's wall time), ``step``,
    ``busy``, ``sync_cpu`` (this process's CPU seconds in ``synchronize()``), ``compute_end``
    (seconds from the barrier to the end of backward) and per parameter ``ready`` (seconds from
    the barrier: the end of backward less the time from the gradient to the last one; a bucket's
    all-reduce can start once the last rank has it, hence the max over ranks)."""
    per, ready = [], []
    for step in range(args.warmup + (steps or args.steps)):
        dist.barrier()
        t0 = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        t1 = time.perf_counter()
        loss.backward()
        t2, c2 = time.perf_counter(), _cpu_seconds()
        sync.synchronize()
        t3, c3 = time.perf_counter(), _cpu_seconds()
        own = sync.measured_plan()["ready_s"]
        last = max(own)
        m = max_over_ranks(t1 - t0, t2 - t1, t3 - t0, sync.busy_seconds(), c3 - c2, t2 - t0,
                            *[(t2 - t0) - (last - r) for r in own])
        sync.zero_grad()
        if step >= args.warmup:
            per.append(m[:6])
            ready.append(m[6:])
    med = [statistics.median(col) for col in zip(*per)]
    return {"fwd": med[0], "bwd": med[1], "step": med[2], "busy": med[3], "sync_cpu": med[4],
            "compute_end": med[5], "ready": [statistics.median(col) for col in zip(*ready)]}


def _cpu_seconds() -> float:
    """This process's CPU time (user + system, all threads: the communication thread, gloo's, and
    the kernel's TCP work done on their behalf), seconds."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def validate_suite(rank: int, args) -> dict | None:
    """Measured step time vs :func:`fastnet.comm.planning.simulate.simulate_plan` per configuration."""
    from fastnet.comm.planning.simulate import simulate_plan

    cost_models = load_cost_models(args.cost_model, args.wire_cost_model)
    from fastnet.comm.planning.topology import gather_hosts

    comm = TorchCommunicator()
    world = dist.get_world_size()
    hosts = gather_hosts(comm)
    on_host = hosts.count(hosts[comm.rank])  # the emulated cluster's nodes share this machine's cores
    cores = len(os.sched_getaffinity(0))
    cpu_share = on_host / cores if on_host * args.threads >= cores else 0.0  # compute saturates the cores
    # the other direction (simulate_plan's comm_stretch): lockstep fair share, 1/s_overlap - 1/s_alone
    comm_stretch = 2 * on_host / cores - max(1.0, on_host / cores) if cpu_share else 0.0
    rows = []
    for name in args.models:
        classes, side = VALIDATE_MODELS[name]
        side = side or args.image_size
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(args.batch, 3, side, side, generator=g)
        y = torch.randint(0, classes, (args.batch,), generator=g)
        runs = []
        for wire in args.wires:
            cost_model = cost_models.get(wire, cost_models["none"])
            for alg in args.algorithms:
                comm_cpu = None
                for overlap in (False, True):  # the no-overlap run first: its synchronize() gives comm CPU
                    torch.manual_seed(0)
                    model = build_model(name, classes, side)
                    sync = GradientSynchronizer(comm, model.parameters(), algorithm=alg, overlap=overlap,
                                                fusion_threshold_bytes=int(args.fusion_mb * (1 << 20)),
                                                wire_dtype=wire, cost_model=cost_model,
                                                ranks_per_node=args.ranks_per_node)
                    got = _timed_steps(model, sync, x, y, args)
                    if comm_cpu is None:
                        comm_cpu = got["sync_cpu"]
                    index = {id(p): i for i, p in enumerate(sync.params)}
                    plan = sync.measured_plan()  # this run's buckets and launch order
                    runs.append({"model": name, "wire": wire, "algorithm": alg, "overlap": overlap, "got": got,
                                 "plan": plan, "members": [[index[id(p)] for p in b.params] for b in sync.buckets],
                                 "comm_cpu": comm_cpu, "cost_model": cost_model, "rpn": sync.reducer.ranks_per_node,
                                 "segment": sync.reducer.segment_bytes})
                    sync.close()
        # The profiled backward: per parameter, the median over the model's other no-overlap runs (their
        # backward has no communication running; leaving the predicted run out keeps its own times out).
        profiles = [r for r in runs if not r["overlap"]]
        for run in runs:
            others = [r["got"] for r in profiles if r is not run] or [run["got"]]  # one run: its own
            ready = [statistics.median(o["ready"][i] for o in others) for i in range(len(others[0]["ready"]))]
            compute_end = statistics.median(o["compute_end"] for o in others)
            plan = run["plan"]
            buckets = [(nbytes, max(ready[i] for i in m), alg) for (nbytes, _, alg), m in zip(plan["buckets"],
                                                                                           run["members"])]
            common = (buckets, compute_end, world, run["rpn"], run["cost_model"], plan["launch_order"], run["overlap"])
            sim = simulate_plan(*common, segment_bytes=run["segment"])
            contended = simulate_plan(*common, segment_bytes=run["segment"], comm_cpu_s=run["comm_cpu"],
                                      cpu_share=cpu_share)
            two_way = simulate_plan(*common, segment_bytes=run["segment"], comm_cpu_s=run["comm_cpu"],
                                    cpu_share=cpu_share, comm_stretch=comm_stretch)
            rows.append({**{k: run[k] for k in ("model", "wire", "algorithm", "overlap")},
                         "buckets": len(buckets), "picked": sorted({b[2] for b in buckets}), **run["got"],
                         "profile_compute_end": compute_end, "predicted": sim.step_s, "pred_comm": sim.comm_s,
                         "pred_exposed": sim.exposed_comm_s, "contended": contended.step_s, "two_way": two_way.step_s, "plan": buckets,
                         "launch_order": plan["launch_order"]})
    if rank != 0:
        return None
    lines = ["| model | wire | algorithm | overlap | buckets | compute end (s) | profiled (s) | comm busy (s) | "
             "comm CPU (s) | model comm (s) | step (s) | model: independent channels (s) | error | "
             "model: CPU contention (s) | error | model: two-way contention (s) | error |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        alg = r["algorithm"] + (f" → {', '.join(r['picked'])}" if r["algorithm"] == "hybrid" else "")
        lines.append(f"| {r['model']} | {r['wire']} | {alg} | {'on' if r['overlap'] else 'off'} | {r['buckets']} | "
                     f"{r['compute_end']:.3f} | {r['profile_compute_end']:.3f} | {r['busy']:.3f} | "
                     f"{r['sync_cpu']:.3f} | {r['pred_comm']:.3f} | "
                     f"{r['step']:.3f} | {r['predicted']:.3f} | {(r['predicted'] - r['step']) / r['step']:+.0%} | "
                     f"{r['contended']:.3f} | {(r['contended'] - r['step']) / r['step']:+.0%} | "
                     f"{r['two_way']:.3f} | {(r['two_way'] - r['step']) / r['step']:+.0%} |")
    lines.append("")
    for key, label in (("predicted", "independent channels"), ("contended", "with CPU contention"),
                       ("two_way", "with two-way CPU contention")):
        errors = [abs(r[key] - r["step"]) / r["step"] for r in rows]
        lines.append(f"Model, {label}: within 15% in {sum(e <= 0.15 for e in errors)} of {len(rows)} "
                     f"configurations; largest error {max(errors):.0%}, median {statistics.median(errors):.0%}.")
    lines.append(f"CPU contention: {on_host} ranks on {cores} cores, cpu_share = {cpu_share:g}, two-way adds "
                 f"comm_stretch = {comm_stretch:g} (simulate_plan; comm CPU: the CPU seconds of synchronize() in each "
                 "configuration's no-overlap run).")
    return {"lines": lines, "rows": rows,
            "what": f"fp32 models, local batch {args.batch} (ResNet-50 at {args.image_size}x{args.image_size}), "
                    f"fusion threshold {args.fusion_mb:g} MiB, buckets rebuilt after step 2; cost model "
                    f"{args.cost_model}" + "".join(f", {w}" for w in args.wire_cost_model)
                    + "; model = simulate_plan on this run's buckets and launch order with the ready times "
                      "and end of backward profiled in the model's other no-overlap runs (per parameter, the "
                      "median over them; from the step's barrier, max over ranks); comm busy = the communication thread's time per step "
                      "(it includes waiting for the slowest rank), comm CPU = CPU seconds in synchronize() "
                      "(max over ranks)"}


def run(rank: int, world: int, args) -> dict | None:
    torch.set_num_threads(args.threads)
    return {"ddp": ddp_suite, "overlap": overlap_suite, "validate": validate_suite}[args.suite](rank, args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", choices=("ddp", "overlap", "validate"), default="ddp")
    p.add_argument("--batch", type=int, default=None, help="local batch per rank (default: 32 ddp, 2 overlap)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 15 ddp, 4 overlap)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (>= 2: the rebuild is after step 2)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    p.add_argument("--fusion-mb", type=float, default=25.0, help="ddp suite: bucket size, MiB")
    p.add_argument("--overlap-mb", type=float, nargs="+", default=[25.0, 64.0], help="overlap suite: thresholds, MiB")
    p.add_argument("--algorithm", default="hierarchical", help="overlap suite: all-reduce algorithm")
    p.add_argument("--image-size", type=int, default=64, help="overlap suite: image side, pixels")
    p.add_argument("--ranks-per-node", type=int, default=None,
                   help="overlap and validate suites: node size (default: torchrun's LOCAL_WORLD_SIZE, which "
                        "is right on the emulated cluster, whose nodes share one host name)")
    p.add_argument("--compute-nice", type=int, default=0,
                   help="overlap suite: nice value of the compute thread, set after the synchronizer (and its "
                        "gloo and communication threads) exist, so communication preempts compute on a "
                        "saturated CPU (restoring it needs root)")
    p.add_argument("--cost-model", default=None, metavar="PATH",
                   help="validate suite (required): the calibrated cost model (YAML), e.g. from "
                        "benchmarks/topology/cluster.py study --calibrate-only --save-cost-model PATH")
    p.add_argument("--wire-cost-model", nargs="*", default=[], metavar="WIRE=PATH",
                   help="validate suite: a cost model calibrated with that wire dtype (e.g. fp16=PATH from "
                        "cluster.py study --calibrate-only --dtype float16) for the configurations with it; "
                        "others use --cost-model")
    p.add_argument("--models", nargs="+", default=list(VALIDATE_MODELS), choices=list(VALIDATE_MODELS),
                   help="validate suite: models")
    p.add_argument("--wires", nargs="+", default=["none", "fp16"], choices=["none", "fp16", "bf16"],
                   help="validate suite: wire dtypes")
    p.add_argument("--algorithms", nargs="+", default=["native", "ring", "hierarchical", "hybrid"],
                   help="validate suite: all-reduce algorithms")
    p.add_argument("--json", default=None, metavar="PATH", help="validate suite: also write the rows as JSON")
    p.add_argument("--append")
    args = p.parse_args()
    if args.suite == "validate" and not args.cost_model:
        p.error("--suite validate needs --cost-model PATH (a calibrated cost model; see --help)")
    if error := check_wire_cost_models(args.wire_cost_model):
        p.error(error)
    args.batch = args.batch or (32 if args.suite == "ddp" else 2)
    args.steps = args.steps or (15 if args.suite == "ddp" else 4)
    if args.warmup < 2:
        p.error(f"--warmup {args.warmup}: must be >= 2 (the synchronizer rebuilds its buckets after step 2)")
    relaunch_under_torchrun(__file__)
    args.ranks_per_node = ranks_per_node(args.ranks_per_node)
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    out = run(dist.get_rank(), world, args)
    dist.destroy_process_group()
    if out is None:
        return
    if args.json and "rows" in out:
        Path(args.json).write_text(json.dumps(out["rows"], indent=1))
    title = {"ddp": "Training step: GradientSynchronizer vs DDP", "overlap": "Overlap: communication hidden behind backward",
             "validate": "Step-time model vs measured steps"}[args.suite]
    launcher = os.environ.get("FASTNET_BENCH_LAUNCHER", "torchrun")
    lines = [f"### {title} — {datetime.date.today()}", "",
             f"Command: `python benchmarks/sync_step.py {' '.join(sys.argv[1:])}` ({launcher})",
             f"Machine: {platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}; {world} ranks gloo, "
             f"{args.threads} thread(s) each; {out['what']}; median of {args.steps} steps after {args.warmup} "
             f"(max over ranks).", "", *out["lines"]]
    emit(lines, args.append)


if __name__ == "__main__":
    main()
