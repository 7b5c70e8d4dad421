"""The step-time simulator: hand-computed schedules, overlap, the FLOP profile, the CLI."""

from __future__ import annotations

import pytest

from fastnet.comm.planning.cost_model import CostModel, Link
from fastnet.comm.planning.simulate import layer_profile, main, parse_link, simulate, simulate_plan

LINK = CostModel(intra=Link(1e-3, 1e-6), inter=Link(1e-3, 1e-6), native=Link(1e-3, 1e-6), p2p=Link(0.0, 0.0))


def test_one_gpu_has_no_communication():
    res = simulate([(10, 0.5), (10, 0.5)], 0.3, 1, 1, LINK)
    assert res.step_s == pytest.approx(0.3) and res.scaling_efficiency == 1.0 and res.buckets == []


def test_schedule_by_hand():
    # 2 ranks on 2 nodes, ring: 2 steps of (1 ms + n/2 µs); two layers of 1000 elements in fp32 (4000 B)
    layers = [(1000, 0.25), (1000, 0.75)]  # forward order; backward meets the second layer first
    res = simulate(layers, 0.3, 2, 1, LINK, "ring", fusion_threshold_bytes=4000, wire_bytes=4)
    t_ar = 2 * (1e-3 + 2000 * 1e-6)  # 6 ms per bucket
    b1_ready = 0.1 + 0.2 * 0.75
    b2_ready = 0.3
    assert [b[0] for b in res.buckets] == [4000, 4000]
    assert res.buckets[0][1:] == pytest.approx((b1_ready, b1_ready, b1_ready + t_ar))
    assert res.buckets[1][1:] == pytest.approx((b2_ready, b2_ready, b2_ready + t_ar))  # channel already free
    assert res.step_s == pytest.approx(0.3 + t_ar) and res.exposed_comm_s == pytest.approx(t_ar)
    assert res.scaling_efficiency == pytest.approx(0.3 / (0.3 + t_ar))
    assert res.time_to_train_s(2, 10, 4) == pytest.approx(2 * 3 * res.step_s)


def test_smaller_buckets_overlap_more():
    layers = [(100_000, 0.1)] * 10
    one = simulate(layers, 1.0, 16, 8, LINK, "hierarchical", fusion_threshold_bytes=1 << 30)
    many = simulate(layers, 1.0, 16, 8, LINK, "hierarchical", fusion_threshold_bytes=200_000)
    assert len(one.buckets) == 1 and len(many.buckets) == 10
    assert many.exposed_comm_s < one.exposed_comm_s and many.step_s < one.step_s


def test_layer_profile_counts_parameters_and_flops():
    prof = layer_profile("resnet20")
    from fastnet.models import build_model

    assert sum(n for n, _ in prof) == sum(p.numel() for p in build_model("resnet20", 10, 32).parameters())
    assert sum(f for _, f in prof) == pytest.approx(1.0)
    convs = [f for n, f in prof if n > 1000]
    assert max(convs) > 10 * min(f for _, f in prof)  # convolutions dominate, norms do not


def test_cli_and_bad_input(capsys):
    assert main(["--model", "resnet20", "--nodes", "2", "--gpus-per-node", "2", "--global-batch", "512",
                 "--gpu-images-per-s", "1000", "--epochs", "1", "--dataset", "50000"]) == 0
    out = capsys.readouterr().out
    assert "scaling efficiency" in out and "time to train 1 epochs" in out
    with pytest.raises(ValueError, match="Invalid link '10ms'"):
        parse_link("10ms")
    assert parse_link("5us,100Gbit/s").bandwidth_gbps == pytest.approx(12.5)
    with pytest.raises(SystemExit):
        main(["--nodes", "3", "--global-batch", "100", "--gpu-images-per-s", "1"])
    assert "not a multiple of the 24 GPUs" in capsys.readouterr().err
    base = ["--model", "resnet20", "--nodes", "4", "--gpus-per-node", "1", "--global-batch", "512",
            "--gpu-images-per-s", "1000", "--algorithm", "ring"]
    capsys.readouterr()
    assert main(base) == 0 and main([*base, "--p2p-us", "500"]) == 0  # one bucket: 6 ring steps, 0.5 ms more each
    free, costly = (float(line.split("all-reduce total ")[1].split(" ms")[0])
                    for line in capsys.readouterr().out.splitlines() if line.startswith("step "))
    assert costly == pytest.approx(free + 6 * 0.5, abs=0.15)
    with pytest.raises(SystemExit):
        main([*base, "--p2p-us", "nan"])
    assert "--p2p-us nan: must be a finite number" in capsys.readouterr().err
    with pytest.raises(ValueError, match="Invalid compute_s 0"):
        simulate([(1, 1.0)], 0, 2, 1, LINK)


