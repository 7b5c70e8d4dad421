"""Checkpoints survive a torn write (issue 39, 5): the newest N are kept, a resume from a directory
falls back to the newest that loads (saying which it skipped), an unwritable checkpoint directory is an
error before training, and a write that fails mid-way (a full disk) leaves the earlier ones loadable."""

from __future__ import annotations

import errno

import pytest
import torch

from fastnet import checkpoint as ckpt
from tests.conftest import FAST, run_trainer


def _state(step: int) -> dict:
    return {"version": ckpt.VERSION, "model": {"w": torch.full((3,), float(step))}, "progress": {"global_step": step}}


def test_keeps_the_newest_and_falls_back_past_a_truncated_one(tmp_path):
    d = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        ckpt.save_atomic(_state(step), d / "last.pt", keep=2)
    assert sorted(p.name for p in d.iterdir()) == ["last.1.pt", "last.pt"]  # step 1 dropped, no .tmp left
    assert ckpt.load(str(d))["progress"]["global_step"] == 3
    data = (d / "last.pt").read_bytes()
    (d / "last.pt").write_bytes(data[: len(data) // 2])  # torn: half written
    state = ckpt.load(str(d))
    assert state["progress"]["global_step"] == 2 and state["path"].endswith("last.1.pt")
    assert state["skipped"] and "last.pt" in state["skipped"][0][0] and "corrupt" in state["skipped"][0][1]
    with pytest.raises(ValueError, match="corrupt"):  # a file named explicitly: no fallback
        ckpt.load(str(d / "last.pt"))


def test_a_failed_write_leaves_the_earlier_checkpoints_loadable(tmp_path, monkeypatch):
    d = tmp_path / "checkpoints"
    ckpt.save_atomic(_state(1), d / "last.pt", keep=2)
    ckpt.save_atomic(_state(2), d / "last.pt", keep=2)
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):  # writes part of the file, then the disk is full
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        ckpt.save_atomic(_state(3), d / "last.pt", keep=2)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in d.iterdir()) == ["last.1.pt", "last.pt"]  # no .tmp, nothing rotated
    assert ckpt.load(str(d))["progress"]["global_step"] == 2
    assert ckpt.load(str(d / "last.1.pt"))["progress"]["global_step"] == 1


def test_unwritable_checkpoint_directory_is_an_error_at_the_start(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")  # (root ignores permission bits: a file in the path blocks it)
    res = run_trainer([*FAST, "--max-steps", "1", "--out-dir", str(tmp_path / "run"),
                       "--checkpoint-dir", str(blocker / "checkpoints")])
    assert res.returncode == 2, res.stderr
    assert "checkpoint directory" in res.stderr and "is not writable" in res.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing trained


@pytest.mark.slow
def test_resume_auto_falls_back_to_the_previous_checkpoint(tmp_path):
    out = tmp_path / "run"
    common = [*FAST, "--global-batch-size", "64", "--micro-batch-size", "64", "--epochs", "1",
              "--checkpoint-interval", "3", "--out-dir", str(out)]
    assert run_trainer([*common, "--max-steps", "6"]).returncode == 0
    last = out / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # torn
    res = run_trainer([*common, "--max-steps", "8", "--resume", "auto"])
    assert res.returncode == 0, res.stderr
    assert "note: skipped checkpoint" in res.stderr and "last.pt" in res.stderr
    resumes = [line for line in (out / "metrics.jsonl").read_text().splitlines() if '"resume"' in line]
    assert resumes and '"step": 3' in resumes[-1]  # continued from last.1.pt (step 3), not from scratch
