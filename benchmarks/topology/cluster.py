"""An emulated cluster on one machine: network namespaces as nodes, a shaped link between them.

    python benchmarks/topology/cluster.py study --nodes 2 --ranks-per-node 2 --rate 1gbit --append docs/BENCHMARKS.md
    python benchmarks/topology/cluster.py run --nodes 2 --ranks-per-node 2 -- -m fastnet.comm.bench -a all
    python benchmarks/topology/cluster.py partition --nodes 2 --ranks-per-node 1 --append docs/BENCHMARKS.md
    python benchmarks/topology/cluster.py down        # remove leftovers of an interrupted run

Needs root (``ip netns``, ``tc``). Every run has its own id (4 hex digits) in every name it
creates, so runs side by side never touch each other's: a bridge ``fnt<id>br`` in the root
namespace; per node ``i`` a namespace ``fnt-<id>-n<i>`` with a veth ``eth0`` (address
10.77.0.<i+1>/24; its root-side peer ``fnt<id>v<i>``) plugged into the bridge,
whose egress is shaped by ``tc tbf`` to ``--rate`` (netem is not in this kernel, so no delay is
added: latency is the veth/bridge path's own). Ranks of one node share its namespace and talk over
its local address (the kernel routes that through ``lo``: unshaped, like shared memory within a
node); ``net.ipv4.tcp_slow_start_after_idle=0`` in each node (as on tuned HPC hosts), so a
connection idle between collectives keeps its congestion window; ranks of different nodes go through the shaped veths. Every rank runs under ``torchrun
--nnodes N --node_rank i`` inside its node's namespace with ``GLOO_SOCKET_IFNAME=eth0``.
Working files (results, the calibrated cost model) live in a fresh root-owned 0700 directory; the
ranks' processes run in their own process groups, killed (and whatever is left in the run's
namespaces) on a timeout (``--timeout``), a failure or Ctrl-C; then the run's namespaces, veths and
bridge are removed. ``down`` with no id removes the leftovers of every run (manual clean-up).

``study`` measures, on the emulated cluster: native, flat ring, hierarchical_p2p (pipelined in
``--segment-mb`` segments, and in one segment), the other algorithms and hybrid in FP32, and ring/hierarchical_p2p
with FP16 on the wire; it calibrates the α-β model's links from separate runs (medians of
``--calibration-runs`` launches: ring within one node, ring across nodes with one rank each, and the
collective-composed hierarchical (in one piece) on the full cluster, fitted together → intra, inter
and p2p (fastnet's per-step software cost, which the rings pay and the collective-composed steps do
not); native on the full cluster → native; the intra-node sweep from ``--calibration-minbytes``)
and compares every prediction with the measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from fastnet.comm.bench import parse_size  # noqa: E402
from fastnet.comm.planning.cost_model import CostModel, calibrate  # noqa: E402
from report import emit  # noqa: E402

SUBNET = "10.77.0"


@dataclasses.dataclass(frozen=True)
class Cluster:
    """One run's emulated cluster: its ``run_id``, node addresses and private working directory."""

    run_id: str
    addrs: list[str]
    workdir: Path

    def namespace(self, i: int) -> str:
        return f"fnt-{self.run_id}-n{i}"


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def _kill_namespace_processes(ns: str) -> None:
    for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


OWNER_FILE = "owner.pid"  # in a run's working directory: the pid of the cluster.py that owns the run


def live_runs(tmp: Path | None = None) -> set[str]:
    """Run ids whose owning ``cluster.py`` process is still alive (its pid in ``OWNER_FILE`` of the
    run's working directory under ``tmp``, default the system temporary directory)."""
    alive = set()
    for owner in Path(tmp or tempfile.gettempdir()).glob(f"fnt-*-*/{OWNER_FILE}"):
        run_id = owner.parent.name.split("-")[1]
        with contextlib.suppress(ValueError, OSError):
            os.kill(int(owner.read_text()), 0)  # raises if no such process
            alive.add(run_id)
    return alive


