"""Fault injection for the restart tests and the soak (``benchmarks/elastic_soak.py``).

``FASTNET_KILL_AT="12:1,27:0,33:1"`` makes the process of the named rank SIGKILL itself right after
the named optimizer step (its metrics written, before any checkpoint of that step), one entry per
launch attempt: entry ``i`` applies when ``TORCHELASTIC_RESTART_COUNT`` is ``i`` (0 without
torchrun), so after the i-th restart the run meets the (i+1)-th fault, and the run that follows the
last entry finishes. Unset (the default), nothing is injected and the check costs one comparison
per step.
"""

from __future__ import annotations

import os
import signal
from typing import Mapping


def kill_step(rank: int, environ: Mapping[str, str] | None = None) -> int | None:
    """The optimizer step after which this rank kills itself in this attempt, or None.

    Raises:
        ValueError: a malformed ``FASTNET_KILL_AT`` or ``TORCHELASTIC_RESTART_COUNT`` (the value named).
    """
    env = os.environ if environ is None else environ
    spec = env.get("FASTNET_KILL_AT", "").strip()
    if not spec:
        return None
    try:
        plan = [tuple(int(v) for v in entry.split(":")) for entry in spec.split(",")]
    except ValueError:
        plan = [()]
    try:
        attempt = int(env.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        raise ValueError(f"Invalid TORCHELASTIC_RESTART_COUNT={env['TORCHELASTIC_RESTART_COUNT']!r} "
                         f"(expected an integer)") from None
    if any(len(e) != 2 or e[0] < 1 or e[1] < 0 for e in plan):
        raise ValueError(f"Invalid FASTNET_KILL_AT={spec!r}: expected STEP:RANK[,STEP:RANK...], steps >= 1, "
                         f"one entry per launch attempt")
    if attempt >= len(plan):
        return None
    step, victim = plan[attempt]
    return step if victim == rank else None


def kill_self() -> None:
    """SIGKILL this process (no cleanup, no flush beyond what was written: a crash)."""
    os.kill(os.getpid(), signal.SIGKILL)
