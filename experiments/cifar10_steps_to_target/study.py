"""Steps to a target validation accuracy vs global batch size, momentum SGD vs LARS (CIFAR-10).

The measurement of Shallue et al. 2019 ("Measuring the Effects of Data Parallelism on Neural
Network Training", JMLR 20, §3): for each global batch B and optimizer, the fewest optimizer steps
that reach a target validation top-1, each B with its own peak learning rate chosen on the
validation hold-out. Perfect scaling halves the steps when B doubles; past a critical batch size
the curve flattens (McCandlish et al. 2018 predict that knee from the gradient noise scale).

    python experiments/cifar10_steps_to_target/study.py run --batch 1024 --optimizer lars \\
        --peak-lr 1 2 4 --seeds 0 [--commit]      # one row per run appended to results.yaml
    python experiments/cifar10_steps_to_target/study.py table    # the RESULTS table and the full sweep
    python experiments/cifar10_steps_to_target/study.py plot --out docs/cifar10_steps_to_target.png

Each run is ``fastnet.train`` with ``common.yaml``, the run's batch, optimizer, peak LR and seed,
the target and step budget of ``study.yaml``, evaluations every ``ceil(steps per epoch /
evals_per_epoch)`` steps and ``stop_at_target``; it lives in ``--runs-dir/<key>/`` and resumes from
its checkpoint when interrupted. A finished run is recorded in ``results.yaml`` (the record that
outlives ``runs/``) and skipped when asked again; a run whose loss became non-finite is recorded as
diverged. ``--commit`` commits ``results.yaml`` after each recorded run (``git commit -- FILE``).
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
from fastnet.metrics import read_metrics  # noqa: E402

RESULTS = HERE / "results.yaml"
TRAIN_IMAGES = 45_000  # 50,000 CIFAR-10 training images less the 5,000 held out
TABLE_HEADER = "| global batch | optimizer | peak LR | seeds | steps to target | epochs to target |"


def study_settings() -> dict:
    return yaml.safe_load((HERE / "study.yaml").read_text())


def run_key(batch: int, optimizer: str, peak_lr: float, seed: int, excluded_lr: float | None = None) -> str:
    return f"b{batch}_{optimizer}_lr{peak_lr:g}" + (f"_ex{excluded_lr:g}" if excluded_lr is not None else "") \
        + f"_s{seed}"


def lr_label(peak_lr: float, excluded_lr: float | None) -> str:
    """The peak LR as the tables print it; a LARS run with its own excluded-tensor LR shows both."""
    return f"{peak_lr:g}" + (f" (excluded {excluded_lr:g})" if excluded_lr is not None else "")


def train_config(batch: int, optimizer: str, peak_lr: float, seed: int, study: dict, data_dir: str | None,
                 excluded_lr: float | None = None) -> dict:
    """The fastnet-train options of one run (``common.yaml`` + this run's choices).

    Raises SystemExit for a batch size without a budget in ``study.yaml``.
    """
    budgets = {int(k): v for k, v in study["budget_epochs"].items()}
    if batch not in budgets:
        raise SystemExit(f"no budget for global batch {batch} in study.yaml; batches with one: "
                         f"{', '.join(map(str, sorted(budgets)))}")
    cfg = yaml.safe_load((HERE / "common.yaml").read_text())
    steps_per_epoch = TRAIN_IMAGES // batch
    cfg.update(global_batch_size=batch, optimizer=optimizer, seed=seed, epochs=budgets[batch],
               base_lr=peak_lr * cfg["reference_batch_size"] / batch,
               target_accuracy=float(study["target_accuracy"]), stop_at_target=True,
               eval_every_steps=max(1, math.ceil(steps_per_epoch / study["evals_per_epoch"])))
    if batch < cfg["micro_batch_size"]:
        cfg["micro_batch_size"] = batch
    if data_dir:
        cfg["data_dir"] = data_dir
    if excluded_lr is not None:  # LARS: the biases' and BN's own peak LR (fastnet-train --lars-excluded-lr)
        cfg["lars_excluded_lr"] = excluded_lr
    return cfg


def load_results() -> list[dict]:
    if not RESULTS.is_file():
        return []
    return yaml.safe_load(RESULTS.read_text()) or []


def append_result(row: dict) -> None:
    """Append one row to results.yaml under a file lock (two drivers may run at once)."""
    with open(HERE / ".results.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = load_results()
        rows.append(row)
        RESULTS.write_text("# Steps-to-target study: one row per finished run, written by study.py (never typed).\n"
                           + yaml.safe_dump(rows, sort_keys=False, width=120, default_flow_style=None))


def commit(message: str) -> None:
    """``git commit`` results.yaml alone (other staged or unstaged changes stay as they are)."""
    for _ in range(10):  # another git command may hold the index lock for a moment
        res = subprocess.run(["git", "add", "--", str(RESULTS)], cwd=REPO, capture_output=True, text=True)
        if res.returncode == 0:
            res = subprocess.run(["git", "commit", "-q", "-m", message, "--", str(RESULTS)], cwd=REPO,
                                 capture_output=True, text=True)
        if res.returncode == 0 or "nothing" in res.stdout + res.stderr:
            return
        time.sleep(3)
    print(f"git commit failed: {res.stderr.strip()}", file=sys.stderr)


def curve(records: list[dict]) -> list[list[float]]:
    """[step, validation top-1] of every evaluation, in order."""
    return [[r["step"], round(r["top1"], 2)] for r in records if r["kind"] in ("eval", "epoch")]


def run_one(cfg: dict, out: Path) -> tuple[dict | None, list[dict], str]:
    """Train one configuration in ``out`` (resuming its checkpoint); returns (summary or None,
    metrics records, status): ``reached``, ``budget`` (stopped at its budget) or ``diverged``.

    Raises SystemExit when training fails for another reason than a non-finite loss.
    """
    out.mkdir(parents=True, exist_ok=True)
    run_cfg = {**cfg, "out_dir": str(out), "progress": "log", "resume": "auto", "overwrite": True}
    (out / "study.yaml").write_text(yaml.safe_dump(run_cfg, sort_keys=False))
    cmd = [sys.executable, "-m", "fastnet.train", "--config", str(out / "study.yaml")]
    with open(out / "train.log", "a") as log:
        res = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
    records = read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").is_file() else []
    summary = next((r for r in reversed(records) if r["kind"] == "summary"), None)
    tail = (out / "train.log").read_text()[-2000:]
    if res.returncode != 0:
        if "non-finite" in tail or "inf/NaN" in tail:
            return None, records, "diverged"
        raise SystemExit(f"run failed: {' '.join(cmd)}\n{tail}")
    if summary is None:
        raise SystemExit(f"run {out} ended without a summary record")
    return summary, records, "reached" if summary.get("steps_to_target") is not None else "budget"


def usable(rows: list[dict], target: float) -> list[dict]:
    """The rows that answer "steps to ``target``": runs that went on at least until a target as high
    (or to their budget), with ``steps_to_target``/``epochs_to_target``/``status`` read for
    ``target`` from the evaluations they recorded (``val_curve``: the first at or above it)."""
    out = []
    for r in rows:
        if r["target_accuracy"] < target and r["status"] == "reached":
            continue  # stopped at a lower target: its curve ends before this one
        first = next((step for step, top1 in r["val_curve"] if top1 >= target), None)
        status = "reached" if first is not None else ("diverged" if r["status"] == "diverged" else "budget")
        out.append({**r, "target_accuracy": target, "status": status, "steps_to_target": first,
                    "epochs_to_target": None if first is None else round(first * r["global_batch"] / TRAIN_IMAGES, 3)})
    return out


def cmd_run(a: argparse.Namespace) -> None:
    if a.excluded_lr is not None and a.optimizer != "lars":
        raise SystemExit(f"--excluded-lr is a LARS option; --optimizer is {a.optimizer}")
    study = study_settings()
    done = {r["run"] for r in usable(load_results(), study["target_accuracy"])}
    for seed in a.seeds:
        for lr in a.peak_lr:
            key = run_key(a.batch, a.optimizer, lr, seed, a.excluded_lr)
            if key in done:
                print(f"{key}: recorded earlier, skipped", file=sys.stderr)
                continue
            cfg = train_config(a.batch, a.optimizer, lr, seed, study, a.data_dir, a.excluded_lr)
            t0 = time.perf_counter()
            summary, records, status = run_one(cfg, Path(a.runs_dir) / key)
            steps_done = max([r["step"] for r in records if "step" in r] or [0])
            row = {
                "run": key, "global_batch": a.batch, "optimizer": a.optimizer, "peak_lr": lr, "seed": seed,
                "lars_excluded_lr": a.excluded_lr,
                "target_accuracy": study["target_accuracy"], "status": status,
                "steps_to_target": summary.get("steps_to_target") if summary else None,
                "epochs_to_target": round(summary["epochs_to_target"], 3)
                if summary and summary.get("epochs_to_target") is not None else None,
                "budget_steps": (TRAIN_IMAGES // a.batch) * cfg["epochs"], "steps": steps_done,
                "eval_every_steps": cfg["eval_every_steps"],
                "best_val_top1": round(summary["best_top1"], 2) if summary else None,
                "test_top1": round(summary["test_top1"], 2) if summary and summary.get("test_top1") else None,
                "images_per_s": round(summary["mean_images_per_s"]) if summary else None,
                # the run's training wall time, every session of a resumed run included (the trainer
                # carries it in the checkpoint); this process's time only without a summary
                "wall_s": round(summary["wall_s"]) if summary and summary.get("wall_s") else
                round(time.perf_counter() - t0),
                "model": cfg["model"], "precision": cfg["precision"], "schedule": f"warm-up {cfg['warmup_epochs']} "
                f"epochs from {cfg['base_lr']:.4g}, then {cfg['lr_schedule']}",
                "date": str(datetime.date.today()), "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
                "val_curve": curve(records),
                # B_simple (McCandlish et al.; micro-batches of 256 vs the global batch) at each logged step
                "noise_scale_curve": [[r["step"], round(r["grad_noise_scale"], 1)] for r in records
                                      if r["kind"] == "step" and r.get("grad_noise_scale") is not None],
            }
            append_result(row)
            print(f"{key}: {status}, steps to target {row['steps_to_target']}, best val {row['best_val_top1']}",
                  file=sys.stderr, flush=True)
            if a.commit:
                commit(f"steps-to-target study: {key} recorded ({status}"
                       + (f", {row['steps_to_target']} steps" if row["steps_to_target"] else "") + ")")


def best_per_batch(rows: list[dict]) -> dict[tuple[int, str], dict]:
    """For each (global batch, optimizer): the peak LR chosen on the sweep's seed (the lowest seed of
    that batch and optimizer, which every LR of the sweep ran), with the median over all its seeds.

    Choosing on the shared seed keeps the choice fair: the best LR is the one that gets more seeds,
    and a second seed tends to take it back towards the mean (the winner's curse), so a choice by
    median over unequal seeds would hand the batch to a runner-up that ran one seed. A seed that did
    not reach counts as infinitely many steps; ties on the sweep seed: the lower median over seeds,
    then more seeds, then the lower LR."""
    by_lr: dict[tuple, list[dict]] = {}
    for r in rows:
        by_lr.setdefault((r["global_batch"], r["optimizer"], r["peak_lr"], r.get("lars_excluded_lr")), []).append(r)
    sweep_seed = {}
    for r in rows:
        k = (r["global_batch"], r["optimizer"])
        sweep_seed[k] = min(sweep_seed.get(k, r["seed"]), r["seed"])
    best: dict[tuple[int, str], dict] = {}
    for (batch, opt, lr, excluded), runs in by_lr.items():
        steps = [r["steps_to_target"] if r["steps_to_target"] is not None else math.inf for r in runs]
        med = statistics.median(steps)
        on_sweep = min((s for r, s in zip(runs, steps) if r["seed"] == sweep_seed[batch, opt]), default=math.inf)
        cand = {"peak_lr": lr, "excluded_lr": excluded, "runs": runs, "median_steps": med,
                "median_epochs": statistics.median(r["epochs_to_target"] if r["epochs_to_target"] is not None
                                                   else math.inf for r in runs),
                "budget_steps": max(r["budget_steps"] for r in runs), "sweep_steps": on_sweep}
        cur = best.get((batch, opt))
        if cur is None or (on_sweep, med, -len(runs), lr) < (cur["sweep_steps"], cur["median_steps"],
                                                             -len(cur["runs"]), cur["peak_lr"]):
            best[(batch, opt)] = cand
    return best


def table_lines(rows: list[dict]) -> list[str]:
    lines = [TABLE_HEADER, "|---:|---|---:|---:|---:|---:|"]
    for (batch, opt), b in sorted(best_per_batch(rows).items()):
        reached = math.isfinite(b["median_steps"])
        steps = f"{b['median_steps']:g}" if reached else f"not reached in {b['budget_steps']}"
        epochs = f"{b['median_epochs']:.2f}" if reached else "–"
        lines.append(f"| {batch} | {opt} | {lr_label(b['peak_lr'], b['excluded_lr'])} | {len(b['runs'])} | {steps} | "
                     f"{epochs} |")
    return lines


def sweep_lines(rows: list[dict]) -> list[str]:
    lines = ["| global batch | optimizer | peak LR | seed | status | steps to target | budget | best val top-1 | "
             "wall (s) |", "|---:|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["global_batch"], r["optimizer"], r["peak_lr"], r["seed"])):
        lines.append(f"| {r['global_batch']} | {r['optimizer']} | {lr_label(r['peak_lr'], r.get('lars_excluded_lr'))} | "
                     f"{r['seed']} | {r['status']} | "
                     f"{r['steps_to_target'] if r['steps_to_target'] is not None else '–'} | {r['budget_steps']} | "
                     f"{r['best_val_top1'] if r['best_val_top1'] is not None else '–'} | {r['wall_s']} |")
    return lines


def noise_lines(rows: list[dict]) -> list[str]:
    """The gradient noise scale the runs measured (B_simple from micro-batches of 256 vs the global
    batch; only runs with accumulation measure it): per run its first logged value (after the first
    log interval's moving average) and its last before it stopped, then the medians over runs."""
    runs = [r for r in rows if r.get("noise_scale_curve")]
    if not runs:
        return ["B_noise: not measured yet (runs at a global batch above 256 measure it)"]
    lines = ["| run | B_noise at the start (step) | B_noise near the end (step) |", "|---|---:|---:|"]
    for r in sorted(runs, key=lambda r: (r["global_batch"], r["optimizer"], r["peak_lr"], r["seed"])):
        (s0, b0), (s1, b1) = r["noise_scale_curve"][0], r["noise_scale_curve"][-1]
        lines.append(f"| {r['run']} | {b0:g} ({s0}) | {b1:g} ({s1}) |")
    first = statistics.median(r["noise_scale_curve"][0][1] for r in runs)
    last = statistics.median(r["noise_scale_curve"][-1][1] for r in runs)
    return lines + ["", f"B_noise ≈ {first:.0f} at the start and ≈ {last:.0f} near the target (medians over "
                        f"{len(runs)} runs)"]


def cmd_table(a: argparse.Namespace) -> None:
    rows = usable(load_results(), study_settings()["target_accuracy"])
    print("\n".join(table_lines(rows)))
    print()
    print("\n".join(noise_lines(rows)))
    if a.sweep:
        print()
        print("\n".join(sweep_lines(rows)))


def cmd_plot(a: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target = study_settings()["target_accuracy"]
    best = best_per_batch(usable(load_results(), target))
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for opt, style in (("sgd", "o-"), ("lars", "s-")):
        pts = sorted((b, v["median_steps"]) for (b, o), v in best.items() if o == opt and math.isfinite(v["median_steps"]))
        if not pts:
            continue
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], style,
                        label="Nesterov momentum SGD" if opt == "sgd" else "LARS")
        b0, s0 = pts[0]
        xs = [p[0] for p in pts]
        ax.plot(xs, [s0 * b0 / x for x in xs], ":", color=line.get_color(), lw=1,
                label=f"perfect scaling from {b0} ({opt.upper()})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("global batch size")
    ax.set_ylabel(f"steps to {target:g}% validation top-1")
    ax.set_title(a.title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out, dpi=120)
    plt.close(fig)
    print(f"wrote {a.out}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train and record runs (skips recorded ones)")
    r.add_argument("--batch", type=int, required=True, help="global batch size (a key of study.yaml's budgets)")
    r.add_argument("--optimizer", choices=["sgd", "lars"], required=True)
    r.add_argument("--peak-lr", type=float, nargs="+", required=True, help="peak learning rates to try")
    r.add_argument("--seeds", type=int, nargs="+", default=[0])
    r.add_argument("--excluded-lr", type=float, default=None,
                   help="LARS only: the excluded tensors' (biases, BN) own peak LR (default: the global peak LR, "
                        "as the reference LARS)")
    r.add_argument("--data-dir", default=None, help="default: common.yaml's (../shared/data)")
    r.add_argument("--runs-dir", default=str(REPO / "runs" / "cifar10_steps_to_target"))
    r.add_argument("--commit", action="store_true", help="git commit results.yaml after each recorded run")
    t = sub.add_parser("table", help="print the RESULTS table (best peak LR per batch and optimizer)")
    t.add_argument("--sweep", action="store_true", help="also every run of the sweep")
    pl = sub.add_parser("plot", help="log-log plot of steps to target vs global batch")
    pl.add_argument("--out", required=True)
    pl.add_argument("--title", default="ResNet-8, CIFAR-10 (JPEG q≈75), steps to target vs batch (CPU, FP32)")
    a = p.parse_args(argv)
    {"run": cmd_run, "table": cmd_table, "plot": cmd_plot}[a.cmd](a)


if __name__ == "__main__":
    main()
