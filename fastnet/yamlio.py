"""Reading YAML files (``--config``, ``--cost-model``) with errors a user can act on.

Only ``yaml.safe_load``: a ``!!python/...`` tag or any other non-standard tag is refused. Every
failure becomes one ``ValueError`` line naming the file, the line and column, and the problem,
instead of a PyYAML traceback.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml


def load_yaml_file(path: str | os.PathLike, what: str = "YAML file") -> Any:
    """Parse ``path`` with ``yaml.safe_load``. Returns the document (None for an empty file).

    Raises:
        ValueError: the file is missing or unreadable, not valid YAML, or uses a tag that safe YAML
            does not construct (e.g. ``!!python/object``); the message is one line,
            ``<what> FILE:LINE:COLUMN: problem``.
    """
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ValueError(f"{what} {str(p)!r} does not exist") from None
    except OSError as exc:
        raise ValueError(f"{what} {str(p)!r} cannot be read ({exc.strerror or exc})") from None
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(p)
        problem = " ".join(str(exc.problem or exc.context or "invalid YAML").split())
        if isinstance(exc, yaml.constructor.ConstructorError) and "tag" in problem:
            problem += " (only plain YAML is read: no !!python/ or custom tags)"
        raise ValueError(f"{what} {where}: {problem}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{what} {p}: {' '.join(str(exc).split())}") from None
