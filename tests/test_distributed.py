"""Launch environments: a task of an srun step is a rank (SLURM_PROCID of SLURM_STEP_NUM_TASKS), a
batch script's job-wide SLURM_* are not (plain `srun python -m fastnet.train` used to start independent
single-process runs that appended to one metrics.jsonl)."""

from __future__ import annotations

import pytest

from fastnet.distributed import _slurm_rendezvous

STEP = {"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1", "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
        "SLURM_JOB_NODELIST": "vm", "SLURM_JOB_ID": "12345", "SLURM_NTASKS": "4"}


def test_srun_task_ranks_and_rendezvous():
    rank, size, local_rank, local_size, init = _slurm_rendezvous(STEP)
    assert (rank, size, local_rank, local_size) == (3, 4, 1, 2)
    assert init == "tcp://vm:32345"  # the first node; 20000 + job id mod 20000, alike in every task
    assert _slurm_rendezvous({**STEP, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"})[4] == "tcp://10.0.0.1:29500"


def test_a_node_range_without_scontrol_asks_for_master_addr(monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match="set MASTER_ADDR"):
        _slurm_rendezvous({**STEP, "SLURM_JOB_NODELIST": "node[01-04]"})


@pytest.mark.parametrize("env,rank,size", [
    (STEP, 3, 4),  # a task of a 4-task srun step
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "1"}, 0, 1),  # the batch script itself
    ({**STEP, "SLURM_STEP_NUM_TASKS": "1"}, 0, 1),  # one task per node running torchrun: torchrun's RANK wins
    ({**STEP, "RANK": "5", "WORLD_SIZE": "8"}, 5, 8),  # torchrun inside srun
])
def test_launch_rank_reads_srun_steps_only(monkeypatch, env, rank, size):
    from fastnet import cli

    for k in ("RANK", "WORLD_SIZE", "PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
              *STEP):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert (cli.launch_rank(), cli.launch_world_size()) == (rank, size)


def test_attempt_store_keys_each_torchrun_attempt_apart(tmp_path):
    """The rendezvous store's keys live under fastnet/attempt_<TORCHELASTIC_RESTART_COUNT>/, so a
    restarted worker never reads the previous attempt's gloo addresses from torchrun's store."""
    import datetime

    from fastnet.distributed import attempt_store
    from tests.conftest import free_port

    port = free_port()
    timeout = datetime.timedelta(seconds=10)
    first = attempt_store(f"tcp://127.0.0.1:{port}", 0, 1, timeout, {})
    second = attempt_store(f"tcp://127.0.0.1:{port}", 0, 1, timeout, {"TORCHELASTIC_RESTART_COUNT": "1"})
    first.set("addr", "old")
    second.set("addr", "new")
    assert first.get("addr") == b"old" and second.get("addr") == b"new"
    import torch.distributed as dist

    raw = dist.TCPStore("127.0.0.1", port, 1, False, timeout=timeout)  # the unprefixed store
    assert raw.get("fastnet/attempt_1/addr") == b"new" and raw.get("fastnet/attempt_0/addr") == b"old"
    with pytest.raises(ValueError, match="TORCHELASTIC_RESTART_COUNT"):
        attempt_store(f"tcp://127.0.0.1:{port}", 0, 1, timeout, {"TORCHELASTIC_RESTART_COUNT": "x"})
