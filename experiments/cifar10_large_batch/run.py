"""The CIFAR-10 large-batch study: every run × seed with fastnet-train, then a table and a plot.

    python experiments/cifar10_large_batch/run.py --profile gpu --append docs/RESULTS.md \\
        --plot docs/cifar10_large_batch.png                      # a lent GPU: 30 epochs, 2 seeds
    python experiments/cifar10_large_batch/run.py --profile cpu  # this 2-core CPU: reduced, spans sessions
        [--curves docs/cifar10_large_batch_curves.png]           # + validation top-1 / loss per run
    python experiments/cifar10_large_batch/run.py --synthetic --epochs 1 --set precision=fp32   # machinery only

Runs (``<name>.yaml`` merged over ``common.yaml``): ``b256_sgd`` (baseline), ``b2048_sgd``,
``b4096_sgd`` and ``b8192_sgd`` (linear scaling + warm-up, Goyal et al. 2017), ``b2048_lars``,
``b4096_lars`` and ``b8192_lars`` (LARS + poly(2), You et al.; Jia et al. 2018). Same epochs for
all; 5,000 training images held out for validation (``val_samples``), the test set read once per
run. Each run is ``fastnet.train`` (``torchrun --standalone --nproc_per_node=NPROC`` for NPROC > 1)
in ``<out>/<run>_s<seed>/``; the numbers come from its ``metrics.jsonl`` summary: best validation
top-1, test top-1, wall seconds, images/s, seconds to the target top-1.

Resumable per run: a run whose ``metrics.jsonl`` holds a summary is skipped (its numbers are
read) when its ``study.yaml`` has this call's settings, and refused when not (another LR's numbers
would be reported under this call's); one with a checkpoint continues from it (``--resume``); so a
study can span sessions. ``--set KEY=VALUE`` overrides every run, ``--set RUN.KEY=VALUE`` one run
(e.g. the LRs chosen on validation: ``b8192_lars.base_lr=0.08 b8192_sgd.base_lr=0.025``). The
default ``--out`` is ``runs/cifar10_large_batch`` (ignored by git). ``--scaling`` also runs the
baseline with 1 process (scaling efficiency = images/s with N ÷ (N × images/s with 1)). With
``--synthetic`` the data are random images: the table checks the machinery only (it says so).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from fastnet.metrics import read_metrics  # noqa: E402
from report import emit  # noqa: E402

RUNS = ("b256_sgd", "b8192_sgd", "b8192_lars", "b2048_sgd", "b2048_lars", "b4096_sgd", "b4096_lars")
# The most informative first: the baseline and the two 8192 runs decide the claim.
PROFILES = {
    # a lent GPU (ResNet-20 ~25k img/s on an H100): the budget, FP16 masters, 2 seeds
    "gpu": {"overrides": {"precision": "fp16", "device": "cuda", "workers": 2}, "nproc": 1, "seeds": [0, 1]},
    # this 2-core CPU (~300 img/s in FP32; FP16 is emulated here): one process, FP32, fewer epochs
    "cpu": {"overrides": {"precision": "fp32", "device": "cpu", "workers": 0, "epochs": 15}, "nproc": 1,
            "seeds": [0]},
}


def config_for(name: str, overrides: dict) -> dict:
    if name not in RUNS:
        raise SystemExit(f"Unknown run {name!r}; valid runs: {', '.join(RUNS)}")
    cfg = yaml.safe_load((HERE / "common.yaml").read_text())
    cfg.update(yaml.safe_load((HERE / f"{name}.yaml").read_text()))
    cfg.update(overrides)
    return cfg


def split_overrides(items: list[str], runs: list[str]) -> tuple[dict, dict[str, dict]]:
    """``KEY=VALUE`` items for every run, and ``RUN.KEY=VALUE`` items per run (values parsed as YAML).

    Raises SystemExit for an item without ``=``, or a ``RUN.`` prefix that is not one of ``runs``.
    """
    common: dict = {}
    per_run: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE or RUN.KEY=VALUE")
        run, dot, field = key.rpartition(".")
        if not dot:
            common[key] = yaml.safe_load(value)
        elif run in runs:
            per_run.setdefault(run, {})[field] = yaml.safe_load(value)
        else:
            raise SystemExit(f"--set {item!r}: {run!r} is not a run of this call; runs: {', '.join(runs)}")
    return common, per_run


def finished(out: Path) -> dict | None:
    """The run's summary record if it finished, else None."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return None
    done = [r for r in read_metrics(path) if r["kind"] == "summary"]
    return done[-1] if done else None


