"""GradientSynchronizer's DDP-grade semantics in real processes (gloo), plain DDP as the oracle.

Unused parameters (on one rank, on every rank, ``p.grad = None`` between steps, tied weights,
fp32/amp/fp16/bf16), unused parameters never blocking later buckets, nodes from host identities in
any placement, and cross-rank consistency checks that turn a would-be hang into an error.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from fastnet.comm import GradientSynchronizer
from fastnet.comm.communicators.torchdist import TorchCommunicator
from fastnet.comm.planning.cost_model import CostModel, Link
from fastnet.comm.gradients.reducer import BucketReducer
from fastnet.comm.planning.hierarchy import Hierarchy
from fastnet.precision import Precision
from tests.conftest import init_gloo, spawn_ranks

STEPS, MICRO = 5, 2
FP32_TOL = 1e-6  # vs DDP after STEPS steps (declared once)


class Branchy(nn.Module):
    """``branch`` is used on rank 0 only (in the first micro-step of each step), ``never`` on no rank;
    ``proj_out`` shares its weight with ``proj_in`` (tied); ``tail`` is the last registered parameter,
    so it sits in bucket 0 (buckets run in reverse registration order) and is unused on rank 1."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(6, 8)
        self.branch = nn.Linear(8, 8)
        self.never = nn.Linear(8, 8)
        self.proj_in = nn.Linear(8, 8, bias=False)
        self.proj_out = nn.Linear(8, 8, bias=False)
        self.proj_out.weight = self.proj_in.weight
        self.head = nn.Linear(8, 4)
        self.tail = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, use_branch: bool, use_tail: bool) -> torch.Tensor:
        h = torch.relu(self.trunk(x))
        if use_branch:
            h = h + torch.relu(self.branch(h))
        h = self.proj_out(torch.tanh(self.proj_in(h)))
        out = self.head(h)
        return self.tail(out) if use_tail else out


def _data(rank: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(100 + rank)
    return [[(torch.randn(5, 6, generator=g), torch.randint(0, 4, (5,), generator=g)) for _ in range(MICRO)]
            for _ in range(STEPS)]


def _run(model, opt, rank, data, *, sync=None, ddp=None, zero="none", precision=None) -> None:
    """STEPS optimizer steps of MICRO micro-steps; ``branch`` on rank 0 in micro-step 0 only, ``tail``
    on rank 0 only. ``zero``: ``none`` (optimizer.zero_grad(set_to_none=True)) or ``views``."""
    net = ddp.module if ddp is not None else model
    for step in data:
        for m, (x, y) in enumerate(step):
            last = m == MICRO - 1
            ctx = (ddp.no_sync() if ddp is not None else sync.no_sync()) if not last else contextlib.nullcontext()
            fwd = ddp if ddp is not None else net
            with ctx:
                x_in = precision.cast_input(x) if precision else x
                with precision.autocast() if precision else contextlib.nullcontext():
                    logits = fwd(x_in, rank == 0 and m == 0, rank == 0)
                loss = nn.functional.cross_entropy(logits.float(), y) / MICRO
                if last and sync is not None:
                    sync.prepare_for_backward(loss)
                if precision is not None:
                    precision.backward(loss)
                else:
                    loss.backward()
        if sync is not None:
            sync.synchronize()
        if precision is not None:
            precision.step(opt, skip=sync.unused_parameters)
            precision.zero_grad(opt)
        else:
            opt.step()
            if zero == "views":
                sync.zero_grad()
            else:
                opt.zero_grad(set_to_none=True)


def _bitwise_same(model: nn.Module, world: int) -> bool:
    flat = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], t) for t in gathered)


