"""fastnet as a torch.distributed backend: ``init_process_group("fastnet")``.

    import torch.distributed as dist
    dist.init_process_group("fastnet")        # instead of "gloo"; nothing else changes
    model = DistributedDataParallel(model)    # DDP's buckets now go through fastnet's all-reduce

The backend registers itself when torch.distributed first meets the name: fastnet's package
declares the ``torch.distributed.backends`` entry point ``fastnet`` (:func:`register`; torch
≥ 2.14 looks it up in ``init_process_group``/``new_group``); with an older torch,
``import fastnet.comm.backend`` registers it. So an unmodified script, a Lightning or Accelerate
project, FSDP, or any ``dist.all_reduce`` caller opts in by changing the backend string.

Each process group (the world, and every ``dist.new_group(..., backend="fastnet")``) is a
:class:`FastnetProcessGroup`. It holds two base backends built from the group's store: one that
every collective fastnet does not handle is delegated to (gloo; NCCL with
``FASTNET_BASE_BACKEND=nccl``), and one carrying only fastnet's own traffic, driven by one
communication thread in call order, so delegated and fastnet collectives never interleave on one
connection. Routed through fastnet:

* ``all_reduce`` with SUM or AVG of floating tensors: fastnet's algorithm
  (``FASTNET_ALGORITHM``: ring, hierarchical, hierarchical_p2p, leader, leader_p2p, native, hybrid
  by the cost model), buckets of at most ``FASTNET_FUSION_MB`` MiB, the wire dtype
  ``FASTNET_WIRE_DTYPE`` (none, fp16, bf16; opt-in, lossy); the tensors of one call
  (``all_reduce_coalesced``, DDP's multi-tensor calls) are fused into one flat buffer. Separate
  calls are never fused with each other: which calls are queued together depends on timing, so
  ranks could fuse differently;
* ``reduce_scatter_tensor`` (SUM, AVG, MAX, MIN), ``all_gather_into_tensor``, their coalesced
  forms (``_coalescing_manager``; the functional collectives of DTensor and FSDP2, e.g.
  ``full_tensor()``) and the list ``all_gather`` of one tensor per rank (FSDP1's parameter
  all-gather on CPU): fastnet's ring (:func:`fastnet.comm.algorithms.ring_reduce_scatter_into`,
  ``ring_all_gather_into``);
* everything else (broadcast, barrier, reduce, gather, scatter, all-to-all, send/recv, list
  all-gather, integer or MAX/MIN/PRODUCT all-reduce), and **every collective on CUDA tensors**:
  the base backend, unchanged. fastnet's algorithms on CUDA tensors through this backend are not
  built: they need fastnet's NCCL communicator on the group's store and the caller's stream
  ordered against its stream, and a GPU to verify (so ``FASTNET_BASE_BACKEND=nccl`` is NCCL with
  fastnet's CPU path beside it, not yet run on a GPU).

The returned ``Work`` (:class:`FastnetWork`) completes from the communication thread; an error
there (a peer that died, the group's timeout) is raised by ``wait()``, as the base backend
raises it.

Settings (environment, read when a group is created; every rank must use the same: construction
compares them across the group's ranks, :func:`fastnet.comm.sync.check_consistency`, and raises
ValueError naming the variable and each differing rank's value): ``FASTNET_ALGORITHM`` (default
``ring``), ``FASTNET_WIRE_DTYPE`` (``none``), ``FASTNET_FUSION_MB`` (25), ``FASTNET_RANKS_PER_NODE``
(default: nodes from the hosts), ``FASTNET_COST_MODEL`` (a calibrated YAML for ``hybrid``),
``FASTNET_SEGMENT_MB`` (pipeline segment, 4), ``FASTNET_BASE_BACKEND`` (``gloo``, or ``nccl`` for
CUDA tensors). A bad value raises ValueError naming it and the valid choices.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import os
import time
from typing import Sequence

import torch
import torch.distributed as dist

from fastnet.comm import scratch
from fastnet.comm.communicator import OPS, WorkList, check_op

BACKEND_NAME = "fastnet"
BASE_BACKENDS = ("gloo", "nccl")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


@dataclasses.dataclass(frozen=True)
class BackendConfig:
    """The ``FASTNET_*`` settings of :class:`FastnetProcessGroup` (module docstring)."""

    algorithm: str = "ring"
    wire_dtype: str = "none"
    fusion_mb: float = 25.0
    ranks_per_node: int | None = None
    cost_model: str | None = None
    segment_mb: float = 4.0
    base_backend: str = "gloo"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "BackendConfig":
        """Read ``FASTNET_*`` from ``env`` (default ``os.environ``).

        Raises:
            ValueError: an unknown algorithm, wire dtype or base backend (the valid ones listed), or
                a number that does not parse or is out of range (the variable named).
        """
        from fastnet.comm.sync import ALGORITHMS, WIRE_DTYPES

        env = os.environ if env is None else env

        def number(name: str, default: float, kind=float, low: float = 0.0):
            raw = env.get(name)
            if raw is None or raw == "":
                return default
            try:
                value = kind(raw)
            except ValueError:
                raise ValueError(f"Invalid {name}={raw!r}: expected a {kind.__name__}") from None
            if value <= low:
                raise ValueError(f"Invalid {name}={raw!r}: must be > {low:g}")
            return value

        algorithm = env.get("FASTNET_ALGORITHM", "ring") or "ring"
        if algorithm not in ALGORITHMS:
            raise ValueError(f"Invalid FASTNET_ALGORITHM={algorithm!r}; valid algorithms: {', '.join(ALGORITHMS)}")
        wire = env.get("FASTNET_WIRE_DTYPE", "none") or "none"
        if wire not in WIRE_DTYPES:
            raise ValueError(f"Invalid FASTNET_WIRE_DTYPE={wire!r}; valid wire dtypes: {', '.join(WIRE_DTYPES)}")
        base = env.get("FASTNET_BASE_BACKEND", "gloo") or "gloo"
        if base not in BASE_BACKENDS:
            raise ValueError(f"Invalid FASTNET_BASE_BACKEND={base!r}; valid base backends: {', '.join(BASE_BACKENDS)}")
        rpn = env.get("FASTNET_RANKS_PER_NODE")
        return cls(algorithm=algorithm, wire_dtype=wire, fusion_mb=number("FASTNET_FUSION_MB", 25.0),
                   ranks_per_node=number("FASTNET_RANKS_PER_NODE", 0, int) if rpn else None,
                   cost_model=env.get("FASTNET_COST_MODEL") or None,
                   segment_mb=number("FASTNET_SEGMENT_MB", 4.0, low=-1e-12), base_backend=base)


class _C10dWork:
    """A :class:`fastnet.comm.communicator.Work` over a c10d ``Work``."""

    __slots__ = ("work",)

    def __init__(self, work) -> None:
        self.work = work

    def wait(self) -> None:
        self.work.wait()

    def is_completed(self) -> bool:
        return self.work.is_completed()


class C10dCommunicator:
    """:class:`fastnet.comm.communicator.Communicator` over a raw c10d backend object (a
    ``ProcessGroupGloo`` built from a store, not registered with torch.distributed), so fastnet's
    algorithms can run inside a backend. ``split`` builds new gloo backends from the same store.
    Point-to-point: gloo's ``send``/``recv`` are non-blocking and need no grouping, so
    :meth:`exchange` posts them one by one (every rank in the same order).

    Raises ValueError for an unknown op or mismatched sizes.
    """

    def __init__(self, backend, rank: int, size: int, store, timeout: datetime.timedelta, name: str = "") -> None:
        self.backend, self.rank, self.size = backend, rank, size
        self.store, self.timeout, self.name = store, timeout, name
        self.device = None
        self._splits = 0
        self._tag = 0

    def __repr__(self) -> str:
        return f"C10dCommunicator(rank={self.rank}, size={self.size}, {self.name or 'world'})"

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", async_op: bool = False):
        check_op(op)
        if op == "avg":
            tensor.div_(self.size)
            op = "sum"
        opts = dist.AllreduceOptions()
        opts.reduceOp = _OPS[op]
        work = self.backend.allreduce([tensor], opts)
        if async_op:
            return _C10dWork(work)
        work.wait()
        return None

    def reduce_scatter(self, output: torch.Tensor, input: torch.Tensor, op: str = "sum") -> None:
        from fastnet.comm.algorithms import ring_reduce_scatter_into

        check_op(op)
        if op == "avg":
            input, op = input / self.size, "sum"
        ring_reduce_scatter_into(self, output.view(-1), input.reshape(-1).contiguous(), op)

    def all_gather(self, output: torch.Tensor, input: torch.Tensor) -> None:
        from fastnet.comm.algorithms import ring_all_gather_into

        ring_all_gather_into(self, output.view(-1), input.reshape(-1).contiguous())

    def reduce(self, tensor: torch.Tensor, dst: int, op: str = "sum") -> None:
        check_op(op)
        if op == "avg":
            tensor.div_(self.size)
            op = "sum"
        opts = dist.ReduceOptions()
        opts.rootRank, opts.reduceOp = dst, _OPS[op]
        self.backend.reduce([tensor], opts).wait()

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        self.backend.broadcast([tensor], opts).wait()

    def isend(self, tensor: torch.Tensor, dst: int):
        return _C10dWork(self.backend.send([tensor], dst, 0))

    def irecv(self, tensor: torch.Tensor, src: int):
        return _C10dWork(self.backend.recv([tensor], src, 0))

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self.isend(tensor, dst).wait()

    def recv(self, tensor: torch.Tensor, src: int) -> None:
        self.irecv(tensor, src).wait()

    def exchange(self, sends: Sequence[tuple[torch.Tensor, int]], recvs: Sequence[tuple[torch.Tensor, int]]):
        works = [self.irecv(t, src) for t, src in recvs if t.numel()]
        works += [self.isend(t, dst) for t, dst in sends if t.numel()]
        return WorkList(works)

    def barrier(self) -> None:
        self.backend.barrier(dist.BarrierOptions()).wait()

    def split(self, color: int | None, key: int = 0) -> "C10dCommunicator | None":
        """Collective: ranks with the same ``color`` get a new gloo backend, ordered by ``key``
        (ties by rank); ``color=None`` joins none and gets None."""
        mine = torch.tensor([-1 if color is None else color, key, self.rank], dtype=torch.int64)
        table = torch.empty(3 * self.size, dtype=torch.int64)
        self.all_gather(table, mine)
        rows = table.view(self.size, 3).tolist()
        self._splits += 1
        if color is None:
            return None
        members = sorted((k, r) for c, k, r in rows if c == color)
        new_rank = [r for _, r in members].index(self.rank)
        name = f"{self.name}/split{self._splits}/color{color}"
        store = dist.PrefixStore(name, self.store)
        backend = dist.ProcessGroupGloo(store, new_rank, len(members), self.timeout)
        return C10dCommunicator(backend, new_rank, len(members), self.store, self.timeout, name)


def _op_name(op) -> str | None:
    """``sum``/``avg``/``max``/``min`` for a c10d reduce op (options hold ``ReduceOp`` objects,
    which compare equal to, but do not hash like, the ``RedOpType`` members); None for the rest."""
    for name in ("SUM", "AVG", "MAX", "MIN"):
        if op == getattr(dist.ReduceOp, name):
            return name.lower()
    return None


def _ring_ok(output: torch.Tensor, input: torch.Tensor) -> bool:
    """Whether fastnet's ring reduce-scatter/all-gather takes this pair (CPU, contiguous)."""
    return not (output.is_cuda or input.is_cuda) and output.is_contiguous() and input.is_contiguous()


