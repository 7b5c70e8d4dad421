"""Hierarchy's communicators: how many a rank holds, which are shared, and the order they close in
(stand-in communicators that record splits and closes; the real ones are exercised in test_algorithms)."""

from __future__ import annotations

import pytest

from fastnet.comm.planning.hierarchy import Hierarchy


class Recorder:
    """Stand-in communicator: ``split`` returns a new named stand-in, ``close`` logs its name."""

    concurrent_safe = True

    def __init__(self, name: str, rank: int, size: int, log: list[str]) -> None:
        self.name, self.rank, self.size, self.log = name, rank, size, log

    def split(self, color, key=0):
        self.log.append(f"split {color}")
        return None if color is None else Recorder(f"{self.name}/{len(self.log)}", 0, 2, self.log)

    def close(self) -> None:
        self.log.append(f"close {self.name}")


@pytest.mark.parametrize("rank,leader", [(0, True), (1, False), (2, True), (3, False)])
def test_leaders_share_the_inter_node_communicator_and_close_once_in_order(rank, leader):
    log: list[str] = []
    h = Hierarchy(Recorder("world", rank, 4, log), ranks_per_node=2)
    assert [e for e in log if e.startswith("split")] == ["split " + str(rank // 2), "split " + str(rank % 2)]
    assert (h.leaders is h.inter) == leader and (h.leaders is None) != leader
    assert h.communicators() == [h.intra, h.inter]  # 2 per rank, never the leaders twice
    h.close()
    assert [e for e in log if e.startswith("close")] == [f"close {h.intra.name}", f"close {h.inter.name}"]
