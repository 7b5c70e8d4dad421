import json
import subprocess
import sys

import pytest
import torch

from fastnet.comm.bench import Bench, bus_factor, main, parse_size, sizes
from fastnet.comm.planning.cost_model import CostModel
from tests.conftest import REPO, child_env


def test_parse_size_and_sweep():
    assert parse_size("8") == 8 and parse_size("64K") == 65536 and parse_size("256M") == 256 << 20
    assert parse_size("1GB") == 1 << 30
    assert sizes(8, 64, 2) == [8, 16, 32, 64]
    with pytest.raises(ValueError, match="Invalid size '12Q'"):
        parse_size("12Q")
    with pytest.raises(ValueError, match="-f 1"):
        sizes(8, 64, 1)


def test_bus_factor_is_nccl_tests_formula():
    assert bus_factor(2) == 1.0 and bus_factor(8) == pytest.approx(1.75)


@pytest.mark.parametrize("argv, message", [
    (["-d", "int4"], "valid dtypes: float32"),
    (["-a", "tree"], "valid algorithms: native, ring, hierarchical, hierarchical_p2p, leader, leader_p2p, hybrid, all"),
    (["-d", "float32,int4"], "Unknown dtype 'int4'"),
    (["--wire-dtype", "fp8"], "valid wire dtypes: none, fp16, bf16"),
    (["--backend", "shmem"], "valid backends: torch, mpi, nccl"),
    (["--model", "vgg99"], "vgg99"),
    (["--fusion-mb", "0"], "Invalid --fusion-mb"),
    (["--segment-mb", "-1"], "Invalid --segment-mb -1"),
])
def test_bad_arguments_exit_with_choices(capsys, argv, message):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float16,bfloat16"])
def test_two_rank_sweep_checks_results(tmp_path, dtype):
    out = tmp_path / "b.json"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                          "fastnet.comm.bench", "-b", "8", "-e", "64K", "-f", "8", "-n", "3", "-w", "1", "-d", dtype, "-a", "all",
                          "--ranks-per-node", "1", "--segment-mb", "0.01",  # 32K: 4 pipelined segments
                          "--calibrate", str(tmp_path / "cm.yaml"),
                          "--plot", str(tmp_path / "b.png"), "--csv", str(tmp_path / "b.csv"),
                          "--json", str(out)], cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "#wrong" in res.stdout and "busbw(GB/s)" in res.stdout
    data = json.loads(out.read_text())
    assert data["world_size"] == 2 and data["backend"] == "gloo" and data["segment_bytes"] == 10485
    ndt = len(dtype.split(","))
    algorithms = ["native", "ring", "hierarchical", "hierarchical_p2p", "leader", "leader_p2p", "hybrid"]
    assert [r["size"] for r in data["rows"]] == [8, 64, 512, 4096, 32768] * len(algorithms) * ndt
    assert [r["algorithm"] for r in data["rows"][::5]] == algorithms * ndt
    assert [r["type"] for r in data["rows"][::5 * len(algorithms)]] == dtype.split(",")
    model = CostModel.load(tmp_path / "cm.yaml")  # fitted to these rows: the inter and native links moved
    assert model.native != CostModel().native and model.inter != CostModel().inter
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "b.csv").read_text().startswith("size,count,type,algorithm,time_us,algbw,busbw,wrong")
    # hybrid without --cost-model chose online before timing: every size has an agreed candidate
    assert "# hybrid chose (online, no --cost-model" in res.stdout
    picked = [r["chosen"] for r in data["rows"] if r["algorithm"] == "hybrid"]
    assert len(picked) == 5 * ndt and set(picked) <= set(algorithms) - {"hybrid"}
    for r in data["rows"]:
        assert r["wrong"] == 0 and r["time_us"] > 0 and r["busbw"] == pytest.approx(r["algbw"])
        assert r["count"] * (4 if r["type"] == "float32" else 2) == r["size"]


@pytest.mark.slow
@pytest.mark.parametrize("nproc,algorithm", [(1, "ring"), (3, "hybrid")])  # hybrid: online, explored untimed
def test_model_mode_averages_every_way(tmp_path, nproc, algorithm):
    out = tmp_path / "m.json"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                          "-m", "fastnet.comm.bench", "--model", "resnet20", "--fusion-mb", "0.01,1", "-n", "2", "-w",
                          "1", "-a", algorithm, "--wire-dtype", "fp16", "--json", str(out)], cwd=REPO, env=child_env(), capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["mode"], r["fusion_mb"]) for r in rows] == [("single", None), ("per-tensor", None),
                                                           ("fused-pack", 0.01), ("fused-views", 0.01),
                                                           ("fused-pack", 1.0), ("fused-views", 1.0)]
    assert all(r["wrong"] == 0 and r["tensors"] == 59 and r["vs_single"] > 0 for r in rows)
    assert rows[0]["vs_single"] == 1.0
    assert [r["wire"] for r in rows] == ["none", "none", "fp16", "none", "fp16", "none"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("world", [2, 3, 5, 40])
def test_fill_pattern_exposes_a_misplaced_chunk(dtype, world):
    """The sweep's data depend on index and rank (as nccl-tests'): a correct sum checks clean, a sum
    whose chunk landed one place off does not (a constant fill, the old one, would hide it)."""
    from fastnet.comm.bench import expected_sum, fill_pattern

    count = 1000
    total = sum(fill_pattern(count, r, world, dtype).double() for r in range(world))
    assert torch.equal(total.to(dtype).double(), expected_sum(count, world, dtype))  # exact in the dtype
    planted = total.clone()
    planted[100:300] = total[101:301]  # a chunk received into the wrong offset
    assert (planted.to(dtype).double() != expected_sum(count, world, dtype)).sum() > 100
    constant = torch.full((count,), float(world * (world + 1) // 2))
    assert torch.equal(constant[100:300], constant[101:301])  # why the old fill could not see it


def test_rows_record_the_segment_each_algorithm_ran_with():
    """Calibration models each row with the segment it ran with: the hierarchical variants run
    unsegmented on communicators whose levels cannot overlap (NCCL's), the ring keeps its segments."""
    bench = Bench.__new__(Bench)  # the segment rule only; construction starts a process group
    bench.segment_bytes = 4 << 20
    for safe, hierarchical in ((True, 4 << 20), (False, 0)):
        bench.comm = type("Comm", (), {"concurrent_safe": safe})()
        assert bench.segment_bytes_of("hierarchical") == bench.segment_bytes_of("hierarchical_p2p") == hierarchical
        assert bench.segment_bytes_of("ring") == bench.segment_bytes_of("native") == 4 << 20
