"""Injected crashes (fastnet.faults) and torchrun's elastic restarts: a run SIGKILLed three times
and restarted by ``torchrun --max-restarts`` ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastnet.faults import kill_step
from fastnet.metrics import read_metrics, reproducible_records
from tests.conftest import FAST, REPO, child_env

RUN = [*FAST, "--global-batch-size", "128", "--micro-batch-size", "64", "--epochs", "3", "--log-interval", "1",
       "--checkpoint-interval", "5", "--timeout-s", "30", "--resume", "auto"]


@pytest.mark.parametrize("spec,attempt,rank,expected", [
    ("", 0, 0, None), ("12:1", 0, 1, 12), ("12:1", 0, 0, None), ("12:1", 1, 1, None),
    ("7:1,18:0,26:1", 1, 0, 18), ("7:1,18:0,26:1", 2, 1, 26), ("7:1,18:0,26:1", 3, 1, None)])
def test_kill_step_follows_the_attempt(spec, attempt, rank, expected):
    env = {"FASTNET_KILL_AT": spec, "TORCHELASTIC_RESTART_COUNT": str(attempt)}
    assert kill_step(rank, env) == expected


@pytest.mark.parametrize("spec", ["12", "a:1", "0:1", "3:-1", "1:2:3"])
def test_kill_step_rejects_a_malformed_plan(spec):
    with pytest.raises(ValueError, match="FASTNET_KILL_AT"):
        kill_step(0, {"FASTNET_KILL_AT": spec})


def torchrun(out: Path, kill_at: str | None, max_restarts: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--max-restarts={max_restarts}", "-m", "fastnet.train", *RUN, "--out-dir", str(out)]
    env = child_env(**({"FASTNET_KILL_AT": kill_at} if kill_at else {}))
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=420)


@pytest.mark.slow
def test_three_crashes_under_torchrun_restarts_end_bit_identical(tmp_path):
    """torchrun --max-restarts 3, 2 gloo ranks, --resume auto, a checkpoint every 5 steps; a rank is
    SIGKILLed after steps 3 (rank 1: before the first checkpoint, so the restart starts over in
    place), 18 (rank 0) and 26 (rank 1): the job finishes by itself, and
    its parameters, buffers, optimizer state and every metric record equal the uninterrupted run's
    bitwise (the steps after each checkpoint are recomputed). Each restart used to meet the previous
    attempt's gloo addresses in torchrun's store and fail (or wait) in the process-group set-up."""
    ref = torchrun(tmp_path / "ref", None, 0)
    assert ref.returncode == 0, ref.stderr[-3000:]
    res = torchrun(tmp_path / "crash", "3:1,18:0,26:1", 3)
    assert res.returncode == 0, res.stderr[-3000:]
    crash = read_metrics(tmp_path / "crash" / "metrics.jsonl")
    assert [r["step"] for r in crash if r["kind"] == "resume"] == [0, 15, 25]
    every = read_metrics(tmp_path / "crash" / "metrics.jsonl", superseded=True)
    assert [r["step"] for r in every if r["kind"] == "step"][:5] == [1, 2, 3, 1, 2]  # steps 1-3 ran twice
    assert reproducible_records(tmp_path / "crash" / "metrics.jsonl") == \
        reproducible_records(tmp_path / "ref" / "metrics.jsonl")
    a = torch.load(tmp_path / "ref" / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "crash" / "checkpoints" / "last.pt", weights_only=False)
    for part in ("model", "optimizer"):
        ta, tb = _tensors(a[part]), _tensors(b[part])
        assert len(ta) == len(tb) > 0 and all(torch.equal(x, y) for x, y in zip(ta, tb)), part


def _tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for k in sorted(tree, key=str) for t in _tensors(tree[k])]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in _tensors(v)]
    return []
