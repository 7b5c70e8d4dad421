"""``hybrid`` without a cost-model file: the algorithm per message size chosen online, on the real buckets.

The first all-reduces of each size class (wire bytes rounded down to a power of two) run every
candidate algorithm in turn, round-robin with each round starting one candidate later (so a
candidate is not always timed at the same bucket of a step): one warm-up round, then ``trials``
timed rounds (host wall-clock of the blocking call; on CUDA after synchronizing the current
stream). Then the ``finalists`` fastest **on rank 0** (one broadcast of rank 0's medians, float64,
one per candidate, so every rank keeps the same ones) take ``refine`` more timed rounds each,
alternating; at the next all-reduce of that class every rank takes the finalist with the smallest
median over all its timed calls on rank 0 (a second broadcast), and that class keeps it for the
rest of the run. The refinement is successive halving: a shared machine times a single
all-reduce with ±30% noise, so two trials alone picked a candidate 10–40% slower than the best
on the emulated cluster (docs/BENCHMARKS.md), while the extra trials go only to the candidates
that can still win. This is Horovod's autotune idea (measure candidate settings on the job's own
traffic, then fix the best) applied to the algorithm choice: it measures what a start-up
calibration would have to model — the real buckets, wire dtype and pipeline segment, the links
as they are, and the contention with backward that overlapped buckets meet — and needs no file
to go stale when the cluster changes.

Cost: per size class, ``(1 + trials) × len(candidates) + finalists × refine`` all-reduces run
exploring (26 with the defaults and 6 candidates), some with a slower algorithm, then two
broadcasts of at most ``len(candidates)`` float64s. With a cost-model file, ``hybrid`` uses the
model instead (:meth:`fastnet.comm.planning.cost_model.CostModel.choose`).

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

from fastnet.comm.communicators.base import Communicator


def size_class(nbytes: int) -> int:
    """The tuning class of a message of ``nbytes`` bytes: the power of two at or below it (bytes)."""
    return 1 << max(int(nbytes).bit_length() - 1, 0)


class OnlineChooser:
    """Chooses ``hybrid``'s algorithm per size class from timed trials (module docstring).

    Args:
        comm: the communicator the all-reduces run on; the decisions are broadcast over it.
        candidates: the algorithms to try (e.g. :data:`fastnet.comm.planning.cost_model.RUNNABLE`).
        trials: timed rounds per candidate after the warm-up round (>= 1).
        finalists: how many of the fastest candidates take the refinement rounds (>= 1).
        refine: timed rounds per finalist after the first decision (>= 0; 0: decide on the
            first ``trials`` rounds alone).

    Raises:
        ValueError: no candidates, ``trials`` < 1, ``finalists`` < 1 or ``refine`` < 0.
    """

    def __init__(self, comm: Communicator, candidates: Sequence[str], trials: int = 2, finalists: int = 2,
                 refine: int = 4) -> None:
        if not candidates:
            raise ValueError("OnlineChooser needs at least one candidate algorithm")
        if trials < 1:
            raise ValueError(f"Invalid trials: {trials} (must be >= 1)")
        if finalists < 1 or refine < 0:
            raise ValueError(f"Invalid finalists {finalists} / refine {refine} (need finalists >= 1, refine >= 0)")
        self.comm, self.candidates, self.trials = comm, tuple(candidates), trials
        self.finalists, self.refine = min(finalists, len(self.candidates)), refine
        self._times: dict[int, dict[str, list[float]]] = {}  # class -> candidate -> measured seconds
        self._calls: dict[int, int] = {}  # class -> exploration calls so far
        self._finalists: dict[int, list[str]] = {}  # class -> the candidates in the refinement rounds
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
        the calls that end a class's first round of trials and its refinement (broadcasts of rank
        0's medians)."""
        c = size_class(nbytes)
        chosen = self.choices.get(c)
        if chosen is not None:
            all_reduce(chosen)
            return chosen
        calls = self._calls.get(c, 0)
        n = len(self.candidates)
        first = n * (1 + self.trials)
        if calls < first:
            alg = self.candidates[(calls + calls // n) % n]  # each round starts one later: no fixed bucket position
            return self._trial(c, calls, alg, all_reduce, device, timed=calls >= n)  # round 1 warms up
        if c not in self._finalists:
            medians = self._rank0_medians(c, self.candidates, device)
            self.medians[c] = medians
            order = sorted(range(n), key=lambda i: medians[i])
            self._finalists[c] = [self.candidates[i] for i in order[:self.finalists]]
        fin = self._finalists[c]
        k, done = len(fin), calls - first
        if k == 1 or done >= k * self.refine:
            medians = self._rank0_medians(c, fin, device) if k > 1 and self.refine else \
                [self.medians[c][self.candidates.index(a)] for a in fin]
            for a, m in zip(fin, medians):
                self.medians[c][self.candidates.index(a)] = m
            chosen = self.choices[c] = fin[min(range(k), key=lambda i: medians[i])]
            all_reduce(chosen)
            return chosen
        return self._trial(c, calls, fin[(done + done // k) % k], all_reduce, device, timed=True)

    def _trial(self, c: int, calls: int, alg: str, all_reduce: Callable[[str], None],
               device: torch.device | None, timed: bool) -> str:
        sync = device is not None and device.type == "cuda"
        t0 = time.perf_counter()
        all_reduce(alg)
        if sync:
            torch.cuda.current_stream(device).synchronize()
        elapsed = time.perf_counter() - t0
        if timed:
            self._times.setdefault(c, {}).setdefault(alg, []).append(elapsed)
        self._calls[c] = calls + 1
        return alg

    def _rank0_medians(self, c: int, names: Sequence[str], device: torch.device | None) -> list[float]:
        """Rank 0's median time per candidate in ``names`` (seconds): one broadcast, so every rank
        takes the same decision from it."""
        times = self._times[c]
        mine = torch.tensor([statistics.median(times[a]) for a in names], dtype=torch.float64,
                            device=device if device is not None and device.type == "cuda" else "cpu")
        self.comm.broadcast(mine, 0)
        return mine.cpu().tolist()

    def state_dict(self) -> dict[str, object]:
        """The exploration so far and the decisions (for a checkpoint: a resumed run continues them
        instead of exploring again, so it runs the same algorithm for the same call)."""
        return {"calls": dict(self._calls), "times": {c: dict(t) for c, t in self._times.items()},
                "finalists": {c: list(f) for c, f in self._finalists.items()},
                "choices": dict(self.choices), "medians": dict(self.medians)}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore :meth:`state_dict` (one saved before the refinement rounds existed loads with its
        classes' choices; an undecided class there starts its refinement). Raises ValueError for a
        choice or finalist that is not a candidate."""
        finalists = state.get("finalists", {})
        named = set(state["choices"].values()) | {a for f in finalists.values() for a in f}
        bad = sorted(named - set(self.candidates))
        if bad:
            raise ValueError(f"saved online choices {bad} are not among the candidates {list(self.candidates)}")
        self._calls = {int(c): int(v) for c, v in state["calls"].items()}
        self._times = {int(c): {a: list(v) for a, v in t.items()} for c, t in state["times"].items()}
        self._finalists = {int(c): list(f) for c, f in finalists.items()}
        self.choices = {int(c): a for c, a in state["choices"].items()}
        self.medians = {int(c): list(v) for c, v in state["medians"].items()}

    def describe(self) -> dict[str, object]:
        """``{size class (bytes): {"algorithm": ..., "median_s": {candidate: seconds}}}`` for the decided classes."""
        return {c: {"algorithm": a, "median_s": dict(zip(self.candidates, self.medians[c]))}
                for c, a in sorted(self.choices.items())}
