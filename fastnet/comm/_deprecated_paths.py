"""The deprecated module paths of the issue-38 re-layout (``fastnet.comm.sync``, ``.synchronizer``,
``.communicator``, ...): each old module forwards its names, on attribute access, to the module that
defines them now, with a DeprecationWarning naming the new path. Names are looked up on every
access (PEP 562 ``__getattr__``), never copied, so module state is read where it lives. The old
paths are removed in fastnet 0.3.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Callable


def forward(old: str, moved: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of the deprecated module ``old``: ``moved`` maps each
    name to the module that now defines it. ``__getattr__`` raises AttributeError for any other name."""

    def __getattr__(name: str) -> object:
        try:
            new = moved[name]
        except KeyError:
            raise AttributeError(f"module {old!r} has no attribute {name!r}") from None
        warnings.warn(f"{old}.{name} moved to {new}.{name}; the old path is removed in fastnet 0.3",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(new), name)

    def __dir__() -> list[str]:
        return sorted(moved)

    return __getattr__, __dir__
