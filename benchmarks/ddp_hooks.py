"""DDP communication hooks side by side: plain DDP vs PyTorch's own hooks vs fastnet's (issue #19).

    python benchmarks/topology/cluster.py run --nodes 2 --ranks-per-node 2 --rate 1gbit -- \\
        benchmarks/ddp_hooks.py --cost-model CM.yaml --wire-cost-model fp16=CM16.yaml --append docs/BENCHMARKS.md

Without torchrun it runs itself under ``torchrun --standalone --nproc_per_node=2`` (gloo on
loopback). The cost models (for fastnet's ``hybrid``) come from ``cluster.py study
--calibrate-only --save-cost-model`` on the same cluster (``--dtype float16`` for the FP16 one);
without them hybrid chooses online (fastnet.comm.planning.autotune) during ``--hybrid-warmup`` steps.

Models: ``mlp`` — 4 × Linear(2048, 2048) (``--mlp-width``), 67 MB of FP32 gradients, local batch ``--batch``
(communication-bound: issue #19's model); ``resnet18_cifar`` (32 × 32 inputs). Every row is
``DistributedDataParallel`` with 25 MiB buckets (``--bucket-mb``), ``gradient_as_bucket_view``,
SGD with momentum, the same weights and data, and a communication hook:

* none (DDP's own gloo all-reduce), torch's ``allreduce_hook``, ``fp16_compress_hook``,
  ``bf16_compress_hook``, and on request (``--torch-hooks ... powersgd_rank4``: it aborts on gloo
  with more than 2 ranks, see ``--help``) PowerSGD rank 4 (``powerSGD_hook``, compression from
  step 2 — a lossy reference: its parameters drift from the others', the last column shows by how much);
* fastnet's hook (:func:`fastnet.comm.ddp_hook`) per algorithm × wire dtype (``--fastnet``);
* no hook, DDP on a process group of fastnet's torch.distributed backend
  (``dist.new_group(backend="fastnet")`` with ``FASTNET_ALGORITHM``/``FASTNET_WIRE_DTYPE``/
  ``FASTNET_FUSION_MB``/``FASTNET_RANKS_PER_NODE``/``FASTNET_COST_MODEL`` set for it; ``--backend``;
  issue #18): what an unmodified script gets from ``init_process_group("fastnet")``.

Per row: the step (forward, backward with DDP's all-reduce, optimizer) of the slowest rank, median
over ``--rounds`` × ``--steps`` timed steps after ``--warmup``. The rows are measured
interleaved (every row built and warmed up, then ``--rounds`` rounds in which each row takes
``--steps`` steps, the order rotated each round), so a slow spell of a shared machine lands on
every row rather than on the few measured during it. Compute = the same step under ``no_sync()``
(no all-reduce), split into forward, backward and optimizer; exposed communication = step −
compute; for fastnet's hook, from its records (:class:`fastnet.comm.gradients.ddp_comm_hook.HookState`): the
communication thread's busy time per step and the wait of buckets queued behind earlier ones; and
the largest parameter difference from plain DDP after the same steps.

With ``--link-rate`` two references per wire dtype: the **link bound** max(compute, link time),
link time = 2(N−1)/N × gradient bytes / link rate for N nodes, and **DDP's step floor** compute +
max(0, link time − backward), i.e. forward + max(backward, link time) + optimizer: DDP's
all-reduce overlaps only the backward that fills its buckets (the next forward needs the updated
weights), so no DDP hook or backend can beat the floor. Each row's efficiency is the reference
over its step.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel as DDP

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from fastnet.comm import ddp_hook, trace  # noqa: E402
from fastnet.comm.planning.cost_model import CostModel  # noqa: E402
from fastnet.models import build_model  # noqa: E402
from ranks import (check_wire_cost_models, load_cost_models, ranks_per_node,  # noqa: E402
                   relaunch_under_torchrun)
from report import emit  # noqa: E402

TORCH_HOOKS = ["none", "allreduce_hook", "fp16_compress_hook", "bf16_compress_hook", "powersgd_rank4"]


def _model_and_data(name: str, rank: int, batch: int, width: int = 2048):
    g = torch.Generator().manual_seed(rank)
    torch.manual_seed(0)
    if name == "mlp":
        model = nn.Sequential(*[nn.Linear(width, width) for _ in range(4)])
        x, y = torch.randn(batch, width, generator=g), torch.randn(batch, width, generator=g)
        return model, x, y, nn.functional.mse_loss
    model = build_model(name, 10, 32)
    x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
    return model, x, y, nn.functional.cross_entropy


def _register(net: DDP, hook: str, args, cost_models: dict[str, CostModel]):
    """Register ``hook`` on ``net``; returns fastnet's HookState (else None)."""
    if hook == "none":
        return None
    if hook in ("allreduce_hook", "fp16_compress_hook", "bf16_compress_hook"):
        net.register_comm_hook(None, getattr(default_hooks, hook))
        return None
    if hook == "powersgd_rank4":
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=4, start_powerSGD_iter=2)
        net.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        return None
    if hook.startswith("backend:"):
        return None
    alg, wire = hook.split(":")
    state, fn = ddp_hook(algorithm=alg, wire_dtype=wire, fusion_mb=args.bucket_mb, ranks_per_node=args.ranks_per_node,
                         cost_model=cost_models.get(wire, cost_models.get("none")))
    net.register_comm_hook(state, fn)
    return state


