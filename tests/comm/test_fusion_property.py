"""Property tests of tensor fusion on 2 real ranks: hypothesis draws tensor lists (random shapes,
mixed dtypes), thresholds and algorithms; both ranks draw the same examples (derandomized, no
shrinking, so their collectives stay in step) and check the averages against the exact mean."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from tests.conftest import init_gloo, spawn_ranks

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}

tensor_specs = st.lists(st.tuples(st.lists(st.integers(0, 7), min_size=0, max_size=3), st.sampled_from(DTYPES)),
                        min_size=1, max_size=8)
same_on_every_rank = settings(max_examples=25, derandomize=True, database=None, deadline=None,
                              phases=[Phase.explicit, Phase.generate])


def _values(rank: int, i: int, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    # small integers / 4: exact in every dtype, and so are their means over 2 ranks
    g = torch.Generator().manual_seed(1000 * rank + i)
    return (torch.randint(-8, 9, shape, generator=g).float() / 4).to(dtype)


def _worker(rank: int, world: int, port: int, queue) -> None:
    init_gloo(rank, world, port)
    from fastnet.comm import AlgorithmAllReduce, GradientSynchronizer
    from fastnet.comm.communicators.torchdist import TorchCommunicator

    comm = TorchCommunicator()
    failures: list[str] = []

    def expected(i: int, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
        return sum(_values(r, i, shape, dtype).double() for r in range(world)) / world

    @same_on_every_rank
    @given(specs=tensor_specs, threshold=st.integers(1, 600), alg=st.sampled_from(["native", "ring", "leader"]),
           wire=st.sampled_from(["none", "fp16"]))
    def list_fusion(specs, threshold, alg, wire):
        grads = [_values(rank, i, s, d) for i, (s, d) in enumerate(specs)]
        AlgorithmAllReduce(comm, alg, threshold, wire, ranks_per_node=1)(grads)
        for i, ((s, d), g) in enumerate(zip(specs, grads)):
            if g.dtype != d or list(g.shape) != s or not torch.allclose(g.double(), expected(i, s, d), atol=TOL[d]):
                failures.append(f"AlgorithmAllReduce {alg} wire={wire} threshold={threshold} specs={specs}: tensor {i}")

    @same_on_every_rank
    @given(specs=tensor_specs, threshold=st.integers(1, 600), alg=st.sampled_from(["native", "ring", "hybrid"]),
           overlap=st.booleans())
    def synchronizer_fusion(specs, threshold, alg, overlap):
        params = nn.ParameterList([nn.Parameter(torch.zeros(s, dtype=d)) for s, d in specs])
        sync = GradientSynchronizer(comm, params.parameters(), algorithm=alg, fusion_threshold_bytes=threshold,
                                    overlap=overlap)
        loss = sum((p.float() * _values(rank, i, s, d).float()).sum() for i, (p, (s, d)) in enumerate(zip(params, specs)))
        loss.backward()  # grad of p = this rank's values
        sync.synchronize()
        sizes = sorted(b.tensor.numel() for b in sync.buckets)
        if sum(sizes) != sum(p.numel() for p in params):
            failures.append(f"synchronizer buckets do not cover the parameters: {specs}")
        for i, ((s, d), p) in enumerate(zip(specs, params)):
            if p.grad.dtype != d or not torch.allclose(p.grad.double(), expected(i, s, d), atol=TOL[d]):
                failures.append(f"GradientSynchronizer {alg} overlap={overlap} threshold={threshold} specs={specs}: "
                                f"tensor {i}")
        sync.close()

    try:
        list_fusion()
        synchronizer_fusion()
        queue.put((rank, failures))
    finally:
        dist.destroy_process_group()


def test_fusion_properties_on_two_ranks():
    for rank, failures in spawn_ranks(_worker, 2, timeout=600):
        assert not failures, failures[:5]
