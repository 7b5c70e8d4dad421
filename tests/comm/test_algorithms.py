"""Ring, hierarchical and leader all-reduce (point-to-point and collective-composed) over TorchCommunicator
(gloo), in real processes."""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.distributed as dist

from fastnet.comm.algorithms import (RingStep, collective_hierarchical_all_reduce, hierarchical_all_reduce,
                                    post, ring_all_reduce, run_pipelined)
from fastnet.comm.communicators.torchdist import TorchCommunicator
from fastnet.comm.algorithms.ring import split_sizes
from fastnet.comm.planning.hierarchy import Hierarchy
from fastnet.comm.planning.topology import Topology
from tests.conftest import init_gloo, spawn_ranks

LENGTHS = [0, 1, 2, 5, 7, 13, 97, 1000, 65537]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _dtypes(world: int) -> list[torch.dtype]:
    """bf16 only up to 3 ranks: the schedules chunk by element count, whatever the dtype, and fp16
    covers a 2-byte dtype at 4 and 6 ranks (the suite's time budget)."""
    return DTYPES if world <= 3 else DTYPES[:2]


def _input(rank: int, length: int, dtype: torch.dtype) -> torch.Tensor:
    # integer-valued, so every partial sum is exact in fp16/bf16 (max 21 * 7 = 147)
    return ((torch.arange(length) % 7 + 1) * (rank + 1)).to(dtype)


def _unbatched(*args, **kwargs):
    raise AssertionError("an algorithm issued an unbatched send/recv on a torch process group (NCCL would "
                         "serialise it like a collective and deadlock the ring): use Communicator.exchange")


