"""Per-rank timeline of the gradient exchange as a Chrome/Perfetto trace (``--trace``).

    from fastnet.comm import trace
    trace.start(rank)                 # from now on the instrumented code records events
    ...                               # training steps
    trace.stop("run/trace/rank0.json")  # write the JSON; load it in ui.perfetto.dev or chrome://tracing

Events (Trace Event Format, "JSON Object Format": ``{"traceEvents": [...]}``; ``ts``/``dur`` in
microseconds from :func:`start`; ``pid`` = the rank, ``tid`` = the thread, named by metadata
events):

* ``ready`` (instant, category ``bucket``): a bucket's last gradient arrived
  (:class:`fastnet.comm.GradientSynchronizer`), with its index and bytes;
* ``queue wait`` (async, ``bucket``): from the launch of a bucket to the start of its
  all-reduce on the communication thread (it waited behind earlier buckets);
* ``all-reduce bucket N`` (complete, ``bucket``): the whole averaging of one bucket;
* ``cast to wire`` / ``cast back`` (complete, ``phase``): the FP16/BF16 narrowing and widening;
* ``native`` / ``ring`` / ``hierarchical`` ... (complete, ``algorithm``): the sum itself;
* ``intra reduce-scatter``, ``inter reduce-scatter``, ``inter all-gather``, ``intra
  all-gather`` (the ring-based hierarchical algorithms, per pipeline segment), ``inter all-reduce``
  (the collective-composed one; async, issue to completion), ``reduce to leader``, ``leaders all-reduce``, ``broadcast from
  leader`` (the leader algorithms): category ``phase``. Pipelined segments overlap on one thread,
  so the ring phases are async events (``b``/``e``, one track per segment) and nest nowhere;
* trainer: ``step N``, ``forward+backward``, ``synchronize``, ``optimizer`` (category ``train``).

When no trace is started every hook is one global lookup (``_current is None``).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterator

_current: "Tracer | None" = None


class Tracer:
    """The events of one rank (pid ``rank``), thread-safe; :meth:`write` saves them as JSON."""

    def __init__(self, rank: int = 0) -> None:
        self.rank = rank
        self.events: list[dict[str, Any]] = []
        self._t0 = time.perf_counter()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._threads: dict[int, str] = {}

    def now_us(self) -> float:
        return (time.perf_counter() - self._t0) * 1e6

    def _add(self, event: dict[str, Any]) -> None:
        tid = threading.get_ident()
        with self._lock:
            if tid not in self._threads:
                self._threads[tid] = threading.current_thread().name
            self.events.append({"pid": self.rank, "tid": tid, **event})

    def complete(self, name: str, cat: str, start_us: float, end_us: float, **args: Any) -> None:
        """A complete event (``ph: X``) from ``start_us`` to ``end_us`` on this thread."""
        self._add({"name": name, "cat": cat, "ph": "X", "ts": start_us, "dur": max(end_us - start_us, 0.0),
                   "args": args})

    def interval(self, name: str, cat: str, start_us: float, end_us: float, **args: Any) -> None:
        """An async pair (``b``/``e``, its own id) from ``start_us`` to ``end_us``: an interval that
        may overlap others on this thread (a bucket's queue wait, an asynchronous collective)."""
        ident = next(self._ids)
        self._add({"name": name, "cat": cat, "ph": "b", "id": ident, "ts": start_us, "args": args})
        self._add({"name": name, "cat": cat, "ph": "e", "id": ident, "ts": max(end_us, start_us)})

    def instant(self, name: str, cat: str, **args: Any) -> None:
        self._add({"name": name, "cat": cat, "ph": "i", "s": "t", "ts": self.now_us(), "args": args})

    @contextlib.contextmanager
    def span(self, name: str, cat: str, overlapping: bool = False, **args: Any) -> Iterator[None]:
        """Record the block as a complete event, or with ``overlapping`` as an async pair
        (``b``/``e`` with its own id: pipelined phases that interleave on one thread)."""
        start = self.now_us()
        if overlapping:
            ident = next(self._ids)
            self._add({"name": name, "cat": cat, "ph": "b", "id": ident, "ts": start, "args": args})
            try:
                yield
            finally:
                self._add({"name": name, "cat": cat, "ph": "e", "id": ident, "ts": self.now_us()})
            return
        try:
            yield
        finally:
            self.complete(name, cat, start, self.now_us(), **args)

    def write(self, path: str | os.PathLike) -> Path:
        """Write the trace (parents created) and return its path."""
        meta = [{"name": "process_name", "ph": "M", "pid": self.rank, "args": {"name": f"rank {self.rank}"}}]
        with self._lock:
            meta += [{"name": "thread_name", "ph": "M", "pid": self.rank, "tid": tid, "args": {"name": name}}
                     for tid, name in self._threads.items()]
            events = list(self.events)
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"traceEvents": meta + events, "displayTimeUnit": "ms"}))
        return out


def start(rank: int = 0) -> Tracer:
    """Start recording this process's events (replacing any trace in progress)."""
    global _current
    _current = Tracer(rank)
    return _current


def stop(path: str | os.PathLike | None = None) -> Path | None:
    """Stop recording; with ``path``, write the events there (returns the path)."""
    global _current
    tracer, _current = _current, None
    return tracer.write(path) if tracer is not None and path is not None else None


def current() -> Tracer | None:
    """The trace being recorded, or None."""
    return _current


def span(name: str, cat: str, overlapping: bool = False, **args: Any):
    """:meth:`Tracer.span` on the current trace; a no-op context without one."""
    tracer = _current  # read once: another thread may stop the trace meanwhile
    return tracer.span(name, cat, overlapping, **args) if tracer is not None else contextlib.nullcontext()
