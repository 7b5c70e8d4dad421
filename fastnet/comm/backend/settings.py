"""The backend's settings, read from the environment when a group is created (``FASTNET_ALGORITHM``,
``FASTNET_WIRE_DTYPE``, ``FASTNET_FUSION_MB``, ``FASTNET_RANKS_PER_NODE``, ``FASTNET_COST_MODEL``,
``FASTNET_SEGMENT_MB``, ``FASTNET_BASE_BACKEND``): :class:`BackendConfig`. A bad value raises
ValueError naming the variable and the valid choices.
"""

from __future__ import annotations

import dataclasses
import os

from fastnet.comm.gradients.reducer import ALGORITHMS, WIRE_DTYPES

BACKEND_NAME = "fastnet"
BASE_BACKENDS = ("gloo", "nccl")


@dataclasses.dataclass(frozen=True)
class BackendConfig:
    """The ``FASTNET_*`` settings of :class:`FastnetProcessGroup` (module docstring)."""

    algorithm: str = "ring"
    wire_dtype: str = "none"
    fusion_mb: float = 25.0
    ranks_per_node: int | None = None
    cost_model: str | None = None
    segment_mb: float = 4.0
    base_backend: str = "gloo"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "BackendConfig":
        """Read ``FASTNET_*`` from ``env`` (default ``os.environ``).

        Raises:
            ValueError: an unknown algorithm, wire dtype or base backend (the valid ones listed), or
                a number that does not parse or is out of range (the variable named).
        """
        env = os.environ if env is None else env

        def number(name: str, default: float, kind=float, low: float = 0.0):
            raw = env.get(name)
            if raw is None or raw == "":
                return default
            try:
                value = kind(raw)
            except ValueError:
                raise ValueError(f"Invalid {name}={raw!r}: expected a {kind.__name__}") from None
            if value <= low:
                raise ValueError(f"Invalid {name}={raw!r}: must be > {low:g}")
            return value

        algorithm = env.get("FASTNET_ALGORITHM", "ring") or "ring"
        if algorithm not in ALGORITHMS:
            raise ValueError(f"Invalid FASTNET_ALGORITHM={algorithm!r}; valid algorithms: {', '.join(ALGORITHMS)}")
        wire = env.get("FASTNET_WIRE_DTYPE", "none") or "none"
        if wire not in WIRE_DTYPES:
            raise ValueError(f"Invalid FASTNET_WIRE_DTYPE={wire!r}; valid wire dtypes: {', '.join(WIRE_DTYPES)}")
        base = env.get("FASTNET_BASE_BACKEND", "gloo") or "gloo"
        if base not in BASE_BACKENDS:
            raise ValueError(f"Invalid FASTNET_BASE_BACKEND={base!r}; valid base backends: {', '.join(BASE_BACKENDS)}")
        rpn = env.get("FASTNET_RANKS_PER_NODE")
        return cls(algorithm=algorithm, wire_dtype=wire, fusion_mb=number("FASTNET_FUSION_MB", 25.0),
                   ranks_per_node=number("FASTNET_RANKS_PER_NODE", 0, int) if rpn else None,
                   cost_model=env.get("FASTNET_COST_MODEL") or None,
                   segment_mb=number("FASTNET_SEGMENT_MB", 4.0, low=-1e-12), base_backend=base)
