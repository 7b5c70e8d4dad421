"""The ``fastnet`` torch.distributed backend, in real processes (world sizes 2 and 3): an unmodified
DDP script and torch's FSDP (FSDP1 FULL_SHARD and FSDP2 fully_shard) end with the parameters gloo
gives them; direct collectives of every
dtype and odd lengths; delegated ops; a dead rank ends the others; bad settings fail clearly."""

from __future__ import annotations

import datetime
import functools
import os
import time

import pytest
import torch

from fastnet.comm.backend import BackendConfig
from tests.conftest import spawn_ranks


def _init(rank: int, world: int, port: int, env: dict[str, str], timeout_s: float = 60.0) -> None:
    import torch.distributed as dist

    env = dict(env)
    backend = env.pop("backend", "fastnet")  # or a per-device string, "cpu:fastnet"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **env)
    # the backend string is all a script changes: the entry point registers "fastnet" (no import)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(7, 33), torch.nn.BatchNorm1d(33), torch.nn.ReLU(),
                               torch.nn.Linear(33, 5))


def _train(model: torch.nn.Module, rank: int, steps: int = 4) -> torch.nn.Module:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    for _ in range(steps):
        x, y = torch.randn(6, 7, generator=g), torch.randint(0, 5, (6,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def _ddp_worker(rank: int, world: int, port: int, queue, env: dict[str, str]) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    _init(rank, world, port, env)
    try:
        backend = dist.get_backend()
        fast = _train(DDP(_model()), rank)  # the default group: "fastnet"
        routed = dict(dist.group.WORLD.routed)
        gloo_group = dist.new_group(backend="gloo")
        plain = _train(DDP(_model(), process_group=gloo_group), rank)
        a, b = _flat(fast.module), _flat(plain.module)
        gathered = [torch.empty_like(a) for _ in range(world)]
        dist.all_gather(gathered, a)  # delegated to the base backend
        queue.put((rank, backend, float((a - b).abs().max()), all(torch.equal(gathered[0], t) for t in gathered),
                   routed))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world,env", [
    (2, {"FASTNET_ALGORITHM": "ring"}),
    (3, {"FASTNET_ALGORITHM": "leader", "FASTNET_RANKS_PER_NODE": "2"}),  # nodes of 2 + 1
    # several buckets per DDP bucket; the per-device form of the backend string
    (3, {"FASTNET_ALGORITHM": "ring", "FASTNET_FUSION_MB": "0.0005", "backend": "cpu:fastnet"}),
])
def test_unmodified_ddp_script_matches_gloo(world, env):
    for rank, backend, diff, same, routed in spawn_ranks(functools.partial(_ddp_worker, env=env), world):
        assert backend == env.get("backend", "fastnet")
        assert routed.get("fastnet:all_reduce", 0) >= 4 and "base:all_reduce" not in routed, routed  # DDP's buckets
        assert diff <= 1e-6, (rank, diff)
        assert same, rank  # every rank ends with the same parameters