def _run_id_of(name: str) -> str | None:
    """The run id in a namespace (``fnt-<id>-n<i>``) or link (``fnt<id>br``, ``fnt<id>v<i>``) name."""
    if name.startswith("fnt-"):
        return name.split("-")[1] if name.count("-") >= 2 else None
    return name[3:7] if name.startswith("fnt") and len(name) > 7 else None


def down(run_id: str | None = None, force: bool = False) -> list[str]:
    """Remove the namespaces (after killing what runs in them), veths and bridge of run ``run_id``,
    or with None of every run whose owner has gone (leftovers of interrupted runs; also the names
    of older versions) — runs in progress are kept unless ``force``. Returns the run ids kept."""
    keep = set() if run_id or force else live_runs()
    ns_prefix, link_prefix = (f"fnt-{run_id}-", f"fnt{run_id}") if run_id else ("fnt-", "fnt")
    for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(ns_prefix) and _run_id_of(name) not in keep:
            _kill_namespace_processes(name)
            sh("ip", "netns", "del", name, check=False)
    for line in sh("ip", "-o", "link", "show", check=False).stdout.splitlines():
        parts = line.split(":")
        name = parts[1].strip().split("@")[0] if len(parts) > 1 else ""
        if name.startswith(link_prefix) and _run_id_of(name) not in keep:
            sh("ip", "link", "del", name, check=False)
    return sorted(keep)


@contextlib.contextmanager
def cluster(nodes: int, rate: str) -> Iterator[Cluster]:
    """Build ``nodes`` namespaces bridged together, egress shaped to ``rate``, under a fresh run id;
    yields the :class:`Cluster`. Removes everything of this run (and only of it) on exit."""
    if os.geteuid() != 0:
        raise SystemExit("the emulated cluster needs root (ip netns, tc)")
    if not 1 <= nodes <= 200:
        raise SystemExit(f"Invalid --nodes {nodes} (1 to 200)")
    run_id = secrets.token_hex(2)
    bridge = f"fnt{run_id}br"
    workdir = Path(tempfile.mkdtemp(prefix=f"fnt-{run_id}-"))  # 0700, owned by root
    (workdir / OWNER_FILE).write_text(str(os.getpid()))  # `down` keeps the runs whose owner is alive
    print(f"# emulated cluster run id {run_id}", file=sys.stderr, flush=True)
    try:
        sh("ip", "link", "add", bridge, "type", "bridge")
        sh("ip", "link", "set", bridge, "up")
        addrs = []
        for i in range(nodes):
            ns, veth, addr = f"fnt-{run_id}-n{i}", f"fnt{run_id}v{i}", f"{SUBNET}.{i + 1}"
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "link", "set", veth, "master", bridge)
            sh("ip", "link", "set", veth, "up")
            for cmd in (("ip", "link", "set", "lo", "up"), ("ip", "addr", "add", f"{addr}/24", "dev", "eth0"),
                        ("sysctl", "-qw", "net.ipv4.tcp_slow_start_after_idle=0"),
                        ("ip", "link", "set", "eth0", "up"),
                        ("tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", rate, "burst", "256kb",
                         "latency", "100ms")):
                sh("ip", "netns", "exec", ns, *cmd)
            addrs.append(addr)
        yield Cluster(run_id, addrs, workdir)
    finally:
        down(run_id)
        shutil.rmtree(workdir, ignore_errors=True)


def start(c: Cluster, rpn: int, args: list[str], logs: Path | None = None) -> list[subprocess.Popen]:
    """Start ``python -m torch.distributed.run ... <args>`` on every node of cluster ``c``, each in
    its own process group; output piped, or with ``logs`` written to ``<logs>.n<i>.{out,err}``."""
    nodes, port = len(c.addrs), 29500
    procs = []
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "eth0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "FASTNET_BENCH_LAUNCHER": f"benchmarks/topology/cluster.py: {nodes} emulated nodes x {rpn} ranks, "
                                     "torchrun per node"}
    try:
        for i in range(nodes):
            cmd = ["ip", "netns", "exec", c.namespace(i), sys.executable, "-m", "torch.distributed.run",
                   f"--nnodes={nodes}", f"--node_rank={i}", f"--nproc_per_node={rpn}", f"--master_addr={SUBNET}.1",
                   f"--master_port={port}", *args]
            out = open(f"{logs}.n{i}.out", "w") if logs else subprocess.PIPE
            err = open(f"{logs}.n{i}.err", "w") if logs else subprocess.PIPE
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, text=True,
                                          start_new_session=True))
    except BaseException:
        kill(c, procs)
        raise
    return procs


