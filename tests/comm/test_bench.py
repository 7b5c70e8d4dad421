import json
import subprocess
import sys

import pytest

from fastnet.comm.bench import bus_factor, main, parse_size, sizes
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


def test_bad_arguments_exit_with_choices(capsys):
    with pytest.raises(SystemExit):
        main(["-d", "int4"])
    assert "valid dtypes: float32" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["-a", "tree"])
    assert "valid algorithms: native, ring, hierarchical, leader" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_two_rank_sweep_checks_results(tmp_path, dtype):
    out = tmp_path / "b.json"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                          "fastnet.comm.bench", "-b", "8", "-e", "64K", "-f", "8", "-n", "3", "-w", "1", "-d", dtype, "-a", "all",
                          "--ranks-per-node", "1",
                          "--json", str(out)], cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "#wrong" in res.stdout and "busbw(GB/s)" in res.stdout
    data = json.loads(out.read_text())
    assert data["world_size"] == 2 and data["backend"] == "gloo"
    assert [r["size"] for r in data["rows"]] == [8, 64, 512, 4096, 32768] * 4
    assert [r["algorithm"] for r in data["rows"][::5]] == ["native", "ring", "hierarchical", "leader"]
    for r in data["rows"]:
        assert r["wrong"] == 0 and r["time_us"] > 0 and r["busbw"] == pytest.approx(r["algbw"])
        assert r["count"] * (2 if dtype == "float16" else 4) == r["size"]
