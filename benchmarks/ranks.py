"""Shared pieces of the multi-rank benchmarks: running under torchrun, the max over ranks, node
size, and the calibrated cost models they take on the command line."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
import torch.distributed as dist

from fastnet.comm.planning.cost_model import CostModel


def relaunch_under_torchrun(script: str, nproc: int = 2, timeout_s: float = 7200) -> None:
    """Without torchrun's ``RANK``: run ``script`` with this process's arguments under ``torchrun
    --standalone --nproc_per_node=nproc`` (gloo on loopback) and exit with its status. Under
    torchrun (e.g. ``benchmarks/topology/cluster.py run``): return."""
    if "RANK" in os.environ:
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script,
           *sys.argv[1:]]
    env = {**os.environ, "FASTNET_BENCH_LAUNCHER": f"{nproc} ranks on loopback", "OMP_NUM_THREADS": "1"}
    raise SystemExit(subprocess.run(cmd, env=env, timeout=timeout_s).returncode)


def max_over_ranks(*values: float) -> list[float]:
    """Each value's maximum over the default group's ranks (one float64 all-reduce)."""
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def ranks_per_node(given: int | None) -> int | None:
    """``given``, else torchrun's LOCAL_WORLD_SIZE (right on the emulated cluster, whose nodes share
    one host name, so fastnet's host detection would see one node), else None (from the hosts)."""
    return given or int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or None


def check_wire_cost_models(items: list[str]) -> str | None:
    """The first malformed ``--wire-cost-model`` item's error text, or None."""
    for item in items:
        wire, _, path = item.partition("=")
        if wire not in ("fp16", "bf16") or not path:
            return f"--wire-cost-model {item!r}: expected fp16=PATH or bf16=PATH"
    return None


def load_cost_models(base: str | None, wire_items: list[str]) -> dict[str, CostModel]:
    """``{"none": base model, wire: model, ...}`` from ``--cost-model`` and ``--wire-cost-model
    WIRE=PATH`` items (a model calibrated with that wire dtype); keys absent where not given."""
    models = {"none": CostModel.load(base)} if base else {}
    for item in wire_items:
        wire, _, path = item.partition("=")
        models[wire] = CostModel.load(path)
    return models
