"""fastnet.kernels on CPU: the reference paths (the kernels' oracles) and the tensor-table builder."""

from __future__ import annotations

import re

import pytest
import torch

from fastnet import kernels
from fastnet.optim import LARS


def test_tensor_table_handles_empty_odd_and_mixed():
    ptrs, offsets = kernels.tensor_table([])
    assert ptrs.numel() == 0 and offsets.tolist() == [0]
    ts = [torch.zeros(3), torch.zeros(1, dtype=torch.float16), torch.zeros(0), torch.zeros(7, 5)]
    ptrs, offsets = kernels.tensor_table(ts)
    assert offsets.tolist() == [0, 3, 4, 4, 39] and ptrs.tolist() == [t.data_ptr() for t in ts]
    assert kernels.group_by_dtype(ts) == {torch.float32: [0, 2, 3], torch.float16: [1]}
    with pytest.raises(ValueError, match="contiguous"):
        kernels.tensor_table([torch.zeros(4, 4).t()])


def test_dispatch_falls_back_on_cpu():
    assert not kernels.use_cuda_kernels([torch.zeros(2)]) and not kernels.use_cuda_kernels([])


def test_pack_unpack_unscale_and_copy_reference():
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=g) for s in ((3, 4), (5,), (0,), (1,))] + [torch.randn(6, generator=g).half()]
    out = torch.empty(sum(t.numel() for t in grads), dtype=torch.float16)
    kernels.pack(grads, out, scale=0.5)
    ref = torch.cat([t.reshape(-1).double() for t in grads]) * 0.5
    assert torch.allclose(out.double(), ref, rtol=1e-3)
    with pytest.raises(ValueError, match="out must be 1-D with 24 elements"):
        kernels.pack(grads, torch.empty(3))
    masters = [torch.full((s,), float("nan")) for s in (12, 5, 0, 1, 6)]  # poisoned: must be overwritten
    found = kernels.unpack_unscale(out, masters, 4.0)
    assert not bool(found) and torch.allclose(torch.cat(masters).double(), ref * 4, rtol=1e-3)
    out[7] = float("inf")
    assert bool(kernels.unpack_unscale(out, masters, 1.0))
    with pytest.raises(ValueError, match="flat has 24 elements, the outputs 3"):
        kernels.unpack_unscale(out, [torch.empty(3)], 1.0)
    with pytest.raises(TypeError, match="float32 outputs"):
        kernels.unpack_unscale(out, [torch.empty(24, dtype=torch.float16)], 1.0)
    src, dst = [torch.randn(4, generator=g), torch.randn(2, 3, generator=g)], [torch.empty(4).half(), torch.empty(6)]
    kernels.copy_cast(src, dst)
    assert torch.equal(dst[0], src[0].half()) and torch.equal(dst[1], src[1].reshape(-1))
    with pytest.raises(ValueError, match="different lengths"):
        kernels.copy_cast(src, dst[:1])


@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_step_reference_matches_the_optimizer(nesterov):
    g = torch.Generator().manual_seed(1)
    shapes = [(8, 3, 3, 3), (8,), (10, 8), (10,)]
    w0 = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(3)]
    hp = dict(lr=0.5, momentum=0.9, weight_decay=5e-4, trust_coefficient=0.02, eps=1e-9, nesterov=nesterov)
    params = [torch.nn.Parameter(t.clone()) for t in w0]
    opt = LARS(params, **hp, trust_clip=True)
    ws, bufs = [t.clone() for t in w0], [torch.zeros_like(t) for t in w0]
    copies = [torch.empty(s, dtype=torch.float16) for s in shapes]
    for step in grads:
        for p, gr in zip(params, step):
            p.grad = gr
        opt.step()
        kernels.lars_step(ws, step, bufs, [t.ndim <= 1 for t in ws], clip=True, model_copies=copies, **hp)
    for p, w, c in zip(params, ws, copies):
        assert torch.allclose(p, w, atol=1e-6) and torch.equal(c, w.half())


def test_every_launched_kernel_exists_in_the_source():
    src = kernels.kernel_source()
    defined = set(re.findall(r"__global__ void (\w+)\(", src)) | {
        m for m in re.findall(r"DEFINE_\w+\((\w+),", src)}
    codes = sorted(set(kernels._CODES.values()))  # every dtype the dispatcher sends to a kernel
    launched = {f"pack_{a}_{b}" for a in codes for b in codes} | {f"unpack_unscale_{c}" for c in codes} | \
        {"copy_f32_" + c for c in codes} | {"lars_norms_f32", "lars_update_f32"}
    assert launched <= defined, launched - defined
    assert f"#define CHUNK {kernels.CHUNK}" in src


def test_kernel_metadata_is_built_once_per_tensor_list():
    """Persistent lists (masters, flat gradient buffers) reuse their tables: no rebuild and no
    host-to-device copy per step."""
    ts = [torch.zeros(5), torch.zeros(2, 3)]
    first = kernels.tensor_table(ts)
    assert kernels.tensor_table(ts) is first or all(a is b for a, b in zip(kernels.tensor_table(ts), first))
    nt, bt, bs, fb, ex, nblocks = kernels._lars_blocks("cpu", (2 * kernels.CHUNK + 1, 3, 0), (False, True, False))
    assert nblocks == 4 and bt.tolist() == [0, 0, 0, 1] and bs.tolist() == [0, kernels.CHUNK, 2 * kernels.CHUNK, 0]
    assert fb.tolist() == [0, 3, 4, 4] and ex.tolist() == [0, 1, 0]
    assert kernels._lars_blocks("cpu", (2 * kernels.CHUNK + 1, 3, 0), (False, True, False))[0] is nt


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_arguments_are_raw_addresses_for_every_kernel_dtype(dtype):
    """Tensors reach CuPy as device addresses (a T* parameter), never through DLPack, which CuPy
    refuses for bfloat16 (CuPy 13; 14 without ml_dtypes): the bf16 kernels would raise at launch."""
    import inspect

    import numpy as np

    t = torch.zeros(3, dtype=dtype)
    args = kernels.kernel_args((t, 0.5, 7))
    assert args == (np.uint64(t.data_ptr()), np.float32(0.5), np.int32(7))
    assert [type(a) for a in args] == [np.uint64, np.float32, np.int32]
    assert "from_dlpack" not in inspect.getsource(kernels)
