"""``hybrid`` without a cost-model file: the algorithm per message size chosen online, on the real buckets.

The first all-reduces of each size class (wire bytes rounded down to a power of two) run every
candidate algorithm in turn, round-robin with each round starting one candidate later (so a
candidate is not always timed at the same bucket of a step): one warm-up round, then ``trials`` timed rounds (host
wall-clock of the blocking call; on CUDA after synchronizing the current stream). At the next
all-reduce of that class every rank takes the candidate with the smallest median time **on rank
0** (one broadcast of rank 0's medians, float64, one per candidate), so the choice is the same
everywhere, and that class keeps it for the rest of the run. This is Horovod's autotune idea
(measure candidate settings on the job's own traffic, then fix the best) applied to the
algorithm choice: it measures what a start-up calibration would have to model — the real
buckets, wire dtype and pipeline segment, the links as they are, and the contention with
backward that overlapped buckets meet — and needs no file to go stale when the cluster changes.

Cost: per size class, ``(1 + trials) × len(candidates)`` all-reduces run exploring (18 with the
defaults and 6 candidates), some with a slower algorithm, then one broadcast of
``len(candidates)`` float64s. With a cost-model file, ``hybrid`` uses the model instead
(:meth:`fastnet.comm.cost_model.CostModel.choose`).

Correctness: every rank runs the same algorithm for the same call, because the exploration order
depends only on the sequence of message sizes, which is the same on every rank (the synchronizer
launches buckets in an agreed order; DDP calls its hook per bucket in the same order; the
backend's collectives are issued in program order), and the decision is rank 0's.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import torch

from fastnet.comm.communicator import Communicator


def size_class(nbytes: int) -> int:
    """The tuning class of a message of ``nbytes`` bytes: the power of two at or below it (bytes)."""
    return 1 << max(int(nbytes).bit_length() - 1, 0)


class OnlineChooser:
    """Chooses ``hybrid``'s algorithm per size class from timed trials (module docstring).

    Args:
        comm: the communicator the all-reduces run on; the decision is broadcast over it.
        candidates: the algorithms to try (e.g. :data:`fastnet.comm.cost_model.RUNNABLE`).
        trials: timed rounds per candidate after the warm-up round (>= 1).

    Raises:
        ValueError: no candidates, or ``trials`` < 1.
    """

    def __init__(self, comm: Communicator, candidates: Sequence[str], trials: int = 2) -> None:
        if not candidates:
            raise ValueError("OnlineChooser needs at least one candidate algorithm")
        if trials < 1:
            raise ValueError(f"Invalid trials: {trials} (must be >= 1)")
        self.comm, self.candidates, self.trials = comm, tuple(candidates), trials
        self._times: dict[int, dict[str, list[float]]] = {}  # class -> candidate -> measured seconds
        self._calls: dict[int, int] = {}  # class -> exploration calls so far
        self.choices: dict[int, str] = {}  # class -> the agreed algorithm
        self.medians: dict[int, list[float]] = {}  # class -> rank 0's median per candidate (seconds)

    def exploring(self) -> bool:
        """Whether a size class met so far is still being explored (no agreed algorithm yet)."""
        return any(c not in self.choices for c in self._calls)

    def choice(self, nbytes: int) -> str | None:
        """The agreed algorithm for ``nbytes``' class, or None while it is still being explored."""
        return self.choices.get(size_class(nbytes))

    def run(self, nbytes: int, all_reduce: Callable[[str], None], device: torch.device | None = None) -> str:
        """Run one all-reduce of ``nbytes`` wire bytes: ``all_reduce(algorithm)`` with the class's
        choice, or the next exploration trial (timed); returns the algorithm used. Collective at
        the call that ends a class's exploration (the broadcast of rank 0's medians)."""
        c = size_class(nbytes)
        chosen = self.choices.get(c)
        if chosen is not None:
            all_reduce(chosen)
            return chosen
        calls = self._calls.get(c, 0)
        n = len(self.candidates)
        if calls == n * (1 + self.trials):
            chosen = self._decide(c, device)
            all_reduce(chosen)
            return chosen
        alg = self.candidates[(calls + calls // n) % n]  # each round starts one later: no fixed bucket position
        sync = device is not None and device.type == "cuda"
        t0 = time.perf_counter()
        all_reduce(alg)
        if sync:
            torch.cuda.current_stream(device).synchronize()
        elapsed = time.perf_counter() - t0
        if calls >= n:  # after the warm-up round
            self._times.setdefault(c, {}).setdefault(alg, []).append(elapsed)
        self._calls[c] = calls + 1
        return alg

    def _decide(self, c: int, device: torch.device | None) -> str:
        times = self._times[c]
        mine = torch.tensor([statistics.median(times[a]) for a in self.candidates], dtype=torch.float64,
                            device=device if device is not None and device.type == "cuda" else "cpu")
        self.comm.broadcast(mine, 0)  # rank 0's medians: the same decision on every rank
        mine = mine.cpu()
        self.medians[c] = mine.tolist()
        chosen = self.candidates[int(torch.argmin(mine))]
        self.choices[c] = chosen
        return chosen

    def state_dict(self) -> dict[str, object]:
        """The exploration so far and the decisions (for a checkpoint: a resumed run continues them
        instead of exploring again, so it runs the same algorithm for the same call)."""
        return {"calls": dict(self._calls), "times": {c: dict(t) for c, t in self._times.items()},
                "choices": dict(self.choices), "medians": dict(self.medians)}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore :meth:`state_dict`. Raises ValueError for a choice that is not a candidate."""
        bad = sorted(set(state["choices"].values()) - set(self.candidates))
        if bad:
            raise ValueError(f"saved online choices {bad} are not among the candidates {list(self.candidates)}")
        self._calls = {int(c): int(v) for c, v in state["calls"].items()}
        self._times = {int(c): {a: list(v) for a, v in t.items()} for c, t in state["times"].items()}
        self.choices = {int(c): a for c, a in state["choices"].items()}
        self.medians = {int(c): list(v) for c, v in state["medians"].items()}

    def describe(self) -> dict[str, object]:
        """``{size class (bytes): {"algorithm": ..., "median_s": {candidate: seconds}}}`` for the decided classes."""
        return {c: {"algorithm": a, "median_s": dict(zip(self.candidates, self.medians[c]))}
                for c, a in sorted(self.choices.items())}
