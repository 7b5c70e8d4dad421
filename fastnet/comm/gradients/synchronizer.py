"""GradientSynchronizer: bucketed gradient all-reduce overlapped with backward, with DDP's semantics.

The data-parallel gradient path of Jia et al. 2018 (§4: tensor fusion, overlap with backward) and
of PyTorch DDP (Li et al. 2020, "PyTorch Distributed", §3.2: buckets in reverse registration order,
launched as soon as they are ready, gradients as views into the bucket buffers; §3.2.3: unused
parameters and the globally agreed used-map):

1. **Buckets.** At construction the parameters are taken in reverse registration order (about
   the order backward produces their gradients) and grouped, one dtype per bucket, into buckets of
   at least ``fusion_threshold_bytes`` on the wire (the last parameter may overshoot; the last
   bucket of a dtype may be smaller). Each bucket is one persistent 1-D buffer and every
   ``p.grad`` is a view into it, so there is no packing or unpacking per step. With ``storage``
   (e.g. :meth:`fastnet.precision.MasterWeights.grad_location`) the buckets are slices of the
   existing flat gradient buffers instead.
2. **Ready hooks and launch order.** A post-accumulate-grad hook per parameter marks it ready and
   counts down its bucket. Buckets launch in ``launch_order``, the same on every rank: while the
   next one in that order is complete it is launched. The first step uses index order; after it
   every rank adopts rank 0's observed completion order (broadcast with the step's used-map, as
   DDP rebuilds its buckets from rank 0's order after the first iteration), so a bucket that
   completes late — e.g. the FP32 BatchNorm/bias bucket beside the FP16 ones, complete only when
   backward reaches the first layer — no longer holds back the buckets that complete before it.
2b. **Buckets rebuilt from measured ready times** (``rebuild_buckets``, with overlap). In step
   :data:`REBUILD_STEP` every gradient's ready time (host clock, seconds from the first gradient
   of backward) and the achieved all-reduce throughput (bytes on the wire / communication-thread
   seconds) are recorded; rank 0's values are broadcast with the used-map, and every rank cuts
   the same new buckets with :func:`fastnet.comm.planning.buckets.plan_buckets` (MG-WFBP's merge rule:
   merge while the link is busy anyway; the fusion threshold becomes the largest bucket and
   ``min_bucket_bytes`` the smallest). Without ``storage`` the members are also reordered by
   rank 0's ready order (DDP's rebuild); with it, buckets stay slices of the flat buffers in
   their layout order (planned in the direction backward fills them). The new plan is checked
   across ranks; gradients are kept. This is what makes the paper's 64 MiB threshold overlap at
   all: ResNet-50's FP16 gradients (49 MiB) would otherwise be one bucket, ready only when
   backward ends. On CUDA the throughput comes from CUDA events on the communication stream, but
   the ready times are the hooks' host times, which run ahead of the device (unverified on a GPU).
3. **Unused parameters never block.** A parameter whose hook did not fire in this backward is
   marked ready at the end of backward (an autograd final callback, as DDP's reducer does), or,
   with ``find_unused_parameters=True``, before backward by :meth:`prepare_for_backward`'s graph
   walk (so its bucket can launch during backward). It contributes its current gradient: zero if
   ``p.grad`` is None (e.g. after ``optimizer.zero_grad(set_to_none=True)``).
4. **Overlap.** A launched bucket is averaged on a communication thread (on CUDA: on a side stream
   that first waits for an event recorded on the backward stream) with
   :class:`fastnet.comm.gradients.reducer.BucketReducer`: divide by world size, optional FP16/BF16 wire, ring /
   hierarchical / leader / native / hybrid. Backward continues meanwhile.
5. :meth:`synchronize` (before the optimizer step) launches what is left, all-reduces the
   **used-map** (one int32 per parameter, MAX over ranks: DDP's ``local_used_map``), waits for all,
   and applies the agreed semantics: a parameter used on *any* rank (in any micro-step of this
   step) gets the averaged gradient on every rank; a parameter used on *no* rank is skipped on
   every rank — its ``p.grad`` is set to None (the optimizer skips it) and it is listed in
   :attr:`unused_parameters` (for optimizers over other tensors, e.g. FP32 masters, whose
   gradients live in ``storage``: there the views stay). It returns the seconds it blocked.
6. :meth:`no_sync` (gradient-accumulation micro-steps) disables communication: gradients
   accumulate in the bucket views (or in fresh tensors after ``p.grad = None``, copied into the
   views by the next synced backward) and only the last micro-step communicates.

Checked across ranks at construction (:func:`fastnet.comm.gradients.consistency.check_consistency`; a mismatch is a
ValueError naming the first differing item and the ranks' values, never a hang): the number,
shapes and dtypes of the parameters; algorithm, wire dtype, pre-division, segment, nodes and cost
model; the bucket plan (dtype, elements and resolved algorithm of every bucket, so hybrid's
choices agree). With ``debug=True`` (the trainer's ``FASTNET_DISTRIBUTED_DEBUG=true``, like DDP's
``TORCH_DISTRIBUTED_DEBUG=DETAIL``) every bucket launch is also checked across ranks, one small
all-gather per bucket.

Construction is collective: it splits ``comm`` into a dedicated communicator (so the comm thread's
collectives never interleave with the caller's). While buckets are in flight, do not run other
collectives that need this synchronizer's results; on NCCL, none at all on another communicator
of this process (NCCL's rule for several communicators: :class:`fastnet.comm.communicators.base.Communicator`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import time
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn as nn

from fastnet.comm import trace
from fastnet.comm.communicators.base import Communicator
from fastnet.comm.gradients.comm_thread import CommThread
from fastnet.comm.gradients.consistency import check_consistency
from fastnet.comm.gradients.reducer import WIRE_DTYPES, BucketReducer
from fastnet.comm.planning.buckets import plan_buckets
from fastnet.comm.planning.cost_model import CostModel
from fastnet.precision import flat_view

REBUILD_STEP = 2
"""The synchronized step whose measured ready times re-cut the buckets (the first one's backward
also pays one-time costs: allocation, lazy initialisation, autotuning)."""


def _elapsed_s(start, end) -> float:
    """Seconds between two recorded CUDA events (waits for ``end``)."""
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def _sq_norm(t: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm as a 0-dim float64 tensor, accumulated in float32 at least (FP16 buckets)."""
    acc = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None
    return torch.linalg.vector_norm(t, dtype=acc).double().square()