def _semantics_worker(rank: int, world: int, port: int, queue) -> None:
    init_gloo(rank, world, port)
    try:
        comm = TorchCommunicator()
        data = _data(rank)
        torch.manual_seed(0)
        init = Branchy()
        ref = Branchy()
        ref.load_state_dict(init.state_dict())
        ddp = DDP(ref, find_unused_parameters=True)
        opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
        _run(ref, opt, rank, data, ddp=ddp)
        out = {}
        for alg, overlap, zero, find_unused in (("ring", True, "none", False), ("native", True, "views", False),
                                                ("ring", False, "none", False), ("native", True, "none", True)):
            model = Branchy()
            model.load_state_dict(init.state_dict())
            sync = GradientSynchronizer(comm, model.parameters(), algorithm=alg, fusion_threshold_bytes=300,
                                        overlap=overlap, timeout_s=60, find_unused_parameters=find_unused)
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
            _run(model, opt, rank, data, sync=sync, zero=zero)
            err = max((a - b).abs().max().item() for a, b in zip(model.parameters(), ref.parameters()))
            out[f"fp32/{alg}/overlap={overlap}/zero={zero}/find_unused={find_unused}"] = {
                "err": err, "bitwise": _bitwise_same(model, world),
                "never_skipped": all(torch.equal(a, b) for a, b in zip(model.never.parameters(),
                                                                        init.never.parameters())),
                "branch_moved": not torch.equal(model.branch.weight, init.branch.weight),
                "unused": len(sync.unused_parameters), "buckets": len(sync.buckets)}
            sync.close()
        model = Branchy()  # amp: autocast + GradScaler over the FP32 model, p.grad = None between steps
        model.load_state_dict(init.state_dict())
        precision = Precision("amp", torch.device("cpu"))
        sync = GradientSynchronizer(comm, model.parameters(), algorithm="ring", fusion_threshold_bytes=300, timeout_s=60)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
        _run(model, opt, rank, data, sync=sync, precision=precision)
        out["amp"] = {"err": 0.0, "bitwise": _bitwise_same(model, world),
                      "never_skipped": all(torch.equal(a, b) for a, b in zip(model.never.parameters(),
                                                                              init.never.parameters())),
                      "branch_moved": not torch.equal(model.branch.weight, init.branch.weight),
                      "unused": len(sync.unused_parameters), "buckets": len(sync.buckets)}
        sync.close()
        for name in ("fp16", "bf16"):
            model = Branchy()
            model.load_state_dict(init.state_dict())
            precision = Precision(name, torch.device("cpu"))
            model = precision.prepare(model)
            sync = GradientSynchronizer(comm, model.parameters(), algorithm="ring", fusion_threshold_bytes=200,
                                        wire_dtype=name, storage=precision.masters.grad_location, timeout_s=60)
            opt = torch.optim.SGD(precision.optimizer_params([{"params": list(model.parameters())}]), lr=0.1,
                                  momentum=0.9, weight_decay=0.01)
            _run(model, opt, rank, data, sync=sync, precision=precision)
            masters = precision.masters
            dtype = precision.masters.dtype
            never = [masters.master_of(p) for p in model.never.parameters()]
            out[name] = {"err": 0.0, "bitwise": _bitwise_same(model, world)
                         and _bitwise_same(nn.ParameterList(masters.master_params), world),
                         "never_skipped": all(torch.equal(m, p.to(dtype).float())
                                              for m, p in zip(never, init.never.parameters())),
                         "branch_moved": not torch.equal(masters.master_of(model.branch.weight),
                                                         init.branch.weight.to(dtype).float()),
                         "unused": len(sync.unused_parameters), "buckets": len(sync.buckets)}
            sync.close()
        queue.put((rank, out))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_unused_parameters_agree_across_ranks_and_match_ddp(world):
    """A branch used on one rank only, a parameter no rank uses, ``p.grad = None`` between steps,
    tied weights, accumulation: bitwise equal across ranks, DDP(find_unused_parameters=True)'s
    parameters within 1e-6 (fp32), and the unused-everywhere parameter skipped on every rank."""
    results = dict(spawn_ranks(_semantics_worker, world))
    for key, r in results[0].items():
        assert r["bitwise"], key
        assert r["never_skipped"] and r["unused"] == 2, (key, r)  # never.weight and never.bias
        assert r["branch_moved"], key  # used on rank 0 only, updated everywhere (bitwise above)
        assert r["buckets"] > 2, key
        if key.startswith("fp32"):
            assert r["err"] <= FP32_TOL, (key, r["err"])
    for rank in range(1, world):
        assert results[rank].keys() == results[0].keys()