def kill(c: Cluster, procs: list[subprocess.Popen]) -> None:
    """Kill every process group of ``procs`` and whatever still runs in ``c``'s namespaces."""
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
    for i in range(len(c.addrs)):
        _kill_namespace_processes(c.namespace(i))
    for p in procs:
        p.wait()


def launch(c: Cluster, rpn: int, args: list[str], timeout: float = 1800) -> list[subprocess.CompletedProcess]:
    """Run ``python -m torch.distributed.run ... <args>`` on every node of cluster ``c``, each in its
    own process group. On a timeout (seconds) or any error, every process group of the run and
    whatever still runs in its namespaces is killed, then the error is raised."""
    procs = start(c, rpn, args)
    try:
        out = []
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
        return out
    except BaseException:
        kill(c, procs)
        raise


def bench(c: Cluster, rpn: int, args: list[str]) -> dict:
    """fastnet-bench on cluster ``c``; rank 0 writes its JSON into the run's private directory."""
    out = c.workdir / f"rows-{secrets.token_hex(4)}.json"
    res = launch(c, rpn, ["-m", "fastnet.comm.bench", *args, "--ranks-per-node", str(rpn), "--json", str(out)])
    if any(r.returncode for r in res):
        raise SystemExit("fastnet-bench failed on the emulated cluster:\n" +
                         "\n".join(r.stdout + r.stderr[-2000:] for r in res))
    return json.loads(out.read_text())


def median_rows(c: Cluster, rpn: int, args: list[str], repeats: int) -> list[dict]:
    """``repeats`` separate launches of the same sweep; each size's time is the median over them
    (the small-message times of one launch vary by 2x on this emulation, which moves the fitted α)."""
    runs = [bench(c, rpn, args) for _ in range(repeats)]
    shape = {key: runs[0][key] for key in ("world_size", "ranks_per_node", "segment_bytes")}  # for calibrate
    return [{**rows[0], **shape, "time_us": statistics.median(r["time_us"] for r in rows)}
            for rows in zip(*(r["rows"] for r in runs))]


