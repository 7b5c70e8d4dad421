""":class:`FastnetProcessGroup`: the c10d ``Backend`` behind ``init_process_group("fastnet")``.
What it routes through fastnet and what it delegates is in :mod:`fastnet.comm.backend`.
"""

from __future__ import annotations

import collections
import datetime
from typing import Sequence

import torch
import torch.distributed as dist

from fastnet.comm import scratch
from fastnet.comm.backend.adapter import FastnetWork, _coalesced_or_each, _device_of, _flat, _op_name
from fastnet.comm.backend.cuda import _cuda_nccl_missing, _CudaPath, _serialized
from fastnet.comm.backend.settings import BACKEND_NAME, BackendConfig
from fastnet.comm.communicators.c10d import C10dCommunicator
from fastnet.comm.communicators.p2p import ring_all_gather_into, ring_reduce_scatter_into
from fastnet.comm.gradients.comm_thread import CommThread
from fastnet.comm.gradients.consistency import check_consistency
from fastnet.comm.gradients.reducer import BucketReducer
from fastnet.comm.planning.cost_model import CostModel

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class FastnetProcessGroup(dist.ProcessGroup):
    """The ``fastnet`` process group of ``size`` ranks (module docstring): fastnet's all-reduce,
    reduce-scatter and all-gather (CPU tensors on a communication thread, CUDA tensors on a side
    stream with ``FASTNET_BASE_BACKEND=nccl``), everything else delegated to the base backend.
    Built by torch.distributed (``init_process_group("fastnet")``, ``new_group``); construction is
    collective over the group's ``store``. ``routed`` counts the calls of the collectives fastnet
    can take by where they went: ``"fastnet:all_reduce"``, ``"base:all_reduce"`` (an op or dtype
    fastnet leaves to the base backend), and so on.

    Raises:
        ValueError: a bad ``FASTNET_*`` setting (:meth:`BackendConfig.from_env`), or settings
            that differ across ranks (:func:`fastnet.comm.gradients.consistency.check_consistency`, every rank
            raises). RuntimeError: ``FASTNET_BASE_BACKEND=nccl`` without CUDA or CuPy's NCCL.
    """

    _MIN_SIZE = 2  # fastnet's algorithms run from this world size (one rank: nothing to reduce)

    def __init__(self, store, rank: int, size: int, timeout: datetime.timedelta,
                 config: BackendConfig | None = None) -> None:
        super().__init__(rank, size)

        self.config = config or BackendConfig.from_env()
        self._rank, self._size, self.timeout = rank, size, timeout
        self._store = store
        self._base = dist.ProcessGroupGloo(dist.PrefixStore("fastnet/base", store), rank, size, timeout)
        self._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO, self._base)
        own_store = dist.PrefixStore("fastnet/own", store)
        own = dist.ProcessGroupGloo(own_store, rank, size, timeout)
        self.comm = C10dCommunicator(own, rank, size, own_store, timeout)
        self._cost_model = CostModel.load(self.config.cost_model) if self.config.cost_model else None
        cuda_missing = _cuda_nccl_missing() if self.config.base_backend == "nccl" else ""
        # before anything else collective: a rank with other settings would split differently
        # (hierarchical) or send other byte counts (wire dtype) and hang or corrupt, not fail
        check_consistency(self.comm, self._settings(cuda_missing), "fastnet backend settings differ across ranks",
                          "Give every rank the same FASTNET_* environment (and the same cost-model file).")
        if cuda_missing:
            raise RuntimeError(f"FASTNET_BASE_BACKEND=nccl runs fastnet's algorithms on CUDA tensors through CuPy's "
                               f"NCCL, which this process cannot use: {cuda_missing}")
        self._base_cuda = None
        if self.config.base_backend == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self._base_cuda = dist.ProcessGroupNCCL(dist.PrefixStore("fastnet/base_nccl", store), rank, size, opts)
            self._register_backend(torch.device("cuda"), dist.ProcessGroup.BackendType.NCCL, self._base_cuda)
        self.reducer = self._make_reducer(self.comm)
        self.fusion_threshold_bytes = max(1, int(self.config.fusion_mb * (1 << 20)))
        self._thread = CommThread()
        self._cuda: _CudaPath | None = None  # created at the first CUDA collective fastnet takes
        self._cuda_attempts = 0  # creation attempts of _cuda (each its own store key)
        self._coalescing_cuda = False  # inside _start_coalescing(cuda) .. _end_coalescing(cuda)
        self._aborted = False
        self._stream: torch.cuda.Stream | None = None  # the side stream: one NCCL order (_serialized)
        self.routed: collections.Counter[str] = collections.Counter()

    def _make_reducer(self, comm):
        c = self.config
        return BucketReducer(comm, c.algorithm, c.wire_dtype, c.ranks_per_node, self._cost_model,
                             int(c.segment_mb * (1 << 20)))

    def _settings(self, cuda_missing: str) -> list[tuple[str, str]]:
        """The ``(name, value)`` items every rank must agree on (:func:`check_consistency`)."""
        c, model = self.config, self._cost_model
        items = [("FASTNET_ALGORITHM", c.algorithm), ("FASTNET_WIRE_DTYPE", c.wire_dtype),
                 ("FASTNET_FUSION_MB", repr(c.fusion_mb)), ("FASTNET_SEGMENT_MB", repr(c.segment_mb)),
                 ("FASTNET_RANKS_PER_NODE", str(c.ranks_per_node)), ("FASTNET_BASE_BACKEND", c.base_backend),
                 ("FASTNET_COST_MODEL", "not used" if c.algorithm != "hybrid" else
                  repr(sorted((model.to_dict() if model else {}).items())))]
        if c.base_backend == "nccl":
            items.append(("CuPy's NCCL for CUDA tensors", f"missing: {cuda_missing}" if cuda_missing else "found"))
        return items

    def getBackendName(self) -> str:  # noqa: N802 (torch's name)
        return BACKEND_NAME

    def __repr__(self) -> str:
        return (f"FastnetProcessGroup(rank={self._rank}, size={self._size}, algorithm={self.config.algorithm}, "
                f"wire={self.config.wire_dtype}, base={self.config.base_backend})")

    # ---- where a call goes -----------------------------------------------------------------
    def _path(self, tensors: Sequence[torch.Tensor]) -> str | None:
        """``"cpu"`` or ``"cuda"`` when fastnet takes a collective of ``tensors`` (all contiguous
        or strided on one device; CUDA only with the NCCL base), else None (the base backend)."""
        if self._size < self._MIN_SIZE or not tensors:
            return None
        device = _device_of(tensors)
        if device is None or any(t.layout != torch.strided for t in tensors):
            return None
        if device.type == "cpu":
            return "cpu"
        if device.type == "cuda" and self._base_cuda is not None and not self._coalescing_cuda:
            return "cuda"  # (inside an open NCCL group, fastnet's dependent ring steps cannot run)
        return None

    def _delegate(self, tensors: Sequence[torch.Tensor], call, p2p: bool = False):
        """``call(base)`` on the base backend of ``tensors`` (every input and output of the call):
        gloo, or NCCL for CUDA tensors when configured. A CUDA collective is issued in the group's
        one NCCL order (:func:`_serialized`): fastnet's communicator and ProcessGroupNCCL's do not
        run collectives at the same time. Point-to-point calls (``p2p``) and calls inside an open
        NCCL group (:meth:`_start_coalescing`) go to ProcessGroupNCCL directly, as without fastnet:
        holding the side stream until a send ends would queue a rank's receive behind its own send,
        and the isend/irecv exchange every pipeline makes would deadlock (each send waits for a
        receive queued behind the peer's send); within a group, ProcessGroupNCCL returns no Work to
        wait for until the group ends (:meth:`_end_coalescing` orders the side stream then)."""
        cuda = [t for t in tensors if t.is_cuda] if self._base_cuda is not None else []
        if not cuda:
            return call(self._base)
        if p2p or self._coalescing_cuda:
            return call(self._base_cuda)
        return _serialized(self._side_stream(cuda[0].device), lambda: call(self._base_cuda), cuda)

    def _start_coalescing(self, device) -> None:
        """``_coalescing_manager(group, device)``'s start (``batch_isend_irecv``, aborts): for CUDA,
        ProcessGroupNCCL opens its NCCL group (``ncclGroupStart``); until :meth:`_end_coalescing`,
        CUDA collectives go to it (batched as without fastnet), not to fastnet's ring, whose steps
        depend on each other and would be launched together at the group's end."""
        if torch.device(device).type == "cuda":
            self._coalescing_cuda = True
        return super()._start_coalescing(device)

    def _end_coalescing(self, device):
        """The end of :meth:`_start_coalescing`'s block: ProcessGroupNCCL launches the group; the
        side stream (fastnet's next collective) then waits for the group's end (one NCCL order)."""
        try:
            work = super()._end_coalescing(device)
        finally:
            self._coalescing_cuda = False
        if work is not None and torch.device(device).type == "cuda" and self._stream is not None and not self._aborted:
            with torch.cuda.stream(self._stream):
                work.wait()
        return work

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        """The group's side stream on ``device``, created at its first CUDA call (any kind: p2p
        calls made by some ranks only create no communicator).

        Raises:
            ValueError: ``device`` is not the device of this group's earlier CUDA calls.
        """
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        elif self._stream.device != device:
            raise ValueError(f"fastnet: this group's CUDA calls run on {self._stream.device}, got tensors on "
                             f"{device}: one device per rank per group (as with ProcessGroupNCCL)")
        return self._stream

    def _cuda_path(self, device: torch.device) -> _CudaPath:
        """fastnet's CUDA path, created at the group's first CUDA collective fastnet takes (every
        rank of the group makes that call, so the communicator's collective creation is safe)."""
        stream = self._side_stream(device)
        if self._cuda is None:
            self._cuda_attempts += 1
            self._cuda = _CudaPath(dist.PrefixStore("fastnet/own_nccl", self._store), self._rank, self._size,
                                   stream, self.timeout, self._make_reducer, self._cuda_attempts)
        return self._cuda

    def _run(self, what: str, tensors: Sequence[torch.Tensor], fn, result) -> FastnetWork:
        """``fn(reducer, comm)`` for ``tensors``: on the communication thread (CPU) or enqueued on
        the CUDA side stream; the Work completes with ``result``."""
        self.routed[f"fastnet:{what}"] += 1
        if tensors[0].is_cuda:
            path = self._cuda_path(tensors[0].device)
            return path.run(what, tensors, lambda: fn(path.reducer, path.comm), result)
        fut: torch.futures.Future = torch.futures.Future()

        def run() -> None:
            try:
                fn(self.reducer, self.comm)
            except BaseException as exc:  # raised by Work.wait() on the caller's side
                fut.set_exception(exc)
                return
            fut.set_result(result)

        self._thread.submit(run)
        return FastnetWork(fut)

    # ---- fastnet's collectives -------------------------------------------------------------
    def _reduce_list(self, reducer, tensors: list[torch.Tensor], op: str) -> None:
        """SUM or AVG of ``tensors`` (one call's list; fused per dtype) in buckets of the fusion
        threshold, with ``reducer`` (the CPU or the CUDA one)."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for dtype, same in by_dtype.items():
            fused = len(same) > 1 or not same[0].is_contiguous()
            if fused:  # CPU: into a reused buffer (fastnet.comm.scratch: no page faults per call)
                flat = scratch.take(sum(t.numel() for t in same), dtype, same[0].device)
                torch.cat([t.reshape(-1) for t in same], out=flat)
            else:
                flat = same[0].view(-1)
            wire = reducer.wire_dtype or dtype
            per_bucket = max(1, self.fusion_threshold_bytes // wire.itemsize)
            for lo in range(0, flat.numel(), per_bucket):
                bucket = flat[lo:lo + per_bucket]
                if op == "avg":
                    reducer(bucket)
                else:
                    reducer.sum_wire_(bucket)
            if fused:
                off = 0
                for t in same:
                    t.copy_(flat[off:off + t.numel()].view_as(t))
                    off += t.numel()
                scratch.give(flat)

    def _fastnet_allreduce(self, tensors: list[torch.Tensor], opts) -> bool:
        return (_op_name(opts.reduceOp) in ("sum", "avg") and self._path(tensors) is not None
                and all(t.dtype in _FLOATS for t in tensors))

    def allreduce(self, tensors, opts=None):
        opts = opts if opts is not None else dist.AllreduceOptions()
        if isinstance(tensors, torch.Tensor):
            tensors = [tensors]
        if not self._fastnet_allreduce(tensors, opts):
            self.routed["base:all_reduce"] += 1
            return self._delegate(tensors, lambda b: b.allreduce(tensors, opts))
        op = _op_name(opts.reduceOp)
        return self._run("all_reduce", tensors, lambda red, _: self._reduce_list(red, tensors, op), tensors)

    def allreduce_coalesced(self, tensors, opts=None):
        opts = opts if opts is not None else dist.AllreduceCoalescedOptions()
        if not self._fastnet_allreduce(tensors, opts):
            self.routed["base:all_reduce_coalesced"] += 1
            return self._delegate(tensors, lambda b: b.allreduce_coalesced(tensors, opts))
        op = _op_name(opts.reduceOp)
        return self._run("all_reduce_coalesced", tensors, lambda red, _: self._reduce_list(red, tensors, op), tensors)

    def _ring_pairs_ok(self, outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor],
                       op: str | None = None) -> bool:
        """Whether fastnet's ring takes these (output, input) pairs: contiguous, one device it runs
        on, one dtype; CUDA: a dtype fastnet's NCCL communicator has; AVG (``op``): floating point
        (the base backend's rule, or its error, for the rest)."""
        from fastnet.comm.communicators.nccl import _NCCL_DTYPES

        both = [*outputs, *inputs]
        path = self._path(both)
        if path is None or not all(t.is_contiguous() for t in both) or len({t.dtype for t in both}) != 1:
            return False
        dtype = both[0].dtype
        if path == "cuda" and dtype not in _NCCL_DTYPES:
            return False
        return op != "avg" or dtype.is_floating_point

    @staticmethod
    def _reduce_scatter(comm, output: torch.Tensor, input: torch.Tensor, op: str) -> None:
        """fastnet's ring reduce-scatter over ``comm`` (AVG: divided first)."""
        if op == "avg":
            input, op = input / comm.size, "sum"
        ring_reduce_scatter_into(comm, output.view(-1), input.reshape(-1), op)

    @staticmethod
    def _all_gather(comm, output: torch.Tensor, input: torch.Tensor) -> None:
        ring_all_gather_into(comm, output.view(-1), input.reshape(-1))

    def reduce_scatter_single(self, output, input, opts=None):
        opts = opts if opts is not None else dist.ReduceScatterOptions()
        op = _op_name(opts.reduceOp)
        if op is None or not self._ring_pairs_ok([output], [input], op):
            self.routed["base:reduce_scatter"] += 1
            return self._delegate([output, input], lambda b: b._reduce_scatter_base(output, input, opts))
        return self._run("reduce_scatter", [output, input],
                         lambda _, comm: self._reduce_scatter(comm, output, input, op), [output])

    _reduce_scatter_base = reduce_scatter_single

    def all_gather_single(self, output, input, opts=None):
        opts = opts if opts is not None else dist.AllgatherOptions()
        if not self._ring_pairs_ok([output], [input]):
            self.routed["base:all_gather"] += 1
            return self._delegate([output, input], lambda b: b._allgather_base(output, input, opts))
        return self._run("all_gather", [output, input], lambda _, comm: self._all_gather(comm, output, input),
                         [output])

    _allgather_base = all_gather_single

    # ---- delegated to the base backend -----------------------------------------------------
    def broadcast(self, tensors, opts=None):
        opts = opts if opts is not None else dist.BroadcastOptions()
        return self._delegate(tensors, lambda b: b.broadcast(tensors, opts))

    def barrier(self, opts=None):
        return self._base.barrier(opts if opts is not None else dist.BarrierOptions())

    def reduce(self, tensors, opts=None):
        opts = opts if opts is not None else dist.ReduceOptions()
        return self._delegate(tensors, lambda b: b.reduce(tensors, opts))

    def allgather(self, output_tensors, input_tensors, opts=None):
        """The list all-gather (``dist.all_gather``; FSDP's parameter all-gather on CPU): fastnet's
        ring through one flat buffer when it is one CPU input of equal-sized outputs, else the base."""
        opts = opts if opts is not None else dist.AllgatherOptions()
        if not (len(input_tensors) == 1 and len(output_tensors) == 1 and len(output_tensors[0]) == self._size
                and self._path(input_tensors) == "cpu"
                and all(o.numel() == input_tensors[0].numel() and o.dtype == input_tensors[0].dtype
                        for o in output_tensors[0])):
            self.routed["base:all_gather"] += 1
            return self._delegate(_flat(output_tensors, input_tensors),
                                  lambda b: b.allgather(output_tensors, input_tensors, opts))
        x, outs = input_tensors[0], output_tensors[0]

        def gather(_, comm) -> None:
            flat = torch.empty(self._size * x.numel(), dtype=x.dtype)
            self._all_gather(comm, flat, x.contiguous())
            for r, o in enumerate(outs):
                o.copy_(flat[r * x.numel():(r + 1) * x.numel()].view_as(o))

        return self._run("all_gather", [x], gather, output_tensors)

    def allgather_coalesced(self, output_lists, input_list, opts=None):
        opts = opts if opts is not None else dist.AllgatherOptions()
        return self._delegate(_flat(output_lists, input_list),
                              lambda b: b.allgather_coalesced(output_lists, input_list, opts))

    def allgather_into_tensor_coalesced(self, outputs, inputs, opts=None):
        """Several ``all_gather_into_tensor`` at once (``_coalescing_manager``; the functional
        collectives of DTensor/FSDP2, e.g. ``full_tensor()``): fastnet's ring for each pair of
        contiguous tensors on one device, one after another; else the base backend."""
        opts = opts if opts is not None else dist.AllgatherOptions()
        if not self._ring_pairs_ok(outputs, inputs):
            self.routed["base:all_gather_coalesced"] += 1
            return self._delegate(_flat(outputs, inputs),
                                  lambda b: _coalesced_or_each(b, "all_gather_single_coalesced", "_allgather_base",
                                                               outputs, inputs, opts))
        return self._run("all_gather_coalesced", [*outputs, *inputs],
                         lambda _, comm: [self._all_gather(comm, o, i) for o, i in zip(outputs, inputs)], outputs)

    def reduce_scatter(self, output_tensors, input_lists, opts=None):
        opts = opts if opts is not None else dist.ReduceScatterOptions()
        return self._delegate(_flat(output_tensors, input_lists),
                              lambda b: b.reduce_scatter(output_tensors, input_lists, opts))

    def reduce_scatter_tensor_coalesced(self, outputs, inputs, opts=None):
        """Several ``reduce_scatter_tensor`` at once: fastnet's ring per pair (contiguous, one
        device, SUM/AVG/MAX/MIN), else the base backend."""
        opts = opts if opts is not None else dist.ReduceScatterOptions()
        op = _op_name(opts.reduceOp)
        if op is None or not self._ring_pairs_ok(outputs, inputs, op):
            self.routed["base:reduce_scatter_coalesced"] += 1
            return self._delegate(_flat(outputs, inputs),
                                  lambda b: _coalesced_or_each(b, "reduce_scatter_single_coalesced",
                                                               "_reduce_scatter_base", outputs, inputs, opts))
        return self._run("reduce_scatter_coalesced", [*outputs, *inputs],
                         lambda _, comm: [self._reduce_scatter(comm, o, i, op) for o, i in zip(outputs, inputs)],
                         outputs)

    def gather(self, output_lists, input_tensors, opts=None):
        opts = opts if opts is not None else dist.GatherOptions()
        return self._delegate(_flat(output_lists, input_tensors), lambda b: b.gather(output_lists, input_tensors, opts))

    def scatter(self, output_tensors, input_lists, opts=None):
        opts = opts if opts is not None else dist.ScatterOptions()
        return self._delegate(_flat(output_tensors, input_lists), lambda b: b.scatter(output_tensors, input_lists, opts))

    def alltoall(self, output_tensors, input_tensors, opts=None):
        opts = opts if opts is not None else dist.AllToAllOptions()
        return self._delegate(_flat(output_tensors, input_tensors),
                              lambda b: b.alltoall(output_tensors, input_tensors, opts))

    def all_to_all_single(self, output, input, output_split_sizes, input_split_sizes, opts=None):
        opts = opts if opts is not None else dist.AllToAllOptions()
        return self._delegate([output, input], lambda b: b.alltoall_base(output, input, output_split_sizes,
                                                                         input_split_sizes, opts))

    alltoall_base = all_to_all_single

    def send(self, tensors, dst: int, tag: int = 0):
        return self._delegate(tensors, lambda b: b.send(tensors, dst, tag), p2p=True)

    def recv(self, tensors, src: int, tag: int = 0):
        return self._delegate(tensors, lambda b: b.recv(tensors, src, tag), p2p=True)

    def recv_anysource(self, tensors, tag: int = 0):
        return self._delegate(tensors, lambda b: b.recv_anysource(tensors, tag), p2p=True)

    def shutdown(self) -> None:
        self._thread.close()
        try:
            if self._cuda is not None:
                self._cuda.close()
        finally:
            if self._base_cuda is not None:
                self._base_cuda.shutdown()

    def abort(self) -> None:
        """Abort every communicator of the group: fastnet's NCCL ones (its watchdog stopped first,
        so that the aborted communicator is not reported as an error that ends the process) and
        ProcessGroupNCCL's."""
        self._aborted = True  # (torch aborts inside an NCCL group: _end_coalescing then orders nothing)
        self._thread.close(timeout_s=0.0)
        if self._cuda is not None:
            self._cuda.abort()
        if self._base_cuda is not None:
            self._base_cuda.abort()
