"""Message schedules and their drivers: a schedule (:data:`Steps`) describes one step's
:class:`~fastnet.comm.communicators.p2p.RingStep` messages at a time; :func:`run_steps` drives one
to the end, :func:`run_pipelined` several in lockstep rounds (segments of one message overlapping
their phases, as NCCL pipelines the chunks of its rings).
"""

from __future__ import annotations

from typing import Any, Generator, Sequence

from fastnet.comm.communicators.p2p import RingStep, post

Steps = Generator[list[RingStep], None, Any]
"""A schedule of message steps: each ``next()`` yields one step's :class:`RingStep` messages
(described, not posted); it is resumed (to finish the step, e.g. add what arrived, and describe the
next) once the driver has posted them and they completed. Its return value is the phase's result.
:func:`run_steps` drives one, :func:`run_pipelined` many."""


def run_steps(steps: Steps) -> Any:
    """Drive ``steps`` to the end, one step at a time; returns the schedule's return value."""
    while True:
        try:
            messages = next(steps)
        except StopIteration as stop:
            return stop.value
        for w in post(messages):
            w.wait()


def _advance(steps: Steps, messages: list[RingStep]) -> bool:
    """Add ``steps``' next step's messages to ``messages``; False once it has ended."""
    try:
        messages.extend(next(steps))
        return True
    except StopIteration:
        return False


def run_pipelined(schedules: Sequence[Steps], depth: int) -> None:
    """Drive ``schedules`` (e.g. one per segment of a message) in lockstep rounds. Each round
    advances every running schedule by one step (a schedule that ends frees its place), starts at
    most one new schedule while fewer than ``depth`` run, then waits for all the round's messages.
    With ``depth`` ≥ the steps per schedule, schedule i takes step j in round i + j: the phases of
    consecutive segments overlap (segment i's inter-node steps while segment i+1 does its
    intra-node ones), as NCCL pipelines the chunks of its rings, and S schedules of s steps take
    S + s − 1 rounds instead of S·s. Every rank runs the same rounds, so messages on each
    communicator are posted in the same order everywhere. Raises ValueError for ``depth < 1``."""
    if depth < 1:
        raise ValueError(f"Invalid pipeline depth: {depth} (must be >= 1)")
    waiting, running = list(reversed(schedules)), []
    while waiting or running:
        messages: list[RingStep] = []
        running = [steps for steps in running if _advance(steps, messages)]  # oldest first, on every rank
        if waiting and len(running) < depth:
            steps = waiting.pop()
            if _advance(steps, messages):
                running.append(steps)
        for w in post(messages):  # one grouped exchange per communicator per round
            w.wait()
