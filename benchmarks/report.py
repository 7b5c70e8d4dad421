"""Shared output of the benchmarks: print a markdown section and optionally append it to a file."""

from __future__ import annotations


def emit(lines: list[str], append: str | None) -> None:
    """Print ``lines`` as one markdown block; with ``append`` (e.g. docs/BENCHMARKS.md) also append it there."""
    table = "\n".join(lines) + "\n"
    print(table)
    if append:
        with open(append, "a") as f:
            f.write("\n" + table)