class FastnetWork(dist._Work):
    """The ``Work`` of a collective run on fastnet's communication thread: ``wait()`` blocks
    until it is done and raises what the thread raised (torch's future-wrapping work does not,
    so a dead peer would go unnoticed); ``wait(timeout)`` raises RuntimeError once ``timeout``
    passes; ``get_future()`` (what DDP chains on) completes with the output tensors."""

    def __init__(self, fut: torch.futures.Future) -> None:
        super().__init__()
        self._fut = fut

    def wait(self, timeout: datetime.timedelta | None = None) -> bool:
        if timeout is not None and timeout.total_seconds() > 0:
            deadline = time.monotonic() + timeout.total_seconds()
            while not self._fut.done():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"fastnet: the collective did not complete within {timeout}")
                time.sleep(0.001)
        self._fut.wait()  # raises the communication thread's error
        return True

    def is_completed(self) -> bool:
        return self._fut.done()

    def is_success(self) -> bool:
        if not self._fut.done():
            return False
        try:
            self._fut.value()
        except Exception:  # noqa: BLE001 - any failure of the collective
            return False
        return True

    def get_future(self) -> torch.futures.Future:
        return self._fut


class FastnetProcessGroup(dist.ProcessGroup):
    """The ``fastnet`` process group of ``size`` ranks (module docstring): fastnet's all-reduce,
    reduce-scatter and all-gather on a communication thread, everything else delegated to the
    base backend. Built by torch.distributed (``init_process_group("fastnet")``, ``new_group``);
    construction is collective over the group's ``store``. ``routed`` counts the calls of the
    collectives fastnet can take by where they went: ``"fastnet:all_reduce"``,
    ``"base:all_reduce"`` (an op or dtype fastnet leaves to the base backend), and so on.

    Raises:
        ValueError: a bad ``FASTNET_*`` setting (:meth:`BackendConfig.from_env`), or settings
            that differ across ranks (:class:`fastnet.comm.sync.BucketReducer`).
    """

    def __init__(self, store, rank: int, size: int, timeout: datetime.timedelta,
                 config: BackendConfig | None = None) -> None:
        super().__init__(rank, size)
        from fastnet.comm.cost_model import CostModel
        from fastnet.comm.sync import BucketReducer, check_consistency
        from fastnet.comm.synchronizer import CommThread

        self.config = config or BackendConfig.from_env()
        self._rank, self._size, self.timeout = rank, size, timeout
        self._base = self._make_base(dist.PrefixStore("fastnet/base", store), rank, size, timeout)
        own_store = dist.PrefixStore("fastnet/own", store)
        own = dist.ProcessGroupGloo(own_store, rank, size, timeout)
        self.comm = C10dCommunicator(own, rank, size, own_store, timeout)
        cost_model = CostModel.load(self.config.cost_model) if self.config.cost_model else None
        # before anything else collective: a rank with other settings would split differently
        # (hierarchical) or send other byte counts (wire dtype) and hang or corrupt, not fail
        check_consistency(self.comm, self._settings(cost_model), "fastnet backend settings differ across ranks",
                          "Give every rank the same FASTNET_* environment (and the same cost-model file).")
        self.reducer = BucketReducer(self.comm, self.config.algorithm, self.config.wire_dtype,
                                     self.config.ranks_per_node, cost_model,
                                     int(self.config.segment_mb * (1 << 20)))
        self.fusion_threshold_bytes = max(1, int(self.config.fusion_mb * (1 << 20)))
        self._thread = CommThread()
        self.routed: collections.Counter[str] = collections.Counter()

    def _settings(self, cost_model) -> list[tuple[str, str]]:
        """The ``(name, value)`` items every rank must agree on (:func:`check_consistency`)."""
        c = self.config
        return [("FASTNET_ALGORITHM", c.algorithm), ("FASTNET_WIRE_DTYPE", c.wire_dtype),
                ("FASTNET_FUSION_MB", repr(c.fusion_mb)), ("FASTNET_SEGMENT_MB", repr(c.segment_mb)),
                ("FASTNET_RANKS_PER_NODE", str(c.ranks_per_node)), ("FASTNET_BASE_BACKEND", c.base_backend),
                ("FASTNET_COST_MODEL", "not used" if c.algorithm != "hybrid" else
                 repr(sorted((cost_model.to_dict() if cost_model else {}).items())))]

    def _make_base(self, store, rank: int, size: int, timeout: datetime.timedelta):
        if self.config.base_backend == "nccl":
            base = dist.ProcessGroupNCCL(store, rank, size, dist.ProcessGroupNCCL.Options())
            self._register_backend(torch.device("cuda"), dist.ProcessGroup.BackendType.NCCL, base)
        else:
            base = dist.ProcessGroupGloo(store, rank, size, timeout)
            self._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO, base)
        return base

    def getBackendName(self) -> str:  # noqa: N802 (torch's name)
        return BACKEND_NAME

    def __repr__(self) -> str:
        return (f"FastnetProcessGroup(rank={self._rank}, size={self._size}, algorithm={self.config.algorithm}, "
                f"wire={self.config.wire_dtype}, base={self.config.base_backend})")

    # ---- fastnet's collectives -------------------------------------------------------------
    def _submit(self, fn, result):
        fut: torch.futures.Future = torch.futures.Future()

        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # raised by Work.wait() on the caller's side
                fut.set_exception(exc)
                return
            fut.set_result(result)

        self._thread.submit(run)
        return FastnetWork(fut)

    def _reduce_list(self, tensors: list[torch.Tensor], op: str) -> None:
        """SUM or AVG of ``tensors`` (one call's list; fused per dtype) in buckets of the fusion
        threshold."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for dtype, same in by_dtype.items():
            fused = len(same) > 1 or not same[0].is_contiguous()
            if fused:  # into a reused buffer (fastnet.comm.scratch: no page faults per call)
                flat = scratch.take(sum(t.numel() for t in same), dtype, same[0].device)
                torch.cat([t.reshape(-1) for t in same], out=flat)
            else:
                flat = same[0].view(-1)
            wire = self.reducer.wire_dtype or dtype
            per_bucket = max(1, self.fusion_threshold_bytes // wire.itemsize)
            for lo in range(0, flat.numel(), per_bucket):
                bucket = flat[lo:lo + per_bucket]
                if op == "avg":
                    self.reducer(bucket)
                else:
                    self.reducer.sum_wire_(bucket)
            if fused:
                off = 0
                for t in same:
                    t.copy_(flat[off:off + t.numel()].view_as(t))
                    off += t.numel()
                scratch.give(flat)

    def _fastnet_allreduce(self, tensors: list[torch.Tensor], opts) -> bool:
        op = _op_name(opts.reduceOp)
        return (op in ("sum", "avg") and self._size > 1 and len(tensors) > 0
                and all(t.dtype in _FLOATS and t.layout == torch.strided and not t.is_cuda for t in tensors))

    def allreduce(self, tensors, opts=None):
        opts = opts if opts is not None else dist.AllreduceOptions()
        if isinstance(tensors, torch.Tensor):
            tensors = [tensors]
        if not self._fastnet_allreduce(tensors, opts):
            self.routed["base:all_reduce"] += 1
            return self._base.allreduce(tensors, opts)
        self.routed["fastnet:all_reduce"] += 1
        op = _op_name(opts.reduceOp)
        return self._submit(lambda: self._reduce_list(tensors, op), tensors)

    def allreduce_coalesced(self, tensors, opts=None):
        opts = opts if opts is not None else dist.AllreduceCoalescedOptions()
        if not self._fastnet_allreduce(tensors, opts):
            self.routed["base:all_reduce_coalesced"] += 1
            return self._base.allreduce_coalesced(tensors, opts)
        self.routed["fastnet:all_reduce_coalesced"] += 1
        op = _op_name(opts.reduceOp)
        return self._submit(lambda: self._reduce_list(tensors, op), tensors)

    def reduce_scatter_single(self, output, input, opts=None):
        opts = opts if opts is not None else dist.ReduceScatterOptions()
        op = _op_name(opts.reduceOp)
        if op is None or not _ring_ok(output, input) or self._size == 1:
            self.routed["base:reduce_scatter"] += 1
            return self._base._reduce_scatter_base(output, input, opts)
        self.routed["fastnet:reduce_scatter"] += 1
        return self._submit(lambda: self.comm.reduce_scatter(output, input, op), [output])

    _reduce_scatter_base = reduce_scatter_single

    def all_gather_single(self, output, input, opts=None):
        opts = opts if opts is not None else dist.AllgatherOptions()
        if not _ring_ok(output, input) or self._size == 1:
            self.routed["base:all_gather"] += 1
            return self._base._allgather_base(output, input, opts)
        self.routed["fastnet:all_gather"] += 1
        return self._submit(lambda: self.comm.all_gather(output, input), [output])

    _allgather_base = all_gather_single

    # ---- delegated to the base backend -----------------------------------------------------
    def broadcast(self, tensors, opts=None):
        return self._base.broadcast(tensors, opts if opts is not None else dist.BroadcastOptions())

    def barrier(self, opts=None):
        return self._base.barrier(opts if opts is not None else dist.BarrierOptions())

    def reduce(self, tensors, opts=None):
        return self._base.reduce(tensors, opts if opts is not None else dist.ReduceOptions())

    def allgather(self, output_tensors, input_tensors, opts=None):
        """The list all-gather (``dist.all_gather``; FSDP's parameter all-gather on CPU): fastnet's
        ring through one flat buffer when it is one input of equal-sized outputs, else the base."""
        opts = opts if opts is not None else dist.AllgatherOptions()
        if not (len(input_tensors) == 1 and len(output_tensors) == 1 and len(output_tensors[0]) == self._size
                and self._size > 1 and not input_tensors[0].is_cuda
                and all(o.numel() == input_tensors[0].numel() and o.dtype == input_tensors[0].dtype
                        for o in output_tensors[0])):
            self.routed["base:all_gather"] += 1
            return self._base.allgather(output_tensors, input_tensors, opts)
        self.routed["fastnet:all_gather"] += 1
        x, outs = input_tensors[0], output_tensors[0]

        def gather() -> None:
            flat = torch.empty(self._size * x.numel(), dtype=x.dtype)
            self.comm.all_gather(flat, x)
            for r, o in enumerate(outs):
                o.copy_(flat[r * x.numel():(r + 1) * x.numel()].view_as(o))

        return self._submit(gather, output_tensors)

    def allgather_coalesced(self, output_lists, input_list, opts=None):
        return self._base.allgather_coalesced(output_lists, input_list,
                                              opts if opts is not None else dist.AllgatherOptions())

    def allgather_into_tensor_coalesced(self, outputs, inputs, opts=None):
        """Several ``all_gather_into_tensor`` at once (``_coalescing_manager``; the functional
        collectives of DTensor/FSDP2, e.g. ``full_tensor()``): fastnet's ring for each pair of CPU
        contiguous tensors, one after another on the thread; else the base backend."""
        opts = opts if opts is not None else dist.AllgatherOptions()
        if not (self._size > 1 and all(_ring_ok(o, i) for o, i in zip(outputs, inputs))):
            self.routed["base:all_gather_coalesced"] += 1
            return self._base.all_gather_single_coalesced(outputs, inputs, opts)
        self.routed["fastnet:all_gather_coalesced"] += 1
        return self._submit(lambda: [self.comm.all_gather(o, i) for o, i in zip(outputs, inputs)], outputs)

    def reduce_scatter(self, output_tensors, input_lists, opts=None):
        return self._base.reduce_scatter(output_tensors, input_lists,
                                         opts if opts is not None else dist.ReduceScatterOptions())

    def reduce_scatter_tensor_coalesced(self, outputs, inputs, opts=None):
        """Several ``reduce_scatter_tensor`` at once: fastnet's ring per pair (CPU, contiguous,
        SUM/AVG/MAX/MIN), else the base backend."""
        opts = opts if opts is not None else dist.ReduceScatterOptions()
        op = _op_name(opts.reduceOp)
        if op is None or not (self._size > 1 and all(_ring_ok(o, i) for o, i in zip(outputs, inputs))):
            self.routed["base:reduce_scatter_coalesced"] += 1
            return self._base.reduce_scatter_single_coalesced(outputs, inputs, opts)
        self.routed["fastnet:reduce_scatter_coalesced"] += 1
        return self._submit(lambda: [self.comm.reduce_scatter(o, i, op) for o, i in zip(outputs, inputs)], outputs)

    def gather(self, output_lists, input_tensors, opts=None):
        return self._base.gather(output_lists, input_tensors, opts if opts is not None else dist.GatherOptions())

    def scatter(self, output_tensors, input_lists, opts=None):
        return self._base.scatter(output_tensors, input_lists, opts if opts is not None else dist.ScatterOptions())

    def alltoall(self, output_tensors, input_tensors, opts=None):
        return self._base.alltoall(output_tensors, input_tensors, opts if opts is not None else dist.AllToAllOptions())

    def all_to_all_single(self, output, input, output_split_sizes, input_split_sizes, opts=None):
        return self._base.alltoall_base(output, input, output_split_sizes, input_split_sizes,
                                        opts if opts is not None else dist.AllToAllOptions())

    alltoall_base = all_to_all_single

    def send(self, tensors, dst: int, tag: int = 0):
        return self._base.send(tensors, dst, tag)

    def recv(self, tensors, src: int, tag: int = 0):
        return self._base.recv(tensors, src, tag)

    def recv_anysource(self, tensors, tag: int = 0):
        return self._base.recv_anysource(tensors, tag)

    def shutdown(self) -> None:
        self._thread.close()

    def abort(self) -> None:
        self._thread.close(timeout_s=0.0)


def _create(store, rank: int, size: int, timeout: datetime.timedelta) -> FastnetProcessGroup:
    return FastnetProcessGroup(store, rank, size, timeout)


_registered = False


def register() -> None:
    """Register the ``fastnet`` backend with torch.distributed (idempotent)."""
    global _registered
    if _registered or BACKEND_NAME.upper() in dist.Backend._plugins:
        _registered = True
        return
    dist.Backend.register_backend(BACKEND_NAME, _create, devices=["cpu", "cuda"])
    _registered = True


__all__ = ["BACKEND_NAME", "BackendConfig", "C10dCommunicator", "FastnetProcessGroup", "FastnetWork", "register", "OPS"]

register()
