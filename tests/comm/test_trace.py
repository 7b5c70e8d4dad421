"""The per-rank Chrome/Perfetto trace (fastnet.comm.trace, fastnet-train --trace)."""

from __future__ import annotations

import json
import threading

import pytest

from fastnet.comm import trace
from tests.conftest import FAST, run_trainer


def test_tracer_records_spans_instants_and_async_phases(tmp_path):
    tracer = trace.start(rank=3)
    with trace.span("outer", "train", step=1):
        tracer.instant("ready", "bucket", bucket=0)
        with trace.span("seg", "phase", True):
            pass
    worker = threading.Thread(target=lambda: trace.span("on thread", "bucket").__enter__(), name="comm")
    with trace.span("joined", "bucket"):
        worker.start()
        worker.join()
    path = trace.stop(tmp_path / "t" / "rank3.json")
    assert trace.current() is None and trace.span("x", "y").__enter__() is None  # no trace: a no-op
    events = json.loads(path.read_text())["traceEvents"]
    by = {(e["name"], e["ph"]) for e in events}
    assert {("outer", "X"), ("ready", "i"), ("seg", "b"), ("seg", "e"), ("joined", "X"),
            ("process_name", "M")} <= by
    outer = next(e for e in events if e["name"] == "outer")
    ready = next(e for e in events if e["name"] == "ready")
    assert outer["pid"] == 3 and outer["args"] == {"step": 1} and outer["ts"] <= ready["ts"] <= outer["ts"] + outer["dur"]
    begin, end = (e for e in events if e["name"] == "seg")
    assert begin["id"] == end["id"] and begin["ts"] <= end["ts"]
    assert {"comm", "MainThread"} <= {e["args"]["name"] for e in events if e["name"] == "thread_name"}


@pytest.mark.slow
def test_trainer_trace_has_every_phase_of_the_hierarchical_exchange(tmp_path):
    """2 ranks as 2 nodes of 1, hierarchical_p2p with FP16 on the wire, --trace --trace-steps 2 of a
    3-step run: one JSON per rank with the bucket events, the wire casts, the algorithm and its four
    ring phases (the intra-node ones have no messages with one rank per node, and still appear),
    and the trainer's step spans for steps 1-2 only."""
    out = tmp_path / "run"
    res = run_trainer([*FAST, "--global-batch-size", "64", "--micro-batch-size", "16", "--max-steps", "3",
                       "--allreduce", "hierarchical_p2p", "--ranks-per-node", "1", "--wire-dtype", "fp16",
                       "--trace", "--trace-steps", "2", "--out-dir", str(out)], nproc=2)
    assert res.returncode == 0, res.stderr
    for rank in range(2):
        events = json.loads((out / "trace" / f"rank{rank}.json").read_text())["traceEvents"]
        names = {e["name"] for e in events}
        assert {"ready", "queue wait", "all-reduce bucket 0", "cast to wire", "cast back", "hierarchical_p2p",
                "intra reduce-scatter", "inter reduce-scatter", "inter all-gather", "intra all-gather",
                "forward+backward", "synchronize", "optimizer", "step 1", "step 2"} <= names, (rank, names)
        assert "step 3" not in names and all(e["pid"] == rank for e in events)
