"""Shared helpers: launching the trainer in real processes (torchrun on loopback, gloo)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Small, fast trainer settings on the embedded digits dataset (real images).
FAST = ["--dataset", "digits", "--model", "small_cnn", "--workers", "0", "--no-progress", "--timeout-s", "60"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTNET_")}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra})
    return env


def run_trainer(args: list[str], nproc: int = 1, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``fastnet.train`` under ``torchrun --standalone --nproc_per_node=nproc`` (or plainly for 1)."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "fastnet.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "fastnet.train", *args]
    return subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def trainer():
    return run_trainer


def pytest_collection_modifyitems(config, items):
    """GPU tests run where CUDA is (the device machine); elsewhere they are skipped with the reason."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; run `pytest -m gpu` on the device machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
