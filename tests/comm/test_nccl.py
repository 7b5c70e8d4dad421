"""The CuPy-NCCL communicator: errors and id handling on CPU; the protocol on one GPU (`pytest -m gpu`)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from fastnet.comm.communicators.nccl import NcclCommunicator, decode_unique_id, encode_unique_id, unique_id_bytes, unique_id_for_cupy


def test_unique_id_round_trip_and_errors():
    raw = bytes(range(64, 192))  # CuPy >= 14 returns bytes
    signed = tuple(b - 256 if b > 127 else b for b in raw)  # CuPy 13: signed chars
    assert decode_unique_id(encode_unique_id(raw)) == raw
    assert decode_unique_id(encode_unique_id(signed)) == raw
    assert unique_id_for_cupy(raw, "14.2.0") == raw and unique_id_for_cupy(signed, "14.0.0rc1") == raw
    assert unique_id_for_cupy(raw, "13.6.0") == signed and unique_id_for_cupy(list(raw), "13.0.0") == signed
    with pytest.raises(ValueError, match="bytes"):
        unique_id_bytes([300] * 128)
    with pytest.raises(ValueError, match="an NCCL unique id has 128 bytes, got 3"):
        encode_unique_id((1, 2, 3))
    with pytest.raises(ValueError, match="got 2"):
        decode_unique_id("[1, 2]")


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed here")
def test_missing_cupy_names_the_extra():
    with pytest.raises(RuntimeError, match=r"pip install 'fastnet\[gpu\]'"):
        NcclCommunicator(0, 1, tuple(range(128)))


@pytest.mark.gpu
def test_protocol_on_one_gpu():
    import torch.distributed as dist

    from fastnet.comm import AlgorithmAllReduce, GradientSynchronizer
    from fastnet.comm.algorithms import ring_all_reduce
    from fastnet.comm.planning.hierarchy import Hierarchy

    comm = NcclCommunicator.from_store(dist.HashStore(), 0, 1, timeout_s=30)
    dev = comm.device
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.int64):
        x = torch.arange(1, 1001, device=dev).to(dtype)
        ref = x.clone()
        comm.all_reduce(x)
        work = comm.all_reduce(x, op="max", async_op=True)
        work.wait()
        assert torch.equal(x, ref), dtype
    out = torch.empty(7, device=dev)
    comm.all_gather(out, torch.arange(7.0, device=dev))
    comm.reduce_scatter(out, torch.arange(7.0, device=dev).mul(2).contiguous())
    assert torch.equal(out, torch.arange(7.0, device=dev) * 2)
    send, recv = torch.arange(5.0, device=dev), torch.zeros(5, device=dev)
    works = [comm.irecv(recv, 0), comm.isend(send, 0)]  # to itself, one NCCL group
    for w in works:
        w.wait()
    assert torch.equal(recv, send)
    comm.reduce(recv, dst=0)
    comm.broadcast(recv, src=0)
    comm.barrier()
    assert torch.equal(recv, send)
    sub = comm.split(0, 0)
    assert sub.size == 1 and sub.rank == 0 and comm.split(None) is None
    ring_all_reduce(comm, recv)
    Hierarchy(comm, 1).all_reduce(recv, "leader")
    assert torch.equal(recv, send)
    AlgorithmAllReduce(comm, "ring")([recv])
    model = torch.nn.Linear(4, 3).to(dev)
    sync = GradientSynchronizer(comm, model.parameters(), algorithm="ring")
    model(torch.ones(2, 4, device=dev)).sum().backward()
    sync.synchronize()
    assert torch.equal(model.bias.grad, torch.full((3,), 2.0, device=dev))
    with pytest.raises(TypeError, match="contiguous tensors on cuda"):
        comm.all_reduce(torch.ones(3))
    with pytest.raises(TypeError, match="NCCL has no type for torch.complex64"):
        comm.all_reduce(torch.ones(3, dtype=torch.complex64, device=dev))
    comm.synchronize()
    comm.close()
