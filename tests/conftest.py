"""Shared helpers: launching the trainer in real processes (torchrun on loopback, gloo)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# One intra-op thread in the test process and in every process it starts (spawned ranks inherit the
# environment; run_trainer's children get it from child_env): the suite runs several processes per
# core, and oversubscribed intra-op threads on a loaded 2-core machine made a single in-process FP16
# test 6x slower (84 s against 14 s), while one thread costs little on a quiet one.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

# Small, fast trainer settings on the embedded digits dataset (real images).
FAST = ["--dataset", "digits", "--model", "small_cnn", "--workers", "0", "--progress", "none", "--timeout-s", "60"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child process: no ``FASTNET_<OPTION>`` settings (they would change the
    trainer's options), except ``FASTNET_KERNELS``, which is no option: it switches the fused CUDA
    kernels on, and ``.ci/gpu`` sets it for the GPU tests (their trainer runs included)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTNET_") or k == "FASTNET_KERNELS"}
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


def init_gloo(rank: int, world: int, port: int, timeout_s: float = 60.0) -> None:
    """In a spawned worker: join a gloo group of ``world`` ranks on 127.0.0.1:``port``."""
    import datetime

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))


class PlainQueue:
    """The queue a worker puts its result on: ``put`` pickles the result to bytes in the worker, so
    tensors travel by value (torch.multiprocessing would share them as file descriptors, which
    vanish when the worker exits before the parent reads them)."""

    def __init__(self, queue) -> None:
        self._queue = queue

    def put(self, obj) -> None:
        import pickle

        self._queue.put(pickle.dumps(obj))

    def close(self) -> None:
        self._queue.close()

    def join_thread(self) -> None:
        self._queue.join_thread()


def _collect(queue, procs, timeout: float):
    """Next result from the queue; fails at once if a worker died instead of waiting out the timeout."""
    import pickle
    import queue as q
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return pickle.loads(queue.get(timeout=0.5))
        except q.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            assert not dead, f"worker exited with {dead}"
    raise TimeoutError("no result from the workers")


def _rank_main(target, rank: int, world: int, port: int, queue) -> None:
    """A spawned rank: ``target``, then the default process group destroyed if the target left it
    alive (gloo's threads met at interpreter exit abort the process: "terminate called without an
    active exception", pytorch/pytorch#190489)."""
    import torch.distributed as dist

    try:
        target(rank, world, port, queue)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def spawn_ranks(target, world: int, timeout: float = 240.0) -> list:
    """Run ``target(rank, world, port, queue)`` in ``world`` spawned processes (real processes, a
    fresh loopback port) and return what each put on the queue, in arrival order (by value:
    :class:`PlainQueue`). Each rank's default process group is destroyed when ``target`` returns.
    Fails fast when a worker dies; kills stragglers."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_rank_main, args=(target, r, world, port, PlainQueue(queue)))
             for r in range(world)]
    for p in procs:
        p.start()
    try:
        results = [_collect(queue, procs, timeout) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=120)  # results are in; a loaded machine can be slow to tear the group down
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return results