class Bucket:
    """One fusion bucket: ``tensor`` (1-D, the members' gradients), the ``params`` in it (reverse
    registration order) and the ``algorithm`` that reduces it."""

    __slots__ = ("index", "tensor", "params", "algorithm", "pending", "future", "done_event", "start_event", "busy_s",
                 "local_sq")

    def __init__(self, index: int, tensor: torch.Tensor, params: list[nn.Parameter], algorithm: str) -> None:
        self.index, self.tensor, self.params, self.algorithm = index, tensor, params, algorithm
        self.pending = len(params)
        self.future: concurrent.futures.Future | None = None
        self.done_event = self.start_event = None
        self.busy_s = 0.0  # seconds the communication thread spent on it this step
        self.local_sq: torch.Tensor | None = None  # this rank's squared gradient norm before the all-reduce

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def wire_bytes(self, wire: torch.dtype | None) -> int:
        """Bytes on the wire with wire dtype ``wire`` (None: the gradients' own)."""
        return self.tensor.numel() * (wire or self.tensor.dtype).itemsize

    def device_busy_s(self) -> float:
        """This step's communication time: CUDA events when recorded, else the host time."""
        if self.start_event is not None and self.done_event is not None:
            return _elapsed_s(self.start_event, self.done_event)
        return self.busy_s


