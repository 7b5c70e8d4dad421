"""Checkpoints: written atomically by rank 0, loaded with ``torch.load(weights_only=True)``.

Layout of a checkpoint (a dict of tensors and plain Python values):
  ``version``, ``model``, ``optimizer``, ``scheduler``, ``precision``, ``epoch`` (the epoch in
  progress), ``step_in_epoch`` (optimizer steps of that epoch already taken), ``global_step``,
  ``samples_seen``, ``rng`` (one entry per rank, indexed by rank: ``torch``: CPU generator state,
  ``cuda``: list of device states, ``python``: ``random`` state; older checkpoints hold rank 0's
  only), ``progress`` (best top-1, time to target, elapsed seconds) and
  ``config`` (the resolved config, for reference).

A write goes to ``<name>.tmp`` in the same directory, is fsync'ed, then renamed over the target,
so a crash mid-write never replaces a good checkpoint with a broken one.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch

VERSION = 1
LAST = "last.pt"


def save_atomic(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically (temp file, fsync, rename). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def resolve_resume_path(resume: str) -> Path:
    """``resume`` is a checkpoint file, a checkpoints directory holding ``last.pt``, or a run's
    out_dir holding ``checkpoints/last.pt``.

    Raises:
        FileNotFoundError: none of them exists; the message names what was looked for.
    """
    p = Path(resume)
    if p.is_dir():
        candidates = [p / LAST, p / "checkpoints" / LAST]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise FileNotFoundError(f"--resume {resume!r}: no checkpoint in that directory (looked for "
                                    f"{' and '.join(repr(str(c)) for c in candidates)}); refusing to start a fresh run "
                                    f"instead")
        return found[0]
    if not p.is_file():
        raise FileNotFoundError(f"--resume {resume!r}: no such checkpoint file or run directory; refusing to start a "
                                f"fresh run instead")
    return p


def describe(state: dict[str, Any]) -> str:
    """``model M, step S (epoch E), out_dir D``: where a checkpoint came from, for messages."""
    cfg, prog = state.get("config") or {}, state.get("progress") or {}
    return (f"model {cfg.get('model', '?')}, step {prog.get('global_step', '?')} (epoch {prog.get('epoch', '?')}), "
            f"from the run in {cfg.get('out_dir', '?')!r}")


def load(resume: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_atomic` (``weights_only=True``: tensors and plain
    values only, so a checkpoint cannot run code). ``state["path"]`` is set to the file read.

    Raises:
        FileNotFoundError: missing file. ValueError: unreadable, truncated or not a fastnet checkpoint
            (the message names the file and the run's ``config.yaml`` beside it, if there is one).
    """
    path = resolve_resume_path(resume)
    config = next((c for c in (path.parent / "config.yaml", path.parent.parent / "config.yaml") if c.is_file()), None)
    origin = f" (its run's config: {str(config)!r})" if config else ""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt files; its text suggests unsafe loading
        raise ValueError(f"--resume: checkpoint {str(path)!r}{origin} is corrupt or unreadable "
                         f"({type(exc).__name__}); refusing to start a fresh run instead") from None
    if not isinstance(state, dict) or state.get("version") != VERSION or "model" not in state:
        raise ValueError(f"--resume: {str(path)!r}{origin} is not a fastnet checkpoint (version {VERSION})")
    state["path"] = str(path)
    return state


def rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
    }


def restore_rng(saved: list[dict[str, Any]] | dict[str, Any], rank: int, world_size: int, seed: int,
                step: int) -> None:
    """Restore this rank's generators from a checkpoint's ``rng``: ``saved[rank]`` when the
    checkpoint has one state per rank of the same world size (an exact resume: dropout and the like
    continue as in the uninterrupted run); an older single state on every rank; on another world
    size, a fresh seed derived from (``seed``, ``rank``, ``step``), the same on every resume."""
    if isinstance(saved, dict):
        set_rng_state(saved)
    elif len(saved) == world_size:
        set_rng_state(saved[rank])
    else:
        derived = (seed * 1_000_003 + rank) * 1_000_033 + step
        torch.manual_seed(derived)
        random.seed(derived)


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
