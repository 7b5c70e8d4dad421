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
  all-gather of CUDA tensors, integer or MAX/MIN/PRODUCT all-reduce): the base backend, unchanged
  (gloo for CPU tensors; NCCL for CUDA tensors with ``FASTNET_BASE_BACKEND=nccl``; barrier: gloo).

**CUDA tensors** (``FASTNET_BASE_BACKEND=nccl``; without it they go to gloo, unchanged). The
same routing, over fastnet's own NCCL communicator (:class:`fastnet.comm.nccl.NcclCommunicator`,
CuPy's bindings), created at the group's first CUDA collective on the tensors' device (as
ProcessGroupNCCL does; one device per rank per group), its unique id passed through the group's
store. A collective is enqueued from the caller's thread, not the communication thread (NCCL
kernels are asynchronous, the host does not wait): fastnet's side stream first waits for the
caller's current stream, the algorithm's kernels (casts, ring additions, NCCL calls) run on it,
and the ``Work``'s future is a CUDA future recorded on it, so ``wait()`` and DDP's callbacks order
the caller's stream after the result without blocking the host (torch.futures.Future semantics).
The tensors are recorded on the side stream so the caching allocator cannot reuse them early.
Delegated CUDA collectives (ProcessGroupNCCL) are issued in the same order through the side
stream (:func:`_serialized`), so the group's two NCCL communicators do not run collectives at the
same time, as NCCL asks of several communicators in one process; point-to-point calls and calls
inside an open NCCL group (``batch_isend_irecv``, ``_coalescing_manager`` with a device) go to
ProcessGroupNCCL directly, as without fastnet (serializing a send would deadlock the isend/irecv
exchange; :meth:`FastnetProcessGroup._delegate`), and may overlap fastnet's collectives, as
ProcessGroupNCCL's own point-to-point communicators overlap its collectives. A watchdog thread polls NCCL's asynchronous
error (of every fastnet NCCL communicator: the group's and the hierarchical algorithms' split ones)
and the oldest unfinished collective's age; on an error or the group's timeout it aborts them (``ncclCommAbort``: kernels waiting
on a dead peer return) and, as ProcessGroupNCCL's default error handling does, ends the process
with the error on stderr, so no rank goes on with an aborted collective's contents. **Not yet run
on a GPU.**

