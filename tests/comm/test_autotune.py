"""hybrid without a cost-model file: the online choice (fastnet.comm.planning.autotune) on real gloo ranks."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from fastnet.comm.planning.autotune import OnlineChooser, size_class
from fastnet.comm.communicators.torchdist import TorchCommunicator
from fastnet.comm.gradients.reducer import BucketReducer
from tests.conftest import init_gloo, spawn_ranks

CANDIDATES = ("native", "ring", "leader")


def test_size_class_is_the_power_of_two_at_or_below():
    assert [size_class(n) for n in (1, 2, 3, 1023, 1024, 1025, 25 << 20)] == [1, 2, 2, 512, 1024, 1024, 16 << 20]


def test_chooser_state_round_trips_and_refuses_unknown_choices():
    a = OnlineChooser(None, CANDIDATES, trials=2)
    a._calls, a._times, a._finalists = {4096: 11}, {4096: {"ring": [0.1, 0.2]}}, {4096: ["ring", "native"]}
    a.choices, a.medians = {1024: "leader"}, {1024: [0.3, 0.2, 0.1]}
    b = OnlineChooser(None, CANDIDATES, trials=2)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict() and b.choice(1500) == "leader" and b.choice(5000) is None
    assert b.exploring()  # class 4096 met, not decided
    b._calls.pop(4096)
    assert not b.exploring() and not OnlineChooser(None, CANDIDATES).exploring()
    with pytest.raises(ValueError, match="not among the candidates"):
        b.load_state_dict({**a.state_dict(), "choices": {1024: "tree"}})
    with pytest.raises(ValueError, match="not among the candidates"):
        b.load_state_dict({**a.state_dict(), "finalists": {4096: ["tree", "ring"]}})
    old = {k: v for k, v in a.state_dict().items() if k != "finalists"}  # saved before the refinement existed
    c = OnlineChooser(None, CANDIDATES, trials=2)
    c.load_state_dict(old)
    assert c.choice(1500) == "leader" and c._finalists == {}


def test_chooser_rejects_no_candidates_and_no_trials():
    with pytest.raises(ValueError, match="candidate"):
        OnlineChooser(None, (), 2)
    with pytest.raises(ValueError, match="trials"):
        OnlineChooser(None, ("ring",), 0)
    with pytest.raises(ValueError, match="finalists"):
        OnlineChooser(None, ("ring",), 2, finalists=0)
    with pytest.raises(ValueError, match="refine"):
        OnlineChooser(None, ("ring",), 2, refine=-1)


def _chooser_run(comm, rank: int, world: int) -> tuple:
    chooser = OnlineChooser(comm, CANDIDATES, trials=2)
    fast = {0: "leader", 1: "ring"}.get(rank, "native")  # each rank measures another candidate as fastest
    used = []
    for _ in range(len(CANDIDATES) * 3 + 2 * 4 + 2):  # 3 rounds, 4 refinement rounds of 2 finalists, 2 more
        x = torch.ones(1000)

        def all_reduce(alg: str) -> None:
            comm.all_reduce(x)
            if alg != fast:
                time.sleep(0.02)

        used.append(chooser.run(4000, all_reduce))
        assert torch.equal(x, torch.full((1000,), float(world)))
    return used, chooser.choice(4000), chooser.choice(100), chooser.describe()


def _reducer_worker(rank: int, world: int, port: int, queue) -> None:
    init_gloo(rank, world, port)
    try:
        chooser = _chooser_run(TorchCommunicator(), rank, world)
        reducer = BucketReducer(TorchCommunicator(), "hybrid", "none", ranks_per_node=2)
        g = torch.Generator().manual_seed(rank)
        results = []
        for step in range(30):
            for numel in (3000, 70000):  # two size classes
                x = torch.randn(numel, generator=g, dtype=torch.float64)
                want = x.clone()
                dist.all_reduce(want)
                reducer.sum_(x)
                results.append(float((x - want).abs().max()))
        queue.put((rank, max(results), reducer.tuner.describe(), reducer.describe(),
                   [reducer.algorithm_for(n * 8) for n in (3000, 70000, 10)], chooser))
        reducer.close()
    finally:
        dist.destroy_process_group()


def test_online_choice_is_rank0s_after_the_same_trials_and_sums_correctly():
    """OnlineChooser on 4 gloo ranks: each candidate gets one warm-up call, then 2 timed ones,
    round-robin; then rank 0's two fastest take 4 more timed calls each, alternating; then every
    rank adopts the finalist fastest on rank 0 (here 'leader', though rank 1 timed 'ring' fastest
    and ranks 2-3 'native') and keeps it; other size classes are
    still undecided. BucketReducer('hybrid') without a cost-model file, 2 nodes x 2: every call
    sums right whichever candidate ran; both size classes end decided with the same choice on
    every rank; algorithm_for reports it ('hybrid' before)."""
    out = {r[0]: r[1:] for r in spawn_ranks(_reducer_worker, 4)}
    n = len(CANDIDATES)
    for rank in range(4):
        used, choice, other, tuned = out[rank][4]
        rotated = [CANDIDATES[(i + i // n) % n] for i in range(3 * n)]  # each round starts one later
        assert used[:3 * n] == rotated and sorted(used[:n]) == sorted(CANDIDATES)
        refined = used[3 * n:3 * n + 8]  # rank 0's two fastest, alternating: 'leader' and one slow one
        assert "leader" in refined and len(set(refined)) == 2 and all(refined.count(a) == 4 for a in set(refined))
        assert refined == out[0][4][0][3 * n:3 * n + 8]  # the same finalists on every rank
        assert used[3 * n + 8:] == ["leader", "leader"] and choice == "leader" and other is None
        assert list(tuned) == [size_class(4000)] and tuned[size_class(4000)]["algorithm"] == "leader"
        assert tuned == out[0][4][3]  # rank 0's medians, everywhere
        err, desc, items, chosen, _ = out[rank]
        assert err < 1e-9
        assert desc == out[0][1] and len(desc) == 2
        assert chosen[:2] == [desc[size_class(3000 * 8)]["algorithm"], desc[size_class(70000 * 8)]["algorithm"]]
        assert chosen[2] == "hybrid"  # a class never seen: still to explore
        assert ("cost model", "online (no file)") in items


@pytest.mark.parametrize("finalists,refine,calls",
                         [(2, 4, 3 * 3 + 2 * 4), (2, 0, 3 * 3), (1, 4, 3 * 3), (3, 2, 3 * 3 + 3 * 2)])
def test_refinement_rounds_go_to_the_fastest_and_can_overturn_the_first_rounds(monkeypatch, finalists, refine, calls):
    """A fake clock (no timing): 'ring' looks fastest in the first rounds only by a fluke of its
    trials, 'leader' is faster over more calls; with refinement the finalists' extra trials
    overturn the first rounds' pick, without it (refine 0, or a single finalist) it stands."""
    import fastnet.comm.planning.autotune as autotune

    clock = [0.0]
    monkeypatch.setattr(autotune.time, "perf_counter", lambda: clock[0])
    seen: dict[str, int] = {}
    cost = {"native": lambda k: 3.0, "ring": lambda k: 1.0 if k <= 3 else 2.5, "leader": lambda k: 1.5}

    def all_reduce(alg: str) -> None:
        seen[alg] = seen.get(alg, 0) + 1
        clock[0] += cost[alg](seen[alg])

    class OneRank:
        def broadcast(self, t, src):
            assert src == 0

    chooser = OnlineChooser(OneRank(), CANDIDATES, trials=2, finalists=finalists, refine=refine)
    used = [chooser.run(4000, all_reduce) for _ in range(calls + 1)]
    assert chooser.choice(4000) is not None and not chooser.exploring()
    assert used[-1] == chooser.choice(4000) == ("leader" if refine and finalists > 1 else "ring")
    assert chooser.state_dict()["calls"] == {size_class(4000): calls}  # the decision took no trial
