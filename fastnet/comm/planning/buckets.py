"""Bucket plans from measured gradient ready times: merge gradients while the link is busy anyway.

The fusion threshold trades latency (one α per all-reduce) against overlap (a bucket cannot start
before its last gradient is ready). A fixed threshold gets this wrong both ways: at the 64 MiB
of Jia et al. 2018 (§4.2) ResNet-50's FP16 gradients (≈ 49 MiB) form one bucket, ready only at the
end of backward, so nothing overlaps; a small threshold pays α many times where backward produces
gradients faster than the link can send them.

:func:`plan_buckets` cuts a sequence of gradients (in the order backward produces them) into
buckets by the merged-gradient rule of MG-WFBP (Shi, Chu & Li, "MG-WFBP: Efficient Data
Communication for Distributed Synchronous SGD Algorithms", INFOCOM 2019, §IV): simulate the link
over the measured ready times; gradient i + 1 joins the open bucket when that bucket could not
start before i + 1 is ready anyway — the link is still busy with earlier buckets, or the gap is
shorter than one all-reduce's latency — since merging then delays nothing and saves one latency;
otherwise the bucket closes and starts at once. The fusion threshold becomes an upper bound on a
bucket (as Horovod's ``HOROVOD_FUSION_THRESHOLD``), and ``min_bytes`` a lower bound (except the
last bucket), so a mis-measured latency cannot produce a bucket per tensor.
:class:`fastnet.comm.GradientSynchronizer` applies it once, after measuring a step.
"""

from __future__ import annotations

from typing import Sequence


def plan_buckets(ready_s: Sequence[float], nbytes: Sequence[int], *, max_bytes: int, latency_s: float,
                 bytes_per_s: float, min_bytes: int = 0) -> list[tuple[int, int]]:
    """Cut gradients ``0..m−1`` (in production order) into consecutive buckets.

    Args:
        ready_s: when each gradient became ready, seconds from the start of backward (length m;
            need not be sorted: a bucket is ready at its members' maximum).
        nbytes: each gradient's size on the wire, bytes.
        max_bytes: largest bucket, bytes (> 0; a single larger gradient is a bucket of its own).
        latency_s: one all-reduce's fixed cost α, seconds (≥ 0).
        bytes_per_s: the all-reduce's throughput once started, bytes per second (> 0).
        min_bytes: smallest bucket, bytes (the last one may be smaller).

    Returns:
        ``[(start, end), ...]``: half-open index ranges covering ``0..m−1`` in order.

    Raises:
        ValueError: mismatched lengths, ``max_bytes`` ≤ 0, ``bytes_per_s`` ≤ 0 or a negative
            ``latency_s`` / ``min_bytes`` (each named with its value).
    """
    m = len(ready_s)
    if len(nbytes) != m:
        raise ValueError(f"plan_buckets: {m} ready times but {len(nbytes)} sizes")
    if max_bytes <= 0 or bytes_per_s <= 0 or latency_s < 0 or min_bytes < 0:
        raise ValueError(f"plan_buckets: invalid max_bytes={max_bytes}, bytes_per_s={bytes_per_s}, "
                         f"latency_s={latency_s} or min_bytes={min_bytes} (need max_bytes > 0, bytes_per_s > 0, "
                         f"latency_s >= 0, min_bytes >= 0)")
    out: list[tuple[int, int]] = []
    start, size, ready, link_free = 0, 0, float("-inf"), float("-inf")
    for i in range(m):
        size += nbytes[i]
        ready = max(ready, ready_s[i])
        if i + 1 < m:
            launch = max(ready, link_free)  # when this bucket would start if it closed now
            if size + nbytes[i + 1] <= max_bytes and (size < min_bytes
                                                      or max(ready, ready_s[i + 1]) <= launch + latency_s):
                continue  # merging i + 1 delays nothing (or the bucket is still too small)
        link_free = max(ready, link_free) + latency_s + size / bytes_per_s
        out.append((start, i + 1))
        start, size, ready = i + 1, 0, float("-inf")
    return out
