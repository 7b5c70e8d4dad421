"""benchmarks/ddp_hooks.py's link bound and efficiency column (the numbers the issue's goals are read from)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import ddp_hooks  # noqa: E402


def test_parse_rate_reads_tc_units_and_names_the_valid_ones():
    assert ddp_hooks.parse_rate("1gbit") == 125e6 and ddp_hooks.parse_rate("500mbit") == 62.5e6
    assert ddp_hooks.parse_rate(None) is None
    with pytest.raises(ValueError, match="gbit, mbit, kbit, bit"):
        ddp_hooks.parse_rate("1gbps")


def test_link_bound_is_the_bandwidth_optimal_volume_over_the_link():
    # the numbers: 33.6 MB of FP16 gradients over 2 nodes at 1 Gbit/s = 269 ms; 4 nodes: 1.5x
    assert ddp_hooks.link_bound_s(33_554_432, 2, 125e6) == pytest.approx(0.2684, abs=1e-4)
    assert ddp_hooks.link_bound_s(33_554_432, 4, 125e6) == pytest.approx(1.5 * 0.2684, abs=1e-4)
    assert ddp_hooks.link_bound_s(33_554_432, 1, 125e6) is None and ddp_hooks.link_bound_s(1, 2, None) is None


def test_table_reads_each_row_against_its_wire_dtypes_bound():
    base = {"model": "mlp", "busy": 0.0, "wait": 0.0, "diff": 0.0, "grad_bytes": 67_108_864, "warmup": 3}
    rows = [{**base, "hook": "compute", "step": 0.1}, {**base, "hook": "none", "step": 1.074},
            {**base, "hook": "fp16_compress_hook", "step": 0.6}, {**base, "hook": "hierarchical:fp16", "step": 0.3},
            {**base, "hook": "backend:hierarchical:none", "step": 0.6, "diff": None}]
    lines = ddp_hooks.table(rows, nodes=2, bytes_per_s=125e6)
    cells = {ln.split("|")[2].strip(): [c.strip() for c in ln.split("|")[3:-1]] for ln in lines[2:]}
    assert cells["plain DDP (gloo all-reduce)"][3] == "50%"  # FP32 bound 537 ms / 1,074 ms
    assert cells["torch fp16_compress_hook"][3] == "45%"  # FP16 bound 268 ms / 600 ms
    assert cells["fastnet hierarchical, wire fp16"][3] == "89%" and cells["fastnet hierarchical, wire fp16"][2] == "2.00x"
    assert cells['DDP on backend "fastnet" hierarchical, wire none'][-1] == "- (more steps)"


def test_table_reads_each_row_against_ddps_step_floor():
    """The floor is forward + max(backward, link time) + optimizer: the all-reduce hides only under backward."""
    base = {"model": "mlp", "busy": 0.0, "wait": 0.0, "diff": 0.0, "grad_bytes": 67_108_864, "warmup": 3}
    rows = [{**base, "hook": "compute", "step": 0.2, "forward": 0.05, "backward": 0.1, "optimizer": 0.05},
            {**base, "hook": "none", "step": 1.0}, {**base, "hook": "hierarchical:fp16", "step": 0.4}]
    lines = ddp_hooks.table(rows, nodes=2, bytes_per_s=125e6)
    cells = {ln.split("|")[2].strip(): [c.strip() for c in ln.split("|")[3:-1]] for ln in lines[2:]}
    floor16 = next(v for k, v in cells.items() if k.startswith("DDP step floor, FP16"))
    assert floor16[0] == "368"  # compute 200 + (link 268 - backward 100) ms = 50 + max(100, 268) + 50
    assert floor16[4] == "100%" and floor16[3] == "73%"  # the link bound (268 ms) is 73% of the floor
    assert cells["fastnet hierarchical, wire fp16"][3:5] == ["67%", "92%"]  # 268 / 400, 368 / 400
    short = ddp_hooks.table(rows, nodes=2, bytes_per_s=1e9)  # link 34 ms < backward: the floor is the compute
    assert any(ln.startswith("| mlp | DDP step floor, FP16 wire") and "| 200 |" in ln for ln in short)


def test_rows_run_interleaved_and_every_row_takes_the_same_steps(tmp_path):
    """Two ranks on loopback, a small MLP: every row is timed, the exact (FP32-wire) rows end where plain
    DDP ends after the interleaved rounds, and the trace of the first round is written."""
    script = Path(ddp_hooks.__file__)
    cmd = [sys.executable, str(script), "--models", "mlp", "--mlp-width", "64", "--bucket-mb", "0.01",
           "--torch-hooks", "fp16_compress_hook", "--fastnet", "hierarchical:none", "ring:fp16", "hybrid:none",
           "--backend", "hierarchical:none", "--steps", "1", "--rounds", "3", "--warmup", "1",
           "--link-rate", "1gbit", "--ranks-per-node", "1", "--trace", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {ln.split("|")[2].strip(): [c.strip() for c in ln.split("|")[3:-1]]
            for ln in out.stdout.splitlines() if ln.startswith("| mlp |")}
    assert "median of 3 x 1 steps after 1" in out.stdout
    for label in ("fastnet hierarchical, wire none", 'DDP on backend "fastnet" hierarchical, wire none'):
        assert float(rows[label][-1]) < 1e-6, (label, rows[label])  # same steps, exact sums: same parameters
    assert float(rows["fastnet ring, wire fp16"][-1]) < 1e-3
    assert rows["fastnet hybrid, wire none"][-1] == "- (more steps)"  # it explored during more warm-up steps
    assert "Online choices of the hybrid hook rows:" in out.stdout
    assert "fastnet hybrid, wire none: size class" in out.stdout
    assert {p.name for p in tmp_path.iterdir()} >= {"mlp_ring-fp16_rank0.json", "mlp_ring-fp16_rank1.json"}


def test_compute_rows_step_runs_no_all_reduce(tmp_path):
    """The compute-only reference really skips DDP's all-reduce (no_sync must hold over the forward
    too: DDP decides there whether the backward syncs); the other rows' steps run it."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model, x, y, loss_fn = ddp_hooks._model_and_data("mlp", 0, 4, width=16)
        net = DDP(model)
        calls = []

        def counting_hook(state, bucket):
            calls.append(bucket.buffer().numel())
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        net.register_comm_hook(None, counting_hook)
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        per = ddp_hooks._steps(net, opt, x, y, loss_fn, 2, no_sync=True)
        assert calls == [] and len(per) == 2 and all(len(s) == len(ddp_hooks.FIELDS) for s in per)
        assert all(abs(s[0] - sum(s[1:4])) < 1e-3 for s in per)  # one rank's parts add up to its step
        ddp_hooks._steps(net, opt, x, y, loss_fn, 1)
        assert sum(calls) == sum(p.numel() for p in model.parameters())
    finally:
        dist.destroy_process_group()
