"""The trainer on one CUDA device (run on the device machine: `pytest -m gpu`)."""

import pytest
import torch

from fastnet.metrics import read_metrics
from tests.conftest import FAST, REPO, run_trainer

pytestmark = pytest.mark.gpu

# The device image has no scikit-learn: `.ci/gpu prepare` exports the digits to data/digits.npz.
DIGITS_DIR = REPO / "data"
FAST = [*FAST, "--data-dir", str(DIGITS_DIR)] if (DIGITS_DIR / "digits.npz").is_file() else FAST


@pytest.mark.parametrize("precision", ["fp32", "amp", "fp16", "bf16"])
def test_cuda_training_learns_and_resumes(tmp_path, precision):
    common = [*FAST, "--device", "cuda", "--precision", precision, "--global-batch-size", "64",
              "--micro-batch-size", "32", "--epochs", "3", "--log-interval", "1", "--base-lr", "0.4"]
    out = tmp_path / "gpu"
    res = run_trainer([*common, "--max-steps", "40", "--out-dir", str(out)])
    assert res.returncode == 0, res.stderr
    recs = read_metrics(out / "metrics.jsonl")
    steps = [r for r in recs if r["kind"] == "step"]
    assert sum(r["train_loss"] for r in steps[-5:]) < 0.6 * sum(r["train_loss"] for r in steps[:5])
    if precision in ("amp", "fp16"):
        assert steps[-1]["loss_scale"] >= 1.0
    if precision in ("fp16", "bf16"):
        ck0 = torch.load(out / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")
        assert ck0["precision"]["master"].dtype == torch.float32
        assert ck0["model"]["0.weight"].dtype == (torch.float16 if precision == "fp16" else torch.bfloat16)
        assert ck0["model"]["1.weight"].dtype == torch.float32  # BatchNorm stays FP32
    ck = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ck["rng"]["cuda"], "CUDA RNG state saved"
    res = run_trainer([*common, "--max-steps", "60", "--out-dir", str(out), "--resume", str(out / "checkpoints")])
    assert res.returncode == 0, res.stderr
    summary = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "summary"][-1]
    assert summary["steps"] == 60 and summary["best_top1"] > 80.0


def test_cuda_lars_training(tmp_path):
    out = tmp_path / "lars"
    res = run_trainer([*FAST, "--device", "cuda", "--optimizer", "lars", "--base-lr", "20", "--lr-schedule", "poly",
                       "--warmup-epochs", "1", "--global-batch-size", "128", "--micro-batch-size", "64",
                       "--epochs", "6", "--out-dir", str(out)])
    assert res.returncode == 0, res.stderr
    summary = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "summary"][-1]
    assert summary["best_top1"] > 90.0