def test_simulate_plan_follows_the_synchronizers_launch_rule_by_hand():
    # 1 byte/s links, no latency: a bucket of b bytes takes 2(N-1)/N * b = b seconds on 2 ranks
    m = CostModel(intra=Link(0.0, 1.0), inter=Link(0.0, 1.0), native=Link(0.0, 1.0), p2p=Link(0.0, 0.0))
    buckets = [(2, 1.0, "native"), (1, 4.0, "native"), (3, 2.0, "native")]  # ready at 1, 4, 2 s
    # index order: bucket 1 (ready at 4) holds bucket 2 back: 1-3, 4-5, 5-8
    r = simulate_plan(buckets, 4.0, 2, 2, m)
    assert [t[2:] for t in r.buckets] == [(1.0, 3.0), (4.0, 5.0), (5.0, 8.0)]
    assert (r.step_s, r.exposed_comm_s, r.comm_s) == (8.0, 4.0, 6.0)
    # rank 0's completion order (0, 2, 1): 1-3, 3-6, 6-7
    r = simulate_plan(buckets, 4.0, 2, 2, m, launch_order=[0, 2, 1], forward_s=0.5)
    assert [t[2:] for t in r.buckets] == [(1.0, 3.0), (3.0, 6.0), (6.0, 7.0)] and r.step_s == 7.5
    # no overlap: everything after backward
    r = simulate_plan(buckets, 4.0, 2, 2, m, overlap=False)
    assert r.exposed_comm_s == 6.0 and r.scaling_efficiency == pytest.approx(4.0 / 10.0)
    assert simulate_plan(buckets, 4.0, 1, 1, m).step_s == 4.0  # one rank: no communication
    with pytest.raises(ValueError, match="permutation"):
        simulate_plan(buckets, 4.0, 2, 2, m, launch_order=[0, 0, 1])


class _Fixed:
    """A cost model whose every all-reduce takes ``t`` seconds."""

    def __init__(self, t: float) -> None:
        self.t = t

    def time(self, *args) -> float:
        return self.t


