"""The CIFAR-10 study's record of finished runs (``results.yaml``) and its accuracy-vs-batch plot.

    python experiments/cifar10_large_batch/summarize.py record runs/cifar10_large_batch/b4096_sgd_s0 ... \\
        --series rule --note "CPU, 2-core AMD EPYC"      # append finished runs to the record
    python experiments/cifar10_large_batch/summarize.py plot --profile cpu --out docs/cifar10_large_batch.png

A study spans sessions and machines, and a fresh checkout loses ``runs/``, so the numbers that a
plot of every batch size needs are kept in ``results.yaml`` beside this file: one row per run and
seed (batch, optimizer, peak LR, epochs, steps, seed, best validation and test top-1, images/s,
the series it belongs to, its source). ``record`` reads them from the run directories
(``study.yaml`` and the summary record of ``metrics.jsonl``, which is kept in ``metrics/`` for the
curves), so no number is typed by hand; the
rows of runs whose directories were lost before this record existed name their source
(docs/RESULTS.md and the date). ``plot`` draws test top-1 (mean ± half-range over seeds) against
the global batch, one line per series, for the rows of one profile and epoch budget.

Series: ``rule`` (the configs' LR rules: SGD 0.1 × B/128 with Goyal et al.'s warm-up; LARS
0.3 × B/128, the paper configs' value), ``tuned`` (the LR chosen on the validation hold-out),
``sweep`` (the other LRs of a sweep; not plotted), ``baseline`` (batch 256, SGD).
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import statistics
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
RECORD = HERE / "results.yaml"
METRICS = HERE / "metrics"
SERIES = ("baseline", "rule", "tuned", "sweep")


def load(path: Path = RECORD) -> list[dict]:
    """The record's rows ([] when the file does not exist yet)."""
    if not path.is_file():
        return []
    return yaml.safe_load(path.read_text()) or []


def row_from_run(run_dir: Path, series: str, profile: str, note: str, keep: Path = METRICS) -> tuple[dict, Path, Path]:
    """One record row from a finished run directory, its ``metrics.jsonl`` and where the record
    keeps a copy of it (``metrics/``).

    Raises:
        SystemExit: the directory has no ``study.yaml`` or no summary record (not finished).
    """
    sys.path.insert(0, str(HERE.parents[1]))
    from fastnet.metrics import read_metrics

    cfg_path, metrics = run_dir / "study.yaml", run_dir / "metrics.jsonl"
    if not cfg_path.is_file() or not metrics.is_file():
        raise SystemExit(f"{run_dir}: not a run directory of run.py (no study.yaml or metrics.jsonl)")
    summaries = [r for r in read_metrics(metrics) if r["kind"] == "summary"]
    if not summaries:
        raise SystemExit(f"{run_dir}: the run has not finished (no summary record)")
    cfg, s = yaml.safe_load(cfg_path.read_text()), summaries[-1]
    peak = round(cfg["base_lr"] * cfg["global_batch_size"] / cfg["reference_batch_size"], 6)
    run = run_dir.name.rsplit("_s", 1)[0]
    # the per-epoch curves outlive runs/ (a few KB): kept beside the record, named by the row's key
    kept = keep / f"{profile}_{run}_lr{peak:g}_e{cfg['epochs']}_s{cfg['seed']}.jsonl"
    return {"run": run, "profile": profile, "series": series,
            "global_batch": cfg["global_batch_size"], "optimizer": cfg["optimizer"], "peak_lr": peak,
            "epochs": cfg["epochs"], "steps": s["steps"], "seed": cfg["seed"], "precision": cfg["precision"],
            "val_top1": s["best_top1"], "test_top1": s.get("test_top1"),
            "images_per_s": round(s["mean_images_per_s"]), "wall_s": round(s["wall_s"]),
            "source": f"{run_dir} ({datetime.date.today()}; {note})" if note else f"{run_dir} ({datetime.date.today()})",
            "metrics": str(kept.relative_to(HERE.parents[1]) if kept.is_relative_to(HERE.parents[1]) else kept)}, \
        metrics, kept