def _warmup(hook: str, args) -> int:
    """Steps before timing: ``--warmup``, and for ``hybrid`` without a cost-model file at least
    ``--hybrid-warmup`` (its online choice explores 26 all-reduces per size class first)."""
    parts = hook.split(":")
    wire_models = dict(item.split("=", 1) for item in args.wire_cost_model)
    online = len(parts) >= 2 and parts[-2] == "hybrid" and not (args.cost_model or parts[-1] in wire_models)
    return max(args.warmup, args.hybrid_warmup) if online else args.warmup


def _steps(net: DDP, opt, x, y, loss_fn, steps: int, state=None, no_sync: bool = False) -> list[list[float]]:
    """``steps`` training steps; per step (seconds): the slowest rank's step and its forward,
    backward and optimizer parts (one rank's, so the parts add up to the step: the ranks of a
    loaded machine are slow in different phases, and per-phase maxima would add up to more than any
    rank's step), then the max over ranks of fastnet's busy and queue-wait times. Under ``no_sync``
    the backward has no all-reduce."""
    per = []
    for _ in range(steps):
        dist.barrier()
        with net.no_sync() if no_sync else contextlib.nullcontext():  # DDP decides in forward whether to sync
            t0 = time.perf_counter()
            loss = loss_fn(net(x), y)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=False)
        t3 = time.perf_counter()
        recs = state.take_records() if state is not None else []
        busy = sum(r[3] - r[2] for r in recs)
        wait = sum(r[2] - r[1] for r in recs)
        mine = torch.tensor([t3 - t0, t1 - t0, t2 - t1, t3 - t2, busy, wait], dtype=torch.float64)
        every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine)
        table = torch.stack(every)
        slowest = table[int(torch.argmax(table[:, 0]))]
        per.append(slowest[:4].tolist() + table[:, 4:].max(dim=0).values.tolist())
    return per


FIELDS = ("step", "forward", "backward", "optimizer", "busy", "wait")


def _backend_group(spec: str, args, groups: dict) -> dist.ProcessGroup:
    """A process group of fastnet's backend for ``backend:ALGORITHM:WIRE`` (collective; cached)."""
    if spec not in groups:
        _, alg, wire = spec.split(":")
        paths = dict(item.split("=", 1) for item in args.wire_cost_model)
        os.environ.update(FASTNET_ALGORITHM=alg, FASTNET_WIRE_DTYPE=wire, FASTNET_FUSION_MB=str(args.bucket_mb),
                          FASTNET_RANKS_PER_NODE=str(args.ranks_per_node or 1),
                          FASTNET_COST_MODEL=paths.get(wire, args.cost_model or ""))
        groups[spec] = dist.new_group(backend="fastnet")
    return groups[spec]