class GradientSynchronizer:
    """Averages the gradients of ``params`` over ``comm`` during backward (module docstring).

    Args:
        comm: the data-parallel communicator (world group for TorchCommunicator).
        params: the parameters to synchronize (those with ``requires_grad``), in registration order.
        algorithm: ``native`` | ``ring`` | ``hierarchical`` | ``leader`` | ``hybrid``.
        fusion_threshold_bytes: bucket size on the wire, bytes (> 0); DDP's default is 25 MiB.
        wire_dtype: ``none`` | ``fp16`` | ``bf16``.
        ranks_per_node: emulated node size for the hierarchical algorithms and the cost model
            (None: nodes from the hosts; ``host_id`` overrides this rank's host identity).
        cost_model: link parameters for ``hybrid``.
        overlap: launch buckets from the backward hooks (True) or all in :meth:`synchronize` (False).
            With True the buckets' collectives are issued by the communication thread while backward
            runs: code that issues NCCL collectives of its own during backward on another
            communicator (SyncBatchNorm) needs False, or the two orders may differ across ranks
            (NCCL's rule for several communicators; the trainer refuses the combination).
        storage: ``p -> (flat 1-D tensor, offset)`` where ``p``'s gradient already lives (the FP16
            master-weight buffers); None allocates bucket buffers and points ``p.grad`` at views.
        timeout_s: :meth:`synchronize` raises RuntimeError after waiting this long (None: the
            backend's own collective timeout applies).
        find_unused_parameters: expect :meth:`prepare_for_backward` with the step's outputs before
            each synced backward; its graph walk marks unused parameters ready before backward.
        predivide_factor: divide gradients by this before the sum, by world size / it after
            (default: the world size; :class:`fastnet.comm.gradients.reducer.BucketReducer`).
        debug: check every bucket launch across ranks (one all-gather per bucket).
        rebuild_buckets: re-cut the buckets once from step :data:`REBUILD_STEP`'s measured ready
            times (module docstring, 2b; only with ``overlap`` and more than one rank).
        min_bucket_bytes: the smallest rebuilt bucket on the wire, bytes (DDP's first bucket is
            1 MiB); the last bucket of a dtype may be smaller.
        measure_grad_norms: measure the squared L2 norm of this rank's gradient just before each
            bucket's all-reduce and of the averaged one after it (:meth:`grad_sq_norms`; the
            gradient noise scale, :mod:`fastnet.noise_scale`): one extra pass over each bucket on
            the communication thread/stream and one after :meth:`synchronize`.

    Raises:
        ValueError: bad algorithm / wire dtype / threshold (valid values listed), parameters,
            settings or bucket plans that differ across ranks (the first differing item named), or
            ``storage`` giving non-adjacent gradients to one bucket.
    """

    def __init__(self, comm: Communicator, params: Iterable[nn.Parameter], *, algorithm: str = "ring",
                 fusion_threshold_bytes: int = 25 << 20, wire_dtype: str = "none",
                 ranks_per_node: int | None = None, cost_model: CostModel | None = None, overlap: bool = True,
                 storage: Callable[[torch.Tensor], tuple[torch.Tensor, int]] | None = None,
                 timeout_s: float | None = None, find_unused_parameters: bool = False,
                 predivide_factor: float | None = None, host_id: str | None = None, debug: bool = False,
                 rebuild_buckets: bool = True, min_bucket_bytes: int = 1 << 20,
                 measure_grad_norms: bool = False) -> None:
        if fusion_threshold_bytes <= 0:
            raise ValueError(f"Invalid fusion threshold: {fusion_threshold_bytes} bytes (must be > 0)")
        if wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"Unknown wire dtype {wire_dtype!r}; valid wire dtypes: {', '.join(WIRE_DTYPES)}")
        self.params = [p for p in params if p.requires_grad]
        self.overlap, self.timeout_s = overlap, timeout_s
        self.measure_grad_norms = measure_grad_norms
        self._grad_sq: tuple[torch.Tensor, torch.Tensor] | None = None
        self.find_unused_parameters, self.debug = find_unused_parameters, debug
        self.comm = comm.split(0, comm.rank) if comm.size > 1 else comm  # dedicated: never interleaves
        self._caller_comm, self._closed = comm, False
        self.reducer = BucketReducer(self.comm, algorithm, wire_dtype, ranks_per_node, cost_model,
                                     predivide_factor=predivide_factor, host_id=host_id)
        self._threshold, self._wire, self._storage_fn = fusion_threshold_bytes, WIRE_DTYPES[wire_dtype], storage
        self._storage = storage is not None
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self._set_buckets(self._make_buckets(self._threshold_groups()))
        check_consistency(self.comm, self._plan_items(fusion_threshold_bytes), "GradientSynchronizer",
                          "Every rank must build the same model and pass the same settings and cost-model file.")
        n = len(self.params)
        self.min_bucket_bytes = min_bucket_bytes
        self._rebuild_pending = rebuild_buckets and overlap and self.comm.size > 1
        self.rebuilt = False  # the buckets were re-cut from measured ready times
        self._steps = 0  # synchronized steps so far
        self._t0: float | None = None  # host time of this backward's first gradient
        self._ready_s = [0.0] * n  # ... and of each gradient, seconds after it
        self._plan_input: list[float] | None = None
        self._used = bytearray(n)  # gradient accumulated on this rank this step (no_sync micro-steps too)
        self._ready = bytearray(n)  # counted towards its bucket this step
        self._was_none = bytearray(n)  # p.grad was None when marked ready without a gradient
        self._require_sync = True
        self._callback_queued = False
        self._next = 0  # position in launch_order of the next bucket to launch
        self.launch_order = list(range(len(self.buckets)))  # agreed by every rank; rebuilt after step 1
        self._completed: list[int] = []  # buckets in the order they became complete this step
        self._arrived = 0  # gradients arrived in this step's synced backward
        self._completed_at = [0] * len(self.buckets)  # gradients arrived when each bucket became complete
        self._launched_at = [0] * len(self.buckets)  # ... and when it was launched
        self._order_agreed = self.comm.size == 1
        self._launched_early = 0
        self.unused_parameters: list[nn.Parameter] = []  # used on no rank in the last synchronized step
        self.last_step: dict[str, int] = {}
        self._exposed: float | tuple = 0.0
        self._busy = 0.0
        self._busy_events: list[tuple] = []
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

    def _plan_items(self, threshold: int) -> list[tuple[str, str]]:
        items = [("number of parameters", str(len(self.params))), ("number of buckets", str(len(self.buckets))),
                 *self.reducer.describe(), ("fusion threshold bytes", str(threshold))]
        items += [(f"parameter {i}", f"{tuple(p.shape)} {str(p.dtype).removeprefix('torch.')}")
                  for i, p in enumerate(self.params)]
        items += [(f"bucket {b.index}", f"{str(b.tensor.dtype).removeprefix('torch.')} x {b.tensor.numel()}, "
                   f"{len(b.params)} parameters, {b.algorithm}") for b in self.buckets]
        return items

    def _wire_bytes(self, p: torch.Tensor) -> int:
        return p.numel() * (self._wire or p.dtype).itemsize

    def _threshold_groups(self) -> list[list[nn.Parameter]]:
        """The initial plan: reverse registration order, one dtype per bucket, each at least the
        fusion threshold (the last parameter may overshoot)."""
        groups: list[list[nn.Parameter]] = []
        open_by_dtype: dict[torch.dtype, tuple[list[nn.Parameter], list[int]]] = {}
        for p in reversed(self.params):
            members, size = open_by_dtype.setdefault(p.dtype, ([], [0]))
            if not members:
                groups.append(members)
            members.append(p)
            size[0] += self._wire_bytes(p)
            if size[0] >= self._threshold:
                del open_by_dtype[p.dtype]
        return groups

    def _set_buckets(self, buckets: list[Bucket]) -> None:
        self.buckets = buckets
        self._slot: list[tuple[Bucket, torch.Tensor]] = [None] * len(self.params)  # type: ignore[list-item]
        for b in self.buckets:
            for p, off in zip(b.params, self._offsets(b)):
                self._slot[self._index[id(p)]] = (b, flat_view(b.tensor, off, p))

    def _make_buckets(self, groups: list[list[nn.Parameter]], keep_none: bool = False) -> list[Bucket]:
        """Buckets of ``groups`` (each one dtype, in production order). Without storage: fresh
        buffers, current gradients copied in and ``p.grad`` pointed at the views (``keep_none``:
        a ``p.grad`` of None stays None, e.g. a parameter skipped in this step)."""
        wire, storage = self._wire, self._storage_fn
        groups = [list(g) for g in groups]
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
                    elif not keep_none:
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

    def _rebuild(self, measured: list[float]) -> None:
        """Re-cut the buckets from rank 0's measured ready times and throughput (module
        docstring, 2b). Same input on every rank, so the same plan; then checked across ranks."""
        n = len(self.params)
        ready, bytes_per_s = measured[:n], measured[n]
        if not bytes_per_s > 0:
            return  # nothing was measured (no bucket took time): keep the plan
        groups: list[list[nn.Parameter]] = []
        for dtype in dict.fromkeys(p.dtype for p in reversed(self.params)):
            seq = [i for i in reversed(range(n)) if self.params[i].dtype == dtype]  # reverse registration
            flipped = False
            if not self._storage:  # members may move: take rank 0's ready order (DDP's rebuild)
                seq.sort(key=lambda i: ready[i])
            elif ready[seq[0]] > ready[seq[-1]]:  # fixed layout, produced the other way round: plan that way
                seq.reverse()
                flipped = True
            sizes = [self._wire_bytes(self.params[i]) for i in seq]
            alg = self.reducer.algorithm_for(self._threshold, modelled=True)
            latency = self.reducer.cost_model.time(alg, 1, self.comm.size, self.reducer.ranks_per_node)
            cuts = plan_buckets([ready[i] for i in seq], sizes, max_bytes=self._threshold, latency_s=latency,
                                bytes_per_s=bytes_per_s, min_bytes=self.min_bucket_bytes)
            for a, b in cuts:  # storage buckets take their members in reverse registration order
                members = [self.params[i] for i in seq[a:b]]
                groups.append(members[::-1] if flipped else members)
        self._set_buckets(self._make_buckets(groups, keep_none=True))
        ready_of = [max(ready[self._index[id(p)]] for p in b.params) for b in self.buckets]
        self.launch_order = sorted(range(len(self.buckets)), key=lambda b: (ready_of[b], b))
        self._completed_at = [0] * len(self.buckets)
        self._launched_at = [0] * len(self.buckets)
        self.rebuilt = True
        check_consistency(self.comm, self._plan_items(self._threshold)
                          + [("launch order", " ".join(map(str, self.launch_order)))],
                          "GradientSynchronizer (rebuilt buckets)",
                          "The rebuilt plan comes from rank 0's broadcast measurements; a difference is a bug.")

    @staticmethod
    def _offsets_reversed(members: list[nn.Parameter], start: int) -> list[int]:
        out, off = [], start + sum(p.numel() for p in members)
        for p in members:
            off -= p.numel()
            out.append(off)
        return out

    # -- per step -----------------------------------------------------------------------------
    def prepare_for_backward(self, outputs: torch.Tensor | Iterable[torch.Tensor]) -> None:
        """With ``find_unused_parameters``: walk the autograd graph from ``outputs`` (the loss, or
        the forward's outputs) and mark every parameter it does not reach ready now, so that an
        unused parameter never holds its bucket back during backward (DDP's
        ``prepare_for_backward``). Call after forward, before the synced backward; a no-op in
        :meth:`no_sync` and without ``find_unused_parameters``. Cost: one visit per graph node."""
        if not (self.find_unused_parameters and self._require_sync):
            return
        roots = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
        stack = [t.grad_fn for t in roots if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        seen, reached = set(), set()
        while stack:
            fn = stack.pop()
            if fn in seen:
                continue
            seen.add(fn)
            var = getattr(fn, "variable", None)
            if var is not None:
                reached.add(id(var))
            stack.extend(nxt for nxt, _ in fn.next_functions if nxt is not None)
        for i, p in enumerate(self.params):
            if id(p) not in reached and not self._ready[i]:
                self._mark_without_grad(i)
        self._launch_ready()

    def _on_grad(self, p: torch.Tensor) -> None:
        i = self._index[id(p)]
        self._used[i] = 1  # also in no_sync: used in any micro-step means used in this step
        if not self._require_sync:
            return
        bucket, view = self._slot[i]
        if self._ready[i] or bucket.future is not None:
            raise RuntimeError(f"a gradient of bucket {bucket.index} arrived after the bucket was launched: "
                               "backward ran twice without synchronize() (use no_sync() for accumulation)")
        if p.grad is None or p.grad.data_ptr() != view.data_ptr():  # someone replaced the view
            if p.grad is not None:
                view.copy_(p.grad)
            p.grad = view
        if not self._callback_queued:  # the first hook of this backward: mark the rest at its end
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
        now = time.perf_counter()
        if self._t0 is None:
            self._t0 = now
        self._ready_s[i] = now - self._t0
        self._ready[i] = 1
        self._arrived += 1
        if self._count_down(bucket):
            self._launch_ready()

    def _mark_without_grad(self, i: int) -> None:
        """Parameter ``i`` got no gradient in this backward: its slot keeps the current ``p.grad``
        (zero if None) and it counts as ready."""
        p = self.params[i]
        bucket, view = self._slot[i]
        if p.grad is None:
            view.zero_()
            self._was_none[i] = 1
        elif p.grad.data_ptr() != view.data_ptr():
            view.copy_(p.grad)
            p.grad = view
        self._ready_s[i] = time.perf_counter() - self._t0 if self._t0 is not None else 0.0
        self._ready[i] = 1
        self._count_down(bucket)

    def _count_down(self, bucket: Bucket) -> bool:
        """One more member of ``bucket`` is ready; when it was the last, the bucket joins the
        completed ones (in completion order). Returns whether the bucket is now complete."""
        bucket.pending -= 1
        if bucket.pending:
            return False
        self._completed.append(bucket.index)
        self._completed_at[bucket.index] = self._arrived
        if (tracer := trace.current()) is not None:
            tracer.instant("ready", "bucket", bucket=bucket.index, bytes=bucket.nbytes)
        return True

    def _end_of_backward(self) -> None:
        self._callback_queued = False
        if not self._require_sync:
            return
        for i in range(len(self.params)):
            if not self._ready[i]:
                self._mark_without_grad(i)
        self._launch_ready()

    def _launch_ready(self, early: bool = True) -> None:
        """Launch buckets in the agreed ``launch_order`` while the next one is complete."""
        while self._next < len(self.buckets) and self.buckets[self.launch_order[self._next]].pending <= 0:
            self._launch(self.buckets[self.launch_order[self._next]])
            self._next += 1
            self._launched_early += early

    def _launch(self, bucket: Bucket) -> None:
        self._launched_at[bucket.index] = self._arrived
        if self._thread is None:
            bucket.future = concurrent.futures.Future()
            bucket.future.set_result(None)  # reduced in synchronize()
            return
        ready = None
        if self._cuda:
            ready = torch.cuda.Event()
            ready.record()  # on the backward stream

        tracer = trace.current()
        launched_us = tracer.now_us() if tracer is not None else 0.0

        def reduce() -> None:
            t0 = time.perf_counter()
            if tracer is not None:
                tracer.interval("queue wait", "bucket", launched_us, tracer.now_us(), bucket=bucket.index)
            with trace.span(f"all-reduce bucket {bucket.index}", "bucket", bytes=bucket.nbytes,
                            algorithm=bucket.algorithm):
                self._reduce(bucket, ready)
            bucket.busy_s = time.perf_counter() - t0

        bucket.future = self._thread.submit(reduce)

    def _reduce(self, bucket: Bucket, ready) -> None:
        """Average ``bucket`` on the communication thread (after the ``ready`` event on CUDA)."""
        if ready is None:
            if self.debug:
                self._check_launch(bucket)
            self._measure_local(bucket)
            self.reducer(bucket.tensor, bucket.algorithm)
        else:
            with torch.cuda.stream(self._stream):  # after the previous bucket's collectives (_used_map)
                if self.debug:
                    self._check_launch(bucket)
                self._stream.wait_event(ready)
                start = torch.cuda.Event(enable_timing=True)
                start.record(self._stream)
                self._measure_local(bucket)
                self.reducer(bucket.tensor, bucket.algorithm)
                bucket.done_event = torch.cuda.Event(enable_timing=True)
                bucket.done_event.record(self._stream)
                bucket.start_event = start

    def _measure_local(self, bucket: Bucket) -> None:
        """This rank's squared norm of the bucket before its all-reduce (float32 accumulation, 0-dim
        tensor on the bucket's device and stream; no host sync)."""
        if self.measure_grad_norms:
            bucket.local_sq = _sq_norm(bucket.tensor)

    def grad_sq_norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The last synchronized step's ``(|g_local|², |g_averaged|²)``: squared L2 norms of this
        rank's gradient before the all-reduce and of the averaged gradient after it, over every
        bucket, as 0-dim float64 tensors on the gradients' device (in the gradients' scale: FP16
        buckets carry the loss scale). No host sync.

        Raises:
            RuntimeError: built without ``measure_grad_norms``, or before the first :meth:`synchronize`.
        """
        if not self.measure_grad_norms or self._grad_sq is None:
            raise RuntimeError("grad_sq_norms() needs GradientSynchronizer(measure_grad_norms=True) and a "
                               "synchronized step first")
        return self._grad_sq

    def _check_launch(self, bucket: Bucket) -> None:
        check_consistency(self.comm, [("launched bucket", f"{bucket.index}: {str(bucket.tensor.dtype)[6:]} x "
                                       f"{bucket.tensor.numel()}, {bucket.algorithm}")],
                          "GradientSynchronizer (debug)", "Ranks launched different buckets: their backward "
                          "passes differ (a rank-dependent branch, or a model changed after construction).")

    def _used_map(self) -> list[int]:
        """Collective on the comm thread's order: the used-map, MAX over ranks (int32 per parameter).
        After the first step, also the launch order: rank 0's bucket completion order, broadcast
        (DDP rebuilds its buckets from rank 0's observed order after the first iteration).

        CUDA: issued on the buckets' stream, so these collectives on ``self.comm`` start after the
        last bucket's (which may run on the hierarchical algorithms' other communicators: NCCL's
        rule, :class:`fastnet.comm.communicators.base.Communicator`)."""
        on_stream = contextlib.nullcontext()
        if self._cuda:  # (without the comm thread the buckets ran on the caller's stream: wait for it)
            self._stream.wait_stream(torch.cuda.current_stream(self._stream.device))
            on_stream = torch.cuda.stream(self._stream)
        with on_stream:
            device = getattr(self.comm, "device", None) or torch.device("cpu")
            used = torch.frombuffer(bytearray(self._used), dtype=torch.uint8).to(torch.int32).to(device)
            if self.comm.size > 1:
                self.comm.all_reduce(used, op="max")
                if not self._order_agreed:
                    order = torch.tensor(self._completed, dtype=torch.int64, device=device)
                    self.comm.broadcast(order, 0)
                    self.launch_order = order.tolist()
                    self._order_agreed = True
                if self._rebuild_pending and self._steps + 1 == REBUILD_STEP:
                    # after the buckets (FIFO): rank 0's busy times are final. Ready times + throughput.
                    busy = sum(b.device_busy_s() for b in self.buckets)  # CUDA: events (host time only queues)
                    wire = sum(b.wire_bytes(self._wire) for b in self.buckets)
                    measured = torch.tensor(self._ready_s + [wire / busy if busy > 0 else 0.0], dtype=torch.float64)
                    measured = measured.to(device)
                    self.comm.broadcast(measured, 0)
                    self._plan_input = measured.cpu().tolist()
            return used.tolist()

    def synchronize(self) -> float:
        """Launch what is left, agree on the used parameters, wait for every bucket, and reset for
        the next step. Returns the seconds this call blocked (communication not hidden behind
        backward). One host sync (the used-map).

        Raises:
            RuntimeError: a bucket did not finish within ``timeout_s`` (a peer may be dead), or the
                error a bucket's all-reduce raised (re-raised here, with the bucket named).
        """
        start = time.perf_counter()
        begin = None
        if self._cuda:  # exposed time on the device: the compute stream's wait for the comm stream
            begin = torch.cuda.Event(enable_timing=True)
            begin.record()
        for i in range(len(self.params)):  # no backward reached its end callback (nothing used here)
            if not self._ready[i]:
                self._mark_without_grad(i)
        if self.comm.size > 1:
            self._launch_ready(early=False)
            used_future = self._thread.submit(self._used_map) if self._thread is not None else None
            for b in (self.buckets[i] for i in self.launch_order):
                if self._thread is None:
                    if self.debug:
                        self._check_launch(b)
                    t0 = time.perf_counter()
                    self._measure_local(b)
                    self.reducer(b.tensor, b.algorithm)
                    b.busy_s = time.perf_counter() - t0
                    continue
                self._wait(b.future, f"all-reduce of bucket {b.index} ({b.nbytes} bytes, {b.algorithm})")
                if b.done_event is not None:
                    torch.cuda.current_stream().wait_event(b.done_event)
            used = self._wait(used_future, "all-reduce of the used-map") if used_future else self._used_map()
        else:
            used = list(self._used)
        if self.measure_grad_norms and self.buckets:
            zero = torch.zeros((), dtype=torch.float64, device=self.buckets[0].tensor.device)
            local = sum((b.local_sq if b.local_sq is not None else
                         _sq_norm(b.tensor)  # world size 1
                         for b in self.buckets), zero)
            reduced = sum((_sq_norm(b.tensor) for b in self.buckets), zero)
            self._grad_sq = (local, reduced)
        self.unused_parameters = []
        for i, p in enumerate(self.params):
            if used[i]:
                view = self._slot[i][1]
                if p.grad is None or p.grad.data_ptr() != view.data_ptr():
                    p.grad = view  # set_to_none on this rank, used on another: the averaged gradient
            else:
                self.unused_parameters.append(p)
                if not self._storage:
                    p.grad = None  # used on no rank: skipped by the optimizer on every rank
        self.last_step = {"buckets": len(self.buckets), "launched_before_synchronize": self._launched_early,
                          "unused_parameters": len(self.unused_parameters), "completed_at": list(self._completed_at),
                          "launched_at": list(self._launched_at)}
        self._busy = sum(b.busy_s for b in self.buckets)
        self._busy_events = [(b.start_event, b.done_event) for b in self.buckets
                             if b.start_event is not None and b.done_event is not None]
        self._steps += 1
        if self._plan_input is not None:
            self._rebuild(self._plan_input)
            self._plan_input, self._rebuild_pending = None, False
            self.last_step["rebuilt_buckets"] = len(self.buckets)
        self._reset()
        self._exposed = time.perf_counter() - start
        if begin is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._exposed = (begin, end)
        return time.perf_counter() - start

    def exposed_seconds(self) -> float:
        """Communication of the last step not hidden behind backward, seconds: on CPU the host's
        wait in :meth:`synchronize`; on CUDA the time the compute stream waited for the
        communication stream, from CUDA events (the host's wait would only cover queuing). On CUDA
        this waits for the step's communication to end (call it after the step's own host sync)."""
        if isinstance(self._exposed, tuple):
            begin, end = self._exposed
            end.synchronize()
            return begin.elapsed_time(end) / 1e3
        return self._exposed

    def _wait(self, future: concurrent.futures.Future, what: str):
        try:
            return future.result(timeout=self.timeout_s)
        except concurrent.futures.TimeoutError:
            raise RuntimeError(f"{what} did not finish within {self.timeout_s} s: a peer rank may have died or hung, or the network to it failed") from None
        except Exception as exc:
            raise RuntimeError(f"{what} failed: {exc}") from exc

    def busy_seconds(self) -> float:
        """Seconds the last step's buckets took: on CPU the communication thread's host time; on
        CUDA the communication stream's time from CUDA events, bucket by bucket (waits for them,
        like :meth:`exposed_seconds`). With :meth:`exposed_seconds`: hidden = busy − exposed."""
        if self._busy_events:
            return sum(_elapsed_s(start, end) for start, end in self._busy_events)
        return self._busy

    def _reset(self) -> None:
        for b in self.buckets:
            b.pending, b.future, b.done_event, b.start_event, b.busy_s = len(b.params), None, None, None, 0.0
            b.local_sq = None
        self._next = self._launched_early = self._arrived = 0
        self._completed = []
        self._t0 = None
        n = len(self.params)
        self._used, self._ready, self._was_none = bytearray(n), bytearray(n), bytearray(n)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Within this context backward only accumulates (no communication), as DDP's ``no_sync``."""
        previous, self._require_sync = self._require_sync, False
        try:
            yield
        finally:
            self._require_sync = previous

    def zero_grad(self) -> None:
        """Zero every bucket in place; the views stay (parameters skipped last step keep
        ``p.grad = None`` until they get a gradient again)."""
        for b in self.buckets:
            b.tensor.zero_()

    def measured_plan(self, ready_s: Sequence[float] | None = None) -> dict[str, object]:
        """The last synchronized step as :func:`fastnet.comm.planning.simulate.simulate_plan` takes it:
        ``buckets`` = per bucket (bytes on the wire, ready time: its last gradient's, seconds from
        the first gradient of backward, algorithm), ``launch_order``, ``backward_s`` (the last
        gradient's ready time) and ``ready_s`` (each parameter's ready time, constructor order).
        Host clock (on CUDA: when the hooks ran).

        ``ready_s``: per-parameter ready times to use instead of this step's (e.g. another run's
        ``ready_s``, profiled without communication running), so that this plan is timed on a
        backward that communication did not slow down.

        Raises:
            ValueError: ``ready_s`` does not have one entry per parameter.
        """
        ready = list(self._ready_s) if ready_s is None else [float(r) for r in ready_s]
        if len(ready) != len(self.params):
            raise ValueError(f"measured_plan: ready_s has {len(ready)} entries, expected {len(self.params)} "
                             "(one per parameter, constructor order)")
        buckets = [(b.wire_bytes(self._wire), max(ready[self._index[id(p)]] for p in b.params), self._resolved(b))
                   for b in self.buckets]
        return {"buckets": buckets, "launch_order": list(self.launch_order),
                "backward_s": max((r for _, r, _ in buckets), default=0.0), "ready_s": ready}

    def plan_state(self) -> dict[str, list] | None:
        """The re-cut bucket plan, for a checkpoint: ``buckets`` (each a list of parameter indices,
        constructor order, as the bucket holds them) and ``launch_order`` (once re-cut), and
        ``tuner`` (``hybrid``'s online choice so far, :mod:`fastnet.comm.planning.autotune`); None when
        there is neither.
        A resumed run restores it with :meth:`load_plan_state` instead of re-cutting from its own,
        timing-dependent measurements, so its buckets (and with them the summation order of ring
        and hierarchical all-reduce) are the uninterrupted run's."""
        tuner = self.reducer.tuner.state_dict() if self.reducer.tuner is not None else None
        if not self.rebuilt and tuner is None:
            return None
        plan = {"buckets": [[self._index[id(p)] for p in b.params] for b in self.buckets],
                "launch_order": list(self.launch_order)} if self.rebuilt else {}
        return {**plan, **({"tuner": tuner} if tuner is not None else {})}

    def load_plan_state(self, state: dict[str, list]) -> bool:
        """Adopt a plan saved by :meth:`plan_state` (collective: checked across ranks) and skip the
        re-cut; call before the first step. Returns False (and keeps the plan) when this
        synchronizer would not re-cut (``rebuild_buckets`` off, no overlap, one rank).

        Raises:
            ValueError: the plan does not cover each parameter exactly once, mixes dtypes in a
                bucket, or its launch order is not a permutation of its buckets.
        """
        if state.get("tuner") is not None and self.reducer.tuner is not None:  # hybrid's online choice so far
            self.reducer.tuner.load_state_dict(state["tuner"])
        if "buckets" not in state:  # saved before the re-cut: the run re-cuts as it would have
            return False
        n = len(self.params)
        groups = [list(g) for g in state["buckets"]]
        order = list(state["launch_order"])
        if sorted(i for g in groups for i in g) != list(range(n)) or any(
                len({self.params[i].dtype for i in g}) != 1 for g in groups) or sorted(order) != list(range(len(groups))):
            raise ValueError(f"saved bucket plan does not fit these {n} parameters (buckets {groups!r}, launch order "
                             f"{order}); resume with the model it was saved for, or drop the checkpoint's bucket_plan")
        if not self._rebuild_pending:
            return False
        members = [[self.params[i] for i in (g[::-1] if self._storage else g)] for g in groups]
        self._set_buckets(self._make_buckets(members, keep_none=True))
        self.launch_order = order
        self._completed_at = [0] * len(self.buckets)
        self._launched_at = [0] * len(self.buckets)
        self.rebuilt, self._rebuild_pending = True, False
        self._order_agreed = True  # the saved launch order stands (no re-adoption at the first step)
        check_consistency(self.comm, self._plan_items(self._threshold)
                          + [("launch order", " ".join(map(str, self.launch_order)))],
                          "GradientSynchronizer (restored buckets)",
                          "Every rank loads the same checkpoint; a difference is a bug.")
        return True

    def describe(self) -> list[dict[str, object]]:
        """Per bucket: index, dtype, elements, bytes (in the gradient dtype), parameters, algorithm
        (``hybrid`` without a cost-model file: the online choice for its size, ``hybrid`` while that
        is still being explored)."""
        return [{"bucket": b.index, "dtype": str(b.tensor.dtype).removeprefix("torch."), "elements": b.tensor.numel(),
                 "bytes": b.nbytes, "params": len(b.params),
                 "algorithm": b.algorithm if b.algorithm != "hybrid" else self.reducer.algorithm_for(
                     b.wire_bytes(self._wire))} for b in self.buckets]

    def _resolved(self, b: Bucket) -> str:
        """The algorithm bucket ``b`` runs: hybrid's online choice for its size, or while that is
        still being explored the cost model's prediction (a runnable name, for the simulator)."""
        if b.algorithm != "hybrid":
            return b.algorithm
        chosen = self.reducer.algorithm_for(b.wire_bytes(self._wire))
        return chosen if chosen != "hybrid" else self.reducer.algorithm_for(b.wire_bytes(self._wire), modelled=True)

    def close(self) -> None:
        """Remove the hooks, stop the communication thread, and close the communicators this
        synchronizer made (the hierarchy's, then its own split of ``comm``; the same order on every
        rank). ``comm`` itself stays open: the caller owns it. Idempotent."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._thread is not None:
            self._thread.close()
            self._thread = None
        if not self._closed:
            self._closed = True
            self.reducer.close()
            if self.comm is not self._caller_comm:
                self.comm.close()