def plot(rows: list[dict], path: str, title: str) -> None:
    """Test top-1 against global batch: one line per (series, optimizer), the baseline joined to
    each ``rule`` line (its batch-256 point), mean ± half-range over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, str], dict[int, list[float]]] = {}
    for r in rows:
        if r["series"] == "sweep" or r.get("test_top1") is None:
            continue
        key = ("rule", r["optimizer"]) if r["series"] == "baseline" else (r["series"], r["optimizer"])
        groups.setdefault(key, {}).setdefault(r["global_batch"], []).append(r["test_top1"])
        if r["series"] == "baseline":  # the small-batch start of the LARS rule line too
            groups.setdefault(("rule", "lars"), {}).setdefault(r["global_batch"], []).append(r["test_top1"])
    labels = {("rule", "sgd"): ("SGD, linear scaling 0.1·B/128 + warm-up", "o-"),
              ("rule", "lars"): ("LARS, 0.3·B/128 (paper configs' LR)", "s--"),
              ("tuned", "sgd"): ("SGD, LR chosen on validation", "o"),
              ("tuned", "lars"): ("LARS, LR chosen on validation", "s")}
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for key, (label, style) in labels.items():
        pts = sorted((b, statistics.mean(v), (max(v) - min(v)) / 2) for b, v in groups.get(key, {}).items())
        if pts:
            shift = 1.08 if key[0] == "tuned" else 1.0  # off the rule line's point at the same batch
            ax.errorbar([p[0] * shift for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt=style, capsize=3,
                        markersize=7 if key[0] == "tuned" else 5, label=label,
                        mfc="none" if key[0] == "tuned" else None)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("global batch size")
    ax.set_ylabel("test top-1 (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("record", help="append finished run directories to the record")
    rec.add_argument("run_dirs", nargs="+", type=Path)
    rec.add_argument("--series", required=True, choices=SERIES)
    rec.add_argument("--profile", default="cpu", help="cpu or gpu (the run.py profile the runs used)")
    rec.add_argument("--note", default="", help="the machine and anything that makes the numbers comparable or not")
    rec.add_argument("--record", type=Path, default=RECORD)
    rec.add_argument("--metrics-dir", type=Path, default=METRICS, help="where each run's metrics.jsonl is kept")
    pl = sub.add_parser("plot", help="the accuracy-vs-batch plot of one profile and epoch budget")
    pl.add_argument("--profile", default="cpu")
    pl.add_argument("--epochs", type=int, default=None, help="the epoch budget (default: the baseline's)")
    pl.add_argument("--out", required=True, help="PNG path")
    pl.add_argument("--record", type=Path, default=RECORD)
    a = p.parse_args(argv)
    rows = load(a.record)
    if a.cmd == "record":
        found = [row_from_run(d, a.series, a.profile, a.note, a.metrics_dir) for d in a.run_dirs]
        new = [row for row, _, _ in found]
        known = {(r["run"], r["profile"], r["peak_lr"], r["epochs"], r["seed"]) for r in rows}
        for r in new:
            if (r["run"], r["profile"], r["peak_lr"], r["epochs"], r["seed"]) in known:
                raise SystemExit(f"{r['run']} (peak LR {r['peak_lr']}, {r['epochs']} epochs, seed {r['seed']}, "
                                 f"{r['profile']}) is already in {a.record}")
        for _, src, kept in found:
            kept.parent.mkdir(exist_ok=True)
            shutil.copyfile(src, kept)
        with a.record.open("a") as f:  # appended as text: the record's comments and rows stay as they are
            for r in new:
                f.write("- " + yaml.safe_dump(r, sort_keys=False, allow_unicode=True, default_flow_style=True,
                                              width=1 << 16))
        print(f"recorded {len(new)} run(s) in {a.record}")
        return
    mine = [r for r in rows if r["profile"] == a.profile]
    epochs = a.epochs or next((r["epochs"] for r in mine if r["series"] == "baseline"), None)
    mine = [r for r in mine if r["epochs"] == epochs]
    if not mine:
        raise SystemExit(f"no rows for profile {a.profile!r} and {epochs} epochs in {a.record}")
    precision = sorted({r["precision"] for r in mine})
    plot(mine, a.out, f"ResNet-20, CIFAR-10 (JPEG q≈75), {epochs} epochs, {'/'.join(precision)}, "
                      f"{a.profile.upper()}\ntest top-1: mean ± half-range over seeds (tuned points shifted right to be seen)")
    print(f"plot: {a.out} ({len(mine)} rows)")


if __name__ == "__main__":
    main()
