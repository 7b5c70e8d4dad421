"""TorchCommunicator's reduce_scatter / all_gather (fastnet's ring on gloo) against the definition,
in real processes: every op, dtype and chunk length, ranks 2-4."""

from __future__ import annotations

import pytest
import torch

from fastnet.comm.algorithms import ring_all_gather_into, ring_reduce_scatter_into
from fastnet.comm.communicators.torchdist import TorchCommunicator
from tests.conftest import init_gloo, spawn_ranks

CHUNKS = [0, 1, 3, 7, 1000]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32]


def _input(rank: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    # integer-valued and rank-dependent (a misplaced chunk or a missing rank shows), exact in fp16/bf16
    return ((torch.arange(n) * (rank + 3)) % 11 + rank).to(dtype)


def _worker(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist

    init_gloo(rank, world, port)
    try:
        comm = TorchCommunicator()
        out = {}
        for dtype in DTYPES:
            for c in CHUNKS:
                for op in ("sum", "avg", "max", "min"):
                    if op == "avg" and not dtype.is_floating_point:
                        continue
                    x = _input(rank, world * c, dtype)
                    before = x.clone()
                    y = torch.full((c,), -1, dtype=dtype)
                    comm.reduce_scatter(y, x, op)
                    out[("rs", str(dtype), c, op)] = (y.double().tolist(), torch.equal(x, before))
                g = torch.full((world * c,), -1, dtype=dtype)
                comm.all_gather(g, _input(rank, c, dtype))
                out[("ag", str(dtype), c)] = g.double().tolist()
        # 2-D tensors (the callers' gathers pass views of any shape)
        g2 = torch.empty(world, 3)
        comm.all_gather(g2, torch.full((3,), float(rank)))
        out["ag-2d"] = g2.tolist()
        errors = []
        for call in (lambda: ring_reduce_scatter_into(comm, torch.empty(2), torch.empty(2 * world + 1)),
                     lambda: ring_all_gather_into(comm, torch.empty(2 * world + 1), torch.empty(2)),
                     lambda: ring_reduce_scatter_into(comm, torch.empty(2), torch.empty(2 * world), "prod")):
            try:
                call()
            except ValueError as exc:
                errors.append(str(exc))
        queue.put((rank, out, errors))
    finally:
        dist.destroy_process_group()


def _expected_rs(world: int, rank: int, c: int, dtype: torch.dtype, op: str) -> list[float]:
    rows = torch.stack([_input(r, world * c, torch.float64) for r in range(world)])
    if op == "avg":
        rows = rows / world
    red = {"sum": rows.sum(0), "avg": rows.sum(0), "max": rows.max(0).values, "min": rows.min(0).values}[op]
    return red[rank * c:(rank + 1) * c].to(dtype).double().tolist()


@pytest.mark.parametrize("world", [2, 3, 4])
def test_reduce_scatter_and_all_gather_match_the_definition(world):
    results = {r: (out, err) for r, out, err in spawn_ranks(_worker, world)}
    for rank, (out, errors) in results.items():
        for dtype in DTYPES:
            for c in CHUNKS:
                for op in ("sum", "avg", "max", "min"):
                    if op == "avg" and not dtype.is_floating_point:
                        continue
                    got, input_kept = out[("rs", str(dtype), c, op)]
                    assert input_kept, ("reduce_scatter changed its input", dtype, c, op)
                    want = _expected_rs(world, rank, c, dtype, op)
                    if op == "avg" and dtype in (torch.float16, torch.bfloat16):  # divided before the sum
                        assert got == pytest.approx(want, rel=1e-2, abs=1e-2), (dtype, c, op)
                    else:
                        assert got == pytest.approx(want, rel=1e-6), (dtype, c, op)
                want_ag = [v for r in range(world) for v in _input(r, c, dtype).double().tolist()]
                assert out[("ag", str(dtype), c)] == want_ag, (dtype, c)
        assert out["ag-2d"] == [[float(r)] * 3 for r in range(world)]
        assert "expected size" in errors[0] and "expected size" in errors[1]
        assert "'prod'" in errors[2] and "sum, max, min" in errors[2]
    # every rank's all-gather is bitwise the same
    assert len({repr(results[r][0][("ag", "torch.float16", 1000)]) for r in results}) == 1


def test_check_op_names_the_valid_ops_and_refuses_integer_avg():
    from fastnet.comm.communicators.base import check_op

    with pytest.raises(ValueError, match="Unknown reduction op 'mean'; valid ops: sum, avg, max, min"):
        check_op("mean")
    with pytest.raises(TypeError, match="op 'avg' needs a floating-point tensor, got torch.int64"):
        check_op("avg", torch.int64)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        check_op("avg", dtype)
    check_op("sum", torch.int64)


def _split_timeout_worker(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist

    from fastnet.comm.communicators.factory import build_communicator
    from tests.conftest import init_gloo

    init_gloo(rank, world, port)
    try:
        seen = []
        real = dist.new_group

        def spy(*args, **kwargs):
            seen.append(kwargs.get("timeout"))
            return real(*args, **kwargs)

        dist.new_group = spy
        comm = build_communicator("torch", timeout_s=7.0)
        sub = comm.split(rank % 2, rank)
        queue.put((rank, [t.total_seconds() if t is not None else None for t in seen], sub.timeout_s))
    finally:
        dist.destroy_process_group()


def test_split_groups_get_the_runs_timeout():
    """Issue 39 (4): a group fastnet creates gets the run's timeout (torch's default for a new group is
    30 minutes, whatever the world group's), so no connection set-up outlives timeout_s."""
    from tests.conftest import spawn_ranks

    for rank, timeouts, inherited in spawn_ranks(_split_timeout_worker, 2):
        assert timeouts and all(t == 7.0 for t in timeouts), timeouts
        assert inherited == 7.0