def measure(rank: int, args) -> list[dict]:
    """Every row of every model, interleaved: each row is built and warmed up first, then the rows
    take turns for ``--rounds`` rounds of ``--steps`` timed steps (the order rotated each round), so
    a slow spell of a shared machine falls on every row alike instead of on the rows measured during
    it; each row's numbers are medians over all its timed steps."""
    cost_models = load_cost_models(args.cost_model, args.wire_cost_model)
    groups: dict = {}
    rows = []
    for name in args.models:
        live = {}
        for hook in ["compute"] + args.hooks:
            model, x, y, loss_fn = _model_and_data(name, rank, args.batch, args.mlp_width)
            group = _backend_group(hook, args, groups) if hook.startswith("backend:") else None
            net = DDP(model, bucket_cap_mb=args.bucket_mb, gradient_as_bucket_view=True, broadcast_buffers=False,
                      process_group=group)
            state = _register(net, hook, args, cost_models) if hook != "compute" else None
            opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
            live[hook] = (model, net, opt, x, y, loss_fn, state)
            _steps(net, opt, x, y, loss_fn, _warmup(hook, args), state, no_sync=hook == "compute")
        timed: dict[str, list] = {hook: [] for hook in live}
        hooks = list(live)
        for r in range(args.rounds):
            for hook in hooks[r % len(hooks):] + hooks[:r % len(hooks)]:
                model, net, opt, x, y, loss_fn, state = live[hook]
                traced = args.trace and ":" in hook and r == 0  # fastnet's rows (hook or backend), first round
                if traced:
                    trace.start(rank)
                timed[hook] += _steps(net, opt, x, y, loss_fn, args.steps, state, no_sync=hook == "compute")
                if traced:
                    trace.stop(Path(args.trace) / f"{name}_{hook.replace(':', '-')}_rank{rank}.json")
        finals = {hook: torch.cat([p.detach().reshape(-1) for p in v[0].parameters()]) for hook, v in live.items()}
        for hook, (model, *_, state) in live.items():
            got = {k: statistics.median(s[i] for s in timed[hook]) for i, k in enumerate(FIELDS)}
            same_steps = _warmup(hook, args) == args.warmup  # only these compare with plain DDP's parameters
            rows.append({"model": name, "hook": hook, **got, "warmup": _warmup(hook, args),
                         "grad_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                         "diff": (finals[hook] - finals["none"]).abs().max().item() if same_steps else None})
            tuner = state.sync.reducer.tuner if state is not None else None  # _register: HookState or None
            if tuner is not None:  # fastnet's hook with hybrid choosing online: what it chose, and why
                rows[-1]["choices"] = tuner.describe()
            if state is not None:
                state.close()
        del live, finals
    return rows


def link_bound_s(grad_bytes: int, nodes: int, bytes_per_s: float | None) -> float | None:
    """The shortest time the inter-node links allow for an all-reduce of ``grad_bytes`` bytes over
    ``nodes`` nodes, each with one link of ``bytes_per_s`` each way: every node must send (and
    receive) at least 2(N-1)/N of the data (the bandwidth-optimal all-reduce's volume; Patarasuk &
    Yuan 2009), so 1x the gradient with 2 nodes, 1.5x with 4. None without a link rate or one node."""
    if not bytes_per_s or nodes < 2:
        return None
    return 2 * (nodes - 1) / nodes * grad_bytes / bytes_per_s


WIRE_BYTES = {"none": 4, "fp16": 2, "bf16": 2}


def _wire(hook: str) -> str:
    """The wire dtype of a row: torch's compress hooks and fastnet's ``ALG:WIRE`` rows; FP32 else."""
    if hook in ("fp16_compress_hook", "bf16_compress_hook"):
        return hook[:4]
    return hook.rsplit(":", 1)[1] if ":" in hook else "none"


def table(rows: list[dict], nodes: int = 1, bytes_per_s: float | None = None) -> list[str]:
    """Rows as markdown; with a link rate, per wire dtype the link bound (max(compute, link time))
    and DDP's step floor (compute + max(0, link time − backward), i.e. forward + max(backward, link
    time) + optimizer: DDP's all-reduce can only overlap the backward that produces its buckets, and
    the optimizer needs its result), and each row's efficiency against both for its wire dtype
    (bound / step, floor / step)."""
    lines = ["| model | hook | step (ms) | vs plain DDP | vs torch fp16_compress_hook | of the link bound | "
             "of the DDP step floor | exposed comm (ms) | fastnet comm busy (ms) | fastnet queue wait (ms) | "
             "max param diff vs plain DDP |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = {r["hook"]: r for r in rows if r["model"] == name}
        c = mine["compute"]
        compute, plain = c["step"], mine["none"]["step"]
        fp16 = mine.get("fp16_compress_hook", {}).get("step")
        fp32_bytes = c["grad_bytes"]
        link = {w: link_bound_s(fp32_bytes * b // 4, nodes, bytes_per_s) for w, b in WIRE_BYTES.items()}
        bound = {w: None if t is None else max(compute, t) for w, t in link.items()}
        bwd = c.get("backward", 0.0)
        floor = {w: None if t is None else compute + max(0.0, t - bwd) for w, t in link.items()}
        lines.append(f"| {name} | compute only (no_sync) | {compute * 1e3:.0f} | - | - | - | - | - | - | - | - |")
        for w in ("none", "fp16"):
            if bound[w] is None:
                continue
            wire = "FP32" if w == "none" else "FP16"
            volume = f"{2 * (nodes - 1) / nodes:g} x {fp32_bytes * WIRE_BYTES[w] // 4 / 1e6:.1f} MB / link"
            lines.append(f"| {name} | link bound, {wire} wire: max(compute, {volume}) | {bound[w] * 1e3:.0f} "
                         "| - | - | 100% | - | - | - | - | - |")
            lines.append(f"| {name} | DDP step floor, {wire} wire: compute + max(0, link - backward "
                         f"{bwd * 1e3:.0f}) | {floor[w] * 1e3:.0f} | - | - | "
                         f"{bound[w] / floor[w]:.0%} | 100% | - | - | - | - |")
        for hook, r in mine.items():
            if hook == "compute":
                continue
            label = {"none": "plain DDP (gloo all-reduce)", "powersgd_rank4": "torch PowerSGD rank 4 (lossy)"}.get(
                hook, f"torch {hook}" if ":" not in hook else "fastnet " + hook.replace(":", ", wire "))
            if hook.startswith("backend:"):
                label = "DDP on backend \"fastnet\" " + hook.split(":", 1)[1].replace(":", ", wire ")
            fastnet = ":" in hook and not hook.startswith("backend:")
            eff, fl = bound[_wire(hook)], floor[_wire(hook)]
            lines.append(f"| {name} | {label} | {r['step'] * 1e3:.0f} | {plain / r['step']:.2f}x | "
                         + (f"{fp16 / r['step']:.2f}x" if fp16 else "-")
                         + (f" | {eff / r['step']:.0%} | {fl / r['step']:.0%}" if eff else " | - | -")
                         + f" | {max(0.0, r['step'] - compute) * 1e3:.0f} | "
                         + (f"{r['busy'] * 1e3:.0f} | {r['wait'] * 1e3:.0f}" if fastnet else "- | -")
                         + (f" | {r['diff']:.1e} |" if r["diff"] is not None else " | - (more steps) |"))
    return lines


def choice_lines(rows: list[dict]) -> list[str]:
    """Under the table: per fastnet hook row with ``hybrid`` choosing online, the algorithm chosen
    per size class and rank 0's median all-reduce time per candidate it was chosen from (ms)."""
    lines = []
    for r in rows:
        for c, d in (r.get("choices") or {}).items():
            times = ", ".join(f"{a} {t * 1e3:.0f}" for a, t in sorted(d["median_s"].items(), key=lambda kv: kv[1]))
            lines.append(f"- {r['model']}, fastnet {r['hook'].replace(':', ', wire ')}: size class {c} B chose "
                         f"**{d['algorithm']}** (rank 0's median all-reduce, ms: {times})")
    return ["", "Online choices of the hybrid hook rows:", "", *lines] if lines else []


def parse_rate(rate: str | None) -> float | None:
    """``tc``-style rate (``1gbit``, ``500mbit``, ``100kbit``) in bytes per second; None for None.

    Raises:
        ValueError: an unknown unit (the valid ones named)."""
    if not rate:
        return None
    units = {"gbit": 1e9, "mbit": 1e6, "kbit": 1e3, "bit": 1.0}
    for unit, bits in units.items():
        if rate.lower().endswith(unit):
            return float(rate[:-len(unit)]) * bits / 8
    raise ValueError(f"Unknown link rate {rate!r}; expected a number with one of the units {', '.join(units)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["mlp", "resnet18_cifar"], choices=["mlp", "resnet18_cifar"])
    p.add_argument("--batch", type=int, default=8, help="local batch per rank")
    p.add_argument("--mlp-width", type=int, default=2048, help="the MLP's layer width (4 x Linear(W, W))")
    p.add_argument("--bucket-mb", type=float, default=25.0, help="DDP's bucket_cap_mb (and fastnet's fusion_mb)")
    p.add_argument("--fastnet", nargs="*", default=["ring:fp16", "hierarchical:none", "hierarchical:fp16",
                                                    "hierarchical_p2p:fp16", "leader:fp16", "hybrid:none",
                                                    "hybrid:fp16"],
                   metavar="ALGORITHM:WIRE", help="fastnet hook rows (wire: none, fp16, bf16)")
    p.add_argument("--backend", nargs="*", default=["hierarchical:none", "hierarchical:fp16", "hybrid:fp16"],
                   metavar="ALGORITHM:WIRE", help="rows of plain DDP over fastnet's torch.distributed backend")
    p.add_argument("--torch-hooks", nargs="*", default=TORCH_HOOKS[1:4], choices=TORCH_HOOKS[1:],
                   help="torch's rows besides plain DDP (default: all but powersgd_rank4, which on gloo with more "
                        "than 2 ranks aborts with a collective size mismatch: its all-reduces are issued from "
                        "future callbacks whose order gloo does not keep alike on every rank; torch skips its "
                        "PowerSGD parity test on gloo, pytorch/pytorch#58467)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per row in each round")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds in which the rows take turns (each row times --steps steps per round)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--hybrid-warmup", type=int, default=30,
                   help="warm-up steps of the hybrid rows without a cost-model file (its online choice first "
                        "explores every candidate, then refines the two fastest: 26 all-reduces per size class)")
    p.add_argument("--trace", default=None, metavar="DIR",
                   help="write a Chrome/Perfetto trace of each fastnet row (hook or backend) per rank "
                        "(fastnet.comm.trace: buckets, casts, algorithm phases) to DIR/<model>_<row>_rank<R>.json")
    p.add_argument("--link-rate", default=None, metavar="RATE",
                   help="each node's inter-node link, e.g. 1gbit (as cluster.py --rate): adds the link-bound rows "
                        "and the efficiency column")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    p.add_argument("--ranks-per-node", type=int, default=None,
                   help="node size for fastnet's hierarchical algorithms (default: torchrun's LOCAL_WORLD_SIZE)")
    p.add_argument("--cost-model", default=None, metavar="PATH", help="calibrated cost model (hybrid)")
    p.add_argument("--wire-cost-model", nargs="*", default=[], metavar="WIRE=PATH",
                   help="a cost model calibrated with that wire dtype, e.g. fp16=PATH")
    p.add_argument("--append")
    args = p.parse_args()
    for flag, specs in (("--fastnet", args.fastnet), ("--backend", args.backend)):
        for spec in specs:
            alg, _, wire = spec.partition(":")
            if wire not in ("none", "fp16", "bf16"):
                p.error(f"{flag} {spec!r}: expected ALGORITHM:WIRE with WIRE one of none, fp16, bf16")
    if error := check_wire_cost_models(args.wire_cost_model):
        p.error(error)
    args.hooks = ["none", *args.torch_hooks, *args.fastnet, *(f"backend:{b}" for b in args.backend)]
    relaunch_under_torchrun(__file__)
    args.ranks_per_node = ranks_per_node(args.ranks_per_node)
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    rows = measure(dist.get_rank(), args)
    dist.destroy_process_group()
    if int(os.environ["RANK"]) != 0:
        return
    launcher = os.environ.get("FASTNET_BENCH_LAUNCHER", "torchrun")
    what = "DDP communication hooks and the backend \"fastnet\" (issues 18, 19)" if args.backend else \
        "DDP communication hooks: torch's vs fastnet's (issue 19)"
    lines = [f"### {what} — {datetime.date.today()}", "",
             f"Command: `python benchmarks/ddp_hooks.py {' '.join(sys.argv[1:])}` ({launcher})",
             f"Machine: {platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}; {world} ranks gloo "
             f"({args.ranks_per_node} per node), {args.threads} thread(s) each; local batch {args.batch}; DDP "
             f"buckets {args.bucket_mb:g} MiB; median of {args.rounds} x {args.steps} steps after {args.warmup} "
             f"(the slowest rank's), the rows interleaved: {args.rounds} rounds, each row {args.steps} steps per "
             "round.",
             "", *table(rows, world // (args.ranks_per_node or world), parse_rate(args.link_rate)),
             *choice_lines(rows)]
    emit(lines, args.append)


if __name__ == "__main__":
    main()