def study(a: argparse.Namespace) -> None:
    n, k = a.nodes, a.ranks_per_node
    sweep = ["-b", a.minbytes, "-e", a.maxbytes, "-f", "4", "-n", str(a.iters), "-w", "5"]  # -w: nccl-tests' default
    # The intra-node (loopback) sweep reaches down to latency-bound sizes, which pin its α: from
    # 1 MiB up, α is the difference of two noisy times on 2 cores and moved between 0 and 1.3 ms
    # from launch to launch. The shaped links are fitted from -b up: tbf's 256 KB burst lets
    # smaller messages leave at veth speed, where the α-β line does not hold.
    calib = ["-b", str(min(parse_size(a.minbytes), parse_size(a.calibration_minbytes))), *sweep[2:]]
    if a.dtype != "float32":  # the links then carry that wire dtype's reduction cost in their β (sizes: its bytes)
        if not a.calibrate_only:
            raise SystemExit(f"--dtype {a.dtype} needs --calibrate-only (the comparison table is fitted in float32)")
        sweep, calib = [*sweep, "-d", a.dtype], [*calib, "-d", a.dtype]
    with cluster(n, a.rate) as c:
        one_node = dataclasses.replace(c, addrs=c.addrs[:1])
        # the intra-node link (none with one rank per node: the default's values stay, unused)
        intra = median_rows(one_node, k, [*calib, "-a", "ring"], a.calibration_runs) if k > 1 else []
        inter = median_rows(c, 1, [*sweep, "-a", "ring"], a.calibration_runs)  # one rank per node: inter-node
        native = median_rows(c, k, [*sweep, "-a", "native"], a.calibration_runs)
        # The collective-composed hierarchical on the whole cluster, in one piece: its steps pay the
        # backend's per-step cost where the rings pay fastnet's point-to-point one, so fitted together
        # the three sweeps separate the links' α from p2p's (the per-algorithm α, measured).
        composed = median_rows(c, k, [*sweep, "-a", "hierarchical", "--segment-mb", "0"], a.calibration_runs)
        fitted = calibrate(intra + inter + composed, n * k, k, levels=("intra", "inter", "p2p"))  # unused: base's
        model = CostModel(intra=fitted.intra, inter=fitted.inter, native=calibrate(native, n * k, k).native,
                          p2p=fitted.p2p)
        cm_path = str(c.workdir / "cost_model.yaml")  # in the run's private directory
        model.save(cm_path)
        if a.save_cost_model:
            model.save(a.save_cost_model)
        links = ", ".join(f"{lv} α={getattr(model, lv).alpha_s * 1e6:.0f} µs, {getattr(model, lv).bandwidth_gbps:.3f} GB/s"
                          for lv in (("intra",) if k > 1 else ()) + ("inter", "native"))
        links += f", p2p α={model.p2p.alpha_s * 1e6:.0f} µs per step"
        if a.calibrate_only:
            print(f"calibrated ({n} nodes × {k} ranks, {a.rate}, {a.dtype}): {links}"
                  + (f"; saved to {a.save_cost_model}" if a.save_cost_model else ""))
            return
        segment = ["--segment-mb", f"{a.segment_mb:g}"]
        fp32 = bench(c, k, [*sweep, "-a", "all", "--cost-model", cm_path, *segment])
        one_segment = [{**r, "segment_bytes": 0}
                       for r in bench(c, k, [*sweep, "-a", "hierarchical_p2p", "--segment-mb", "0"])["rows"]]
        half = ["-b", str(parse_size(a.minbytes) // 2), "-e", str(parse_size(a.maxbytes) // 2), *sweep[4:]]
        fp16 = {alg: bench(c, k, [*half, "-a", alg, "-d", "float16", *segment])["rows"]
                for alg in ("ring", "hierarchical_p2p")}
    seg = int(a.segment_mb * (1 << 20))
    world = n * k
    rows = fp32["rows"]
    lines = [f"### Emulated cluster: {n} nodes × {k} ranks, {a.rate} inter-node link — {datetime.date.today()}", "",
             f"Command: `python benchmarks/topology/cluster.py study --nodes {n} --ranks-per-node {k} --rate {a.rate}"
             f" -b {a.minbytes} -e {a.maxbytes} --iters {a.iters} --segment-mb {a.segment_mb:g}"
             f" --calibration-runs {a.calibration_runs} --calibration-minbytes {a.calibration_minbytes}`",
             f"Machine: {platform.machine()} {os.cpu_count()} CPUs; network namespaces as nodes, veth + bridge, "
             f"`tc tbf` at {a.rate} on each node's egress, no added delay, tcp_slow_start_after_idle=0; "
             f"warm-up 5; gloo; {fp32['header']}.",
             f"Links calibrated from separate runs (medians of {a.calibration_runs} launches; ring on one node,"
             f" {a.calibration_minbytes}–{a.maxbytes}, ring with 1 rank per node and hierarchical in one piece on the"
             " cluster, fitted together → intra, inter, p2p; native on the cluster → native): " + links + ".", "",
             "| size (MiB) | algorithm | wire | time (ms) | busbw (GB/s) | vs flat ring | model (ms) | model error "
             "| #wrong |", "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    pipelined = (f"hierarchical_p2p is pipelined in {a.segment_mb:g} MiB segments; 'hierarchical_p2p, 1 segment' "
                 f"is not")
    lines.insert(5, f"{pipelined} (fastnet-bench --segment-mb 0).")
    ring_t = {r["size"]: r["time_us"] for r in rows if r["algorithm"] == "ring"}
    for r in rows + one_segment + [x for v in fp16.values() for x in v]:
        alg, size, r_seg = r["algorithm"], r["size"], r.get("segment_bytes", seg)
        wire = "fp16" if r["type"] == "float16" else "fp32"
        fp32_size = size * (2 if wire == "fp16" else 1)  # compare at equal element count
        pick = model.choose(size, world, k, segment_bytes=r_seg) if alg == "hybrid" else alg
        pred = model.time(pick, size, world, k, r_seg) * 1e6
        name = f"hybrid→{pick}" if alg == "hybrid" else alg + (", 1 segment" if not r_seg else "")
        lines.append(f"| {fp32_size / 2**20:g} | {name} | {wire} | {r['time_us'] / 1e3:.1f} | {r['busbw']:.3f} | "
                     f"{ring_t.get(fp32_size, float('nan')) / r['time_us']:.2f}x | {pred / 1e3:.1f} | "
                     f"{(pred - r['time_us']) / r['time_us']:+.0%} | {r['wrong']} |")
    emit(lines, a.append)


PARTITION_TRAIN = ["-m", "fastnet.train", "--dataset", "digits", "--model", "small_cnn", "--workers", "0",
                   "--progress", "log", "--global-batch-size", "128", "--micro-batch-size", "32", "--epochs", "3",
                   "--log-interval", "1", "--checkpoint-interval", "5", "--resume", "auto"]


def _workers(ns: str) -> set[int]:
    """Pids of the fastnet-train workers (not torchrun's agent) running in namespace ``ns``."""
    found = set()
    for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"fastnet.train" in cmd and b"torch.distributed.run" not in cmd:
                found.add(int(pid))
    return found


def _comparable(out: Path) -> list[dict]:
    from fastnet.metrics import reproducible_records

    return reproducible_records(out / "metrics.jsonl")


def _final_state(out: Path) -> list:
    import torch

    state = torch.load(out / "checkpoints" / "last.pt", weights_only=False)

    def flat(tree) -> list:
        if isinstance(tree, torch.Tensor):
            return [tree]
        if isinstance(tree, dict):
            return [t for k in sorted(tree, key=str) for t in flat(tree[k])]
        return [t for v in tree for t in flat(v)] if isinstance(tree, (list, tuple)) else []

    return flat([state["model"], state["optimizer"], state["buffers"]])


def partition(a: argparse.Namespace) -> None:
    """A network partition mid-training, then a clean resume (issue: faults lose nothing, case 6).

    On the emulated cluster: an uninterrupted reference run of fastnet-train (digits, 3 epochs, a
    checkpoint every 5 steps); the same run again, and once its metrics show step ``--cut-step``,
    node ``--cut-node``'s link goes down (``ip link set <its veth> down``: packets vanish, no reset,
    as a failed switch port). Every worker must end within ``--timeout-s`` (+ the detection slack)
    with a one-line error naming the collective. The link comes back up and the run is relaunched
    with ``--resume auto``: it must end bitwise equal to the reference (parameters, buffers,
    optimizer state, metric records without their clock fields)."""
    import time

    world = a.nodes * a.ranks_per_node
    if 128 % (32 * world):
        raise SystemExit(f"--nodes x --ranks-per-node = {world} must divide 4 (global batch 128, micro-batch 32)")
    train = [*PARTITION_TRAIN, "--timeout-s", f"{a.timeout_s:g}"]
    with cluster(a.nodes, a.rate) as c:
        ref_dir, run_dir = c.workdir / "reference", c.workdir / "partitioned"
        ref = launch(c, a.ranks_per_node, [*train, "--out-dir", str(ref_dir)], timeout=900)
        if any(r.returncode for r in ref):
            raise SystemExit("the reference run failed:\n" + "\n".join(r.stderr[-2000:] for r in ref))
        logs = c.workdir / "partition"
        procs = start(c, a.ranks_per_node, [*train, "--out-dir", str(run_dir)], logs=logs)
        try:
            deadline = time.monotonic() + 600
            metrics = run_dir / "metrics.jsonl"
            while not (metrics.exists() and f'"step": {a.cut_step},' in metrics.read_text()):
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    raise SystemExit(f"the run never reached step {a.cut_step}: see {logs}.n*.err")
                time.sleep(0.05)
            alive = {i: _workers(c.namespace(i)) for i in range(a.nodes)}
            veth = f"fnt{c.run_id}v{a.cut_node}"
            sh("ip", "link", "set", veth, "down")
            cut = time.monotonic()
            ended: dict[int, float] = {}
            agents_done: dict[int, float] = {}
            limit = a.timeout_s + a.slack_s
            while time.monotonic() - cut < limit + 60 and (len(agents_done) < a.nodes or
                                                           any(pid not in ended for v in alive.values() for pid in v)):
                now = time.monotonic() - cut
                for i in range(a.nodes):
                    running = _workers(c.namespace(i))
                    for pid in alive[i] - running:
                        ended.setdefault(pid, now)
                    if procs[i].poll() is not None:
                        agents_done.setdefault(i, now)
                time.sleep(0.1)
        finally:
            kill(c, procs)
        errs = [Path(f"{logs}.n{i}.err").read_text() for i in range(a.nodes)]
        progress = [ln for e in errs for ln in e.splitlines() if "/33)" in ln]
        last_step = max((int(ln.split("(")[1].split("/")[0]) for ln in progress), default=0)
        sh("ip", "link", "set", veth, "up")
        resumed = launch(c, a.ranks_per_node, [*train, "--out-dir", str(run_dir)], timeout=900)
        if any(r.returncode for r in resumed):
            raise SystemExit("the resumed run failed:\n" + "\n".join(r.stderr[-2000:] for r in resumed))
        from fastnet.metrics import read_metrics

        resumes = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "resume"]
        same_records = _comparable(run_dir) == _comparable(ref_dir)
        x, y = _final_state(run_dir), _final_state(ref_dir)
        import torch

        same_state = len(x) == len(y) and all(torch.equal(p, q) for p, q in zip(x, y))
    lines = [f"### Network partition: {a.nodes} nodes × {a.ranks_per_node} ranks, node {a.cut_node}'s link down "
             f"after step {a.cut_step} — {datetime.date.today()}", "",
             f"Command: `python benchmarks/topology/cluster.py partition --nodes {a.nodes} --ranks-per-node "
             f"{a.ranks_per_node} --rate {a.rate} --cut-node {a.cut_node} --cut-step {a.cut_step} --timeout-s "
             f"{a.timeout_s:g}`; machine: {platform.machine()} {os.cpu_count()} CPUs; fastnet-train on digits "
             f"(3 epochs, 33 steps, a checkpoint every 5 steps, gloo, `--timeout-s {a.timeout_s:g}`) under torchrun "
             "per node; the link is the node's veth (`ip link set ... down`: packets dropped, no reset).", "",
             "| worker (node, pid) | ended after the cut (s) | within timeout_s + slack |", "|---|---:|---|"]
    for i in range(a.nodes):
        for pid in sorted(alive[i]):
            t = ended.get(pid)
            lines.append(f"| node {i}, {pid} | {'still running (killed)' if t is None else f'{t:.1f}'} | "
                         f"{'yes' if t is not None and t <= limit else 'NO'} |")
    agents = ", ".join(f"node {i}: {agents_done[i]:.1f} s" if i in agents_done else f"node {i}: still running (killed)"
                       for i in range(a.nodes))
    lines += ["", f"torchrun agents ended: {agents}. The last step logged before the cut: {last_step}.", "",
              "Each rank's error line:", "", "```"]
    lines += [ln[:400] for e in errs for ln in e.splitlines() if "fastnet-train: error" in ln] or ["(none)"]
    lines += ["```", "",
              f"Relaunched with the link up (`--resume auto`): resumed from step {resumes}; metric records "
              f"{'equal' if same_records else 'DIFFER'} and final parameters, buffers and optimizer state "
              f"{'bitwise equal' if same_state else 'DIFFER'} to the uninterrupted run."]
    emit(lines, a.append)
    ok = same_records and same_state and all(ended.get(pid, limit + 1) <= limit for v in alive.values() for pid in v)
    if not ok:
        raise SystemExit(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("study", "run", "partition"):
        s = sub.add_parser(name)
        s.add_argument("--nodes", type=int, default=2)
        s.add_argument("--ranks-per-node", type=int, default=2)
        s.add_argument("--rate", default="1gbit", help="tc tbf rate of each node's link, e.g. 1gbit, 500mbit")
        if name == "study":
            s.add_argument("-b", "--minbytes", default="1M")
            s.add_argument("-e", "--maxbytes", default="256M")
            s.add_argument("--iters", type=int, default=3)
            s.add_argument("--segment-mb", type=float, default=4.0, help="hierarchical pipeline segment, MiB")
            s.add_argument("--calibration-runs", type=int, default=3,
                           help="launches per calibration sweep; the fit uses each size's median")
            s.add_argument("--calibration-minbytes", default="64K",
                           help="smallest size of the intra-node calibration sweep")
            s.add_argument("--save-cost-model", default=None, metavar="PATH",
                           help="also write the calibrated cost model (YAML) here, e.g. for "
                                "benchmarks/sync_step.py --suite validate --cost-model PATH")
            s.add_argument("--calibrate-only", action="store_true",
                           help="stop after the calibration (print the links; no comparison table)")
            s.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                           help="with --calibrate-only: the wire dtype of the calibration sweeps, so the links' "
                                "β include its reduction cost (on a CPU, FP16 sums cost more than the bytes)")
            s.add_argument("--append")
        elif name == "partition":
            s.add_argument("--cut-node", type=int, default=1, help="the node whose link goes down")
            s.add_argument("--cut-step", type=int, default=12, help="the link goes down once this step is logged")
            s.add_argument("--timeout-s", type=float, default=20.0, help="fastnet-train's collective timeout")
            s.add_argument("--slack-s", type=float, default=15.0,
                           help="seconds past --timeout-s a worker may take to notice and exit")
            s.add_argument("--append")
        else:
            s.add_argument("--timeout", type=float, default=1800.0, help="seconds before the run's processes are "
                           "killed and its cluster removed (default %(default)g)")
            s.add_argument("args", nargs=argparse.REMAINDER, help="after --: torchrun arguments, e.g. -m fastnet.comm.bench")
    d = sub.add_parser("down", help="remove leftovers of interrupted runs (every run whose cluster.py has "
                       "exited, or --run-id's; runs in progress are kept unless --force)")
    d.add_argument("--run-id", default=None)
    d.add_argument("--force", action="store_true", help="also remove runs in progress (kills their ranks)")
    a = p.parse_args()
    # SIGTERM (e.g. timeout(1), pkill) unwinds like Ctrl-C: the run's process groups are killed and its
    # namespaces removed, instead of leaving ranks running in namespaces nobody owns
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    if a.cmd == "down":
        kept = down(a.run_id, a.force)
        if kept:
            print(f"# kept runs in progress: {', '.join(kept)} (--run-id ID or --force removes them)", file=sys.stderr)
    elif a.cmd == "run":
        with cluster(a.nodes, a.rate) as c:
            try:
                results = launch(c, a.ranks_per_node, [x for x in a.args if x != "--"], a.timeout)
            except subprocess.TimeoutExpired:
                raise SystemExit(f"the run did not finish within --timeout {a.timeout:g} s: its processes were "
                                 f"killed and its cluster {c.run_id} removed") from None
            for r in results:
                print(r.stdout, end="")
                print(r.stderr[-2000:], end="", file=sys.stderr)
            if any(r.returncode for r in results):
                raise SystemExit(1)
    elif a.cmd == "partition":
        partition(a)
    else:
        study(a)


if __name__ == "__main__":
    main()