def _fp16_worker(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    _init(rank, world, port, {"FASTNET_WIRE_DTYPE": "fp16"})
    try:
        fast = _train(DDP(_model()), rank)
        plain = _train(DDP(_model(), process_group=dist.new_group(backend="gloo")), rank)
        queue.put((rank, float((_flat(fast.module) - _flat(plain.module)).abs().max())))
    finally:
        dist.destroy_process_group()


def test_fp16_wire_is_opt_in_and_close():
    for rank, diff in spawn_ranks(_fp16_worker, 2):
        assert 0 < diff < 1e-2, (rank, diff)  # lossy, as asked for, but close


def _fsdp_worker(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import FullStateDictConfig, ShardingStrategy, StateDictType

    _init(rank, world, port, {})
    try:
        gloo_group = dist.new_group(backend="gloo")
        out = []
        for group in (dist.group.WORLD, gloo_group):
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(7, 33), torch.nn.ReLU(), torch.nn.Linear(33, 5))
            fsdp = _train(FSDP(model, process_group=group, sharding_strategy=ShardingStrategy.FULL_SHARD,
                               use_orig_params=True, device_id=torch.device("cpu")), rank)
            if group is dist.group.WORLD:
                routed = dict(group.routed)
            cfg = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
            with FSDP.state_dict_type(fsdp, StateDictType.FULL_STATE_DICT, cfg):
                state = fsdp.state_dict()
            out.append(torch.cat([v.reshape(-1) for v in state.values()]))
        queue.put((rank, float((out[0] - out[1]).abs().max()), out[0].numel(), routed))
    finally:
        dist.destroy_process_group()


def test_fsdp_full_shard_matches_gloo():
    results = spawn_ranks(_fsdp_worker, 2)
    for rank, diff, numel, routed in results:
        assert numel == 7 * 33 + 33 + 33 * 5 + 5
        # FSDP's parameter all-gathers and gradient reduce-scatters went through fastnet's ring
        assert routed.get("fastnet:all_gather", 0) > 0 and routed.get("fastnet:reduce_scatter", 0) > 0, routed
        assert diff <= 1e-6, (rank, diff)


def _fsdp2_worker(rank: int, world: int, port: int, queue, backend: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    _init(rank, world, port, {"backend": backend})
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(7, 33), torch.nn.ReLU(), torch.nn.Linear(33, 5))
        fully_shard(model[0])
        fully_shard(model)  # FSDP2: DTensor parameters sharded over the default group
        _train(model, rank)
        # full_tensor(): the functional all-gather, through allgather_into_tensor_coalesced
        full = torch.cat([p.full_tensor().detach().reshape(-1) for p in model.parameters()])
        queue.put((rank, full.tolist(), dict(getattr(dist.group.WORLD, "routed", {}))))
    finally:
        dist.destroy_process_group()


def test_fsdp2_fully_shard_matches_gloo():
    want = {r: p for r, p, _ in spawn_ranks(functools.partial(_fsdp2_worker, backend="gloo"), 2)}
    for rank, params, routed in spawn_ranks(functools.partial(_fsdp2_worker, backend="fastnet"), 2):
        assert len(params) == 7 * 33 + 33 + 33 * 5 + 5
        assert max(abs(a - b) for a, b in zip(params, want[rank])) <= 1e-6, rank
        assert all(routed.get(f"fastnet:{op}", 0) > 0 for op in ("all_gather", "reduce_scatter",
                                                                 "all_gather_coalesced")), routed


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64, torch.uint8]
LENGTHS = [0, 1, 7, 1001]


