"""The CIFAR-10 large-batch study: every run × seed with fastnet-train, then a table and a plot.

    python experiments/cifar10_large_batch/run.py --data-dir ../shared/data/cifar10 --seeds 0 1 \\
        --append docs/RESULTS.md --plot docs/cifar10_large_batch.png
    python experiments/cifar10_large_batch/run.py --synthetic --epochs 1 --set precision=fp32   # machinery only

Runs (``<name>.yaml`` merged over ``common.yaml``): ``b256_sgd`` (baseline), ``b4096_sgd`` and
``b8192_sgd`` (linear scaling + warm-up, Goyal et al. 2017), ``b4096_lars`` and ``b8192_lars``
(LARS + poly(2), You et al.; Jia et al. 2018). Same epochs for all. Each run is
``torchrun --standalone --nproc_per_node=NPROC -m fastnet.train``; the numbers come from its
``metrics.jsonl`` summary: best top-1 (%), wall seconds, mean images/s, seconds to the target
top-1. ``--scaling`` also runs the baseline with 1 process to report scaling efficiency
(images/s with N processes ÷ (N × images/s with 1)). With ``--synthetic`` the data are random
images: the table checks the machinery and its accuracies mean nothing (it says so).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from fastnet.metrics import read_metrics  # noqa: E402
from report import emit  # noqa: E402

RUNS = ("b256_sgd", "b4096_sgd", "b8192_sgd", "b4096_lars", "b8192_lars")


def config_for(name: str, overrides: dict) -> dict:
    if name not in RUNS:
        raise SystemExit(f"Unknown run {name!r}; valid runs: {', '.join(RUNS)}")
    cfg = yaml.safe_load((HERE / "common.yaml").read_text())
    cfg.update(yaml.safe_load((HERE / f"{name}.yaml").read_text()))
    cfg.update(overrides)
    return cfg


def run_one(cfg: dict, nproc: int, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cfg = {**cfg, "out_dir": str(out), "progress": False}
    (out / "study.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
           "fastnet.train", "--config", str(out / "study.yaml")]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc))}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"run failed: {' '.join(cmd)}\n{res.stderr[-3000:]}")
    (summary,) = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "summary"]
    return summary


def fmt_s(seconds: float | None) -> str:
    return "not reached" if seconds is None else f"{seconds:.0f} s"


def plot(results: dict[str, list[dict]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for opt, style in (("sgd", "o-"), ("lars", "s--")):
        pts = []
        for name, rows in results.items():
            cfg = rows[0]["cfg"]
            if cfg["optimizer"] == opt or (opt == "lars" and name == "b256_sgd"):
                tops = [r["summary"]["best_top1"] for r in rows]
                pts.append((cfg["global_batch_size"], statistics.mean(tops), (max(tops) - min(tops)) / 2))
        pts.sort()
        if pts:
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt=style,
                        capsize=3, label=opt.upper() + (" (from the b256 SGD baseline)" if opt == "lars" else ""))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("global batch size")
    ax.set_ylabel("best top-1 (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "cifar10"))
    p.add_argument("--synthetic", action="store_true", help="random images instead of CIFAR-10 (machinery check)")
    p.add_argument("--runs", nargs="+", default=list(RUNS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--epochs", type=int, help="override every run's epochs")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--scaling", action="store_true", help="also run the baseline with 1 process")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides for every run")
    p.add_argument("--out", default=None, help="run directories (default: a temporary directory)")
    p.add_argument("--append", help="append the table to this markdown file (e.g. docs/RESULTS.md)")
    p.add_argument("--plot", help="write the accuracy-vs-batch plot (PNG)")
    a = p.parse_args()
    overrides: dict = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in a.set)}
    if a.epochs:
        overrides["epochs"] = a.epochs
    if a.synthetic:
        overrides.update(dataset="synthetic", data_dir=None, image_size=32, synthetic_samples=8192, num_classes=10)
    else:
        overrides["data_dir"] = a.data_dir
    root = Path(a.out or tempfile.mkdtemp(prefix="cifar10_large_batch_"))
    results: dict[str, list[dict]] = {}
    for name in a.runs:
        cfg = config_for(name, overrides)
        results[name] = [{"cfg": cfg, "seed": s, "summary": run_one({**cfg, "seed": s}, a.nproc, root / f"{name}_s{s}")}
                         for s in a.seeds]
    scaling = None
    if a.scaling:
        one = run_one({**config_for("b256_sgd", overrides), "seed": a.seeds[0]}, 1, root / "b256_sgd_1proc")
        n = results.get("b256_sgd", [{"summary": None}])[0]["summary"]
        if n:
            scaling = (one, n)
    data = "synthetic random images (machinery check: accuracies are meaningless)" if a.synthetic else \
        f"CIFAR-10 from {a.data_dir}"
    cfg0 = next(iter(results.values()))[0]["cfg"]
    lines = [f"### CIFAR-10 large-batch study — {datetime.date.today()}", "",
             f"Command: `python experiments/cifar10_large_batch/run.py {' '.join(sys.argv[1:])}`",
             f"Machine: {platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}; {a.nproc} processes "
             f"(torchrun, gloo); data: {data}; model {cfg0['model']}, {cfg0['epochs']} epochs, precision "
             f"{cfg0['precision']}; seeds {a.seeds}.", "",
             "| run | global batch | optimizer | peak LR | best top-1 (%) mean ± half-range | wall (s) | images/s "
             "| time to target (s) |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for name, rows in results.items():
        cfg = rows[0]["cfg"]
        tops = [r["summary"]["best_top1"] for r in rows]
        walls = [r["summary"]["wall_s"] for r in rows]
        ips = [r["summary"]["mean_images_per_s"] for r in rows]
        ttt = [r["summary"]["time_to_target_s"] for r in rows]
        peak = cfg["base_lr"] * cfg["global_batch_size"] / cfg["reference_batch_size"]
        lines.append(f"| {name} | {cfg['global_batch_size']} | {cfg['optimizer']} | {peak:g} | "
                     f"{statistics.mean(tops):.2f} ± {(max(tops) - min(tops)) / 2:.2f} | {statistics.mean(walls):.0f} | "
                     f"{statistics.mean(ips):.0f} | "
                     f"{'-' if any(t is None for t in ttt) else f'{statistics.mean(ttt):.0f}'} |")
    if scaling:
        one, n = scaling
        eff = n["mean_images_per_s"] / (a.nproc * one["mean_images_per_s"])
        lines += ["", f"Scaling (b256_sgd): 1 process {one['mean_images_per_s']:.0f} images/s, {a.nproc} processes "
                      f"{n['mean_images_per_s']:.0f} images/s: efficiency {eff:.0%}; time to target "
                      f"{fmt_s(one['time_to_target_s'])} vs {fmt_s(n['time_to_target_s'])}."]
    if a.plot:
        plot(results, a.plot, f"ResNet-20, {data.split(' (')[0]}, {cfg0['epochs']} epochs")
        lines += ["", f"Plot: `{a.plot}`."]
    emit(lines, a.append)


if __name__ == "__main__":
    main()
