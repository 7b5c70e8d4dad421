"""Cross-rank checks that turn a mismatch into a clear error instead of a hang or corrupted
results: :func:`check_consistency` (named settings, one all-gather) and :func:`check_layout`
(every rank's bucket layout: dtype and elements).
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch

from fastnet.comm.communicators.base import Communicator


def _item_hash(name: str, value: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{name}\0{value}".encode()).digest()[:8], "little", signed=True)


def _gather(comm: Communicator, mine: torch.Tensor) -> torch.Tensor:
    """All-gather a 1-D tensor of equal length on every rank; returns (size, length) on the CPU."""
    device = getattr(comm, "device", None) or torch.device("cpu")
    out = torch.empty(comm.size * mine.numel(), dtype=mine.dtype, device=device)
    comm.all_gather(out, mine.to(device))
    return out.cpu().view(comm.size, -1)


def check_consistency(comm: Communicator, items: Sequence[tuple[str, str]], what: str, advice: str = "") -> None:
    """Collective: check that every rank of ``comm`` holds the same ``items`` — ``(name, value)``
    text pairs such as ``("parameter 3", "(64, 3, 7, 7) float16")`` — and raise naming the first
    item that differs, with each differing rank's value, instead of hanging or corrupting results
    later (DDP's parameter-shape verification does the same at construction).

    Steps: 1) all-gather each rank's item count (one int64); 2) all-gather one 64-bit SHA-256 digest
    per item (padded to the largest count); 3) only on a difference, all-gather the first differing
    item's text (512 bytes per rank). Every rank sees the same gathered tables, so every rank takes
    the same branch and raises the same error: no rank is left waiting. Put count items (e.g.
    "number of parameters") first so that a structural difference is reported as such.

    Raises:
        ValueError: the items differ (message: ``"{what}: ranks disagree on {item}: rank 0: ...;
            rank r: ... {advice}"``).
    """
    if comm.size == 1:
        return
    counts = _gather(comm, torch.tensor([len(items)], dtype=torch.int64)).view(-1)
    width = int(counts.max())
    mine = torch.full((max(width, 1),), -1, dtype=torch.int64)
    for i, (name, value) in enumerate(items):
        mine[i] = _item_hash(name, value)
    rows = _gather(comm, mine)
    differs = (rows != rows[0]).any(dim=0).nonzero()
    if differs.numel() == 0:
        return
    k = int(differs[0])
    text = (f"{items[k][0]} = {items[k][1]}" if k < len(items) else "(no such item)").encode()[:512]
    buf = torch.zeros(512, dtype=torch.uint8)
    if text:
        buf[:len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    texts = [bytes(r.tolist()).rstrip(b"\0").decode(errors="replace") for r in _gather(comm, buf)]
    shown = [0] + [r for r in range(comm.size) if r != 0 and rows[r, k] != rows[0, k]]
    name = items[k][0] if k < len(items) else texts[0].split(" = ")[0]
    raise ValueError(f"{what}: ranks disagree on {name}: "
                     + "; ".join(f"rank {r}: {texts[r].removeprefix(name + ' = ')}" for r in shown)
                     + (f". {advice}" if advice else ""))


def check_layout(comm: Communicator, layout: Sequence[tuple[torch.dtype, int]], what: str = "gradient") -> None:
    """Collective: compare ``layout`` (a list of (dtype, element count)) across the ranks of ``comm``
    (:func:`check_consistency`).

    Raises:
        ValueError: the layouts differ; the message says "{what} layouts differ across ranks" and
            names each differing rank and its entry.
    """
    items = [("number of buffers", str(len(layout)))]
    items += [(f"buffer {i}", f"{str(d).removeprefix('torch.')} x {n}") for i, (d, n) in enumerate(layout)]
    check_consistency(comm, items, f"{what} layouts differ across ranks",
                      "Every rank must all-reduce the same tensors.")
