"""benchmarks/topology/cluster.py, the root-run emulated cluster: concurrent runs and timeouts.

Needs root and iproute2 (network namespaces): this machine and CI have both.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO, child_env

CLUSTER = REPO / "benchmarks" / "topology" / "cluster.py"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None,
                                 reason="the emulated cluster needs root, ip netns and tc")]


def _namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _run_id(stderr: str) -> str:
    return re.search(r"emulated cluster run id (\w+)", stderr).group(1)


def test_two_runs_at_once_both_finish_with_correct_results():
    cmd = [sys.executable, str(CLUSTER), "run", "--nodes", "2", "--ranks-per-node", "1", "--rate", "1gbit",
           "--timeout", "240", "--", "-m", "fastnet.comm.bench", "-b", "1K", "-e", "64K", "-f", "8", "-n", "2",
           "-w", "1", "-a", "ring", "--ranks-per-node", "1"]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    ids = []
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert "out of bounds values : 0 OK" in out  # the index/rank-dependent data summed correctly
        ids.append(_run_id(err))
    assert ids[0] != ids[1]
    assert not [ns for ns in _namespaces() if any(ns.startswith(f"fnt-{i}-") for i in ids)]


def test_timeout_kills_the_runs_processes_and_removes_its_namespaces(tmp_path):
    sleeper = tmp_path / "sleeper.py"
    sleeper.write_text("import time\ntime.sleep(600)\n")
    res = subprocess.run([sys.executable, str(CLUSTER), "run", "--nodes", "2", "--ranks-per-node", "1",
                          "--timeout", "10", "--", str(sleeper)], cwd=REPO, env=child_env(), capture_output=True,
                         text=True, timeout=180)
    assert res.returncode != 0 and "did not finish within --timeout 10 s" in res.stderr, res.stderr[-2000:]
    run_id = _run_id(res.stderr)
    assert not [ns for ns in _namespaces() if ns.startswith(f"fnt-{run_id}-")]
    left = subprocess.run(["pgrep", "-f", str(sleeper)], capture_output=True, text=True)
    assert left.returncode == 1, left.stdout  # no process of the run is left
