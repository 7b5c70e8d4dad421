"""fastnet's CUDA kernels vs their reference twins in float64 (run on the device: `FASTNET_KERNELS=1 pytest -m gpu`)."""

from __future__ import annotations

import pytest
import torch

from fastnet import kernels
from fastnet.models import build_model

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _need_kernels():
    if not kernels.use_cuda_kernels([torch.zeros(1, device="cuda")]):
        pytest.fail("the CUDA kernels are not enabled: run with FASTNET_KERNELS=1 and CuPy installed")


def _shapes(kind: str) -> list[torch.Size]:
    if kind == "resnet50":
        return [p.shape for p in build_model("resnet50", 1000, 224).parameters()]
    return [torch.Size([n]) for n in (1, 3, 4095, 4096, 4097, 100_003)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("kind", ["odd", "resnet50"])
@pytest.mark.parametrize("src_dtype,dst_dtype", [(torch.float32, torch.float16), (torch.float16, torch.float16),
                                                 (torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                                 (torch.bfloat16, torch.bfloat16)])
def test_pack_and_unpack_unscale(kind, src_dtype, dst_dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    grads = [torch.randn(s, generator=g, device="cuda").to(src_dtype) for s in _shapes(kind)]
    ref = torch.cat([t.reshape(-1).double() for t in grads]) * 0.25
    out = torch.full((ref.numel(),), float("nan"), device="cuda", dtype=dst_dtype)
    kernels.pack(grads, out, scale=0.25)
    assert _rel(out, ref) < {torch.float16: 1e-3, torch.bfloat16: 8e-3}.get(dst_dtype, 1e-6)
    masters = [torch.full((t.numel(),), float("nan"), device="cuda") for t in grads]
    found = kernels.unpack_unscale(out, masters, 4.0)
    assert not bool(found) and _rel(torch.cat(masters), out.double() * 4) < 1e-6
    out[out.numel() // 2] = float("inf")
    assert bool(kernels.unpack_unscale(out, masters, 1.0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_copy_cast_resnet50(dtype):
    src = [torch.randn(s, device="cuda") for s in _shapes("resnet50")]
    dst = [torch.full(s, float("nan"), device="cuda", dtype=dtype) for s in _shapes("resnet50")]
    kernels.copy_cast(src, dst)
    assert all(torch.equal(d, s.to(dtype)) for s, d in zip(src, dst))


@pytest.mark.parametrize("kind", ["odd", "resnet50"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_lars_matches_reference_and_is_deterministic(kind, channels_last):
    g = torch.Generator(device="cuda").manual_seed(1)
    shapes = _shapes(kind)
    w0 = [torch.randn(s, generator=g, device="cuda") for s in shapes]
    grads = [torch.randn(s, generator=g, device="cuda") * 1e-2 for s in shapes]
    if channels_last:  # the 4-D tensors of a channels_last model: walked in storage order by the kernel
        w0, grads = ([t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in ts]
                     for ts in (w0, grads))
    excluded = [len(s) <= 1 for s in shapes]
    hp = dict(lr=2.0, momentum=0.9, weight_decay=5e-4, trust_coefficient=0.001, eps=1e-9, nesterov=False, clip=False)
    from fastnet.optim.lars import lars

    ref_w, ref_b = [w.double() for w in w0], [None] * len(w0)
    for _ in range(2):
        lars(ref_w, [x.double() for x in grads], ref_b, excluded, foreach=False, **hp)
    outs = []
    for _ in range(2):
        ws, bufs = [w.clone() for w in w0], [torch.zeros_like(w) for w in w0]
        copies = [torch.full_like(w, float("nan"), dtype=torch.float16) for w in w0]
        for _ in range(2):
            kernels.lars_step(ws, grads, bufs, excluded, model_copies=copies, **hp)
        outs.append(torch.cat([w.reshape(-1) for w in ws]))
        assert max(_rel(w, r) for w, r in zip(ws, ref_w)) < 1e-5
        assert all(torch.equal(c, w.half()) for c, w in zip(copies, ws))
    assert torch.equal(outs[0], outs[1])  # same bits every run
