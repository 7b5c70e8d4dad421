"""LARS on CUDA (run on the device machine: `pytest -m gpu`)."""

import pytest
import torch

from fastnet.optim import LARS

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_paths_match_cpu_reference(dtype):
    shapes = [(64, 3, 7, 7), (64,), (64,), (256, 64, 1, 1), (1000, 2048), (1000,), (1,)]
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=dtype) * 1e-2 for s in shapes] for _ in range(3)]
    results = {}
    for name, device, foreach in (("cpu_ref", "cpu", False), ("cuda_foreach", "cuda", True),
                                  ("cuda_ref", "cuda", False), ("cuda_default", "cuda", None)):
        params = [torch.nn.Parameter(t.clone().to(device)) for t in base]
        opt = LARS(params, lr=2.0, momentum=0.9, weight_decay=5e-4, trust_coefficient=0.001, nesterov=True,
                   foreach=foreach)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.to(device)
            opt.step()
        results[name] = [p.detach().cpu() for p in params]
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)
    for name in ("cuda_foreach", "cuda_ref", "cuda_default"):
        for a, b in zip(results[name], results["cpu_ref"]):
            torch.testing.assert_close(a, b, **tol)
