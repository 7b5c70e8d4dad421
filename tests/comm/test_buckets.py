"""plan_buckets (MG-WFBP's merge rule) by hand and as properties; GradientSynchronizer's rebuild of
its buckets from rank 0's measured ready times, in real processes, with plain DDP as the oracle."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.parallel import DistributedDataParallel as DDP

from fastnet.comm import GradientSynchronizer
from fastnet.comm.planning.buckets import plan_buckets
from fastnet.comm.communicators.torchdist import TorchCommunicator
from fastnet.precision import Precision
from tests.conftest import init_gloo, spawn_ranks


def test_merges_while_the_link_is_busy_by_hand():
    # four 1-byte gradients ready at 0, 1, 2, 3 s
    fast = plan_buckets([0, 1, 2, 3], [1] * 4, max_bytes=100, latency_s=0.0, bytes_per_s=1.0)
    assert fast == [(0, 1), (1, 2), (2, 3), (3, 4)]  # each sent before the next is ready
    # 2 s per byte: bucket 0 occupies the link until 2 s, so 1 and 2 wait anyway and merge
    # ([1, 2] starts at 2 s, ends at 6 s), then 3 is ready while the link is busy: last bucket
    slow = plan_buckets([0, 1, 2, 3], [1] * 4, max_bytes=100, latency_s=0.0, bytes_per_s=0.5)
    assert slow == [(0, 1), (1, 3), (3, 4)]
    # a latency longer than the gaps merges everything; max_bytes caps it
    assert plan_buckets([0, 1, 2, 3], [1] * 4, max_bytes=100, latency_s=5.0, bytes_per_s=1.0) == [(0, 4)]
    assert plan_buckets([0, 1, 2, 3], [1] * 4, max_bytes=2, latency_s=5.0, bytes_per_s=1.0) == [(0, 2), (2, 4)]
    assert plan_buckets([0, 1, 2, 3], [5, 1, 1, 1], max_bytes=2, latency_s=5.0, bytes_per_s=1.0) == [(0, 1), (1, 3),
                                                                                                      (3, 4)]
    # min_bytes: no bucket below it but the last
    assert plan_buckets([0, 1, 2, 3], [1] * 4, max_bytes=100, latency_s=0.0, bytes_per_s=1.0,
                        min_bytes=3) == [(0, 3), (3, 4)]
    assert plan_buckets([], [], max_bytes=1, latency_s=0.0, bytes_per_s=1.0) == []


def test_plan_buckets_rejects_bad_input():
    with pytest.raises(ValueError, match="3 ready times but 2 sizes"):
        plan_buckets([0, 1, 2], [1, 1], max_bytes=1, latency_s=0.0, bytes_per_s=1.0)
    for bad in ({"max_bytes": 0}, {"bytes_per_s": 0.0}, {"latency_s": -1.0}, {"min_bytes": -1}):
        kwargs = {"max_bytes": 1, "latency_s": 0.0, "bytes_per_s": 1.0, **bad}
        with pytest.raises(ValueError, match=f"{next(iter(bad))}={next(iter(bad.values()))}"):
            plan_buckets([0.0], [1], **kwargs)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 10), st.integers(1, 50)), max_size=40), st.integers(1, 120),
       st.floats(0, 2), st.floats(0.1, 100), st.integers(0, 80))
def test_plan_covers_in_order_within_the_bounds(grads, max_bytes, latency, rate, min_bytes):
    ready, sizes = [g[0] for g in grads], [g[1] for g in grads]
    plan = plan_buckets(ready, sizes, max_bytes=max_bytes, latency_s=latency, bytes_per_s=rate, min_bytes=min_bytes)
    assert [i for a, b in plan for i in range(a, b)] == list(range(len(grads)))  # every gradient once, in order
    for k, (a, b) in enumerate(plan):
        total = sum(sizes[a:b])
        assert b - a == 1 or total <= max_bytes  # only a single oversized gradient exceeds the cap
        if k + 1 < len(plan):  # below min_bytes only where the next gradient would break the cap
            assert total >= min_bytes or total + sizes[b] > max_bytes


class Sleep(torch.autograd.Function):
    """Identity whose backward sleeps ``s`` seconds: a slow layer between two fast ones."""

    @staticmethod
    def forward(ctx, x, s):
        ctx.s = s
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        time.sleep(ctx.s)
        return g, None


class Stages(nn.Module):
    """Five Linear stages with a 0.3 s backward pause after some of them. Registered in reverse of
    their use (``stages[0]`` runs last), so production order differs from registration order."""

    def __init__(self, pauses: tuple[int, ...]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(nn.Linear(16, 16) for _ in range(5))
        self.pauses = pauses

    def forward(self, x):
        for i in reversed(range(5)):
            x = torch.tanh(self.stages[i](x))
            if i in self.pauses:  # backward reaches stage i's weights, then pauses before stage i + 1
                x = Sleep.apply(x, 0.3)
        return x.sum(dim=1)


def _rebuild_worker(rank: int, world: int, port: int, queue) -> None:
    init_gloo(rank, world, port)
    try:
        g = torch.Generator().manual_seed(rank)
        data = [torch.randn(4, 16, generator=g) for _ in range(4)]
        # rank 1 pauses elsewhere: its own times would give another plan; rank 0's is adopted
        pauses = (1, 3) if rank == 0 else (2,)
        torch.manual_seed(0)
        model = Stages(pauses)
        sync = GradientSynchronizer(TorchCommunicator(), model.parameters(), algorithm="ring",
                                    fusion_threshold_bytes=1 << 20, min_bucket_bytes=0, timeout_s=60)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        torch.manual_seed(0)
        oracle = DDP(Stages(pauses))
        opt_o = torch.optim.SGD(oracle.parameters(), lr=0.1, momentum=0.9)
        plans, rebuilt = [], []
        for x in data:
            with sync.no_sync():  # accumulation across the rebuild too
                model(x[:2]).sum().backward()
            model(x[2:]).sum().backward()
            sync.synchronize()
            opt.step()
            sync.zero_grad()
            with oracle.no_sync():
                oracle(x[:2]).sum().backward()
            oracle(x[2:]).sum().backward()
            opt_o.step()
            opt_o.zero_grad()
            plans.append([[_name(model, p) for p in b.params] for b in sync.buckets])
            rebuilt.append(sync.rebuilt)
        diff = max((p - q).abs().max().item() for p, q in zip(model.parameters(), oracle.module.parameters()))
        params = list(model.parameters())
        own = sync.measured_plan()
        other = sync.measured_plan(ready_s=[float(i) for i in range(len(params))])  # another profile's times
        index = {id(p): i for i, p in enumerate(params)}
        members = [[index[id(p)] for p in b.params] for b in sync.buckets]
        try:
            sync.measured_plan(ready_s=[0.0])
            bad = "accepted"
        except ValueError as exc:
            bad = str(exc)
        # a resumed run adopts the saved plan and does not re-cut from its own timing (pauses swapped)
        torch.manual_seed(0)
        again = Stages((2,) if rank == 0 else (1, 3))
        sync2 = GradientSynchronizer(TorchCommunicator(), again.parameters(), algorithm="ring",
                                     fusion_threshold_bytes=1 << 20, min_bucket_bytes=0, timeout_s=60)
        loaded = sync2.load_plan_state(sync.plan_state())
        for x in data[:3]:
            again(x).sum().backward()
            sync2.synchronize()
            sync2.zero_grad()
        restored = ([[_name(again, p) for p in b.params] for b in sync2.buckets], list(sync2.launch_order),
                    loaded and sync2.rebuilt)
        try:
            sync2.load_plan_state({"buckets": [[0]], "launch_order": [0]})
            bad_plan = "accepted"
        except ValueError as exc:
            bad_plan = str(exc)
        sync2.close()
        queue.put((rank, plans, rebuilt, list(sync.launch_order), diff, own, other, members, [p.numel() for p in params], bad,
                   restored, bad_plan))
        sync.close()
    finally:
        dist.destroy_process_group()


def _name(model: nn.Module, p: torch.Tensor) -> str:
    return next(n for n, q in model.named_parameters() if q is p)


def test_rebuild_adopts_rank0s_ready_times_and_matches_ddp():
    """After step 2, the buckets are re-cut where rank 0's backward paused (before stage 1's and
    stage 3's gradients; rank 1 paused elsewhere), with the members in production order (stage 0
    first: registered first but used last in forward); every rank holds the same plan, and the
    parameters stay DDP's through the rebuild, with accumulation."""
    out = {r[0]: r[1:] for r in spawn_ranks(_rebuild_worker, 2)}
    plans, rebuilt, order, diff, own, other, members, numels, bad, restored, bad_plan = out[0]
    assert rebuilt == [False, True, True, True]
    assert out[1][0] == plans and out[1][2] == order  # the same plan on every rank
    assert len(plans[0]) == 1  # 1 MiB threshold: one bucket before the rebuild
    after = plans[-1]
    produced = [n for b in after for n in b]
    assert [int(n.split(".")[1]) for n in produced] == sorted(int(n.split(".")[1]) for n in produced)
    bucket_of = {n: k for k, b in enumerate(after) for n in b}
    for paused in (1, 3):  # rank 0's pauses cut the plan; rank 1's (before stage 2) need not
        assert bucket_of[f"stages.{paused - 1}.weight"] != bucket_of[f"stages.{paused}.weight"], after
    assert order == list(range(len(after))) and len(after) >= 3
    assert diff <= 1e-6 and out[1][3] <= 1e-6
    # measured_plan: a bucket is ready with its last gradient; another profile's times replace this step's
    assert len(own["ready_s"]) == sum(map(len, members)) and own["launch_order"] == order
    assert [r for _, r, _ in own["buckets"]] == [max(own["ready_s"][i] for i in m) for m in members]
    assert own["backward_s"] == max(own["ready_s"]) > 0  # the pauses of rank 0's backward are in it
    assert [(n, r, a) for n, r, a in other["buckets"]] == [(n, float(max(m)), a)
                                                           for (n, _, a), m in zip(own["buckets"], members)]
    assert [n for n, _, _ in own["buckets"]] == [4 * sum(numels[i] for i in m) for m in members]  # fp32 wire
    assert "ready_s has 1 entries" in bad
    # plan_state / load_plan_state (the checkpoint's bucket plan): the same buckets after 3 more steps
    assert restored == (plans[-1], order, True) and out[1][9] == restored
    assert "does not fit these" in bad_plan  # one bucket of parameter 0 only