# Settings that do not change a run's numbers: where it lives, how it logs, where the same data are.
BOOKKEEPING = frozenset({"out_dir", "progress", "resume", "overwrite", "data_dir", "workers"})


def settings_differ(asked: dict, recorded: dict) -> list[str]:
    """The settings (not bookkeeping) on which a run directory's ``study.yaml`` and this call disagree."""
    keys = (set(asked) | set(recorded)) - BOOKKEEPING
    return [f"{k}: {recorded.get(k, '(unset)')!r} there, {asked.get(k, '(unset)')!r} asked"
            for k in sorted(keys) if asked.get(k) != recorded.get(k)]


def run_one(cfg: dict, nproc: int, out: Path) -> dict:
    """Run (or skip, or resume) one configuration in ``out``; returns its summary record.

    Raises SystemExit when ``out`` holds a finished run made with other settings (its numbers
    would be reported under this call's settings), or when the training process fails.
    """
    summary = finished(out)
    if summary is not None:
        recorded = out / "study.yaml"
        diff = settings_differ(cfg, yaml.safe_load(recorded.read_text())) if recorded.is_file() else []
        if diff:
            raise SystemExit(f"{out} holds a run finished with other settings ({'; '.join(diff)}); "
                             "choose another --out, or remove that directory to run it again")
        print(f"{out.name}: finished earlier, skipped", file=sys.stderr)
        return summary
    out.mkdir(parents=True, exist_ok=True)
    # resume: auto continues from the run's checkpoint if it has one; a run that died before its first
    # checkpoint starts afresh (overwrite removes its partial metrics)
    cfg = {**cfg, "out_dir": str(out), "progress": "none", "resume": "auto", "overwrite": True}
    if (out / "checkpoints" / "last.pt").is_file():
        print(f"{out.name}: resuming from its checkpoint", file=sys.stderr)
    (out / "study.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    cmd = [sys.executable, *launcher, "-m", "fastnet.train", "--config", str(out / "study.yaml")]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc))}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"run failed: {' '.join(cmd)}\n{res.stderr[-3000:]}")
    summary = finished(out)
    if summary is None:
        raise SystemExit(f"run {out} ended without a summary record")
    return summary


def _layout(data_dir: str | None) -> str:
    from fastnet.data import _cifar_jpeg_layout

    if not data_dir or not Path(data_dir).exists():
        return ""
    found = _cifar_jpeg_layout(Path(data_dir))
    return f"jpeg-{found[0]}" if found and not (Path(data_dir) / "cifar-10-batches-py").is_dir() else "batches"


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
                tops = [r["summary"].get("test_top1", r["summary"]["final_top1"]) or 0.0 for r in rows]
                pts.append((cfg["global_batch_size"], statistics.mean(tops), (max(tops) - min(tops)) / 2))
        pts.sort()
        if pts:
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt=style,
                        capsize=3, label=opt.upper() + (" (from the b256 SGD baseline)" if opt == "lars" else ""))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("global batch size")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(dirs: dict[str, list[Path]], path: str, title: str) -> None:
    """Training curves from each run's ``metrics.jsonl``: validation top-1 per epoch (left) and
    training loss per logged step against epochs (right), one line per run and seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, loss) = plt.subplots(1, 2, figsize=(10, 4))
    for name, outs in dirs.items():
        for out in outs:
            recs = read_metrics(out / "metrics.jsonl")
            epochs = [r for r in recs if r["kind"] == "epoch"]
            steps = [r for r in recs if r["kind"] == "step"]
            label = out.name
            line, = acc.plot([r["epoch"] + 1 for r in epochs], [r["top1"] for r in epochs], marker=".", label=label)
            if steps and epochs:
                per_epoch = epochs[0]["step"] / (epochs[0]["epoch"] + 1)  # steps per epoch
                loss.plot([r["step"] / per_epoch for r in steps], [r["train_loss"] for r in steps],
                          color=line.get_color(), lw=0.8, label=label)
    acc.set_xlabel("epoch")
    acc.set_ylabel("validation top-1 (%)")
    loss.set_xlabel("epoch")
    loss.set_ylabel("training loss")
    loss.set_yscale("log")
    for ax in (acc, loss):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--profile", choices=sorted(PROFILES), help="cpu: reduced FP32 study for 2 cores; gpu: the "
                   "full study on one GPU (sets precision, device, epochs, processes, seeds; flags below win)")
    p.add_argument("--synthetic", action="store_true", help="random images instead of CIFAR-10 (machinery check)")
    p.add_argument("--runs", nargs="+", default=list(RUNS))
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--epochs", type=int, help="override every run's epochs")
    p.add_argument("--nproc", type=int, default=None, help="processes per run (default 2, or the profile's)")
    p.add_argument("--scaling", action="store_true", help="also run the baseline with 1 process")
    p.add_argument("--set", nargs="*", default=[], metavar="[RUN.]KEY=VALUE",
                   help="extra overrides for every run, or for one run with its name first (b8192_lars.base_lr=0.08)")
    p.add_argument("--out", default=str(REPO / "runs" / "cifar10_large_batch"),
                   help="run directories; finished runs there are skipped, interrupted ones resumed")
    p.add_argument("--append", help="append the table to this markdown file (e.g. docs/RESULTS.md)")
    p.add_argument("--plot", help="write the accuracy-vs-batch plot (PNG)")
    p.add_argument("--curves", help="write the training curves (PNG): validation top-1 and training loss per run")
    a = p.parse_args()
    profile = PROFILES.get(a.profile, {"overrides": {}, "nproc": 2, "seeds": [0]})
    a.nproc = a.nproc or profile["nproc"]
    a.seeds = a.seeds or profile["seeds"]
    overrides, per_run = split_overrides(a.set, a.runs)
    overrides = {**profile["overrides"], **overrides}
    if a.epochs:
        overrides["epochs"] = a.epochs
    if a.synthetic:
        overrides.update(dataset="synthetic", data_dir=None, image_size=32, synthetic_samples=8192, num_classes=10,
                         val_samples=0)
    else:
        overrides["data_dir"] = a.data_dir
    root = Path(a.out)
    results: dict[str, list[dict]] = {}
    for name in a.runs:
        cfg = config_for(name, {**overrides, **per_run.get(name, {})})
        results[name] = [{"cfg": cfg, "seed": s, "summary": run_one({**cfg, "seed": s}, a.nproc, root / f"{name}_s{s}")}
                         for s in a.seeds]
    scaling = None
    if a.scaling:
        one = run_one({**config_for("b256_sgd", overrides), "seed": a.seeds[0]}, 1, root / "b256_sgd_1proc")
        n = results.get("b256_sgd", [{"summary": None}])[0]["summary"]
        if n:
            scaling = (one, n)
    data = "synthetic random images (machinery check: accuracies are meaningless)" if a.synthetic else \
        f"CIFAR-10 (JPEG q≈75 re-encoding) from {a.data_dir}" if "jpeg" in _layout(a.data_dir) else \
        f"CIFAR-10 from {a.data_dir}"
    cfg0 = next(iter(results.values()))[0]["cfg"]
    procs = f"{a.nproc} processes (torchrun, gloo)" if a.nproc > 1 else "1 process (no all-reduce)"
    lines = [f"### CIFAR-10 large-batch study — {datetime.date.today()}", "",
             f"Command: `python experiments/cifar10_large_batch/run.py {' '.join(sys.argv[1:])}`",
             f"Machine: {platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}; {procs}; data: {data}; "
             f"model {cfg0['model']}, {cfg0['epochs']} epochs, precision {cfg0['precision']}; seeds {a.seeds}.", "",
             "| run | global batch | optimizer | peak LR | epochs | steps | best val top-1 (%) | test top-1 (%) "
             "mean ± half-range | wall (s) | images/s | time to target (s) |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, rows in results.items():
        cfg = rows[0]["cfg"]
        vals = [r["summary"]["best_top1"] for r in rows]
        tops = [r["summary"].get("test_top1", r["summary"]["final_top1"]) or 0.0 for r in rows]
        walls = [r["summary"]["wall_s"] for r in rows]
        ips = [r["summary"]["mean_images_per_s"] for r in rows]
        ttt = [r["summary"]["time_to_target_s"] for r in rows]
        peak = cfg["base_lr"] * cfg["global_batch_size"] / cfg["reference_batch_size"]
        lines.append(f"| {name} | {cfg['global_batch_size']} | {cfg['optimizer']} | {peak:g} | {cfg['epochs']:g} | "
                     f"{rows[0]['summary']['steps']} | {statistics.mean(vals):.2f} | "
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
    if a.curves:
        plot_curves({name: [root / f"{name}_s{s}" for s in a.seeds] for name in results}, a.curves,
                    f"ResNet-20, {data.split(' (')[0]}, {cfg0['epochs']} epochs")
        lines += ["", f"Training curves: `{a.curves}`."]
    emit(lines, a.append)


if __name__ == "__main__":
    main()
