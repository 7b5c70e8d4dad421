"""``fastnet-plot``: a run's curves from its ``metrics.jsonl`` as one PNG, several runs overlaid.

    fastnet-plot RUN_DIR [RUN_DIR ...] [--out curves.png] [--title TEXT]

Six panels against the training images seen (so runs of different global batches line up):
training loss, learning rate, evaluation top-1 (``eval``, ``epoch`` and the final ``test``
record), images/s, communication (seconds per logged window not hidden behind backward, and busy),
and the gradient noise scale B_simple where it was measured. Drawn with matplotlib (the ``viz``
extra); a run directory without ``metrics.jsonl`` is an error naming it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from fastnet.metrics import read_metrics

PANELS = (("train_loss", "training loss", "log"), ("lr", "learning rate", "linear"),
          ("top1", "evaluation top-1 (%)", "linear"), ("images_per_s", "images/s", "linear"),
          ("comm_s", "communication (s per window)", "linear"), ("grad_noise_scale", "noise scale B_simple", "log"))


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path, title: str | None = None) -> Path:
    """Draw the runs' curves into ``out`` (PNG) and return its path.

    Raises:
        FileNotFoundError: a run directory without ``metrics.jsonl``.
        RuntimeError: matplotlib missing (the ``viz`` extra named).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("fastnet-plot needs matplotlib: pip install 'fastnet[viz]'") from None
    runs = []
    for d in run_dirs:
        path = Path(d) / "metrics.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{str(d)!r} holds no metrics.jsonl (a fastnet-train run directory has one)")
        runs.append((Path(d).name or str(d), read_metrics(path)))
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    for (key, label, scale), ax in zip(PANELS, axes.flat):
        drawn = False
        for name, records in runs:
            kinds = ("eval", "epoch", "test") if key == "top1" else ("step",)
            pts = [(r.get("samples_seen", 0), r[key]) for r in records
                   if r["kind"] in kinds and isinstance(r.get(key), (int, float))]
            if key == "top1":  # the test record has no samples_seen: place it at the run's end
                end = max((r.get("samples_seen", 0) for r in records if "samples_seen" in r), default=0)
                pts = [(s or end, v) for s, v in pts]
            if pts:
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if key == "top1" else None,
                        lw=1, label=name)
                drawn = True
            if key == "comm_s":
                busy = [(r.get("samples_seen", 0), r["comm_busy_s"]) for r in records
                        if r["kind"] == "step" and isinstance(r.get("comm_busy_s"), (int, float))]
                if any(v for _, v in busy):
                    ax.plot([p[0] for p in busy], [p[1] for p in busy], ls=":", lw=1, label=f"{name} (busy)")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("training images seen", fontsize=8)
        ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
        if drawn and scale == "log":
            ax.set_yscale("log")
        if not drawn:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.grid(True, alpha=0.3)
        if drawn:
            ax.legend(fontsize=7)
    fig.suptitle(title or ", ".join(name for name, _ in runs), fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fastnet-plot", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="fastnet-train out_dir(s) holding metrics.jsonl")
    p.add_argument("--out", help="PNG to write (default: <first RUN_DIR>/curves.png)")
    p.add_argument("--title")
    a = p.parse_args(argv)
    try:
        out = plot_runs(a.runs, a.out or Path(a.runs[0]) / "curves.png", a.title)
    except (FileNotFoundError, RuntimeError) as exc:
        print(f"fastnet-plot: error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
