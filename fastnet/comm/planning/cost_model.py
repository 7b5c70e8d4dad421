"""The α-β (latency-bandwidth) cost model of all-reduce, its calibration, and the hybrid choice.

A message step over a link costs ``α + m·β`` seconds for ``m`` bytes (Hockney's model, as used by
Thakur, Rabenseifner & Gropp 2005, "Optimization of Collective Communication Operations in MPICH",
§3, and by Jia et al. 2018, §4.2). Each link level has its own :class:`Link`: ``intra`` (ranks of one
node) and ``inter`` (between nodes); the backend's own all-reduce gets a third, ``native``, fitted to
its measured times with the ring formula. For ``n`` bytes on ``N`` ranks in nodes of ``k``
(``m = N / k`` nodes):

==================  ==========================================================  ===================
algorithm           time (seconds)                                              steps
==================  ==========================================================  ===================
ring                2(N−1)·(α + α_p2p + n/N·β), over ``inter`` when m > 1       2(N−1)
hierarchical        2(k−1)·(α_i + n/k·β_i) + 2(m−1)·(α_e + s·n/(k·m)·β_e)       2(k−1) + 2(m−1)
hierarchical_p2p    the same + (2(k−1) + 2(m−1))·α_p2p                          2(k−1) + 2(m−1)
                    (pipelined in segments: :meth:`CostModel.time`)
leader (Jia et al.) 4(k−1)·(α_i + n/k·β_i) + 2(m−1)·(α_e + n/m·β_e)             4(k−1) + 2(m−1)
leader_p2p          the same + 2(m−1)·α_p2p (the leaders' ring)                 4(k−1) + 2(m−1)
tree                2⌈log₂N⌉·(α + n·β) (binary-tree reduce + broadcast)          2⌈log₂N⌉
halving_doubling    2⌈log₂N⌉·α + 2(N−1)/N·n·β (Rabenseifner)                     2⌈log₂N⌉
native              the ring formula with the ``native`` link                    2(N−1)
==================  ==========================================================  ===================

``α_p2p`` is the software cost per step of fastnet's own point-to-point schedules (the ``p2p``
level); the collective-composed ``hierarchical`` and ``leader`` pay the backend's per-step cost,
which is part of the links' α.

``leader``'s intra-node reduce and broadcast are each counted as a ring reduce-scatter plus a
gather (scatter plus all-gather), 2(k−1) steps, which gives the paper's 4(k−1) + 2(N/k − 1) steps
against the flat ring's 2(N−1). The reduction arithmetic is folded into β.

The inter-node link belongs to the node: ``inter_links_per_node`` (NICs) of them. A flat ring with
consecutive ranks per node and ``leader`` send one flow out of each node; ``hierarchical`` runs k
inter-node rings at once, which share the node's links: ``s = k / min(k, inter_links_per_node)``.
With one NIC per node (Jia et al.'s P40 nodes; the emulated cluster of benchmarks/topology) the
hierarchical algorithm therefore moves as many bytes across the node's link as ``leader`` and
wins over the flat ring through the ring's 2(N−1)/N·n > 2(m−1)/m·n inter-node bytes, not through
the 1/k split (measured: docs/BENCHMARKS.md, emulated cluster).

:func:`calibrate` fits the links to a ``fastnet-bench --json`` sweep by non-negative least squares
on relative error; :meth:`CostModel.choose` is the hybrid algorithm's per-message choice.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import yaml

MODELLED = ("native", "ring", "hierarchical", "hierarchical_p2p", "leader", "leader_p2p", "tree", "halving_doubling")
RUNNABLE = ("native", "ring", "hierarchical", "hierarchical_p2p", "leader", "leader_p2p")  # hybrid picks among these
_LEVELS = ("intra", "inter", "native", "p2p")


@dataclasses.dataclass(frozen=True)
class Link:
    """One link level: ``alpha_s`` latency per message step (seconds), ``beta_s_per_byte`` inverse
    bandwidth (seconds per byte; 1e-9 is 1 GB/s). Raises ValueError for a negative value."""

    alpha_s: float
    beta_s_per_byte: float

    def __post_init__(self) -> None:
        if not (self.alpha_s >= 0 and self.beta_s_per_byte >= 0):
            raise ValueError(f"Invalid link: alpha_s {self.alpha_s}, beta_s_per_byte {self.beta_s_per_byte} "
                             f"(both must be >= 0 seconds)")

    @classmethod
    def of(cls, latency_us: float, bandwidth_gbps: float) -> "Link":
        """From latency (µs) and bandwidth (GB/s, 1e9 bytes per second)."""
        if bandwidth_gbps <= 0:
            raise ValueError(f"Invalid bandwidth: {bandwidth_gbps} GB/s (must be > 0)")
        return cls(latency_us * 1e-6, 1e-9 / bandwidth_gbps)

    @property
    def bandwidth_gbps(self) -> float:
        return math.inf if self.beta_s_per_byte == 0 else 1e-9 / self.beta_s_per_byte


def _shape(world_size: int, ranks_per_node: int | None) -> tuple[int, int, int]:
    if world_size < 1:
        raise ValueError(f"Invalid world size {world_size} (must be >= 1)")
    k = ranks_per_node or world_size
    if not 1 <= k <= world_size:
        raise ValueError(f"Invalid ranks_per_node {ranks_per_node} for world size {world_size}")
    return world_size, k, -(-world_size // k)


def steps(algorithm: str, world_size: int, ranks_per_node: int | None = None) -> int:
    """Message steps one rank takes (the table in the module docstring). Raises ValueError for an
    unknown algorithm (valid ones listed)."""
    n, k, m = _shape(world_size, ranks_per_node)
    log = math.ceil(math.log2(n)) if n > 1 else 0
    table = {"ring": 2 * (n - 1), "native": 2 * (n - 1), "hierarchical": 2 * (k - 1) + 2 * (m - 1),
             "leader": 4 * (k - 1) + 2 * (m - 1), "tree": 2 * log, "halving_doubling": 2 * log}
    table.update(hierarchical_p2p=table["hierarchical"], leader_p2p=table["leader"])
    if algorithm not in table:
        raise ValueError(f"Unknown algorithm {algorithm!r}; modelled algorithms: {', '.join(MODELLED)}")
    return table[algorithm]


def coefficients(algorithm: str, nbytes: float, world_size: int, ranks_per_node: int | None = None,
                 inter_links_per_node: int = 1, segment_bytes: int = 0) -> dict[str, tuple[float, float]]:
    """Per link level, ``(latency steps, bytes)`` such that time = Σ steps·α + bytes·β (the model is
    linear in the link parameters; :func:`calibrate` fits them from these). Bytes are per rank on
    the critical path. ``segment_bytes`` > 0: ``ring`` sends each step's chunk (n / N bytes) in
    G = ⌈n / N / segment⌉ pipelined segments (:func:`fastnet.comm.algorithms.ring_all_reduce`):
    the link terms are unchanged (the addition overlaps the transfer; it is folded into the
    calibrated β) and the software cost counts 2(N−1)·G exchanges. Raises ValueError for an
    unknown algorithm."""
    n, k, m = _shape(world_size, ranks_per_node)
    steps(algorithm, n, k)  # validates the name
    if n == 1:
        return {}
    out = _link_coefficients(algorithm.removesuffix("_p2p"), nbytes, n, k, m, inter_links_per_node)
    p2p_steps = {"ring": 2 * (n - 1), "hierarchical_p2p": 2 * (k - 1) + 2 * (m - 1), "leader_p2p": 2 * (m - 1)}
    if p2p_steps.get(algorithm):
        segments = math.ceil(nbytes / n / segment_bytes) if algorithm == "ring" and segment_bytes > 0 else 1
        out["p2p"] = (float(p2p_steps[algorithm] * max(1, segments)), 0.0)
    return out


def _link_coefficients(algorithm: str, nbytes: float, n: int, k: int, m: int,
                       inter_links_per_node: int) -> dict[str, tuple[float, float]]:
    if algorithm in ("ring", "native"):
        level = "native" if algorithm == "native" else ("inter" if m > 1 else "intra")
        return {level: (2.0 * (n - 1), 2.0 * (n - 1) / n * nbytes)}
    if algorithm == "tree":
        level = "inter" if m > 1 else "intra"
        s = 2.0 * math.ceil(math.log2(n))
        return {level: (s, s * nbytes)}
    if algorithm == "halving_doubling":
        level = "inter" if m > 1 else "intra"
        return {level: (2.0 * math.ceil(math.log2(n)), 2.0 * (n - 1) / n * nbytes)}
    intra_steps = 2.0 * (k - 1) if algorithm == "hierarchical" else 4.0 * (k - 1)
    out = {"intra": (intra_steps, intra_steps * nbytes / k)} if k > 1 else {}
    if m > 1:
        share = k / min(k, max(1, inter_links_per_node))  # concurrent inter-node rings per node link
        chunk = nbytes / k * share if algorithm == "hierarchical" else nbytes
        out["inter"] = (2.0 * (m - 1), 2.0 * (m - 1) / m * chunk)
    return out


@dataclasses.dataclass(frozen=True)
class CostModel:
    """α-β parameters per link level; predicts all-reduce times and picks the fastest algorithm.

    The defaults are order-of-magnitude placeholders for one CPU host over loopback (intra 30 µs,
    5 GB/s) with a 1 Gbit/s Ethernet between nodes (inter 50 µs, 0.125 GB/s); :func:`calibrate`
    replaces them with measured ones. ``inter_links_per_node``: NICs per node (module docstring).
    ``p2p`` is not a link: its α is the software cost of one step of fastnet's point-to-point
    schedules (``ring``, ``*_p2p``: Python, a grouped exchange, the wait), added to the link's α;
    its placeholder 250 µs is what gloo on the development CPU measured (250–800 µs), and
    :func:`calibrate` fits it from ring/``*_p2p`` rows against the collective variants' rows.
    ``to_dict()`` keys: ``intra``, ``inter``, ``native``, ``p2p`` (each ``{alpha_s,
    beta_s_per_byte}``; files without ``p2p`` load with the placeholder) and ``inter_links_per_node``.
    """

    intra: Link = Link.of(30.0, 5.0)
    inter: Link = Link.of(50.0, 0.125)
    native: Link = Link.of(30.0, 5.0)
    p2p: Link = Link(250e-6, 0.0)
    inter_links_per_node: int = 1

    def level_times(self, algorithm: str, nbytes: float, world_size: int,
                    ranks_per_node: int | None = None, segment_bytes: int = 0) -> dict[str, float]:
        """Predicted seconds per level (``intra``, ``inter``, ``native``, and ``p2p``: fastnet's
        per-step software overhead of its point-to-point schedules) of one SUM all-reduce of
        ``nbytes`` bytes, without the hierarchical pipeline (``segment_bytes``: the ring's
        segments, :func:`coefficients`)."""
        links = {"intra": self.intra, "inter": self.inter, "native": self.native, "p2p": self.p2p}
        return {lv: s * links[lv].alpha_s + b * links[lv].beta_s_per_byte for lv, (s, b) in
                coefficients(algorithm, nbytes, world_size, ranks_per_node, self.inter_links_per_node,
                             segment_bytes).items()}

    def time(self, algorithm: str, nbytes: float, world_size: int, ranks_per_node: int | None = None,
             segment_bytes: int = 0) -> float:
        """Predicted seconds for one SUM all-reduce of ``nbytes`` bytes.

        ``segment_bytes`` > 0: ``hierarchical`` and ``hierarchical_p2p`` are pipelined in segments
        of that size (:mod:`fastnet.comm.algorithms`): with S = ⌈n / segment⌉ segments
        of s steps and per-segment link times t_l, the first segment passes every level and each
        further one costs the slowest level, ``Σ_l t_l + (S − 1)·max_l t_l`` (the pipeline
        formula; the last, shorter segment, as the algorithms cut it, costs its own slowest
        level), plus the software overhead of S + s − 1 lockstep rounds, ``(S + s − 1)·α_p2p``.
        ``ring`` sends each step's chunk in pipelined segments (:func:`coefficients`)."""
        if algorithm.startswith("hierarchical") and 0 < segment_bytes < nbytes:
            per = self.level_times(algorithm, segment_bytes, world_size, ranks_per_node)
            overhead = per.pop("p2p", 0.0)
            if not per:
                return 0.0
            full, tail = divmod(nbytes, segment_bytes)  # the algorithms cut full segments and one shorter tail
            segments = int(full) + (tail > 0)
            rounds = segments + steps(algorithm, world_size, ranks_per_node) - 1
            t = sum(per.values()) + (int(full) - 1) * max(per.values())
            if tail > 0:
                t += max(v for lv, v in self.level_times(algorithm, tail, world_size, ranks_per_node).items()
                         if lv != "p2p")
            return t + rounds * self.p2p.alpha_s * bool(overhead)
        return sum(self.level_times(algorithm, nbytes, world_size, ranks_per_node, segment_bytes).values())

    def choose(self, nbytes: float, world_size: int, ranks_per_node: int | None = None,
               candidates: Sequence[str] = RUNNABLE, segment_bytes: int = 0, pipelined_levels: bool = True) -> str:
        """The hybrid algorithm's choice: the candidate with the smallest predicted time (ties: the
        earlier candidate; ``segment_bytes`` as in :meth:`time`). The ``hierarchical`` variants
        are left out when nodes are unequal. ``pipelined_levels=False``: the two levels cannot
        overlap (NCCL communicators, :func:`fastnet.comm.communicators.base.serial`), so the
        hierarchical variants run unsegmented (:class:`fastnet.comm.planning.hierarchy.Hierarchy`) and are
        predicted so; the ring keeps its segments."""
        n, k, _ = _shape(world_size, ranks_per_node)
        usable = [a for a in candidates if not a.startswith("hierarchical") or n % k == 0]
        if not usable:
            raise ValueError(f"no usable algorithm among {list(candidates)} for world size {n}, ranks_per_node {k}")

        def segment(a: str) -> int:
            return 0 if not pipelined_levels and a.startswith("hierarchical") else segment_bytes

        return min(usable, key=lambda a: (self.time(a, nbytes, n, k, segment(a)), usable.index(a)))

    def to_dict(self) -> dict[str, Any]:
        return {**{lv: dataclasses.asdict(getattr(self, lv)) for lv in _LEVELS},
                "inter_links_per_node": self.inter_links_per_node}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CostModel":
        """Raises ValueError naming an unknown level or a malformed link."""
        data = dict(data)
        links = int(data.pop("inter_links_per_node", 1))
        unknown = set(data) - set(_LEVELS)
        if unknown:
            raise ValueError(f"Unknown cost-model levels {sorted(unknown)}; valid levels: {', '.join(_LEVELS)}")
        if links < 1:
            raise ValueError(f"Invalid inter_links_per_node: {links} (must be >= 1)")
        try:
            return cls(**{lv: Link(float(v["alpha_s"]), float(v["beta_s_per_byte"])) for lv, v in data.items()},
                       inter_links_per_node=links)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed cost model {data!r}: each level needs alpha_s and beta_s_per_byte") from exc

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> "CostModel":
        """From a YAML file written by :meth:`save` / ``fastnet-bench --calibrate``. Raises
        ValueError for a missing file, invalid or unsafe YAML (file:line:column) or malformed content."""
        from fastnet.yamlio import load_yaml_file

        data = load_yaml_file(path, "cost model")  # one-line errors for bad or unsafe YAML
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of link levels, got {type(data).__name__}")
        return cls.from_dict(data)