def _worker(rank: int, world: int, port: int, queue) -> None:
    init_gloo(rank, world, port)
    for name in ("isend", "irecv", "send", "recv"):  # only grouped exchanges may carry point-to-point traffic
        setattr(TorchCommunicator, name, _unbatched)
    batches = []
    batch_isend_irecv = dist.batch_isend_irecv
    dist.batch_isend_irecv = lambda ops: batches.append(len(ops)) or batch_isend_irecv(ops)
    try:
        comm = TorchCommunicator()
        results = {}
        # up to 3 ranks every node size (1: each rank a node; world: one node; 2 + 1: unequal nodes); at 4
        # and 6 only the shapes with both levels > 1 (2 x 2; 3 x 2 and 2 x 3), the degenerate ones being
        # the same code paths as at 2-3 ranks (the suite's time budget)
        rpns = sorted({1, 2, 3, world}) if world <= 3 else ([2] if world == 4 else [2, 3])
        hierarchies = {rpn: Hierarchy(comm, rpn) for rpn in rpns if rpn <= world}
        for dtype in _dtypes(world):
            for length in LENGTHS:
                # tiny segments (2, 5 elements) only up to 1000 elements: at 65537 they are thousands of
                # exchanges per step, minutes of CI for nothing the 1000-element segments do not cover
                rings = [("ring", None), ("ring-seg-1000", None)] + ([("ring-seg-2", None)] if length <= 1000 else [])
                cases = rings + [(alg, rpn) for rpn in hierarchies
                                            for alg in ("hierarchical", "hierarchical_p2p", "leader", "leader_p2p",
                                                        "pipelined-5", "pipelined-1000", "collective-5",
                                                        "collective-1000")
                                            if (alg.startswith("leader") or world % rpn == 0)
                                            and not (alg.endswith("-5") and length > 1000)]
                for alg, rpn in cases:
                    x = _input(rank, length, dtype)
                    if alg == "ring":
                        ring_all_reduce(comm, x)
                    elif alg.startswith("ring-seg"):  # pipelined in segments of 2 / 1000 elements per chunk
                        ring_all_reduce(comm, x, segment_elems=int(alg.split("-")[2]))
                    elif alg.startswith("pipelined"):  # segments of 5 / 1000 elements, odd tails
                        h = hierarchies[rpn]
                        hierarchical_all_reduce(h.intra, h.inter, x, segment_elems=int(alg.split("-")[1]))
                    elif alg.startswith("collective"):  # the two-stage pipeline of backend collectives
                        h = hierarchies[rpn]
                        collective_hierarchical_all_reduce(h.intra, h.inter, x, segment_elems=int(alg.split("-")[1]))
                    else:
                        hierarchies[rpn].all_reduce(x, alg)
                    key = (alg, rpn, str(dtype), length)
                    results[key] = (torch.equal(x, _input(0, length, torch.float64).mul(world * (world + 1) // 2)
                                                .to(dtype)),
                                    hashlib.sha256(x.view(torch.uint8).numpy().tobytes()).hexdigest())
        errors = []
        if world % 2 == 1 and world > 2:
            try:
                hierarchies[2].all_reduce(torch.ones(4), "hierarchical")
            except ValueError as exc:
                errors.append(str(exc))
        split = comm.split(rank % 2, key=-rank)  # reversed order inside each color
        results["batched"] = (len(batches) > 0) == (world > 1), ""
        queue.put((rank, results, errors, (split.size, split.rank)))
    finally:
        dist.destroy_process_group()


# 3 covers odd sizes and unequal nodes (2 + 1), 4 the 2 x 2 cluster, 6 both levels > 1 in both
# shapes (3 x 2, 2 x 3); 5 added nothing they do not cover and cost a minute of the CI budget
@pytest.mark.parametrize("world", [1, 2, 3, 4, 6])
def test_algorithms_sum_exactly_and_agree_bitwise(world):
    out = {r: (res, err, sp) for r, res, err, sp in spawn_ranks(_worker, world)}
    keys = out[0][0].keys()
    assert len(keys) >= 3 * len(LENGTHS) * len(_dtypes(world))
    for dtype in _dtypes(world):  # the segmented ring adds in the same order: bitwise the unsegmented ring's result
        for length in LENGTHS:
            plain = out[0][0][("ring", None, str(dtype), length)][1]
            assert all(out[0][0][(f"ring-seg-{g}", None, str(dtype), length)][1] == plain
                       for g in ((2, 1000) if length <= 1000 else (1000,)))
    for key in keys:
        assert all(out[r][0][key][0] for r in range(world)), (key, [out[r][0][key][0] for r in range(world)])
        assert len({out[r][0][key][1] for r in range(world)}) == 1, key  # bitwise identical on every rank
    if world % 2 == 1 and world > 2:
        assert all("equal ranks per node" in out[r][1][0] for r in range(world))
    for r in range(world):  # split: color = rank % 2, key = -rank -> highest rank first
        members = [q for q in range(world) if q % 2 == r % 2]
        assert out[r][2] == (len(members), sorted(members, reverse=True).index(r))


def test_run_pipelined_staggers_schedules_one_round_apart():
    log, round_ends, groups = [], set(), []  # (schedule, step) in posting order; log length at every wait

    class Work:
        def wait(self):
            round_ends.add(len(log))  # no step is posted while a round's works are waited on

    class Comm:
        rank, size = 0, 2

        def exchange(self, sends, recvs):
            groups.append((len(sends), len(recvs)))
            return Work()

    comm = Comm()

    def schedule(i, steps):
        for j in range(steps):
            log.append((i, j))
            yield [RingStep(comm, torch.ones(1), torch.empty(1))]

    run_pipelined([schedule(i, 4) for i in range(6)], depth=4)
    round_of, start = {}, 0
    for r, end in enumerate(sorted(round_ends)):
        round_of.update({entry: r for entry in log[start:end]})
        start = end
    assert len(log) == 24 and all(round_of[(i, j)] == i + j for i in range(6) for j in range(4)), round_of
    assert len(round_ends) == 6 + 4 - 1  # segments + steps - 1 rounds
    # one grouped exchange per communicator per round, holding every running schedule's step
    assert groups == [(k, k) for k in (1, 2, 3, 4, 4, 4, 3, 2, 1)]
    with pytest.raises(ValueError, match="pipeline depth: 0"):
        run_pipelined([], 0)


def test_segmented_ring_pipelines_steps_per_segment():
    """Each segment moves on to the next ring step as soon as it has arrived: step t + 1 of segment
    0 is posted before step t's last segment is waited on; every exchange pairs one send to the
    right with one receive from the left, posted in (step, segment) order."""
    events = []

    class Work:
        def __init__(self, k):
            self.k = k

        def wait(self):
            events.append(("wait", self.k))

    class Comm:
        rank, size = 1, 3

        def exchange(self, sends, recvs):
            assert [d for _, d in sends] == [2] and [s for _, s in recvs] == [0]
            k = sum(e[0] == "post" for e in events)
            events.append(("post", k, sends[0][0].numel(), recvs[0][0].numel()))
            return Work(k)

    ring_all_reduce(Comm(), torch.zeros(3 * 10), segment_elems=4)  # chunks of 10 -> 3 segments (4, 3, 3)
    posts = [e for e in events if e[0] == "post"]
    assert len(posts) == 2 * (3 - 1) * 3 and [p[2] for p in posts[:3]] == [4, 3, 3]
    first_wait_of_last_segment = events.index(("wait", 2))
    second_step_first_segment = events.index(posts[3])
    assert second_step_first_segment < first_wait_of_last_segment  # pipelined, not step by step
    with pytest.raises(ValueError, match="segment_elems: -1"):
        ring_all_reduce(Comm(), torch.zeros(6), segment_elems=-1)


def test_topology_layout():
    t = Topology.of(5, 7, 3)
    assert (t.node, t.local_rank, t.local_size, t.num_nodes, t.uniform) == (1, 2, 3, 3, False)
    assert Topology.of(6, 7, 3).local_size == 1
    with pytest.raises(ValueError, match="ranks_per_node: 0"):
        Topology.of(0, 4, 0)


def test_split_sizes_and_input_checks():
    assert split_sizes(10, 4) == [3, 3, 2, 2] and split_sizes(2, 4) == [1, 1, 0, 0] and split_sizes(0, 3) == [0] * 3

    class One:
        rank, size = 0, 1

    with pytest.raises(ValueError, match="1-D contiguous"):
        ring_all_reduce(One(), torch.ones(2, 2))
    with pytest.raises(ValueError, match="segment_elems: -1"):
        hierarchical_all_reduce(One(), One(), torch.ones(4), segment_elems=-1)
    assert torch.equal(ring_all_reduce(One(), torch.arange(5.0)), torch.arange(5.0))


class _OrderComm:
    """A communicator that moves no data and logs the order of its posts and waits into ``log``."""

    def __init__(self, name, log, size=2, concurrent_safe=True):
        self.name, self.log, self.rank, self.size = name, log, 0, size
        self.concurrent_safe = concurrent_safe

    def _work(self, what):
        self.log.append(("post", self.name, what))
        comm = self

        class Work:
            def wait(self):
                comm.log.append(("wait", comm.name, what))

        return Work()

    def exchange(self, sends, recvs):
        return self._work("exchange")

    def all_reduce(self, tensor, op="sum", async_op=False):
        work = self._work("all_reduce")
        if not async_op:
            work.wait()
            return None
        return work

    def reduce_scatter(self, output, input, op="sum"):
        self._work("reduce_scatter").wait()

    def all_gather(self, output, input):
        self._work("all_gather").wait()


@pytest.mark.parametrize("safe", [True, False])
def test_two_communicators_overlap_only_where_allowed(safe):
    """NCCL's rule for several communicators in one process: with a communicator that is not
    ``concurrent_safe``, every operation is posted only after the other communicator's last one was
    waited on (on NCCL a stream wait), in the same order; gloo's may overlap (the pipelines)."""
    log = []
    intra, inter = _OrderComm("intra", log), _OrderComm("inter", log, concurrent_safe=safe)

    def overlapping(entries):
        """Posts made while another communicator had an operation posted and not yet waited on."""
        open_ops, found = {}, 0
        for kind, name, _ in entries:
            if kind == "post":
                found += any(n != name and k for n, k in open_ops.items())
                open_ops[name] = open_ops.get(name, 0) + 1
            else:
                open_ops[name] = 0
        return found

    for w in post([RingStep(intra, torch.ones(1), torch.empty(1)), RingStep(inter, torch.ones(1), torch.empty(1))]):
        w.wait()
    assert [e[1] for e in log if e[0] == "post"] == ["intra", "inter"]  # first appearance, on every rank
    assert (overlapping(log) > 0) == safe, log

    log.clear()
    collective_hierarchical_all_reduce(intra, inter, torch.zeros(40), segment_elems=10)
    posts = [(e[1], e[2]) for e in log if e[0] == "post"]
    assert posts[:3] == [("intra", "reduce_scatter"), ("inter", "all_reduce"), ("intra", "reduce_scatter")]
    assert len(posts) == 4 * 3  # every segment: reduce-scatter, all-reduce, all-gather
    assert (overlapping(log) > 0) == safe, log


@pytest.mark.parametrize("safe", [True, False])
def test_hierarchy_segments_only_where_levels_overlap(safe):
    """Hierarchy.all_reduce cuts a long bucket into pipeline segments where the two levels can
    overlap (gloo); on communicators that run one after the other (NCCL) segments gain nothing, so
    it runs one segment: one reduce-scatter, all-reduce and all-gather."""
    log = []
    h = Hierarchy.__new__(Hierarchy)  # the algorithm dispatch only; construction splits a real group
    h.topology = Topology.of(0, 4, 2)
    h.intra, h.inter = _OrderComm("intra", log), _OrderComm("inter", log, concurrent_safe=safe)
    h.segment_bytes = 40  # 10 float32 elements: 4 segments of a 40-element bucket
    h.all_reduce(torch.zeros(40), "hierarchical")
    assert sum(e[0] == "post" for e in log) == (4 * 3 if safe else 3)