def _value(rank: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    return ((torch.arange(n) * (rank + 2)) % 5 + rank).to(dtype)  # exact in every dtype, rank-dependent


def _collectives_worker(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist

    _init(rank, world, port, {"FASTNET_FUSION_MB": "0.001"})  # 1001 fp32 elements: several buckets
    try:
        out: dict = {}
        ops = {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.AVG, "max": dist.ReduceOp.MAX,
               "min": dist.ReduceOp.MIN, "product": dist.ReduceOp.PRODUCT}
        for dtype in DTYPES:
            for n in LENGTHS:
                for name, op in ops.items():
                    if name == "avg" and not dtype.is_floating_point:
                        continue
                    if dtype == torch.uint8 and name in ("sum", "product"):
                        continue  # wraps around; not what this test is about
                    x = _value(rank, n, dtype)
                    dist.all_reduce(x, op=op)
                    out[("all_reduce", str(dtype), n, name)] = x.double().tolist()
                if n:
                    rs = torch.empty(n, dtype=dtype)
                    dist.reduce_scatter_tensor(rs, _value(rank, n * world, dtype))
                    out[("reduce_scatter", str(dtype), n)] = rs.double().tolist()
                ag = torch.empty(n * world, dtype=dtype)
                dist.all_gather_into_tensor(ag, _value(rank, n, dtype))
                out[("all_gather", str(dtype), n)] = ag.double().tolist()
                b = _value(rank, n, dtype)
                dist.broadcast(b, src=world - 1)
                out[("broadcast", str(dtype), n)] = b.double().tolist()
        # coalesced (torch's _coalescing_manager: one call of several pairs), odd lengths
        ags = [torch.empty(n * world) for n in (3, 1001)]
        rss = [torch.empty(n) for n in (3, 1001)]
        with dist._coalescing_manager(async_ops=False):
            for ag_out in ags:
                dist.all_gather_into_tensor(ag_out, _value(rank, ag_out.numel() // world, torch.float32))
        with dist._coalescing_manager(async_ops=False):
            for rs_out in rss:
                dist.reduce_scatter_tensor(rs_out, _value(rank, rs_out.numel() * world, torch.float32))
        out["coalesced"] = ([t.tolist() for t in ags], [t.tolist() for t in rss])
        out["routed"] = dict(dist.group.WORLD.routed)
        # asynchronous: several in flight, then waited in reverse
        xs = [_value(rank, 9, torch.float32) for _ in range(4)]
        works = [dist.all_reduce(x, async_op=True) for x in xs]
        for w in reversed(works):
            w.wait()
        out["async"] = [x.tolist() for x in xs]
        # delegated (fastnet has no algorithm of its own for them): results must still be right
        a2a = torch.empty(world, dtype=torch.int64)
        dist.all_to_all_single(a2a, torch.arange(world, dtype=torch.int64) + 10 * rank)
        out["all_to_all"] = a2a.tolist()
        g = [torch.empty(2) for _ in range(world)] if rank == 0 else None
        dist.gather(torch.full((2,), float(rank)), g, dst=0)
        out["gather"] = [t.tolist() for t in g] if g else None
        s = torch.empty(1)
        dist.scatter(s, [torch.full((1,), float(r * 3)) for r in range(world)] if rank == 0 else None, src=0)
        out["scatter"] = s.tolist()
        red = torch.full((3,), float(rank + 1))
        dist.reduce(red, dst=0)
        out["reduce"] = red.tolist() if rank == 0 else None
        lst = [torch.empty(3) for _ in range(world)]
        dist.all_gather(lst, torch.full((3,), float(rank)))
        out["all_gather_list"] = [t.tolist() for t in lst]
        rsl = torch.empty(2)
        dist.reduce_scatter(rsl, [torch.full((2,), float(rank + 10 * r)) for r in range(world)])
        out["reduce_scatter_list"] = rsl.tolist()
        cx = torch.tensor([1 + 2j, 3j]) * (rank + 1)  # complex: torch views it as real pairs
        dist.all_reduce(cx)
        out["complex"] = [(v.real, v.imag) for v in cx.tolist()]
        # what Lightning/Accelerate call: the object collectives, and a batched p2p ring
        objs = [None] * world
        dist.all_gather_object(objs, {"rank": rank})
        box = [{"from": rank}]
        dist.broadcast_object_list(box, src=world - 1)
        out["objects"] = (objs, box)
        send, recv = torch.full((3,), float(rank)), torch.empty(3)
        for req in dist.batch_isend_irecv([dist.P2POp(dist.isend, send, (rank + 1) % world),
                                           dist.P2POp(dist.irecv, recv, (rank - 1) % world)]):
            req.wait()
        out["batch_p2p"] = recv.tolist()
        if world >= 2 and rank in (0, 1):
            t = torch.full((4,), 7.0) if rank == 0 else torch.empty(4)
            (dist.send(t, 1) if rank == 0 else dist.recv(t, 0))
            out["p2p"] = t.tolist()
        dist.barrier()
        sub = dist.new_group([0, world - 1])  # a subgroup over the same backend
        z = torch.full((3,), float(rank + 1))
        if rank in (0, world - 1):
            dist.all_reduce(z, group=sub)
            out["new_group"] = (z.tolist(), dist.get_backend(sub))
        # torch's subgroup helper (every rank in one subgroup; a 1-rank subgroup when world is 3)
        mine, _ = dist.new_subgroups_by_enumeration([[world - 1, 0]] + ([[1]] if world == 3 else []))
        w = torch.full((2,), float(rank + 1), dtype=torch.float16)
        dist.all_reduce(w, group=mine)
        out["subgroups"] = (w.tolist(), dist.get_world_size(mine), dist.get_backend(mine))
        # AVG of integers is the base backend's to take or refuse (fastnet's ring would divide into
        # a float buffer and receive into an integer one)
        before = dist.group.WORLD.routed["base:reduce_scatter"]
        try:
            rsi = torch.empty(3, dtype=torch.int64)
            dist.reduce_scatter_tensor(rsi, _value(rank, 3 * world, torch.int64), op=dist.ReduceOp.AVG)
            out["int_avg"] = rsi.tolist()
        except RuntimeError as exc:
            out["int_avg"] = f"RuntimeError: {exc}"[:200]
        out["int_avg_routed"] = dist.group.WORLD.routed["base:reduce_scatter"] - before
        queue.put((rank, out))
    finally:
        dist.destroy_process_group()


def _reduce(values: list[torch.Tensor], name: str) -> torch.Tensor:
    st = torch.stack([v.double() for v in values])
    return {"sum": st.sum(0), "avg": st.mean(0), "max": st.max(0).values, "min": st.min(0).values,
            "product": st.prod(0)}[name]


@pytest.mark.parametrize("world", [2, 3])
def test_direct_collectives_every_dtype_and_length(world):
    results = dict(spawn_ranks(_collectives_worker, world))
    for rank, out in results.items():
        for dtype in DTYPES:
            for n in LENGTHS:
                for name in ("sum", "avg", "max", "min", "product"):
                    key = ("all_reduce", str(dtype), n, name)
                    if key not in out:
                        continue
                    want = _reduce([_value(r, n, dtype) for r in range(world)], name).to(dtype).double().tolist()
                    # AVG divides before the sum (no FP16 overflow): an ulp from sum / n in fp32
                    tol = (1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-6) if name == "avg" else 1e-9
                    assert out[key] == pytest.approx(want, rel=tol, abs=tol), key
                if n:
                    full = _reduce([_value(r, n * world, dtype) for r in range(world)], "sum")
                    assert out[("reduce_scatter", str(dtype), n)] == full[rank * n:(rank + 1) * n].to(dtype).double().tolist()
                assert out[("all_gather", str(dtype), n)] == [v for r in range(world)
                                                            for v in _value(r, n, dtype).double().tolist()]
                assert out[("broadcast", str(dtype), n)] == _value(world - 1, n, dtype).double().tolist()
        assert out["int_avg_routed"] == 1, out["int_avg"]  # delegated: gloo's error (or result), not the ring's
        ags, rss = out["coalesced"]
        for ag_out, n in zip(ags, (3, 1001)):
            assert ag_out == [v for r in range(world) for v in _value(r, n, torch.float32).double().tolist()]
        for rs_out, n in zip(rss, (3, 1001)):
            full = _reduce([_value(r, n * world, torch.float32) for r in range(world)], "sum")
            assert rs_out == pytest.approx(full[rank * n:(rank + 1) * n].tolist(), rel=1e-6)
        assert out["routed"].get("fastnet:all_gather_coalesced") == 1, out["routed"]
        assert out["routed"].get("fastnet:reduce_scatter_coalesced") == 1, out["routed"]
        total = _reduce([_value(r, 9, torch.float32) for r in range(world)], "sum").tolist()
        assert out["async"] == [total] * 4
        assert out["all_to_all"] == [rank + 10 * r for r in range(world)]
        assert out["gather"] == ([[float(r)] * 2 for r in range(world)] if rank == 0 else None)
        assert out["scatter"] == [float(rank * 3)]
        assert out["reduce"] == ([float(sum(range(1, world + 1)))] * 3 if rank == 0 else None)
        assert out["all_gather_list"] == [[float(r)] * 3 for r in range(world)]
        assert out["reduce_scatter_list"] == [float(sum(r + 10 * rank for r in range(world)))] * 2
        k = world * (world + 1) / 2
        assert out["complex"] == [(k, 2 * k), (0.0, 3 * k)]
        assert out["objects"] == ([{"rank": r} for r in range(world)], [{"from": world - 1}])
        assert out["batch_p2p"] == [float((rank - 1) % world)] * 3
        if rank in (0, 1):
            assert out["p2p"] == [7.0] * 4
        if rank in (0, world - 1):
            assert out["new_group"] == ([float(1 + world)] * 3, "fastnet")
            assert out["subgroups"] == ([float(1 + world)] * 2, 2, "fastnet")
        else:
            assert out["subgroups"] == ([2.0] * 2, 1, "fastnet")


def _dead_rank_worker(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist

    _init(rank, world, port, {}, timeout_s=20.0)
    x = torch.ones(1000)
    dist.all_reduce(x)  # everyone is up
    if rank == world - 1:
        queue.put((rank, "died", 0.0))
        queue.close()
        queue.join_thread()  # the result is in the pipe before the hard exit
        os._exit(0)  # no clean-up: to its peers, as if it were killed
    t0 = time.monotonic()
    try:
        for _ in range(50):  # the next all-reduce cannot complete
            dist.all_reduce(x)
        queue.put((rank, "no error", time.monotonic() - t0))
    except Exception as exc:  # noqa: BLE001 - whatever the base backend raises
        queue.put((rank, f"{type(exc).__name__}: {exc}"[:300], time.monotonic() - t0))
    queue.close()
    queue.join_thread()
    os._exit(0)  # the group cannot be torn down cleanly without the dead rank


def test_dead_rank_ends_the_others_within_the_timeout():
    results = {r: (what, s) for r, what, s in spawn_ranks(_dead_rank_worker, 3, timeout=180)}
    assert results[2][0] == "died"
    for rank in (0, 1):
        what, seconds = results[rank]
        assert what != "no error" and "Error" in what, what
        assert seconds < 60, (rank, seconds)  # the group's timeout is 20 s; gloo usually sees the reset at once


def test_bad_settings_name_the_variable_and_the_choices():
    with pytest.raises(ValueError, match=r"FASTNET_ALGORITHM='tree'.*valid algorithms: native, ring"):
        BackendConfig.from_env({"FASTNET_ALGORITHM": "tree"})
    with pytest.raises(ValueError, match=r"FASTNET_WIRE_DTYPE='fp8'.*none, fp16, bf16"):
        BackendConfig.from_env({"FASTNET_WIRE_DTYPE": "fp8"})
    with pytest.raises(ValueError, match=r"FASTNET_BASE_BACKEND='mpi'.*gloo, nccl"):
        BackendConfig.from_env({"FASTNET_BASE_BACKEND": "mpi"})
    with pytest.raises(ValueError, match=r"FASTNET_FUSION_MB='-1'.*> 0"):
        BackendConfig.from_env({"FASTNET_FUSION_MB": "-1"})
    with pytest.raises(ValueError, match=r"FASTNET_RANKS_PER_NODE='two'.*int"):
        BackendConfig.from_env({"FASTNET_RANKS_PER_NODE": "two"})
    cfg = BackendConfig.from_env({"FASTNET_ALGORITHM": "hybrid", "FASTNET_WIRE_DTYPE": "bf16", "FASTNET_FUSION_MB": "8",
                                  "FASTNET_RANKS_PER_NODE": "4"})
    assert (cfg.algorithm, cfg.wire_dtype, cfg.fusion_mb, cfg.ranks_per_node, cfg.base_backend) == \
        ("hybrid", "bf16", 8.0, 4, "gloo")
    assert BackendConfig.from_env({}) == BackendConfig()


def _mismatch_worker(rank: int, world: int, port: int, queue, envs: dict[int, dict[str, str]]) -> None:
    t0 = time.monotonic()
    try:
        _init(rank, world, port, envs.get(rank, {}), timeout_s=30.0)
        what = "no error"
    except Exception as exc:  # noqa: BLE001 - the error init_process_group raises
        what = f"{type(exc).__name__}: {exc}"[:400]
    queue.put((rank, what, time.monotonic() - t0))
    queue.close()
    queue.join_thread()
    os._exit(0)  # a group that failed to build cannot be destroyed


@pytest.mark.parametrize("envs,name", [
    ({1: {"FASTNET_WIRE_DTYPE": "fp16"}}, "FASTNET_WIRE_DTYPE"),  # other byte counts on the wire
    ({0: {"FASTNET_ALGORITHM": "hierarchical", "FASTNET_RANKS_PER_NODE": "1"}}, "FASTNET_ALGORITHM"),  # would split alone
    ({1: {"FASTNET_BASE_BACKEND": "nccl"}}, "FASTNET_BASE_BACKEND"),  # only one rank would build NCCL
])
def test_settings_that_differ_across_ranks_fail_on_every_rank(envs, name):
    results = {r: (what, s) for r, what, s in spawn_ranks(functools.partial(_mismatch_worker, envs=envs), 2,
                                                          timeout=120)}
    for rank, (what, seconds) in results.items():
        assert what.startswith("ValueError: fastnet backend settings differ across ranks: ranks disagree on "
                               + name), (rank, what)
        assert "rank 0: " in what and "rank 1: " in what, what
        assert seconds < 25, (rank, seconds)  # at construction, not a hang until the 30 s timeout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_nccl_base_without_cuda_fails_clearly_on_every_rank():
    env = {"FASTNET_BASE_BACKEND": "nccl"}
    results = spawn_ranks(functools.partial(_mismatch_worker, envs={0: env, 1: env}), 2, timeout=120)
    for rank, what, seconds in results:
        assert what.startswith("RuntimeError: FASTNET_BASE_BACKEND=nccl runs fastnet's algorithms on CUDA tensors "
                               "through CuPy's NCCL, which this process cannot use: "), (rank, what)
        assert "no CUDA device" in what, what
        assert seconds < 25, (rank, seconds)


def _stuck_rank_worker(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist

    _init(rank, world, port, {}, timeout_s=5.0)
    x = torch.ones(1000)
    dist.all_reduce(x)
    t0 = time.monotonic()
    if rank == 1:
        time.sleep(20)  # alive, connections open, but never joins the next all-reduce
        what = "slept"
    else:
        try:
            dist.all_reduce(x)
            what = "no error"
        except Exception as exc:  # noqa: BLE001 - whatever the base backend raises on its timeout
            what = f"{type(exc).__name__}: {exc}"[:300]
    queue.put((rank, what, time.monotonic() - t0))
    queue.close()
    queue.join_thread()
    os._exit(0)


def test_stuck_peer_times_out_instead_of_hanging():
    results = {r: (what, s) for r, what, s in spawn_ranks(_stuck_rank_worker, 2, timeout=120)}
    what, seconds = results[0]
    assert what != "no error" and "Error" in what, what
    assert seconds < 18, seconds  # the group's 5 s timeout, not the peer's 20 s sleep


def test_cuda_path_aborts_and_destroys_every_communicator():
    """The CUDA path's teardown covers the hierarchical algorithms' split communicators too (their
    kernels may be the ones waiting on a dead peer): abort reaches every one even when one abort
    fails (the first error is raised after), and close synchronizes all before destroying any.
    Runs the teardown logic on stand-ins: building a real _CudaPath needs a GPU."""
    import threading

    from fastnet.comm.backend import _CudaPath

    log = []

    class Nccl:  # cupy.cuda.nccl.NcclCommunicator's teardown calls
        def __init__(self, name, fail=False):
            self.name, self.fail = name, fail

        def abort(self):
            log.append(("abort", self.name))
            if self.fail:
                raise RuntimeError(f"abort of {self.name} failed")

    class Comm:  # fastnet.comm.communicators.nccl.NcclCommunicator
        def __init__(self, name, fail=False):
            self.name, self._comm = name, Nccl(name, fail)

        def synchronize(self):
            log.append(("synchronize", self.name))

        def close(self):
            log.append(("close", self.name))

    path = _CudaPath.__new__(_CudaPath)
    path.communicators = [Comm("intra", fail=True), Comm("inter"), Comm("world")]
    path._closed, path._watchdog = threading.Event(), threading.Thread(target=lambda: None)
    path._watchdog.start()
    with pytest.raises(RuntimeError, match="abort of intra failed"):
        path.abort()
    assert path._closed.is_set() and log == [("abort", "intra"), ("abort", "inter"), ("abort", "world")]
    log.clear()
    path.close()
    assert log == [("synchronize", n) for n in ("intra", "inter", "world")] + [("close", n) for n in
                                                                               ("intra", "inter", "world")]
    # a communicator that does not finish (a dead peer): all are aborted, none destroyed, its error raised
    log.clear()
    class Stuck(Comm):
        def synchronize(self):
            log.append(("synchronize", self.name))
            raise RuntimeError("NCCL operations on rank 0 did not finish")

    path.communicators = [Comm("intra"), Stuck("inter"), Comm("world")]
    with pytest.raises(RuntimeError, match="did not finish"):
        path.close()
    assert log == [("synchronize", "intra"), ("synchronize", "inter"), ("abort", "intra"), ("abort", "inter"),
                   ("abort", "world")]


def _gpu_ddp_check_worker(rank: int, world: int, port: int, queue) -> None:
    """The GPU test's DDP check (tests/comm/test_backend_gpu.py, check 5) on CPU: the same model, cap and
    steps through the fastnet backend, fastnet's routing forced on at one rank as there."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from tests.comm.test_backend_gpu import DDP_BUCKET_CAP_MB, DDP_DIMS, DDP_STEPS, ddp_model

    _init(rank, world, port, {})
    try:
        pg = dist.group.WORLD
        pg._MIN_SIZE = 1  # route one rank through fastnet, as the GPU test does
        ddp = DDP(ddp_model(), bucket_cap_mb=DDP_BUCKET_CAP_MB)
        before = pg.routed["fastnet:all_reduce"]
        g = torch.Generator().manual_seed(1)
        for _ in range(DDP_STEPS):
            ddp(torch.randn(8, DDP_DIMS[0], generator=g)).square().mean().backward()
        queue.put(pg.routed["fastnet:all_reduce"] - before)
    finally:
        dist.destroy_process_group()


def test_gpu_ddp_check_gets_several_buckets_per_step():
    from tests.comm.test_backend_gpu import DDP_MIN_CALLS

    (calls,) = spawn_ranks(_gpu_ddp_check_worker, 1)
    assert calls >= DDP_MIN_CALLS, calls


def test_coalesced_delegation_falls_back_to_one_call_per_pair_without_the_coalesced_method():
    """torch 2.11's Backend has no all_gather_single_coalesced / reduce_scatter_single_coalesced: the
    delegated coalesced call then issues one _allgather_base per pair and waits for them together."""
    from fastnet.comm.backend import _coalesced_or_each

    class Work:
        def __init__(self):
            self.waited = False

        def wait(self, timeout=None):
            self.waited = True
            return True

        def is_completed(self):
            return self.waited

        def get_future(self):
            fut = torch.futures.Future()
            fut.set_result(None)
            return fut

    class OldBackend:  # world size 2 stand-in: the "other rank" holds the same input
        def __init__(self):
            self.works = []

        def _allgather_base(self, out, inp, opts):
            out.copy_(torch.cat([inp, inp]))
            self.works.append(Work())
            return self.works[-1]

    base = OldBackend()
    outs, ins = [torch.zeros(4), torch.zeros(6)], [torch.arange(2.0), torch.arange(3.0)]
    work = _coalesced_or_each(base, "all_gather_single_coalesced", "_allgather_base", outs, ins, None)
    assert len(base.works) == 2 and not work.is_completed()
    work.wait()
    assert work.is_completed() and all(w.waited for w in base.works)
    assert torch.equal(outs[1], torch.tensor([0.0, 1.0, 2.0, 0.0, 1.0, 2.0]))
    assert work.get_future().wait() == outs

    class NewBackend:
        def all_gather_single_coalesced(self, outputs, inputs, opts):
            return ("coalesced", len(outputs))

    assert _coalesced_or_each(NewBackend(), "all_gather_single_coalesced", "_allgather_base", outs, ins, None) == \
        ("coalesced", 2)


def test_batch_isend_irecv_grouping_detected_per_torch_version():
    """torch 2.14 groups a ProcessGroup subclass's p2p ops (isinstance); torch 2.11's check
    (``type(group) is ProcessGroup``, distributed_c10d.py at v2.11.0) excludes it: only then does fastnet
    put its own batch_isend_irecv in place."""
    import inspect

    import torch.distributed as dist

    from fastnet.comm import backend

    torch_211 = "    if type(group) is ProcessGroup and group._get_backend(device).supports_coalescing:\n"
    assert not backend.batch_groups_subclasses(torch_211)
    assert backend.batch_groups_subclasses(inspect.getsource(backend._TORCH_BATCH_ISEND_IRECV))  # this torch
    assert dist.batch_isend_irecv is backend._TORCH_BATCH_ISEND_IRECV  # so torch's own stays


def _p2p_worker(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist

    from fastnet.comm.backend import _batch_isend_irecv

    _init(rank, world, port, {})
    try:
        send, recv = torch.full((5,), float(rank + 1)), torch.zeros(5)
        peer = 1 - rank
        ops = [dist.P2POp(dist.isend, send, peer), dist.P2POp(dist.irecv, recv, peer)]
        for work in _batch_isend_irecv(ops):  # gloo: no coalescing, torch's own path
            work.wait()
        queue.put((rank, recv.tolist()))
    finally:
        dist.destroy_process_group()


def test_fastnet_batch_isend_irecv_exchanges_on_cpu():
    for rank, got in spawn_ranks(_p2p_worker, 2):
        assert got == [float(2 - rank)] * 5
