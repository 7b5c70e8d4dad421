"""The α-β cost model: the paper's step counts, the formulas, calibration, the hybrid choice."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastnet.comm.planning.cost_model import CostModel, Link, calibrate, coefficients, steps


def test_step_counts_reproduce_jia_et_al():
    # Jia et al. 2018, §4.2: flat ring 2(N-1) steps vs hierarchical 4(k-1) + 2(N/k - 1).
    assert steps("ring", 1024) == 2046
    assert steps("leader", 1024, 16) == 4 * 15 + 2 * 63 == 186
    assert steps("hierarchical", 1024, 16) == steps("hierarchical_p2p", 1024, 16) == 2 * 15 + 2 * 63
    assert steps("leader_p2p", 1024, 16) == 186
    assert steps("tree", 1024) == steps("halving_doubling", 1024) == 20
    assert steps("ring", 1) == 0 and steps("tree", 5) == 6


def test_formulas_by_hand():
    m = CostModel(intra=Link(1e-6, 1e-9), inter=Link(1e-5, 1e-8), native=Link(2e-6, 2e-9), p2p=Link(3e-6, 0.0))
    n = 1 << 20
    # one node of 4: ring over the intra link, plus fastnet's per-step software cost
    assert m.time("ring", n, 4) == pytest.approx(6 * (1e-6 + 3e-6 + n / 4 * 1e-9))
    # 2 nodes x 2: the flat ring's slowest link is the inter-node one
    assert m.time("ring", n, 4, 2) == pytest.approx(6 * (1e-5 + 3e-6 + n / 4 * 1e-8))
    # the point-to-point variants pay the software cost per step, the collective ones do not
    assert m.time("hierarchical_p2p", n, 4, 2) == pytest.approx(m.time("hierarchical", n, 4, 2) + 4 * 3e-6)
    assert m.time("leader_p2p", n, 4, 2) == pytest.approx(m.time("leader", n, 4, 2) + 2 * 3e-6)
    # one NIC per node: the 2 concurrent inter-node rings of hierarchical share it
    assert m.time("hierarchical", n, 4, 2) == pytest.approx(2 * (1e-6 + n / 2 * 1e-9) + 2 * 1e-5 + n * 1e-8)
    two_nics = dataclasses.replace(m, inter_links_per_node=2)
    assert two_nics.time("hierarchical", n, 4, 2) == pytest.approx(2 * (1e-6 + n / 2 * 1e-9) + 2 * (1e-5 + n / 4 * 1e-8))
    assert two_nics.time("leader", n, 4, 2) == m.time("leader", n, 4, 2)
    assert m.time("leader", n, 4, 2) == pytest.approx(4 * (1e-6 + n / 2 * 1e-9) + 2 * (1e-5 + n / 2 * 1e-8))
    assert m.time("native", n, 2) == pytest.approx(2 * (2e-6 + n / 2 * 2e-9))
    assert m.time("tree", n, 4) == pytest.approx(4 * (1e-6 + n * 1e-9))
    assert m.time("halving_doubling", n, 4) == pytest.approx(4 * 1e-6 + 1.5 * n * 1e-9)
    assert m.time("ring", n, 1) == 0.0
    # a slow inter-node link: hierarchical moves 1/k of the bytes across it
    assert m.choose(64 << 20, 4, 2, ("ring", "hierarchical", "leader")) == "hierarchical"
    assert m.choose(64 << 20, 6, 4, ("ring", "hierarchical", "leader")) == "leader"  # unequal nodes


def test_pipelined_hierarchical_by_hand():
    m = CostModel(intra=Link(1e-4, 1e-9), inter=Link(1e-4, 1e-8), p2p=Link(0.0, 0.0))
    n, seg = 64 << 20, 4 << 20
    per = m.level_times("hierarchical_p2p", seg, 4, 2)
    assert set(per) == {"intra", "inter", "p2p"} and per["inter"] > per["intra"]
    # first segment passes both levels, the other 15 cost the slower (inter-node) one each
    assert m.time("hierarchical_p2p", n, 4, 2, seg) == pytest.approx(per["intra"] + per["inter"] + 15 * per["inter"])
    assert m.time("hierarchical_p2p", n, 4, 2, seg) < m.time("hierarchical_p2p", n, 4, 2)
    assert m.time("hierarchical_p2p", seg, 4, 2, seg) == m.time("hierarchical_p2p", seg, 4, 2)  # one segment
    assert m.time("leader", n, 4, 2, seg) == m.time("leader", n, 4, 2)  # only hierarchical_p2p is pipelined
    assert m.time("hierarchical", n, 4, 2, seg) < m.time("hierarchical", n, 4, 2)  # the collective one too
    assert m.time("hierarchical_p2p", n, 1, 1, seg) == 0.0
    # a short tail: 3 full segments and one of a quarter segment (a 12.5 MiB DDP bucket in 4 MiB
    # segments) cost 3 full ones through the pipeline plus the tail's own slowest level, not a 4th full one
    odd = 3 * seg + seg // 4
    tail = m.level_times("hierarchical_p2p", seg // 4, 4, 2)
    assert m.time("hierarchical_p2p", odd, 4, 2, seg) == pytest.approx(per["intra"] + 3 * per["inter"] + tail["inter"])
    assert m.time("hierarchical_p2p", odd, 4, 2, seg) < m.time("hierarchical_p2p", 4 * seg, 4, 2, seg)
    # software cost: one α_p2p per lockstep round, 16 segments of 4 steps = 19 rounds
    costly = dataclasses.replace(m, p2p=Link(1e-3, 0.0))
    assert costly.time("hierarchical_p2p", n, 4, 2, seg) == pytest.approx(m.time("hierarchical_p2p", n, 4, 2, seg)
                                                                            + 19 * 1e-3)
    # pipelining hides the intra-node phases: it can turn the choice at large sizes
    slow_intra = CostModel(intra=Link(1e-4, 0.6e-8), inter=Link(1e-4, 1e-8), p2p=Link(0.0, 0.0))
    assert slow_intra.choose(n, 4, 2, ("ring", "hierarchical_p2p")) == "ring"
    assert slow_intra.choose(n, 4, 2, ("ring", "hierarchical_p2p"), segment_bytes=seg) == "hierarchical_p2p"


def test_segmented_ring_counts_its_exchanges():
    m = CostModel(intra=Link(1e-4, 1e-9), p2p=Link(1e-3, 0.0))
    n, seg = 64 << 20, 4 << 20  # 4 ranks: chunks of 16 MiB, 4 segments each
    assert m.time("ring", n, 4, 4, seg) == pytest.approx(m.time("ring", n, 4, 4) + 6 * 3 * 1e-3)
    assert m.time("ring", 16 << 20, 4, 4, seg) == m.time("ring", 16 << 20, 4, 4)  # one segment per chunk
    assert coefficients("ring", n, 4, 4, segment_bytes=seg)["p2p"] == (24.0, 0.0)
    truth = CostModel(intra=Link.of(50.0, 2.0), p2p=Link(300e-6, 0.0))
    rows = [{"algorithm": alg, "size": s, "time_us": truth.time(alg, s, 4, 4, seg) * 1e6}
            for alg in ("ring", "native") for s in (1 << 12, 1 << 20, 1 << 24, 1 << 26, 1 << 28)]
    fit = calibrate(rows, 4, 4, base=CostModel(native=truth.native), segment_bytes=seg, levels=("intra", "p2p"))
    assert fit.p2p.alpha_s == pytest.approx(truth.p2p.alpha_s, rel=1e-3)


def test_calibrate_leaves_out_pipelined_rows():
    truth = CostModel(intra=Link.of(50.0, 2.0), inter=Link.of(80.0, 0.1))
    seg = 1 << 20
    rows = [{"algorithm": alg, "size": s, "time_us": truth.time(alg, s, 4, 2, seg) * 1e6}
            for alg in ("ring", "hierarchical", "hierarchical_p2p") for s in (1 << 10, 1 << 16, 1 << 20, 1 << 24)]
    fit = calibrate(rows, 4, 2, segment_bytes=seg)
    for row in rows:
        assert fit.time(row["algorithm"], row["size"], 4, 2, seg) * 1e6 == pytest.approx(row["time_us"], rel=1e-3)
    rows.append({"algorithm": "hierarchical_p2p", "size": 1 << 26, "time_us": 1.0})  # nonsense, but pipelined
    assert calibrate(rows, 4, 2, segment_bytes=seg) == fit


def test_calibrate_separates_software_cost_from_the_links():
    """α_p2p is fitted from the point-to-point rows against the collective rows of the same sweep:
    the per-variant α is measured, not assumed."""
    truth = CostModel(intra=Link.of(20.0, 5.0), inter=Link.of(60.0, 0.2), native=Link.of(30.0, 4.0),
                      p2p=Link(400e-6, 0.0))
    algs = ("native", "ring", "hierarchical", "hierarchical_p2p", "leader", "leader_p2p")
    rows = [{"algorithm": a, "size": s, "time_us": truth.time(a, s, 8, 4) * 1e6}
            for a in algs for s in (8, 1 << 12, 1 << 16, 1 << 20, 1 << 24)]
    fit = calibrate(rows, 8, 4)
    assert fit.p2p.alpha_s == pytest.approx(400e-6, rel=1e-3)
    assert fit.intra.alpha_s == pytest.approx(20e-6, rel=1e-3) and fit.inter.alpha_s == pytest.approx(60e-6, rel=1e-3)
    assert CostModel.from_dict({k: v for k, v in fit.to_dict().items() if k != "p2p"}).p2p == CostModel().p2p


def test_choose_crosses_over_with_size():
    # native: low latency, low bandwidth; ring: high latency, high bandwidth
    m = CostModel(intra=Link.of(200.0, 10.0), native=Link.of(10.0, 1.0))
    assert m.choose(1 << 10, 2, candidates=("native", "ring")) == "native"
    assert m.choose(256 << 20, 2, candidates=("native", "ring")) == "ring"


@settings(max_examples=30, deadline=None)
@given(alpha_us=st.floats(1.0, 500.0), bw=st.floats(0.05, 50.0), a2=st.floats(1.0, 500.0), bw2=st.floats(0.05, 50.0))
def test_calibrate_recovers_parameters(alpha_us, bw, a2, bw2):
    truth = CostModel(intra=Link.of(alpha_us, bw), inter=Link.of(a2, bw2), native=Link.of(a2, bw))
    rows = [{"algorithm": alg, "size": s, "time_us": truth.time(alg, s, 4, 2) * 1e6}
            for alg in ("ring", "hierarchical", "native") for s in (8, 1 << 10, 1 << 16, 1 << 20, 1 << 24)]
    fit = calibrate(rows, 4, 2)
    for row in rows:
        assert fit.time(row["algorithm"], row["size"], 4, 2) * 1e6 == pytest.approx(row["time_us"], rel=1e-3)
    assert fit.inter.bandwidth_gbps == pytest.approx(bw2, rel=1e-3)


def test_calibrate_keeps_unexercised_levels_and_round_trips(tmp_path):
    base = CostModel()
    rows = [{"algorithm": "ring", "size": s, "time_us": 50 + s / 2e3} for s in (1 << 10, 1 << 20, 1 << 24)]
    fit = calibrate(rows, 2, base=base)
    assert fit.inter == base.inter and fit.native == base.native and fit.intra != base.intra
    fit.save(tmp_path / "cm.yaml")
    assert CostModel.load(tmp_path / "cm.yaml") == fit
    with pytest.raises(ValueError, match="Invalid inter_links_per_node: 0"):
        CostModel.from_dict({**fit.to_dict(), "inter_links_per_node": 0})


def test_bad_input():
    with pytest.raises(ValueError, match="modelled algorithms: native, ring, hierarchical, hierarchical_p2p, leader, "
                                         "leader_p2p, tree"):
        steps("butterfly", 4)
    with pytest.raises(ValueError, match="Invalid ranks_per_node 5 for world size 4"):
        coefficients("ring", 10, 4, 5)
    with pytest.raises(ValueError, match="Invalid link"):
        Link(-1.0, 0.0)
    with pytest.raises(ValueError, match="Invalid bandwidth: 0 GB/s"):
        Link.of(1.0, 0)
    with pytest.raises(ValueError, match="Unknown cost-model levels \\['wan'\\]"):
        CostModel.from_dict({"wan": {"alpha_s": 1, "beta_s_per_byte": 1}})
    with pytest.raises(ValueError, match="no usable rows"):
        calibrate([{"algorithm": "ring", "size": 8, "time_us": 3.0}], 1)


def test_calibrate_only_the_named_levels():
    truth = CostModel(intra=Link.of(40.0, 3.0), p2p=Link(300e-6, 0.0))
    rows = [{"algorithm": "ring", "size": s, "time_us": truth.time("ring", s, 4) * 1e6} for s in (8, 1 << 16, 1 << 22)]
    folded = calibrate(rows, 4, base=CostModel(p2p=Link(0.0, 0.0)), levels=("intra",))
    assert folded.p2p.alpha_s == 0.0 and folded.intra.alpha_s == pytest.approx(340e-6, rel=1e-3)
    held = calibrate(rows, 4, base=CostModel(p2p=Link(300e-6, 0.0)), levels=("intra",))
    assert held.intra.alpha_s == pytest.approx(40e-6, rel=1e-3)
    with pytest.raises(ValueError, match="Unknown cost-model levels \\['wan'\\]"):
        calibrate(rows, 4, levels=("wan",))


def test_calibrate_fits_sweeps_of_different_shapes_together():
    """cluster.py study's calibration: a one-node ring, a one-rank-per-node ring and the whole
    cluster's collective-composed hierarchical (each row carrying its shape) pin intra, inter and
    p2p; the rings alone cannot tell a link's α from fastnet's per-step cost."""
    truth = CostModel(intra=Link.of(120.0, 1.5), inter=Link.of(400.0, 0.1), p2p=Link(300e-6, 0.0))
    seg = 4 << 20
    shapes = {"intra": ("ring", 2, 2, seg), "inter": ("ring", 2, 1, seg), "composed": ("hierarchical", 4, 2, 0)}
    rows = [{"algorithm": alg, "size": s, "world_size": w, "ranks_per_node": k, "segment_bytes": sg,
             "time_us": truth.time(alg, s, w, k, sg) * 1e6}
            for alg, w, k, sg in shapes.values() for s in (1 << 16, 1 << 20, 1 << 22, 1 << 24, 1 << 26)]
    fit = calibrate(rows, 4, 2, levels=("intra", "inter", "p2p"))  # the default shape is overridden per row
    for lv in ("intra", "inter", "p2p"):
        assert getattr(fit, lv).alpha_s == pytest.approx(getattr(truth, lv).alpha_s, rel=1e-3)
        assert getattr(fit, lv).beta_s_per_byte == pytest.approx(getattr(truth, lv).beta_s_per_byte, rel=1e-3)
    # without the composed rows, α_p2p and the links' α trade off: the fit cannot recover them
    rings = [r for r in rows if r["algorithm"] == "ring"]
    folded = calibrate(rings, 4, 2, base=CostModel(p2p=Link(0.0, 0.0)), levels=("intra", "inter"))
    assert folded.inter.alpha_s == pytest.approx(truth.inter.alpha_s + truth.p2p.alpha_s, rel=0.02)  # ~: segments add p2p steps


def test_choose_without_pipelined_levels_unsegments_only_the_hierarchical_variants():
    """``pipelined_levels=False`` (NCCL: the two levels cannot overlap, so Hierarchy runs them
    unsegmented): the hierarchical variants are predicted unsegmented, the ring keeps its segments
    (one communicator: nothing to serialize)."""
    from fastnet.comm.planning.cost_model import CostModel, Link

    seg = 4 << 20
    flat = CostModel(native=Link.of(50, 0.12453))  # 2 ranks, 64 MiB: segments cost the ring 3.5 ms
    assert flat.choose(64 << 20, 2, 1, ("native", "ring"), segment_bytes=seg) == "native"
    assert flat.choose(64 << 20, 2, 1, ("native", "ring"), segment_bytes=0) == "ring"
    assert flat.choose(64 << 20, 2, 1, ("native", "ring"), segment_bytes=seg, pipelined_levels=False) == "native"
    # 8 ranks in nodes of 4, slow native and inter: the pipeline is what makes hierarchical win
    two_level = CostModel(native=Link.of(50, 0.125), intra=Link.of(30, 0.2), inter=Link.of(50, 0.125),
                          p2p=Link(1e-5, 0))
    assert two_level.choose(64 << 20, 8, 4, segment_bytes=seg) == "hierarchical"
    assert two_level.choose(64 << 20, 8, 4, segment_bytes=seg, pipelined_levels=False) == "native"
