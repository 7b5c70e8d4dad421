"""benchmarks/ddp_hooks.py's link bound and efficiency column (the numbers the issue's goals are read from)."""

from __future__ import annotations

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
