"""The module paths before the issue-38 re-layout keep every name they had for one release: each
access warns (DeprecationWarning naming the new module) and returns the very object the new module
defines; the facade's ``ddp_hook`` stays the function; the ``python -m`` entries and the backend's
registration are unchanged."""

from __future__ import annotations

import importlib
import importlib.metadata
import subprocess
import sys

import pytest
import torch.distributed as dist

from tests.conftest import REPO, child_env

OLD = ["communicator", "mpi", "nccl", "topology", "cost_model", "autotune", "buckets", "simulate", "sync", "native",
       "synchronizer", "ddp_hook"]


@pytest.mark.parametrize("old", OLD)
def test_old_path_forwards_every_name_to_its_new_home_with_a_warning(old):
    module = importlib.import_module(f"fastnet.comm.{old}")
    names = dir(module)
    assert names, old
    for name in names:
        with pytest.warns(DeprecationWarning, match=rf"fastnet\.comm\.{old}\.{name} moved to fastnet\.comm\.\w"):
            value = getattr(module, name)
        assert value is not None
    with pytest.raises(AttributeError, match=f"fastnet.comm.{old}' has no attribute 'no_such_name'"):
        module.no_such_name  # noqa: B018


@pytest.mark.parametrize("old,name,new", [
    ("sync", "BucketReducer", "fastnet.comm.gradients.reducer"),
    ("sync", "check_consistency", "fastnet.comm.gradients.consistency"),
    ("sync", "AlgorithmAllReduce", "fastnet.comm.gradients.allreduce"),
    ("synchronizer", "CommThread", "fastnet.comm.gradients.comm_thread"),
    ("synchronizer", "GradientSynchronizer", "fastnet.comm.gradients.synchronizer"),
    ("communicator", "TorchCommunicator", "fastnet.comm.communicators.torchdist"),
    ("communicator", "build_communicator", "fastnet.comm.communicators.factory"),
    ("communicator", "split_sizes", "fastnet.comm.algorithms.ring"),
    ("topology", "Hierarchy", "fastnet.comm.planning.hierarchy"),
    ("topology", "Topology", "fastnet.comm.planning.topology"),
    ("mpi", "MPICommunicator", "fastnet.comm.communicators.mpi"),
    ("nccl", "NcclCommunicator", "fastnet.comm.communicators.nccl"),
    ("ddp_hook", "HookState", "fastnet.comm.gradients.ddp_comm_hook"),
])
def test_old_name_is_the_new_object(old, name, new):
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        value = getattr(importlib.import_module(f"fastnet.comm.{old}"), name)
    assert value is getattr(importlib.import_module(new), name)


def test_module_state_is_read_where_it_lives():
    """Nothing is copied: a value changed in the new module is what the old path returns."""
    reducer = importlib.import_module("fastnet.comm.gradients.reducer")
    sync = importlib.import_module("fastnet.comm.sync")
    saved = reducer.WIRE_DTYPES
    try:
        reducer.WIRE_DTYPES = ("changed",)
        with pytest.warns(DeprecationWarning):
            assert sync.WIRE_DTYPES == ("changed",)
    finally:
        reducer.WIRE_DTYPES = saved


def test_facade_ddp_hook_stays_the_function():
    import fastnet.comm

    old_module = importlib.import_module("fastnet.comm.ddp_hook")  # the deprecated module, after the facade
    from fastnet.comm import ddp_hook
    assert callable(ddp_hook) and ddp_hook is not old_module and type(old_module).__name__ == "module"
    assert fastnet.comm.ddp_hook is ddp_hook


def test_importing_fastnet_comm_warns_nothing():
    res = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c",
                          "import fastnet.comm, fastnet.comm.backend, fastnet.comm.bench, fastnet.train"],
                         cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def test_backend_registers_and_the_entry_point_is_register():
    import fastnet.comm.backend
    from fastnet.comm.backend.registration import register

    assert "FASTNET" in dist.Backend._plugins
    assert fastnet.comm.backend.register is register
    points = importlib.metadata.entry_points(group="torch.distributed.backends")
    assert points["fastnet"].value == "fastnet.comm.backend:register"


@pytest.mark.parametrize("module", ["fastnet.comm.simulate", "fastnet.comm.bench", "fastnet.train"])
def test_python_dash_m_entries_still_run(module):
    res = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-m", module, "--help"], cwd=REPO,
                         env=child_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "usage" in res.stdout.lower(), res.stderr[-2000:]
