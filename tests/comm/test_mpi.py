"""fastnet over mpi4py: real processes launched by mpiexec (MPICH from the `mpi` extra)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, child_env

pytestmark = pytest.mark.mpi
MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")


@pytest.fixture(scope="module", autouse=True)
def _need_mpi():
    pytest.importorskip("mpi4py", reason="install the mpi extra: pip install 'fastnet[mpi]'")
    if MPIEXEC is None:
        pytest.skip("no mpiexec on PATH: pip install 'fastnet[mpi]'")


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_algorithms_over_mpi(n):
    res = subprocess.run([MPIEXEC, "-n", str(n), sys.executable, "-m", "tests.comm.mpi_worker"], cwd=REPO,
                         env=child_env(), capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULTS "))
    data = json.loads(line[len("RESULTS "):])
    assert data["size"] == n and data["rpn"] == n  # one machine: MPI's shared-memory split sees all ranks
    ranks = data["ranks"]
    node_sizes = [k for k in {1, 2, n} if k <= n and n % k == 0]  # 3 dtypes x 5 lengths each
    assert sum(key.startswith("pipelined/") for key in ranks[0]) == 15 * len(node_sizes)
    for key, (ok, digest) in ranks[0].items():
        if key == "mismatch":
            if n > 1:
                assert all("gradient layouts differ" in rk[key][0] for rk in ranks)
            continue
        assert all(rk[key][0] is True for rk in ranks), (key, [rk[key][0] for rk in ranks])
        assert len({rk[key][1] for rk in ranks}) == 1, key  # bitwise identical on every rank


def test_unsupported_dtype_names_dtype_and_backend():
    from fastnet.comm.communicators.mpi import MPICommunicator

    comm = MPICommunicator()  # a singleton MPI world outside mpiexec
    with pytest.raises(TypeError, match="complex32 is not supported by the mpi backend"):
        comm.broadcast(torch.zeros(2, dtype=torch.complex32), 0)
    x = torch.tensor([1.5, 2.0], dtype=torch.bfloat16)
    comm.all_reduce(x)  # bf16 through float32
    assert torch.equal(x, torch.tensor([1.5, 2.0], dtype=torch.bfloat16))


def test_missing_mpi4py_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake(name, *a, **k):
        if name.startswith("mpi4py"):
            raise ImportError("no mpi4py")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    from fastnet.comm.communicators.mpi import MPICommunicator

    with pytest.raises(RuntimeError, match=r"pip install 'fastnet\[mpi\]'"):
        MPICommunicator()


def test_bench_over_mpi(tmp_path):
    out = tmp_path / "b.json"
    res = subprocess.run([MPIEXEC, "-n", "3", sys.executable, "-m", "fastnet.comm.bench", "--backend", "mpi", "-a",
                          "all", "-b", "8", "-e", "4K", "-f", "8", "-n", "2", "-w", "1", "--ranks-per-node", "1",
                          "--json", str(out)], cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["backend"] == "mpi" and data["world_size"] == 3
    assert {r["algorithm"] for r in data["rows"]} == {"native", "ring", "hierarchical", "hierarchical_p2p", "leader",
                                                         "leader_p2p", "hybrid"}
    assert all(r["wrong"] == 0 for r in data["rows"])


@pytest.mark.parametrize("n", [2, 3])
def test_mpiexec_launch_and_ddp_hook_over_mpi(n):
    """torch.distributed rendezvous from MPI (no torchrun) and fastnet's DDP hook with
    ``communicator="mpi"``: the same parameters as plain DDP, bitwise equal on every rank."""
    res = subprocess.run([MPIEXEC, "-n", str(n), sys.executable, "-m", "tests.comm.mpi_ddp_worker"], cwd=REPO,
                         env=child_env(), capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULTS "))[len("RESULTS "):])
    assert data["size"] == n and data["local_size"] == n
    assert data["err"] < 1e-5 and data["same"], data


def test_trainer_under_mpiexec_with_the_mpi_communicator(tmp_path):
    from tests.conftest import FAST

    out = tmp_path / "mpi"
    res = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "fastnet.train", *FAST, "--communicator", "mpi",
                          "--allreduce", "ring", "--global-batch-size", "64", "--micro-batch-size", "32",
                          "--max-steps", "8", "--out-dir", str(out)], cwd=REPO, env=child_env(),
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert summary["kind"] == "summary" and summary["world_size"] == 2 and summary["steps"] == 8
    assert summary["param_checksums"][0] == summary["param_checksums"][1]
    assert summary["state_checksums"][0] == summary["state_checksums"][1]


def test_communicator_registry_errors():
    from fastnet.comm.communicators.factory import build_communicator

    with pytest.raises(ValueError, match="valid communicators: torch, nccl, mpi"):
        build_communicator("ucx")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs CUDA"):
            build_communicator("nccl")
