"""Soak of torchrun's elastic restarts: random crashes, every run bit-identical to the uninterrupted one.

    .venv/bin/python benchmarks/elastic_soak.py [--repeats 5] [--kills 3] [--nproc 2] [--seed 0]
                                                [--append docs/BENCHMARKS.md]

One uninterrupted reference run (``torchrun --standalone --nproc_per_node N -m fastnet.train`` on
the digits data, 3 epochs, a checkpoint every 5 steps, ``--resume auto``), then ``--repeats`` runs
of the same job under ``torchrun --max-restarts K`` in which ``--kills`` (K) ranks, drawn at random,
SIGKILL themselves after random steps (``FASTNET_KILL_AT``, :mod:`fastnet.faults`; one crash per
launch attempt, at increasing steps). A repeat passes when torchrun ends with exit code 0 by itself
and the final checkpoint's parameters, buffers, optimizer state and every metric record (the clock
fields aside) equal the reference's bitwise. The table reports the crashes survived, the steps
recomputed (those between a crash and the checkpoint it resumed from) and the steps lost (0: any
difference from the reference counts as lost).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import emit  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from fastnet.metrics import read_metrics, reproducible_records  # noqa: E402

INTERVAL, EPOCHS = 5, 3
ARGS = ["--dataset", "digits", "--model", "small_cnn", "--workers", "0", "--progress", "none",
        "--global-batch-size", "128", "--micro-batch-size", "64", "--epochs", str(EPOCHS), "--log-interval", "1",
        "--checkpoint-interval", str(INTERVAL), "--timeout-s", "30", "--resume", "auto"]


def torchrun(out: Path, nproc: int, kill_at: str | None, max_restarts: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTNET_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **({"FASTNET_KILL_AT": kill_at} if kill_at else {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           f"--max-restarts={max_restarts}", "-m", "fastnet.train", *ARGS, "--out-dir", str(out)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def comparable(out: Path) -> list[dict]:
    return reproducible_records(out / "metrics.jsonl")


def tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for k in sorted(tree, key=str) for t in tensors(tree[k])]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in tensors(v)]
    return []


def final_state(out: Path) -> list[torch.Tensor]:
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    return tensors([state["model"], state["optimizer"], state["buffers"]])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--kills", type=int, default=3, help="crashes per run (one per launch attempt)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--append", help="also append the table to this file (e.g. docs/BENCHMARKS.md)")
    a = p.parse_args(argv)
    steps = EPOCHS * (1438 // 128)  # digits: 1,438 training images, the last partial batch dropped
    rng = random.Random(a.seed)
    rows, failures = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        ref = torchrun(Path(tmp) / "ref", a.nproc, None, 0)
        if ref.returncode:
            raise SystemExit(f"reference run failed:\n{ref.stderr[-3000:]}")
        want_records, want_state = comparable(Path(tmp) / "ref"), final_state(Path(tmp) / "ref")
        for r in range(a.repeats):
            kill_steps = sorted(rng.sample(range(2, steps), a.kills))
            plan = ",".join(f"{s}:{rng.randrange(a.nproc)}" for s in kill_steps)
            out = Path(tmp) / f"run{r}"
            t0 = time.perf_counter()
            res = torchrun(out, a.nproc, plan, a.kills)
            wall = time.perf_counter() - t0
            resumes = [x["step"] for x in read_metrics(out / "metrics.jsonl") if x["kind"] == "resume"] \
                if (out / "metrics.jsonl").exists() else []
            ok = res.returncode == 0 and comparable(out) == want_records
            got = final_state(out) if ok else []
            ok = ok and len(got) == len(want_state) and all(torch.equal(x, y) for x, y in zip(got, want_state))
            failures += not ok
            recomputed = sum(k - s for k, s in zip(kill_steps, resumes))
            rows.append(f"| {r} | {plan} | {', '.join(map(str, resumes))} | {len(resumes)} | {recomputed} | "
                        f"{'0' if ok else 'run differs'} | {res.returncode} | {wall:.0f} |")
            print(rows[-1], flush=True)
            if not ok:
                print(res.stderr[-3000:], file=sys.stderr)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    lines = [f"### Elastic restarts: torchrun --max-restarts {a.kills}, {a.nproc} gloo ranks, "
             f"{datetime.date.today()}",
             "",
             f"Command: `.venv/bin/python benchmarks/elastic_soak.py --repeats {a.repeats} --kills {a.kills} "
             f"--nproc {a.nproc} --seed {a.seed}`; machine: {machine}. Digits, {steps} steps, a checkpoint every "
             f"{INTERVAL} steps; each run compared bitwise (parameters, buffers, optimizer state, metric records) "
             f"with one uninterrupted run.",
             "",
             "| repeat | crashes (step:rank, one per attempt) | resumed from steps | crashes survived | "
             "steps recomputed | steps lost | torchrun exit | wall (s) |",
             "|---:|---|---|---:|---:|---|---:|---:|",
             *rows,
             "",
             f"{a.repeats - failures} of {a.repeats} runs bit-identical to the uninterrupted run; "
             f"{sum(int(r.split('|')[4]) for r in rows)} crashes survived."]
    emit(lines, a.append)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
