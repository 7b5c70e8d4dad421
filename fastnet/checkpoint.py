"""Checkpoints: written atomically by rank 0, loaded with ``torch.load(weights_only=True)``.

Layout of a checkpoint (a dict of tensors and plain Python values):
  ``version``, ``model``, ``optimizer``, ``scheduler``, ``precision``, ``epoch`` (the epoch in
  progress), ``step_in_epoch`` (optimizer steps of that epoch already taken), ``global_step``,
  ``samples_seen``, ``rng`` (one entry per rank, indexed by rank: ``torch``: CPU generator state,
  ``cuda``: list of device states, ``python``: ``random`` state; older checkpoints hold rank 0's
  only), ``progress`` (best top-1, time to target, elapsed seconds) and
  ``config`` (the resolved config, for reference).

A write goes to ``<name>.tmp`` in the same directory, is fsync'ed, then renamed over the target,
so a crash mid-write never replaces a good checkpoint with a broken one; a failed write (a full disk)
removes its temporary file and leaves every earlier checkpoint as it was. The ``keep`` newest are
kept (``last.pt``, then ``last.1.pt``, ...: renamed down one place just before the new one takes
``last.pt``), and a resume from a directory falls back to the newest that loads (a torn or truncated
file is skipped, saying so).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch

VERSION = 1
LAST = "last.pt"


def older(path: Path, k: int) -> Path:
    """The ``k``-th older checkpoint beside ``path`` (``last.pt`` -> ``last.1.pt``; k = 0: ``path``)."""
    return path if k == 0 else path.with_name(f"{path.stem}.{k}{path.suffix}")


def save_atomic(state: dict[str, Any], path: str | os.PathLike, keep: int = 1, rotate: bool = True) -> Path:
    """Write ``state`` to ``path`` atomically (temp file, fsync, rename), keeping the ``keep - 1``
    previous ones as ``<stem>.1<suffix>`` ... (the oldest dropped). ``rotate=False`` replaces
    ``path`` alone (a second save of the same step must not push an older step out). Returns the path.

    Raises:
        OSError: the write failed (e.g. ENOSPC); the temporary file is removed and the earlier
            checkpoints are untouched. ValueError: ``keep < 1``.
    """
    if keep < 1:
        raise ValueError(f"Invalid keep: {keep} (must be >= 1)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    for k in range(keep - 1 if rotate else 0, 0, -1):  # last.(k-1) -> last.k, oldest first; the oldest kept goes
        if older(path, k - 1).is_file():
            os.replace(older(path, k - 1), older(path, k))
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def check_writable(directory: str | os.PathLike) -> None:
    """Create ``directory`` and write a probe file in it, so an unwritable checkpoint directory is an
    error at the start, not after hours of training.

    Raises:
        ValueError: it cannot be created or written (the reason and the way out named).
    """
    d = Path(directory)
    probe = d / f".fastnet-write-test-{os.getpid()}"
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"checkpoint directory {str(d)!r} is not writable ({type(exc).__name__}: {exc.strerror or exc}); "
                         f"fix its permissions or space, or choose another with --checkpoint-dir / --out-dir") from None


def candidates(directory: Path, keep: int = 8) -> list[Path]:
    """The checkpoints of a checkpoints directory, newest first: ``last.pt``, ``last.1.pt``, ..."""
    return [p for p in (older(directory / LAST, k) for k in range(keep)) if p.is_file()]


def resolve_resume_path(resume: str) -> Path:
    """``resume`` is a checkpoint file, a checkpoints directory holding ``last.pt``, or a run's
    out_dir holding ``checkpoints/last.pt``.

    Raises:
        FileNotFoundError: none of them exists; the message names what was looked for.
    """
    p = Path(resume)
    if p.is_dir():
        looked = [p / LAST, p / "checkpoints" / LAST]
        found = [c for c in looked if candidates(c.parent)]
        if not found:
            raise FileNotFoundError(f"--resume {resume!r}: no checkpoint in that directory (looked for "
                                    f"{' and '.join(repr(str(c)) for c in looked)} and their older copies); refusing "
                                    f"to start a fresh run instead")
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

    ``resume`` naming a directory (a run's out_dir or its checkpoints): the newest of ``last.pt``,
    ``last.1.pt``, ... that loads; the ones skipped are listed in ``state["skipped"]`` as
    ``(path, reason)``. A file named explicitly is that file or an error.

    Raises:
        FileNotFoundError: missing file. ValueError: unreadable, truncated or not a fastnet checkpoint
            (every candidate, for a directory; the message names the file and the run's
            ``config.yaml`` beside it, if there is one).
    """
    path = resolve_resume_path(resume)  # for a directory: <dir>/last.pt, which a torn save may have left missing
    if Path(resume).is_dir():
        skipped = []
        for cand in candidates(path.parent):
            try:
                state = _load_file(cand, map_location)
            except ValueError as exc:
                skipped.append((str(cand), str(exc)))
                continue
            state["skipped"] = skipped
            return state
        raise ValueError("; ".join(reason for _, reason in skipped))
    return _load_file(path, map_location)


def _load_file(path: Path, map_location: str | torch.device) -> dict[str, Any]:
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
