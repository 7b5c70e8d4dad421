"""fastnet-train as a practitioner meets it: resume semantics (re-planning, refusals, a finished run,
another world size), run-directory protection, errors printed once under torchrun, a non-finite
run that keeps its last good checkpoint, progress output without a terminal. Real processes on
the embedded digits data (torchrun on loopback, gloo)."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch

from fastnet.metrics import read_metrics
from tests.conftest import FAST, run_trainer

pytestmark = pytest.mark.slow

# digits: 1438 training images; global batch 64 -> 22 steps per epoch on any world size
BASE = [*FAST, "--global-batch-size", "64", "--micro-batch-size", "32", "--log-interval", "1"]


def _records(out: Path, kind: str) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == kind]


def _lrs(out: Path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in _records(out, "step")}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_resume_with_more_epochs_replans_the_schedule(tmp_path):
    """A finished 1-epoch cosine run resumed with --epochs 2 continues under the 2-epoch plan: from the
    first resumed step on, its LR is the uninterrupted 2-epoch run's (not the finished schedule's 0)."""
    short, long = tmp_path / "short", tmp_path / "long"
    assert run_trainer([*BASE, "--epochs", "1", "--out-dir", str(short)]).returncode == 0
    res = run_trainer([*BASE, "--epochs", "2", "--out-dir", str(long)])
    assert res.returncode == 0, res.stderr
    assert _lrs(short)[22] == pytest.approx(0.0, abs=1e-12)  # the 1-epoch schedule has ended
    res = run_trainer(["--resume", str(short), "--epochs", "2", "--progress", "none"])  # out_dir from the checkpoint
    assert res.returncode == 0, res.stderr
    (resume,) = _records(short, "resume")
    peak = 0.1 * 64 / 256
    assert resume["step"] == 22 and resume["replanned"] == ["epochs"] and resume["changed"]["epochs"] == [1.0, 2.0]
    assert resume["lr"] == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 22 / 44)))
    lrs, straight = _lrs(short), _lrs(long)
    assert sorted(lrs) == list(range(1, 45))  # steps 23..44 appended, each once
    for step in range(23, 45):
        assert lrs[step] == pytest.approx(straight[step], rel=1e-12), step
    assert len(_records(short, "summary")) == 2 and _records(short, "summary")[-1]["steps"] == 44


def test_resume_refuses_plan_changes_and_reports_a_finished_run(tmp_path):
    out = tmp_path / "run"
    assert run_trainer([*BASE, "--max-steps", "3", "--epochs", "1", "--out-dir", str(out)]).returncode == 0
    ckpt = out / "checkpoints" / "last.pt"
    before = _sha(ckpt)
    res = run_trainer(["--resume", str(out), "--model", "small_cnn_dropout", "--global-batch-size", "128",
                       "--optimizer", "lars", "--progress", "none"])
    assert res.returncode == 2
    assert "cannot resume" in res.stderr and "model small_cnn, step 3" in res.stderr
    for diff in ("model: 'small_cnn' -> 'small_cnn_dropout'", "global_batch_size: 64 -> 128",
                 "optimizer: 'sgd' -> 'lars'"):
        assert diff in res.stderr
    assert _sha(ckpt) == before and len(_records(out, "summary")) == 1
    res = run_trainer(["--resume", str(ckpt)])  # the same plan: max_steps 3 reached
    assert res.returncode == 0 and "already finished (3 steps)" in res.stderr
    assert len(_records(out, "summary")) == 1 and _sha(ckpt) == before  # nothing appended, nothing written


def test_resume_accepts_the_run_directory_the_checkpoints_directory_or_the_file(tmp_path):
    """Every form of --resume finds the run's last checkpoint and its run directory (in process:
    the same prepare() the trainer calls); one resumed run carries on where the first stopped."""
    from fastnet.cli import prepare
    from fastnet.config import resolve

    out = tmp_path / "run"
    assert run_trainer([*BASE, "--epochs", "1", "--max-steps", "2", "--out-dir", str(out)]).returncode == 0
    for target in (out, out / "checkpoints", out / "checkpoints" / "last.pt"):
        merged, state, stale = prepare(resolve(None, {"resume": str(target)}, environ={}))
        assert Path(state["path"]).resolve() == (out / "checkpoints" / "last.pt").resolve(), target
        assert Path(merged.out_dir).resolve() == out.resolve() and merged.max_steps == 2 and stale == [], target
    res = run_trainer(["--resume", "auto", "--out-dir", str(out), "--max-steps", "3"])
    assert res.returncode == 0, res.stderr
    assert [r["step"] for r in _records(out, "step")] == [1, 2, 3]
    assert [r["step"] for r in _records(out, "resume")] == [2]


def test_resume_auto_starts_a_new_run_when_there_is_no_checkpoint(tmp_path):
    out = tmp_path / "fresh"
    res = run_trainer([*BASE, "--epochs", "1", "--max-steps", "2", "--resume", "auto", "--out-dir", str(out)])
    assert res.returncode == 0, res.stderr
    assert [r["step"] for r in _records(out, "step")] == [1, 2] and not _records(out, "resume")


@pytest.mark.parametrize("seed,finished,restarts", [(0, False, True), (1, False, False), (0, True, False)])
def test_resume_auto_without_checkpoint_restarts_only_the_same_run(tmp_path, seed, finished, restarts):
    """A run that stopped before its first checkpoint (a crash torchrun restarts) starts over in
    place under --resume auto; another run's files there (here: another seed), or a finished run
    whose checkpoints are gone, are still refused."""
    import yaml

    from fastnet.cli import prepare
    from fastnet.config import resolve

    out = tmp_path / "run"
    out.mkdir()
    cfg = resolve(None, {"dataset": "digits", "model": "small_cnn", "out_dir": str(out), "resume": "auto"}, environ={})
    (out / "config.yaml").write_text(yaml.safe_dump({**cfg.to_dict(), "seed": seed, "world_size": 2}))
    (out / "metrics.jsonl").write_text('{"kind": "step", "step": 1}\n' + ('{"kind": "summary"}\n' if finished else ""))
    if restarts:
        cfg2, state, stale = prepare(cfg)
        assert state is None and stale == [] and cfg2.resume is None
    else:
        with pytest.raises(ValueError, match="already holds a run"):
            prepare(cfg)


def test_new_run_refuses_a_used_out_dir_unless_overwrite(tmp_path):
    out = tmp_path / "run"
    assert run_trainer([*BASE, "--epochs", "1", "--max-steps", "2", "--out-dir", str(out)]).returncode == 0
    before = _sha(out / "checkpoints" / "last.pt")
    res = run_trainer([*BASE, "--epochs", "1", "--max-steps", "3", "--out-dir", str(out)])
    assert res.returncode == 2
    assert "already holds a run" in res.stderr and "--resume" in res.stderr and "--overwrite" in res.stderr
    assert _sha(out / "checkpoints" / "last.pt") == before and len(_records(out, "step")) == 2
    res = run_trainer([*BASE, "--epochs", "1", "--max-steps", "3", "--out-dir", str(out), "--overwrite"])
    assert res.returncode == 0, res.stderr
    assert [r["step"] for r in _records(out, "step")] == [1, 2, 3] and len(_records(out, "summary")) == 1
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["progress"]["global_step"] == 3


def test_resume_on_another_world_size_continues_the_same_run(tmp_path):
    """2 ranks x 32 -> stop at step 7 -> 1 rank x 32 x 2 accumulation steps to step 16: the same images in
    the same micro-batches (block-sharded sampler), so the parameters match the uninterrupted 2-rank run
    up to float summation order (no dropout; BatchNorm statistics are per micro-batch either way)."""
    common = [*BASE, "--epochs", "1", "--base-lr", "0.4"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert run_trainer([*common, "--max-steps", "16", "--out-dir", str(full)], nproc=2).returncode == 0
    assert run_trainer([*common, "--max-steps", "7", "--out-dir", str(part)], nproc=2).returncode == 0
    res = run_trainer(["--resume", str(part), "--max-steps", "16", "--progress", "none"], nproc=1)
    assert res.returncode == 0, res.stderr
    (resume,) = _records(part, "resume")
    assert resume["world_size"] == 1 and resume["accumulation_steps"] == 2 and resume["step"] == 7
    a = torch.load(full / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(part / "checkpoints" / "last.pt", weights_only=True)
    assert b["progress"]["global_step"] == 16 and b["progress"]["samples_seen"] == a["progress"]["samples_seen"]
    params = [k for k in a["model"] if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    for key in params:
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=1e-4, atol=1e-5, msg=key)
    full_losses = {r["step"]: r["train_loss"] for r in _records(full, "step")}
    part_losses = {r["step"]: r["train_loss"] for r in _records(part, "step")}
    for step in range(8, 17):
        assert part_losses[step] == pytest.approx(full_losses[step], rel=1e-4), step


def test_nan_mid_run_keeps_the_last_good_checkpoint(tmp_path):
    """A good epoch, then a resumed run whose LR and weight decay (finite, so they pass validation) make the
    parameters overflow in the first resumed step while that step's loss is still finite: the run
    stops with an error naming the step before any checkpoint is written; the good one stays byte for byte."""
    out = tmp_path / "run"
    assert run_trainer([*BASE, "--epochs", "1", "--out-dir", str(out)]).returncode == 0
    ckpt = out / "checkpoints" / "last.pt"
    before = _sha(ckpt)
    res = run_trainer(["--resume", str(out), "--epochs", "2", "--base-lr", "1e6", "--weight-decay", "3e38",
                       "--checkpoint-interval", "1", "--progress", "none"])
    assert res.returncode == 1
    assert "inf/NaN by step 23" in res.stderr and "no checkpoint written" in res.stderr
    assert res.stderr.count("fastnet-train: error") == 1
    assert _sha(ckpt) == before
    assert torch.load(ckpt, weights_only=True)["progress"]["global_step"] == 22


def test_errors_are_printed_once_under_torchrun(tmp_path):
    # at parse time (every rank parses the same arguments): rank 0 prints, exit code 2
    res = run_trainer([*BASE, "--momentum", "nan", "--out-dir", str(tmp_path / "a")], nproc=2)
    assert res.returncode != 0
    assert res.stderr.count("fastnet-train: error") == 1 and "Invalid momentum 'nan'" in res.stderr
    # during the run, on every rank at once: one line from rank 0, and torchrun's summary names the cause
    res = run_trainer([*BASE, "--global-batch-size", "100", "--out-dir", str(tmp_path / "b")], nproc=2)
    assert res.returncode != 0
    assert res.stderr.count("fastnet-train: error") == 1 and "error (rank 0): ValueError" in res.stderr
    summary = res.stderr.split("Root Cause (first observed failure)")[1]
    assert "global_batch_size 100 is not divisible" in summary and "error_file" in summary


def test_progress_is_plain_lines_without_a_terminal(tmp_path):
    res = run_trainer([*[a for a in BASE if a not in ("--progress", "none")], "--epochs", "1", "--max-steps", "4",
                       "--log-interval", "2", "--out-dir", str(tmp_path / "p")])
    assert res.returncode == 0, res.stderr
    assert "\r" not in res.stderr and "step/s" not in res.stderr  # no tqdm bar in a log file
    assert "epoch 0 step 2/22 (2/4) loss" in res.stderr and "epoch 0 step 4/22 (4/4)" in res.stderr
    assert res.stderr.splitlines()[0].startswith("fastnet-train: starting: small_cnn on digits")