The returned ``Work`` (:class:`FastnetWork`) completes from the communication thread (CPU) or the
side stream (CUDA); an error there (a peer that died, the group's timeout) is raised by
``wait()``, as the base backend raises it.

Settings (environment, read when a group is created; every rank must use the same: construction
compares them across the group's ranks, :func:`fastnet.comm.sync.check_consistency`, and raises
ValueError naming the variable and each differing rank's value): ``FASTNET_ALGORITHM`` (default
``ring``), ``FASTNET_WIRE_DTYPE`` (``none``), ``FASTNET_FUSION_MB`` (25), ``FASTNET_RANKS_PER_NODE``
(default: nodes from the hosts), ``FASTNET_COST_MODEL`` (a calibrated YAML for ``hybrid``),
``FASTNET_SEGMENT_MB`` (pipeline segment, 4), ``FASTNET_BASE_BACKEND`` (``gloo``, or ``nccl``:
CUDA tensors through NCCL, needs CuPy's NCCL, ``pip install 'fastnet[gpu]'``). A bad value raises
ValueError naming it and the valid choices.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import inspect
import os
import sys
import threading
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

        check_op(op, input.dtype)
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


def _device_of(tensors: Sequence[torch.Tensor]) -> torch.device | None:
    """The one device all ``tensors`` are on, or None (none given, or several devices)."""
    devices = {t.device for t in tensors}
    return devices.pop() if len(devices) == 1 else None


class FastnetWork(dist._Work):
    """The ``Work`` of a collective run on fastnet's communication thread: ``wait()`` blocks
    until it is done and raises what the thread raised (torch's future-wrapping work does not,
    so a dead peer would go unnoticed); ``wait(timeout)`` raises RuntimeError once ``timeout``
    passes; ``get_future()`` (what DDP chains on) completes with the output tensors."""

    def __init__(self, fut: torch.futures.Future, event: "torch.cuda.Event | None" = None) -> None:
        super().__init__()
        self._fut, self._event = fut, event  # event: the end of a CUDA collective on the side stream

    def _done(self) -> bool:
        return self._fut.done() and (self._event is None or self._event.query())

    def wait(self, timeout: datetime.timedelta | None = None) -> bool:
        """Without ``timeout``: CPU, block until done; CUDA, order the current stream after the
        result (no host block). With ``timeout``: block the host until done (CUDA too) or raise."""
        if timeout is not None and timeout.total_seconds() > 0:
            deadline = time.monotonic() + timeout.total_seconds()
            while not self._done():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"fastnet: the collective did not complete within {timeout}")
                time.sleep(0.001)
        self._fut.wait()  # raises the communication thread's error; CUDA: the stream wait
        return True

    def is_completed(self) -> bool:
        return self._done()

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


def _cuda_nccl_missing() -> str:
    """Why fastnet's CUDA path cannot run in this process ('' when it can)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        from fastnet.comm.nccl import _nccl

        _nccl()
    except RuntimeError as exc:
        return str(exc)
    return ""


def _serialized(stream: torch.cuda.Stream, call, tensors: Sequence[torch.Tensor]):
    """Issue ``call()`` (a ProcessGroupNCCL collective, returning its ``Work``) in a group's one
    NCCL order, kept by the group's side ``stream``. NCCL's rule for several communicators in one
    process ("Using multiple NCCL communicators concurrently", NCCL user guide: their operations
    should not run at the same time and must be issued in the same order on every rank) then holds
    for a group's collectives, fastnet's and the base backend's: the call is issued with the side
    stream current, after the caller's stream (ProcessGroupNCCL's stream waits for the current
    one), and the side stream then waits for the call's end, so fastnet's next collective starts
    after it. The caller's stream is not blocked: it waits when the caller waits on the returned
    Work, as with NCCL alone.

    ``tensors`` (every input and output of the call) are recorded on the side stream: the wait
    above releases ProcessGroupNCCL's own hold on an async call's tensors (its allocator-safety
    stash is freed when a stream has waited for the work), while the caller's stream has not yet
    waited, so without the record a temporary input (``torch.cat(...)`` passed to an async
    all-to-all) could be reused while NCCL still reads it."""
    stream.wait_stream(torch.cuda.current_stream(stream.device))
    with torch.cuda.stream(stream):
        work = call()
        if work is not None:
            work.wait()  # without TORCH_NCCL_BLOCKING_WAIT no host block: the current stream waits for its end
        for t in tensors:
            if t.is_cuda:
                t.record_stream(stream)
    return work


class _Works(dist._Work):
    """Several base-backend Works as one: ``wait`` waits for each, ``get_future`` completes with
    ``result`` once all have (:func:`_coalesced_or_each`)."""

    def __init__(self, works: list, result) -> None:
        super().__init__()
        self._works, self._result = works, result

    def wait(self, timeout: datetime.timedelta | None = None) -> bool:
        for w in self._works:
            w.wait(timeout) if timeout is not None else w.wait()
        return True

    def is_completed(self) -> bool:
        return all(w.is_completed() for w in self._works)

    def get_future(self) -> torch.futures.Future:
        return torch.futures.collect_all([w.get_future() for w in self._works]).then(lambda _: self._result)


def _coalesced_or_each(base, name: str, each: str, outputs, inputs, opts):
    """``base.<name>(outputs, inputs, opts)`` (``all_gather_single_coalesced`` /
    ``reduce_scatter_single_coalesced``) where the base backend has it; torch 2.11's ``Backend``
    has neither (``.ci/gpu`` prints the hasattr lines), so there one ``base.<each>(out, in, opts)``
    (``_allgather_base`` / ``_reduce_scatter_base``) per pair, their Works waited together."""
    fn = getattr(base, name, None)
    if fn is not None:
        return fn(outputs, inputs, opts)
    return _Works([getattr(base, each)(o, i, opts) for o, i in zip(outputs, inputs)], list(outputs))


def _flat(*items) -> list[torch.Tensor]:
    """The tensors in ``items`` (tensors and nested lists/tuples of them), in order."""
    out: list[torch.Tensor] = []
    for item in items:
        if isinstance(item, torch.Tensor):
            out.append(item)
        elif isinstance(item, (list, tuple)):
            out.extend(_flat(*item))
    return out


class _CudaPath:
    """fastnet's collectives on the CUDA tensors of one group on one device (module docstring):
    fastnet's NCCL communicator from the group's ``store``, a :class:`fastnet.comm.sync.BucketReducer`
    over it, the group's side ``stream`` (:func:`_serialized`), and the watchdog. Construction is
    collective over the group."""

    def __init__(self, store, rank: int, size: int, stream: torch.cuda.Stream, timeout: datetime.timedelta,
                 make_reducer, attempt: int = 0) -> None:
        from fastnet.comm.nccl import NcclCommunicator

        self.device, self.rank, self.timeout, self.stream = stream.device, rank, timeout, stream
        with torch.cuda.device(self.device):
            # one key per creation attempt: a retry after a failed creation must not read the old id
            self.comm = NcclCommunicator.from_store(store, rank, size, key=f"unique_id/{attempt}", device=self.device,
                                                    timeout_s=timeout.total_seconds())
            self.reducer = make_reducer(self.comm)
        hierarchy = getattr(self.reducer, "hierarchy", None)  # the hierarchical algorithms' split communicators
        subs = hierarchy.communicators() if hierarchy else []
        self.communicators = [*subs, self.comm]  # watched, aborted and destroyed together
        self._unfinished: collections.deque = collections.deque()  # (event, deadline, what), in order
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="fastnet-nccl-watchdog", daemon=True)
        self._watchdog.start()

    def run(self, what: str, tensors: Sequence[torch.Tensor], fn, result) -> FastnetWork:
        """Enqueue ``fn()`` (fastnet's kernels and NCCL calls) on the side stream after the
        caller's current stream; the Work's CUDA future holds ``result``."""
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)
        fut: torch.futures.Future = torch.futures.Future(devices=[self.device])
        with torch.cuda.stream(self.stream):
            for t in tensors:
                t.record_stream(self.stream)  # the caller may drop them before the side stream is done
            fn()
            fut.set_result(result)  # records CUDA events on the side stream (the current one here)
            event = torch.cuda.Event()
            event.record(self.stream)
        with self._lock:
            self._unfinished.append((event, time.monotonic() + self.timeout.total_seconds(), what))
        return FastnetWork(fut, event)

    def _watch(self) -> None:
        torch.cuda.set_device(self.device)
        while not self._closed.wait(0.05):
            try:
                with self._lock:
                    while self._unfinished and self._unfinished[0][0].query():
                        self._unfinished.popleft()
                    oldest = self._unfinished[0] if self._unfinished else None
            except Exception as exc:  # noqa: BLE001 - a sticky CUDA error: the watchdog must not die silently
                self._fail(f"CUDA reported an error: {exc}")
                return
            if self._closed.is_set():  # stop() while this round ran: the communicator may be aborted
                return
            try:
                for comm in self.communicators:
                    comm._comm.check_async_error()
            except Exception as exc:  # noqa: BLE001 - NCCL's error, whatever CuPy wraps it in
                self._fail(f"NCCL reported an error: {exc}")
                return
            if oldest is not None and time.monotonic() > oldest[1]:
                self._fail(f"{oldest[2]} did not complete within the group's timeout {self.timeout}: a peer "
                           f"rank may have died or stopped")
                return

    def _fail(self, why: str) -> None:
        """Abort the communicators and end the process (ProcessGroupNCCL's default error handling):
        the aborted collectives' contents are undefined, so this rank must not go on."""
        sys.stderr.write(f"[fastnet] rank {self.rank} on {self.device}: {why}; aborting the NCCL communicators "
                         f"and ending the process\n")
        sys.stderr.flush()
        # ncclCommAbort frees device memory and can wait behind running kernels: the process ends
        # within 10 s whatever abort does (ProcessGroupNCCL has a heartbeat monitor for the same)
        threading.Timer(10.0, os._exit, (1,)).start()
        try:
            self._abort_all()
        finally:
            os._exit(1)

    def _abort_all(self) -> None:
        """``ncclCommAbort`` on every communicator (the hierarchical algorithms' split ones too:
        their kernels may be the ones waiting on a dead peer); the first error is raised after."""
        error = None
        for comm in self.communicators:
            try:
                comm._comm.abort()
            except Exception as exc:  # noqa: BLE001 - abort the others first
                error = error or exc
        if error is not None:
            raise error

    def stop(self) -> None:
        """Stop the watchdog (before the communicators are aborted or destroyed: its polls must not
        see an aborted communicator as an error)."""
        self._closed.set()
        if threading.current_thread() is not self._watchdog:
            self._watchdog.join(5.0)

    def close(self) -> None:
        """Stop the watchdog and destroy the communicators once their work is done; when one does
        not finish (an error, its timeout), abort them all and raise its error (no communicator is
        left to a destroy that would wait on a dead peer)."""
        self.stop()
        try:
            for comm in self.communicators:
                comm.synchronize()
        except BaseException:
            try:
                self._abort_all()
            except Exception:  # noqa: BLE001 - the synchronize error is the one to report
                pass
            raise
        for comm in self.communicators:
            comm.close()

    def abort(self) -> None:
        """Stop the watchdog, then abort the communicators (``ncclCommAbort``)."""
        self.stop()
        self._abort_all()


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
            that differ across ranks (:func:`fastnet.comm.sync.check_consistency`, every rank
            raises). RuntimeError: ``FASTNET_BASE_BACKEND=nccl`` without CUDA or CuPy's NCCL.
    """

    _MIN_SIZE = 2  # fastnet's algorithms run from this world size (one rank: nothing to reduce)

    def __init__(self, store, rank: int, size: int, timeout: datetime.timedelta,
                 config: BackendConfig | None = None) -> None:
        super().__init__(rank, size)
        from fastnet.comm.cost_model import CostModel
        from fastnet.comm.sync import check_consistency
        from fastnet.comm.synchronizer import CommThread

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
        from fastnet.comm.sync import BucketReducer

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
        from fastnet.comm.nccl import _NCCL_DTYPES

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
        from fastnet.comm.algorithms import ring_reduce_scatter_into

        if op == "avg":
            input, op = input / comm.size, "sum"
        ring_reduce_scatter_into(comm, output.view(-1), input.reshape(-1), op)

    @staticmethod
    def _all_gather(comm, output: torch.Tensor, input: torch.Tensor) -> None:
        from fastnet.comm.algorithms import ring_all_gather_into

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


def batch_groups_subclasses(source: str) -> bool:
    """Whether ``torch.distributed.batch_isend_irecv`` (its ``source``) groups the point-to-point ops
    of a ``ProcessGroup`` subclass such as fastnet's: torch 2.14 checks ``isinstance(group,
    ProcessGroup)``; torch 2.11 checks ``type(group) is ProcessGroup`` (torch/distributed/
    distributed_c10d.py, v2.11.0), which is False for a subclass, so the ops went out one by one and a
    two-way NCCL exchange could deadlock (each send waiting for a receive queued behind the peer's send)."""
    return "type(group) is ProcessGroup" not in source


def _batch_isend_irecv(p2p_op_list):
    """``torch.distributed.batch_isend_irecv`` where torch's own does not group a subclass's ops
    (:func:`batch_groups_subclasses`): on fastnet's group with a base backend that supports
    coalescing (ProcessGroupNCCL), the ops are issued inside ``_coalescing_manager`` as torch 2.14
    does (one NCCL group; :meth:`FastnetProcessGroup._start_coalescing`); anything else goes to
    torch's own function unchanged."""
    c10d = dist.distributed_c10d
    c10d._check_p2p_op_list(p2p_op_list)
    group = p2p_op_list[0].group or c10d._get_default_group()
    device = p2p_op_list[0].tensor.device
    if not isinstance(group, FastnetProcessGroup) or \
            not getattr(group._get_backend(device), "supports_coalescing", False):
        return _TORCH_BATCH_ISEND_IRECV(p2p_op_list)
    with c10d._coalescing_manager(group, device, async_ops=True) as cm:
        for p2p in p2p_op_list:
            p2p.op(p2p.tensor, p2p.peer, p2p.group, p2p.tag)
    return cm.works


_TORCH_BATCH_ISEND_IRECV = dist.distributed_c10d.batch_isend_irecv


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
    if not batch_groups_subclasses(inspect.getsource(_TORCH_BATCH_ISEND_IRECV)):  # torch 2.11 (see above)
        dist.batch_isend_irecv = dist.distributed_c10d.batch_isend_irecv = _batch_isend_irecv
    _registered = True


__all__ = ["BACKEND_NAME", "BackendConfig", "C10dCommunicator", "FastnetProcessGroup", "FastnetWork", "register", "OPS"]

register()