def _storage_worker(rank: int, world: int, port: int, queue) -> None:
    init_gloo(rank, world, port)
    try:
        results = {}
        for rebuild in (False, True):
            torch.manual_seed(0)
            precision = Precision("fp16", torch.device("cpu"), loss_scaling=False)
            model = precision.prepare(Stages((1, 3)))
            sync = GradientSynchronizer(TorchCommunicator(), model.parameters(), algorithm="native",
                                        fusion_threshold_bytes=1 << 20, min_bucket_bytes=0, timeout_s=60,
                                        storage=precision.masters.grad_location, rebuild_buckets=rebuild)
            flats = precision.masters.grad_buffers()
            g = torch.Generator().manual_seed(rank)
            for _ in range(4):
                x = torch.randn(4, 16, generator=g).half()
                precision.backward(model(x).float().sum())
                sync.synchronize()
                inside = all(any(f.data_ptr() <= b.tensor.data_ptr() < f.data_ptr() + f.numel() * f.element_size()
                                 for f in flats) for b in sync.buckets)
                grads = torch.cat([f.float().clone() for f in flats])
                precision.masters.zero_grad()
            results[rebuild] = (len(sync.buckets), sync.rebuilt, inside, grads)
            if rebuild:  # the saved plan restores the same slices on fresh masters
                torch.manual_seed(0)
                precision2 = Precision("fp16", torch.device("cpu"), loss_scaling=False)
                model2 = precision2.prepare(Stages((1, 3)))
                sync2 = GradientSynchronizer(TorchCommunicator(), model2.parameters(), algorithm="native",
                                             fusion_threshold_bytes=1 << 20, min_bucket_bytes=0, timeout_s=60,
                                             storage=precision2.masters.grad_location)
                sync2.load_plan_state(sync.plan_state())

                def where(buckets, buffers):  # (flat buffer, element offset, elements) of each bucket
                    return [next((i, (b.tensor.data_ptr() - f.data_ptr()) // f.element_size(), b.tensor.numel())
                                 for i, f in enumerate(buffers)
                                 if f.data_ptr() <= b.tensor.data_ptr() < f.data_ptr() + f.numel() * f.element_size())
                            for b in buckets]

                same = (sync2.plan_state() == sync.plan_state() and sync2.describe() == sync.describe()
                        and where(sync2.buckets, precision2.masters.grad_buffers()) == where(sync.buckets, flats))
                results["restored"] = same
                sync2.close()
            sync.close()
        diff = (results[True][3] - results[False][3]).abs().max().item()
        queue.put((rank, results[False][:3], results[True][:3], diff, results["restored"]))
    finally:
        dist.destroy_process_group()


def test_rebuild_with_fp16_master_storage_keeps_slices_of_the_flat_buffers():
    """FP16 masters: the rebuilt buckets are still slices of the flat gradient buffers (no copy,
    layout order), more of them than the 1 MiB threshold gave, and the averaged gradients are the
    same bits as without the rebuild (2 ranks: a + b per element whatever the bucket)."""
    out = {r[0]: r[1:] for r in spawn_ranks(_storage_worker, 2)}
    for rank in (0, 1):
        (n_plain, rebuilt_plain, _), (n_rebuilt, rebuilt, inside), diff, restored = out[rank]
        assert not rebuilt_plain and rebuilt and inside and n_rebuilt > n_plain
        assert diff == 0.0
        assert restored  # load_plan_state: the same slices, at the same offsets, on fresh masters