def test_simulate_plan_cpu_contention_by_hand():
    # one 0.5 s all-reduce from t = 0, backward ends at 1.0; the bucket costs 0.2 CPU s, 2 s of compute lost per CPU s
    res = simulate_plan([(100, 0.0, "ring")], 1.0, 4, 2, _Fixed(0.5), comm_cpu_s=0.2, cpu_share=2.0)
    assert res.compute_s == pytest.approx(1.4) and res.step_s == pytest.approx(1.4) and res.exposed_comm_s == 0
    # without contention (the default) the same plan is the plain launch rule
    assert simulate_plan([(100, 0.0, "ring")], 1.0, 4, 2, _Fixed(0.5)).step_s == pytest.approx(1.0)
    # launched at 0.8: [0.8, 1.3] overlaps compute wholly (the delay moves compute's end to 1.4)
    res = simulate_plan([(100, 0.8, "ring")], 1.0, 4, 2, _Fixed(0.5), comm_cpu_s=0.2, cpu_share=2.0)
    assert res.compute_s == pytest.approx(1.4) and res.step_s == pytest.approx(1.4)
    # two buckets, CPU split by bytes: the second (ready 0.9 -> stretched) runs after the first
    res = simulate_plan([(300, 0.0, "ring"), (100, 0.9, "ring")], 1.0, 4, 2, _Fixed(0.5), comm_cpu_s=0.4,
                        cpu_share=1.0)
    # fixed point: E = 1 + 0.3 + 0.1 * (E - 0.9 s') / 0.5 with the second bucket at [max(0.5, 0.9 E), +0.5]
    e = res.compute_s
    start2 = max(0.5, 0.9 * e)
    assert e == pytest.approx(1.0 + 0.3 + 0.1 * (min(start2 + 0.5, e) - start2) / 0.5, abs=1e-9)
    assert res.buckets[1][1] == pytest.approx(0.9 * e) and res.step_s == pytest.approx(max(e, start2 + 0.5))
    # without overlap nothing runs during compute: no delay
    assert simulate_plan([(100, 0.0, "ring")], 1.0, 4, 2, _Fixed(0.5), overlap=False, comm_cpu_s=0.2,
                         cpu_share=2.0).step_s == pytest.approx(1.5)
    with pytest.raises(ValueError, match="cpu_share -1"):
        simulate_plan([(100, 0.0, "ring")], 1.0, 4, 2, _Fixed(0.5), cpu_share=-1)


def test_simulate_plan_two_way_contention_by_hand():
    # wholly inside compute: the 0.5 s all-reduce gains 1.5 x 0.2 s (-> 0.8 s, ends 0.8 <= E = 1.4)
    res = simulate_plan([(100, 0.0, "ring")], 1.0, 4, 2, _Fixed(0.5), comm_cpu_s=0.2, cpu_share=2.0,
                        comm_stretch=1.5)
    assert res.compute_s == pytest.approx(1.4) and res.comm_s == pytest.approx(0.8)
    assert res.buckets[0][3] == pytest.approx(0.8) and res.step_s == pytest.approx(1.4)
    # launched at 0.8, compute ends at 1.0: only f = 0.2 / D of it overlaps compute, so
    # D = 0.5 + 1.5 * 0.2 * 0.2 / D -> D^2 - 0.5 D - 0.06 = 0 -> D = 0.6, the step 1.4
    res = simulate_plan([(100, 0.8, "ring")], 1.0, 4, 2, _Fixed(0.5), comm_cpu_s=0.2, comm_stretch=1.5)
    assert res.comm_s == pytest.approx(0.6) and res.compute_s == pytest.approx(1.0)
    assert res.step_s == pytest.approx(1.4) and res.exposed_comm_s == pytest.approx(0.4)
    # both directions at once: D = 0.5 + 0.3 f, E = 1 + 2 * 0.2 f, f = (E - 0.8) / D (the bucket outlives compute)
    res = simulate_plan([(100, 0.8, "ring")], 1.0, 4, 2, _Fixed(0.5), comm_cpu_s=0.2, cpu_share=2.0,
                        comm_stretch=1.5)
    d, e = res.comm_s, res.compute_s
    f = (e - 0.8) / d
    assert d == pytest.approx(0.5 + 0.3 * f) and e == pytest.approx(1.0 + 0.4 * f) and 0 < f < 1
    # no overlap, or no CPU seconds: no stretch
    assert simulate_plan([(100, 0.0, "ring")], 1.0, 4, 2, _Fixed(0.5), overlap=False, comm_cpu_s=0.2,
                         comm_stretch=1.5).step_s == pytest.approx(1.5)
    assert simulate_plan([(100, 0.8, "ring")], 1.0, 4, 2, _Fixed(0.5), comm_stretch=1.5).step_s == pytest.approx(1.3)
    with pytest.raises(ValueError, match="comm_stretch -1"):
        simulate_plan([(100, 0.0, "ring")], 1.0, 4, 2, _Fixed(0.5), comm_stretch=-1)
