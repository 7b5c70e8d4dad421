"""Run metrics: a JSON-lines file per run, written by rank 0.

Records (one JSON object per line, ``"kind"`` says which):
  * ``step``: epoch, step (optimizer steps done), samples_seen, train_loss, lr, loss_scale,
    images_per_s (global, over the steps since the last record), wall_s (since the start),
    comm_s (gradient communication not hidden behind backward, seconds, since the last record),
    comm_busy_s (seconds the communication worked: host time of the communication thread on CPU,
    CUDA-event time of the communication stream on GPU, since the last record), comm_hidden_s
    (the part of each step's busy time not exposed, max(0, busy − exposed) summed, since the
    last record);
  * ``epoch``: epoch, step, samples_seen, train_loss (mean of the epoch), eval_set (``val`` with
    ``val_samples``, else ``test``), top1, top5 (percent), eval_loss, eval_samples (images
    evaluated, summed over ranks), images_per_s, wall_s, comm_s;
  * ``eval`` (with ``eval_every_steps``, between epoch ends): epoch, step, samples_seen, eval_set,
    top1, top5, eval_loss, eval_samples, wall_s;
  * ``test`` (only with ``val_samples``): the test set evaluated once with the final model;
  * ``resume``: step, epoch, world_size, accumulation_steps, checkpoint (path), changed (option:
    [checkpoint's value, new value]), replanned (the changed options that re-planned the schedule),
    lr (the LR the run continues at) — one per resumed session;
  * ``buckets`` (once, when the synchronizer re-cut its buckets from measured ready times): step,
    buckets (as in config.yaml's ``buckets``), launch_order;
  * ``summary``: best_top1, final_top1 (on the eval set), test_top1, eval_set, time_to_target_s
    (None if not reached), target_accuracy, steps_to_target and epochs_to_target (optimizer steps and
    training epochs at the first evaluation at or above the target; None if not reached), mean_images_per_s (training only), wall_s, steps,
    world_size, param_checksums and state_checksums (parameters + buffers), one per rank.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


# Scalars mirrored to TensorBoard, by record kind (tag "<kind>/<field>", x = the record's step).
TENSORBOARD_FIELDS = {
    "step": ("train_loss", "lr", "loss_scale", "images_per_s", "comm_s", "comm_busy_s", "comm_hidden_s",
             "grad_noise_scale", "grad_sq_norm", "grad_trace", "update_ratio_adapted", "update_ratio_excluded"),
    "eval": ("top1", "top5", "eval_loss"),
    "epoch": ("train_loss", "top1", "top5", "eval_loss", "images_per_s", "comm_s"),
    "test": ("top1", "top5", "eval_loss"),
}


class MetricsWriter:
    """Appends records to ``<out_dir>/metrics.jsonl`` (rank 0 only; other ranks write nothing); with
    ``tensorboard`` also the scalars of :data:`TENSORBOARD_FIELDS` as TensorBoard events in
    ``<out_dir>/tensorboard/`` (``torch.utils.tensorboard``; the ``viz`` extra installs tensorboard).

    Raises:
        RuntimeError: ``tensorboard`` without the tensorboard package (the extra named).
    """

    def __init__(self, out_dir: str | Path, enabled: bool, tensorboard: bool = False) -> None:
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.is_file() and self.path.stat().st_size:
                with open(self.path, "rb+") as f:  # a crash may have torn the last line: end it
                    f.seek(-1, 2)
                    if f.read(1) != b"\n":
                        f.write(b"\n")
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    raise RuntimeError("--tensorboard needs the tensorboard package: pip install 'fastnet[viz]'") \
                        from None
                self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))

    def write(self, kind: str, **fields: Any) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"kind": kind, **{k: _clean(v) for k, v in fields.items()}}) + "\n")
        if self._tb is not None and kind in TENSORBOARD_FIELDS and "step" in fields:
            for name in TENSORBOARD_FIELDS[kind]:
                value = fields.get(name)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"{kind}/{name}", value, fields["step"])
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: str | Path, superseded: bool = False) -> list[dict[str, Any]]:
    """Read a metrics.jsonl file back into a list of records, in file order.

    A run that crashed and resumed from its last checkpoint (``resume`` record at step ``s``)
    recomputes the steps after ``s``; the crashed session's records of those steps are dropped
    unless ``superseded`` (and of an ``epoch``/``eval``/``test`` record written twice for one step,
    the later), so each step, evaluation and epoch appears as the run that finished computed it. A line torn by the crash (not JSON, directly before a ``resume`` record) is skipped.

    Raises:
        ValueError: a line that is not JSON elsewhere (its line number named).
    """
    lines = [(n, line) for n, line in enumerate(Path(path).read_text().splitlines(), 1) if line.strip()]
    records: list[dict[str, Any]] = []
    for i, (n, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i + 1 < len(lines) and '"kind": "resume"' in lines[i + 1][1]:
                continue
            raise ValueError(f"{path}: line {n} is not a JSON record: {line[:80]!r}") from None
    if superseded:
        return records
    kept: list[dict[str, Any]] = []
    for r in records:
        if r.get("kind") == "resume":
            kept = [k for k in kept if k.get("kind") == "resume" or k.get("step", 0) <= r["step"]]
        kept.append(r)
    # a crash between an epoch's record and its checkpoint: the resumed run writes that record again
    last = {(r["kind"], r.get("step")): i for i, r in enumerate(kept) if r.get("kind") in ("epoch", "eval", "test")}
    return [r for i, r in enumerate(kept)
            if r.get("kind") not in ("epoch", "eval", "test") or last[(r["kind"], r.get("step"))] == i]


CLOCK_FIELDS = frozenset({"images_per_s", "wall_s", "comm_s", "comm_busy_s", "comm_hidden_s", "session_s",
                          "time_to_target_s", "mean_images_per_s"})  # wall-clock fields: differ between identical runs


def reproducible_records(path: str | Path) -> list[dict[str, Any]]:
    """The records a resumed or restarted run must reproduce bit for bit: :func:`read_metrics`
    without ``resume`` records and without the wall-clock fields (:data:`CLOCK_FIELDS`)."""
    return [{k: v for k, v in r.items() if k not in CLOCK_FIELDS} for r in read_metrics(path)
            if r.get("kind") != "resume"]
