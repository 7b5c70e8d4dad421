"""``python -m fastnet.train``: the entry module of ``fastnet-train`` (the loop is :mod:`fastnet.trainer`).

    torchrun --nproc_per_node=2 -m fastnet.train --config experiments/digits.yaml --epochs 20

The trainer's public names stay importable from here (``from fastnet.train import train``).
"""

from __future__ import annotations

import sys
from typing import Sequence

from fastnet.trainer import (NonFiniteLossError, NonFiniteParametersError, Progress, evaluate, param_checksum,
                             parameters_finite, train)

__all__ = ["NonFiniteLossError", "NonFiniteParametersError", "Progress", "evaluate", "main", "param_checksum",
           "parameters_finite", "train"]


def main(argv: Sequence[str] | None = None) -> int:
    """``fastnet-train``: parse ``argv`` (default ``sys.argv[1:]``) and run; see :func:`fastnet.cli.main`.
    Returns the process exit code."""
    from fastnet.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