def calibrate(rows: Iterable[dict[str, Any]], world_size: int, ranks_per_node: int | None = None,
              base: CostModel | None = None, segment_bytes: int = 0,
              levels: Sequence[str] | None = None) -> CostModel:
    """Fit the link parameters to measured all-reduce times.

    ``rows``: ``fastnet-bench`` rows (``algorithm``, ``size`` in bytes, ``time_us``), from
    ``world_size`` ranks in nodes of ``ranks_per_node``; a row may carry its own ``world_size``,
    ``ranks_per_node`` and ``segment_bytes`` (sweeps of different shapes fitted together, e.g. a
    one-node ring, a one-rank-per-node ring and the whole cluster's collective-composed
    ``hierarchical``, which together separate the links' α from ``p2p``'s). Solves
    min Σ ((predicted − measured) / measured)² over the α, β of the levels the rows exercise,
    subject to α, β ≥ 0 (``scipy.optimize.nnls``); levels no row exercises keep ``base``'s values.
    ``segment_bytes`` > 0: the rows were measured with a pipelined ``hierarchical``
    (:meth:`CostModel.time`), whose rows longer than a segment are not linear in α, β and are left
    out, and a segmented ``ring`` (counted in its exchanges). ``levels``: fit only these (default:
    every level the rows exercise); the others are held at ``base``'s values, e.g. ``levels=("intra",)`` with
    ``base.p2p`` zero folds fastnet's per-step software cost into the link's α. Raises ValueError
    if no row is usable or ``levels`` names an unknown level.
    """
    from scipy.optimize import nnls

    base = base or CostModel()
    fit = tuple(levels) if levels is not None else _LEVELS
    if set(fit) - set(_LEVELS):
        raise ValueError(f"Unknown cost-model levels {sorted(set(fit) - set(_LEVELS))}; valid levels: {', '.join(_LEVELS)}")
    eqs, rhs = [], []
    for r in rows:
        if r["algorithm"] not in MODELLED or r["time_us"] <= 0:
            continue
        seg = r.get("segment_bytes", segment_bytes)
        if r["algorithm"].startswith("hierarchical") and 0 < seg < r["size"]:
            continue
        coef = coefficients(r["algorithm"], r["size"], r.get("world_size", world_size),
                            r.get("ranks_per_node", ranks_per_node), base.inter_links_per_node, seg)
        if not coef:
            continue
        t = r["time_us"] * 1e-6
        row = np.zeros(2 * len(_LEVELS))
        held = 0.0  # seconds from the levels held at base's values
        for lv, (s, b) in coef.items():
            i = _LEVELS.index(lv)
            if lv in fit:
                row[2 * i], row[2 * i + 1] = s / t, b / t  # relative error: every size weighs the same
            else:
                held += s * getattr(base, lv).alpha_s + b * getattr(base, lv).beta_s_per_byte
        eqs.append(row)
        rhs.append(1.0 - held / t)
    if not eqs:
        raise ValueError("calibrate: no usable rows (need algorithm in "
                         f"{', '.join(MODELLED)}, time_us > 0, world size > 1)")
    a = np.array(eqs)
    used = [i for i in range(a.shape[1]) if a[:, i].any()]
    # Scale columns to comparable magnitude (α ~ 1e-5 s, β ~ 1e-10 s/B) before NNLS.
    scale = np.abs(a[:, used]).max(axis=0)
    sol, _ = nnls(a[:, used] / scale, np.array(rhs))
    x = np.array([v for lv in _LEVELS for v in dataclasses.astuple(getattr(base, lv))])
    x[used] = sol / scale
    return CostModel(**{lv: Link(float(x[2 * i]), float(x[2 * i + 1])) for i, lv in enumerate(_LEVELS)},
                     inter_links_per_node=base.inter_links_per_node)