def _overlap_worker(rank: int, world: int, port: int, queue) -> None:
    init_gloo(rank, world, port)
    try:
        comm = TorchCommunicator()
        out = {}
        for find_unused in (False, True):
            torch.manual_seed(0)
            model = Branchy()
            sync = GradientSynchronizer(comm, model.parameters(), algorithm="ring", fusion_threshold_bytes=300,
                                        timeout_s=60, find_unused_parameters=find_unused)
            assert any(p is model.tail.bias for p in sync.buckets[0].params)
            seen = {}

            def last_grad(_p, sync=sync, seen=seen):  # trunk's: the last gradients of backward
                seen["launched"] = [b.future is not None for b in sync.buckets]

            for p in model.trunk.parameters():
                p.register_post_accumulate_grad_hook(last_grad)
            x, y = torch.randn(5, 6), torch.randint(0, 4, (5,))
            loss = nn.functional.cross_entropy(model(x, False, use_tail=False), y)  # tail unused on every rank
            sync.prepare_for_backward(loss)
            loss.backward()
            out[find_unused] = {"at_last_grad": seen["launched"],
                                "before_sync": [b.future is not None for b in sync.buckets]}
            sync.synchronize()
            out[find_unused]["stats"] = dict(sync.last_step)
            sync.close()
        queue.put((rank, out))
    finally:
        dist.destroy_process_group()


def test_unused_parameter_in_the_first_bucket_does_not_block_later_buckets():
    for _, out in spawn_ranks(_overlap_worker, 2):
        for find_unused, r in out.items():
            n = r["stats"]["buckets"]
            assert all(r["before_sync"]), r  # every bucket launched before synchronize()
            assert r["stats"]["launched_before_synchronize"] == n
        # With the graph walk, bucket 0 (holding the unused tail) is launched during backward, before
        # its last gradient; without it, at the end of backward.
        assert out[True]["at_last_grad"][0] and not out[False]["at_last_grad"][0]


def _hosts_worker(rank: int, world: int, port: int, queue) -> None:
    init_gloo(rank, world, port)
    try:
        comm = TorchCommunicator()
        host = "node-a" if rank % 2 == 0 else "node-b"  # round-robin placement: ranks 0,2 | 1,3
        out = {}
        hier = Hierarchy(comm, None, host_id=host)
        t = hier.topology
        out["topology"] = (t.node, t.local_rank, t.local_size, t.num_nodes, t.uniform)
        out["intra"] = [hier.intra.global_rank(r) for r in range(hier.intra.size)]
        out["inter"] = [hier.inter.global_rank(r) for r in range(hier.inter.size)]
        for alg in ("hierarchical", "hierarchical_p2p", "leader", "leader_p2p", "hybrid"):
            try:
                reducer = BucketReducer(comm, alg, host_id=host)
            except ValueError as exc:
                out[alg] = str(exc)
                continue
            x = torch.arange(37, dtype=torch.float32) * (rank + 1)  # integer values: exact sums
            reducer.sum_(x)
            expected = torch.arange(37, dtype=torch.float32) * sum(r + 1 for r in range(world))
            out[alg] = (torch.equal(x, expected), reducer.algorithm_for(1 << 20))
        queue.put((rank, out))
    finally:
        dist.destroy_process_group()


def test_nodes_come_from_hosts_in_any_rank_placement():
    results = dict(spawn_ranks(_hosts_worker, 4))
    assert results[0]["intra"] == [0, 2] and results[1]["intra"] == [1, 3]  # not rank // 2
    assert results[0]["inter"] == [0, 1] and results[2]["inter"] == [2, 3]
    assert results[3]["topology"] == (1, 1, 2, 2, True)
    for r in range(4):
        for alg in ("hierarchical", "hierarchical_p2p", "leader", "leader_p2p", "hybrid"):
            assert results[r][alg][0], (r, alg)


def test_unequal_hosts_refuse_hierarchical_and_run_leader():
    results = dict(spawn_ranks(_hosts_worker, 3))  # node-a: ranks 0, 2; node-b: rank 1
    for r in range(3):
        for alg in ("hierarchical", "hierarchical_p2p"):
            assert "ranks per host: node-a: ranks [0, 2]; node-b: ranks [1]" in results[r][alg]
        assert results[r]["leader"][0] and results[r]["leader_p2p"][0]
        ok, choice = results[r]["hybrid"]
        assert ok and not choice.startswith("hierarchical")
    assert results[1]["topology"] == (1, 0, 1, 2, False)


