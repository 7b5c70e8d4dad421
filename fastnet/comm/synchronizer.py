"""GradientSynchronizer: bucketed gradient all-reduce overlapped with backward.

The data-parallel gradient path of Jia et al. 2018 (§4: tensor fusion, overlap with backward) and
of PyTorch DDP (Li et al. 2020, "PyTorch Distributed", §3.2: buckets in reverse registration order,
launched as soon as they are ready, gradients as views into the bucket buffers):

1. **Buckets.** At construction the parameters are taken in reverse registration order (about
   the order backward produces their gradients) and grouped, one dtype per bucket, into buckets of
   at least ``fusion_threshold_bytes`` on the wire (the last parameter may overshoot; the last
   bucket of a dtype may be smaller). Each bucket is one persistent 1-D buffer and every
   ``p.grad`` is a view into it, so there is no packing or unpacking per step. With ``storage``
   (e.g. :meth:`fastnet.precision.MasterWeights.grad_location`) the buckets are slices of the
   existing flat gradient buffers instead.
2. **Ready hooks.** A post-accumulate-grad hook per parameter counts down its bucket. When a
   bucket's last gradient is in, it and every later-indexed bucket that is also complete are
   launched in index order, so every rank issues the same collectives in the same order.
3. **Overlap.** A launched bucket is averaged on a communication thread (on CUDA: on a side stream
   that first waits for an event recorded on the backward stream) with
   :class:`fastnet.comm.sync.BucketReducer`: divide by world size, optional FP16/BF16 wire, ring /
   hierarchical / leader / native / hybrid. Backward continues meanwhile.
4. :meth:`synchronize` (before the optimizer step) launches buckets that never became ready
   (parameters without gradients this step: reduced as they are), waits for all, and on CUDA makes
   the current stream wait for the side stream. It returns the seconds it blocked (exposed
   communication).
5. :meth:`no_sync` (gradient-accumulation micro-steps) disables the hooks: gradients accumulate in
   the bucket views and only the last micro-step communicates.

Construction is collective: it splits ``comm`` into a dedicated communicator (so the comm thread's
collectives never interleave with the caller's) and checks that every rank has the same bucket
layout (ValueError naming the ranks otherwise). While buckets are in flight, do not run other
collectives that need this synchronizer's results, and do not set ``p.grad = None`` (use
:meth:`zero_grad`; a gradient that was replaced anyway is copied back into its view by the hook).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import queue
import threading
import time
from typing import Callable, Iterable, Iterator

import torch
import torch.nn as nn

from fastnet.comm.communicator import Communicator
from fastnet.comm.cost_model import CostModel
from fastnet.comm.sync import WIRE_DTYPES, BucketReducer, check_layout
from fastnet.precision import flat_view


class Bucket:
    """One fusion bucket: ``tensor`` (1-D, the members' gradients), the ``params`` in it (reverse
    registration order) and the ``algorithm`` that reduces it."""

    __slots__ = ("index", "tensor", "params", "algorithm", "pending", "future", "done_event")

    def __init__(self, index: int, tensor: torch.Tensor, params: list[nn.Parameter], algorithm: str) -> None:
        self.index, self.tensor, self.params, self.algorithm = index, tensor, params, algorithm
        self.pending = len(params)
        self.future: concurrent.futures.Future | None = None
        self.done_event = None

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()


class CommThread:
    """One daemon thread running submitted callables in submission order (FIFO keeps every rank's
    collectives in the same order). Daemon: a collective stuck on a dead peer cannot block exit."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="fastnet-comm", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, fut = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:  # handed to synchronize(), which re-raises it
                fut.set_exception(exc)

    def submit(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((fn, fut))
        return fut

    def close(self, timeout_s: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout_s)  # a thread stuck on a dead peer is left to die with the process


class GradientSynchronizer:
    """Averages the gradients of ``params`` over ``comm`` during backward (module docstring).

    Args:
        comm: the data-parallel communicator (world group for TorchCommunicator).
        params: the parameters to synchronize (those with ``requires_grad``), in registration order.
        algorithm: ``native`` | ``ring`` | ``hierarchical`` | ``leader`` | ``hybrid``.
        fusion_threshold_bytes: bucket size on the wire, bytes (> 0); DDP's default is 25 MiB.
        wire_dtype: ``none`` | ``fp16`` | ``bf16``.
        ranks_per_node: node size for the hierarchical algorithms and the cost model.
        cost_model: link parameters for ``hybrid``.
        overlap: launch buckets from the backward hooks (True) or all in :meth:`synchronize` (False).
        storage: ``p -> (flat 1-D tensor, offset)`` where ``p``'s gradient already lives (the FP16
            master-weight buffers); None allocates bucket buffers and points ``p.grad`` at views.
        timeout_s: :meth:`synchronize` raises RuntimeError after waiting this long (None: the
            backend's own collective timeout applies).

    Raises:
        ValueError: bad algorithm / wire dtype / threshold (valid values listed), bucket layouts
            that differ across ranks, or ``storage`` giving non-adjacent gradients to one bucket.
    """

    def __init__(self, comm: Communicator, params: Iterable[nn.Parameter], *, algorithm: str = "ring",
                 fusion_threshold_bytes: int = 25 << 20, wire_dtype: str = "none",
                 ranks_per_node: int | None = None, cost_model: CostModel | None = None, overlap: bool = True,
                 storage: Callable[[torch.Tensor], tuple[torch.Tensor, int]] | None = None,
                 timeout_s: float | None = None) -> None:
        if fusion_threshold_bytes <= 0:
            raise ValueError(f"Invalid fusion threshold: {fusion_threshold_bytes} bytes (must be > 0)")
        if wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"Unknown wire dtype {wire_dtype!r}; valid wire dtypes: {', '.join(WIRE_DTYPES)}")
        self.params = [p for p in params if p.requires_grad]
        self.overlap, self.timeout_s = overlap, timeout_s
        self.comm = comm.split(0, comm.rank) if comm.size > 1 else comm  # dedicated: never interleaves
        self.reducer = BucketReducer(self.comm, algorithm, wire_dtype, ranks_per_node, cost_model)
        self.buckets = self._build_buckets(fusion_threshold_bytes, WIRE_DTYPES[wire_dtype], storage)
        self._bucket_of = {id(p): (b, flat_view(b.tensor, off, p)) for b in self.buckets
                           for p, off in zip(b.params, self._offsets(b))}
        check_layout(self.comm, [(b.tensor.dtype, b.tensor.numel()) for b in self.buckets][:7]
                     + [(torch.int64, len(self.buckets))], "bucket")
        self._require_sync = True
        self._next = 0  # the next bucket to launch
        self._cuda = bool(self.params) and self.params[0].device.type == "cuda"
        self._stream = torch.cuda.Stream(self.params[0].device) if self._cuda else None
        self._thread = CommThread() if overlap and self.comm.size > 1 else None
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]

    # -- construction -------------------------------------------------------------------------
    @staticmethod
    def _offsets(b: Bucket) -> list[int]:
        out, off = [], 0
        for p in b.params:
            out.append(off)
            off += p.numel()
        return out

    def _build_buckets(self, threshold: int, wire: torch.dtype | None,
                       storage: Callable[[torch.Tensor], tuple[torch.Tensor, int]] | None) -> list[Bucket]:
        groups: list[list[nn.Parameter]] = []
        open_by_dtype: dict[torch.dtype, tuple[list[nn.Parameter], list[int]]] = {}
        for p in reversed(self.params):
            members, size = open_by_dtype.setdefault(p.dtype, ([], [0]))
            if not members:
                groups.append(members)
            members.append(p)
            size[0] += p.numel() * (wire or p.dtype).itemsize
            if size[0] >= threshold:
                del open_by_dtype[p.dtype]
        buckets = []
        for i, members in enumerate(groups):
            numel = sum(p.numel() for p in members)
            if storage is None:
                tensor = torch.zeros(numel, dtype=members[0].dtype, device=members[0].device)
                off = 0
                for p in members:
                    view = flat_view(tensor, off, p)
                    if p.grad is not None:
                        view.copy_(p.grad)
                    p.grad = view
                    off += p.numel()
            else:
                # Reverse registration order: each member sits just before the previous one.
                flat, start = storage(members[-1])
                for p, expect in zip(members, self._offsets_reversed(members, start)):
                    f, o = storage(p)
                    if f.data_ptr() != flat.data_ptr() or o != expect:
                        raise ValueError(f"storage puts the gradients of bucket {i} in non-adjacent places; "
                                         f"a bucket must be one slice of one flat buffer")
                tensor = flat[start:start + numel]
                members.reverse()  # registration order inside the slice, offsets ascending
            algorithm = self.reducer.algorithm_for(numel * (wire or members[0].dtype).itemsize)
            buckets.append(Bucket(i, tensor, members, algorithm))
        return buckets

    @staticmethod
    def _offsets_reversed(members: list[nn.Parameter], start: int) -> list[int]:
        out, off = [], start + sum(p.numel() for p in members)
        for p in members:
            off -= p.numel()
            out.append(off)
        return out

    # -- per step -----------------------------------------------------------------------------
    def _on_grad(self, p: torch.Tensor) -> None:
        if not self._require_sync:
            return
        bucket, view = self._bucket_of[id(p)]
        if p.grad is None or p.grad.data_ptr() != view.data_ptr():  # someone replaced the view
            if p.grad is not None:
                view.copy_(p.grad)
            p.grad = view
        if bucket.future is not None:
            raise RuntimeError(f"a gradient of bucket {bucket.index} arrived after the bucket was launched: "
                               "backward ran twice without synchronize() (use no_sync() for accumulation)")
        bucket.pending -= 1
        if bucket.pending == 0:
            self._launch_ready()

    def _launch_ready(self) -> None:
        while self._next < len(self.buckets) and self.buckets[self._next].pending <= 0:
            self._launch(self.buckets[self._next])
            self._next += 1

    def _launch(self, bucket: Bucket) -> None:
        if self._thread is None:
            bucket.future = concurrent.futures.Future()
            bucket.future.set_result(None)  # reduced in synchronize()
            return
        ready = None
        if self._cuda:
            ready = torch.cuda.Event()
            ready.record()  # on the backward stream

        def reduce() -> None:
            if ready is None:
                self.reducer(bucket.tensor, bucket.algorithm)
                return
            with torch.cuda.stream(self._stream):
                self._stream.wait_event(ready)
                self.reducer(bucket.tensor, bucket.algorithm)
                bucket.done_event = torch.cuda.Event()
                bucket.done_event.record(self._stream)

        bucket.future = self._thread.submit(reduce)

    def synchronize(self) -> float:
        """Launch what is left, wait for every bucket, and reset for the next step. Returns the
        seconds this call blocked (communication not hidden behind backward).

        Raises:
            RuntimeError: a bucket did not finish within ``timeout_s`` (a peer may be dead), or the
                error a bucket's all-reduce raised (re-raised here, with the bucket named).
        """
        start = time.perf_counter()
        if self.comm.size > 1:
            for b in self.buckets[self._next:]:
                b.pending = 0
            self._launch_ready()
            for b in self.buckets:
                if self._thread is None:
                    self.reducer(b.tensor, b.algorithm)
                    continue
                try:
                    b.future.result(timeout=self.timeout_s)
                except concurrent.futures.TimeoutError:
                    raise RuntimeError(f"all-reduce of bucket {b.index} ({b.nbytes} bytes, {b.algorithm}) did not "
                                       f"finish within {self.timeout_s} s: a peer rank may have died") from None
                except Exception as exc:
                    raise RuntimeError(f"all-reduce of bucket {b.index} ({b.nbytes} bytes, {b.algorithm}) "
                                       f"failed: {exc}") from exc
                if b.done_event is not None:
                    torch.cuda.current_stream().wait_event(b.done_event)
        self._reset()
        return time.perf_counter() - start

    def _reset(self) -> None:
        for b in self.buckets:
            b.pending, b.future, b.done_event = len(b.params), None, None
        self._next = 0

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Within this context backward only accumulates (no communication), as DDP's ``no_sync``."""
        previous, self._require_sync = self._require_sync, False
        try:
            yield
        finally:
            self._require_sync = previous

    def zero_grad(self) -> None:
        """Zero every bucket (hence every ``p.grad``) in place; the views stay."""
        for b in self.buckets:
            b.tensor.zero_()

    def describe(self) -> list[dict[str, object]]:
        """Per bucket: index, dtype, elements, bytes (in the gradient dtype), parameters, algorithm."""
        return [{"bucket": b.index, "dtype": str(b.tensor.dtype).removeprefix("torch."), "elements": b.tensor.numel(),
                 "bytes": b.nbytes, "params": len(b.params), "algorithm": b.algorithm} for b in self.buckets]

    def close(self) -> None:
        """Remove the hooks and stop the communication thread."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._thread is not None:
            self._thread.close()
            self._thread = None
