"""The CUDA kernels compile without a GPU (CI): NVRTC to PTX for sm_80 and sm_90, then ptxas.

Fails on a compile error, a register spill, or a kernel that fastnet/kernels.py launches but the
source does not define. NVRTC and the CUDA headers come with torch's CUDA build (nvidia-cuda-nvrtc,
nvidia-cuda-runtime); ptxas with the dev extra (nvidia-cuda-nvcc).
"""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fastnet import kernels

CODES = ("f32", "f16", "bf16")  # fastnet.kernels._CODES
LAUNCHED = ([f"pack_{s}_{d}" for s, d in itertools.product(CODES, repeat=2)]
            + [f"unpack_unscale_{s}" for s in CODES] + [f"copy_f32_{d}" for d in CODES]
            + ["lars_norms_f32", "lars_update_f32"])


def _ptxas() -> str:
    for root in kernels._nvidia_roots():
        if (root / "bin" / "ptxas").is_file():
            return str(root / "bin" / "ptxas")
    found = shutil.which("ptxas")
    if found is None:
        pytest.fail("ptxas not found: `pip install -e '.[dev]'` installs nvidia-cuda-nvcc")
    return found


def test_the_launched_kernel_names_are_the_dispatchers():
    source = (Path(kernels.__file__).read_text())
    patterns = set(re.findall(r'_launch\(f?"([a-z0-9_{}().]+)"', source))
    assert {"pack_{_code(dtype)}_{_code(out.dtype)}", "unpack_unscale_{_code(flat.dtype)}",
            "copy_f32_{_code(dtype)}", "lars_norms_f32", "lars_update_f32"} == patterns  # LAUNCHED lists these


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_kernels_compile_for_ampere_and_hopper_without_spills(arch, tmp_path):
    ptx = kernels.nvrtc_compile(kernels.kernel_source(), arch, kernels.cuda_include_dirs())
    (tmp_path / "k.ptx").write_text(ptx)
    res = subprocess.run([_ptxas(), f"-arch={arch}", "-v", str(tmp_path / "k.ptx"), "-o", str(tmp_path / "k.cubin")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    log = res.stdout + res.stderr
    compiled = set(re.findall(r"Compiling entry function '(\w+)'", log))
    assert set(LAUNCHED) <= compiled, sorted(set(LAUNCHED) - compiled)
    spills = [(int(a), int(b)) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)]
    assert len(spills) == len(compiled) and all(s == (0, 0) for s in spills), log
    registers = [int(r) for r in re.findall(r"Used (\d+) registers", log)]
    assert registers and max(registers) <= 64, registers  # full occupancy at 256 threads per block
    print(f"{arch}: {len(compiled)} kernels, registers {min(registers)}-{max(registers)}, no spills")


def test_which_tensors_the_kernels_take():
    import torch

    assert set(kernels._CODES.values()) == set(CODES)
    assert kernels.kernel_tensors_ok([torch.zeros(2), torch.zeros(2, dtype=torch.float16),
                                      torch.zeros(2, dtype=torch.bfloat16)])
    assert not kernels.kernel_tensors_ok([torch.zeros(2, dtype=torch.float64)])  # reference path
    cl = torch.zeros(2, 3, 4, 5).to(memory_format=torch.channels_last)
    assert not kernels.kernel_tensors_ok([cl])  # pack/unpack/copy follow logical order
    assert kernels.kernel_tensors_ok([cl], dense_ok=True)  # LARS: storage order, one layout
    assert not kernels.kernel_tensors_ok([torch.zeros(4, 4)[:, :2]], dense_ok=True)  # not dense: reference path
    ptrs, offsets = kernels.tensor_table([cl], dense_ok=True)
    assert ptrs.tolist() == [cl.data_ptr()] and offsets.tolist() == [0, 120]
    # bf16 through the public functions on CPU: the reference path
    masters = [torch.zeros(4)]
    found = kernels.unpack_unscale(torch.full((4,), 2.0, dtype=torch.bfloat16), masters, 0.5)
    assert not bool(found) and torch.equal(masters[0], torch.ones(4))