def _mismatch_worker(rank: int, world: int, port: int, queue) -> None:
    import time

    init_gloo(rank, world, port, timeout_s=30)
    comm = TorchCommunicator()
    msgs = {}
    # 1) another cost-model file on the last rank: hybrid would choose other algorithms and hang
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    fast_inter = CostModel(inter=Link.of(1.0, 100.0)) if rank == world - 1 else CostModel()  # another file
    t0 = time.monotonic()
    try:
        GradientSynchronizer(comm, model.parameters(), algorithm="hybrid", cost_model=fast_inter, ranks_per_node=1)
    except ValueError as exc:
        msgs["cost_model"] = (str(exc), time.monotonic() - t0)
    # 2) one rank built another model
    other = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8 + (rank == 1)))
    try:
        GradientSynchronizer(comm, other.parameters())
    except ValueError as exc:
        msgs["model"] = str(exc)
    # 3) debug mode: a rank whose bucket plan was changed after construction (ring vs native would hang)
    sync = GradientSynchronizer(comm, model.parameters(), algorithm="ring", debug=True, timeout_s=20)
    if rank == 1:
        sync.buckets[0].algorithm = "native"
    model(torch.ones(2, 64)).sum().backward()
    try:
        sync.synchronize()
    except RuntimeError as exc:
        msgs["debug"] = str(exc)
    queue.put((rank, msgs))
    queue.close()
    queue.join_thread()
    os._exit(0)


@pytest.mark.parametrize("world", [2, 3])
def test_mismatches_are_errors_naming_the_item_not_hangs(world):
    results = dict(spawn_ranks(_mismatch_worker, world, timeout=120))
    for rank in range(world):
        msg, waited = results[rank]["cost_model"]
        assert "ranks disagree on cost model" in msg and f"rank {world - 1}:" in msg, msg
        assert waited < 20
        assert "ranks disagree on parameter 2: rank 0: (8, 64) float32; rank 1: (9, 64) float32" in results[rank]["model"]
        assert "GradientSynchronizer (debug): ranks disagree on launched bucket" in results[rank]["debug"]
        assert "ring" in results[rank]["debug"] and "native" in results[rank]["debug"]


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


def _order_worker(rank: int, world: int, port: int, queue) -> None:
    init_gloo(rank, world, port)
    try:
        torch.manual_seed(0)
        model = ConvBN()
        precision = Precision("fp16", torch.device("cpu"), loss_scaling=False)
        model = precision.prepare(model)
        sync = GradientSynchronizer(TorchCommunicator(), model.parameters(), algorithm="ring", wire_dtype="fp16",
                                    fusion_threshold_bytes=600, storage=precision.masters.grad_location,
                                    timeout_s=60, rebuild_buckets=False)  # the order alone (rebuild: below)
        fp32 = [b.index for b in sync.buckets if b.tensor.dtype == torch.float32]
        steps = []
        g = torch.Generator().manual_seed(rank)
        for _ in range(3):
            x, y = torch.randn(4, 3, 4, 4, generator=g), torch.randint(0, 5, (4,), generator=g)
            precision.backward(nn.functional.cross_entropy(model(x.half()).float(), y))
            sync.synchronize()
            steps.append((dict(sync.last_step), list(sync.launch_order)))
            precision.masters.zero_grad()
        queue.put((rank, fp32, len(sync.buckets), steps))
        sync.close()
    finally:
        dist.destroy_process_group()


def test_launch_order_follows_rank0s_completion_order_after_the_first_step():
    """FP16 masters: the FP32 BatchNorm bucket completes only near the end of backward. In the first
    step (index order) it holds back the FP16 buckets behind it; from the second step on, the
    launch order is rank 0's completion order, the same on every rank, and every bucket launches
    the moment it is complete."""
    results = {r[0]: r[1:] for r in spawn_ranks(_order_worker, 2)}
    fp32, nbuckets, steps = results[0]
    assert len(fp32) == 1 and nbuckets >= 4
    first, later = steps[0][0], steps[1:]
    assert any(l > c for l, c in zip(first["launched_at"], first["completed_at"]))  # held back
    for step, order in later:
        assert sorted(order) == list(range(nbuckets)) and order != list(range(nbuckets))
        assert order.index(fp32[0]) >= nbuckets - 2  # the BN bucket completes with the first layers
        assert step["launched_at"] == step["completed_at"]  # launched as soon as complete
    assert [s[1] for s in results[1][2]] == [s[1] for s in steps]  # rank 1 adopted rank 0's order
