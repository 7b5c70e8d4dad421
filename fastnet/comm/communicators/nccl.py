"""The :class:`~fastnet.comm.communicators.base.Communicator` protocol over NCCL through CuPy's bindings
(``cupy.cuda.nccl``), for CUDA tensors, independent of torch.distributed's process groups.

    comm = NcclCommunicator.from_torch()          # under torchrun, after init_process_group
    comm = NcclCommunicator.from_mpi()            # under mpiexec
    comm = NcclCommunicator.from_store(store, rank, size)   # any torch.distributed Store

* **Unique id.** Rank 0 calls ``ncclGetUniqueId``; the 128 bytes reach the other ranks through the
  torch.distributed store, a torch.distributed broadcast, or an MPI broadcast.
* **Zero copy.** Tensors are passed to NCCL by data pointer (``Tensor.data_ptr()``); they must be
  contiguous CUDA tensors on this communicator's device.
* **Streams.** Every operation runs on this communicator's own CUDA stream, which first waits
  for the caller's current stream; the caller's stream then waits for it (device-side, no host
  block), so results are ready for the next kernel in stream order, as with torch's NCCL group.
  The tensors are recorded on the side stream so the caching allocator cannot reuse them early.
* **Point-to-point.** ``isend``/``irecv`` are queued and issued together inside one
  ``ncclGroupStart``/``ncclGroupEnd`` at the first ``wait()`` (or next operation), so a ring step's
  send and receive cannot deadlock.
* **Timeouts.** :meth:`barrier` and :meth:`synchronize` block the host until the side stream is
  done, polling ``ncclCommGetAsyncError``; after ``timeout_s`` the communicator is aborted
  (``ncclCommAbort``) and RuntimeError is raised, instead of hanging on a dead peer.
* **split** exchanges new unique ids with an all-gather over this communicator itself.

NCCL will not place two ranks on one GPU, so multi-rank runs need one GPU per rank.

Raises (construction): RuntimeError when CuPy or its NCCL bindings are missing (install
``fastnet[gpu]``) or CUDA is unavailable.
"""

from __future__ import annotations

import json
import time
from typing import Any, Sequence

import torch

from fastnet.comm.communicators.base import check_op, check_reduce_scatter

# ncclDataType_t / ncclRedOp_t values from nccl.h (stable across NCCL 2.x).
_NCCL_DTYPES = {torch.int8: 0, torch.uint8: 1, torch.int32: 2, torch.int64: 4, torch.float16: 6,
                torch.float32: 7, torch.float64: 8, torch.bfloat16: 9}
_NCCL_OPS = {"sum": 0, "max": 2, "min": 3}
UNIQUE_ID_BYTES = 128


def _nccl() -> Any:
    try:
        from cupy.cuda import nccl
    except ImportError as exc:
        raise RuntimeError(f"the CuPy-NCCL backend needs CuPy with NCCL ({exc}): pip install 'fastnet[gpu]' "
                           "(cupy-cuda12x + nvidia-nccl-cu12), or use the torch.distributed nccl backend") from None
    if not getattr(nccl, "available", True):
        raise RuntimeError("CuPy was built without NCCL: pip install 'fastnet[gpu]' (nvidia-nccl-cu12)")
    return nccl


def unique_id_bytes(uid: bytes | Sequence[int]) -> bytes:
    """An NCCL unique id (``ncclUniqueId``, 128 bytes) as ``bytes``, from either form CuPy's
    ``get_unique_id()`` returns: ``bytes`` (CuPy >= 14) or a tuple of 128 C ``char`` values in
    -128..127 (CuPy 13) — or a list of 0..255 values (the store/broadcast encoding).

    Raises:
        ValueError: not 128 bytes, or a value outside -128..255.
    """
    if len(uid) != UNIQUE_ID_BYTES:
        raise ValueError(f"an NCCL unique id has {UNIQUE_ID_BYTES} bytes, got {len(uid)}")
    if isinstance(uid, (bytes, bytearray)):
        return bytes(uid)
    if any(not -128 <= int(b) <= 255 for b in uid):
        raise ValueError("an NCCL unique id's values are bytes (-128..255)")
    return bytes(int(b) & 0xFF for b in uid)


def unique_id_for_cupy(uid: bytes | Sequence[int], cupy_version: str) -> bytes | tuple[int, ...]:
    """``uid`` in the form ``cupy.cuda.nccl.NcclCommunicator(ndev, commId, rank)`` of CuPy
    ``cupy_version`` takes: ``bytes`` from CuPy 14 on (``commId (bytes)``; ``get_unique_id`` "returned
    a tuple of integers" before 14.0), a tuple of signed ``char`` values before it."""
    raw = unique_id_bytes(uid)
    if int(cupy_version.split(".")[0]) >= 14:
        return raw
    return tuple(b - 256 if b > 127 else b for b in raw)


def encode_unique_id(uid: bytes | Sequence[int]) -> str:
    """NCCL unique id (either of CuPy's forms, :func:`unique_id_bytes`) → text for a store or a
    broadcast (a JSON list of 128 values in 0..255)."""
    return json.dumps(list(unique_id_bytes(uid)))


def decode_unique_id(text: str | bytes) -> bytes:
    """:func:`encode_unique_id`'s text → the 128-byte id. Raises ValueError on a wrong length."""
    return unique_id_bytes(json.loads(text))


class _Work:
    """Handle of an operation on the side stream: ``wait()`` orders the caller's current stream
    after it (device side); ``is_completed()`` asks the event without blocking."""

    __slots__ = ("comm", "event")

    def __init__(self, comm: "NcclCommunicator", event: torch.cuda.Event | None) -> None:
        self.comm, self.event = comm, event

    def wait(self) -> None:
        self.comm._flush()
        if self.event is None:
            self.event = self.comm._record()
        torch.cuda.current_stream(self.comm.device).wait_event(self.event)

    def is_completed(self) -> bool:
        self.comm._flush()
        return self.event is not None and self.event.query()


class NcclCommunicator:
    """Communicator over a ``cupy.cuda.nccl.NcclCommunicator`` of ``size`` ranks (module docstring).
    Not ``concurrent_safe``: fastnet's algorithms never run its operations at the same time as
    another communicator's (:class:`fastnet.comm.communicators.base.Communicator`, NCCL's rule).

    Args:
        rank, size: this process's rank and the number of ranks (one GPU each).
        unique_id: rank 0's ``cupy.cuda.nccl.get_unique_id()`` (bytes, or CuPy 13's tuple), the
            same on every rank.
        device: the CUDA device (default: the current one).
        timeout_s: host-side limit for :meth:`barrier` / :meth:`synchronize`, seconds.

    Raises:
        RuntimeError: CuPy/NCCL or CUDA missing. TypeError: a tensor that is not a contiguous CUDA
        tensor on this device, or a dtype NCCL lacks (the supported ones are named). ValueError:
        unknown op or mismatched sizes.
    """

    concurrent_safe = False

    def __init__(self, rank: int, size: int, unique_id: bytes | Sequence[int],
                 device: torch.device | int | None = None,
                 timeout_s: float = 300.0) -> None:
        self.nccl = _nccl()
        if not torch.cuda.is_available():
            raise RuntimeError("the CuPy-NCCL backend needs a CUDA device; on CPU use gloo or MPI")
        import cupy

        self.device = torch.device("cuda", torch.cuda.current_device() if device is None else
                                   torch.device("cuda", device).index if isinstance(device, int) else device.index)
        self.rank, self.size, self.timeout_s = rank, size, timeout_s
        with cupy.cuda.Device(self.device.index):
            self._comm = self.nccl.NcclCommunicator(size, unique_id_for_cupy(unique_id, cupy.__version__), rank)
        self._stream = torch.cuda.Stream(self.device)
        self._pending: list[tuple[str, torch.Tensor, int]] = []  # queued isend/irecv

    def __repr__(self) -> str:
        return f"NcclCommunicator(rank={self.rank}, size={self.size}, device={self.device})"

    # -- construction helpers ---------------------------------------------------------------
    @classmethod
    def from_store(cls, store: Any, rank: int, size: int, key: str = "fastnet/nccl_unique_id", **kw: Any
                   ) -> "NcclCommunicator":
        """Rank 0 puts a new unique id under ``key`` in the torch.distributed ``store``; the others
        read it (blocking up to the store's timeout)."""
        if rank == 0:
            store.set(key, encode_unique_id(_nccl().get_unique_id()))
        return cls(rank, size, decode_unique_id(store.get(key)), **kw)

    @classmethod
    def from_torch(cls, group: Any = None, **kw: Any) -> "NcclCommunicator":
        """Over the ranks of a torch.distributed group: the id travels by ``broadcast_object_list``."""
        import torch.distributed as dist

        rank, size = dist.get_rank(group), dist.get_world_size(group)
        box = [encode_unique_id(_nccl().get_unique_id()) if rank == 0 else None]
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group else 0, group=group)
        return cls(rank, size, decode_unique_id(box[0]), **kw)

    @classmethod
    def from_mpi(cls, comm: Any = None, **kw: Any) -> "NcclCommunicator":
        """Over an mpi4py communicator (default COMM_WORLD); the id travels by ``bcast``."""
        from fastnet.comm.communicators.mpi import _mpi

        comm = comm if comm is not None else _mpi().COMM_WORLD
        uid = comm.bcast(encode_unique_id(_nccl().get_unique_id()) if comm.Get_rank() == 0 else None, root=0)
        return cls(comm.Get_rank(), comm.Get_size(), decode_unique_id(uid), **kw)

    # -- plumbing -----------------------------------------------------------------------------
    def _ptr(self, t: torch.Tensor) -> int:
        if t.device != self.device or not t.is_contiguous():
            raise TypeError(f"the NCCL communicator takes contiguous tensors on {self.device}, got "
                            f"{'a non-contiguous tensor' if t.device == self.device else t.device}")
        if t.dtype not in _NCCL_DTYPES:
            raise TypeError(f"NCCL has no type for {t.dtype}; supported: "
                            f"{', '.join(str(d).removeprefix('torch.') for d in _NCCL_DTYPES)}")
        t.record_stream(self._stream)
        return t.data_ptr()

    def _begin(self) -> int:
        self._flush()
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        return self._stream.cuda_stream

    def _record(self) -> torch.cuda.Event:
        ev = torch.cuda.Event()
        ev.record(self._stream)
        return ev

    def _end(self, async_op: bool) -> _Work | None:
        work = _Work(self, self._record())
        if async_op:
            return work
        work.wait()
        return None

    def _flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        s = self._stream.cuda_stream
        self.nccl.groupStart()
        try:
            for kind, t, peer in pending:
                fn = self._comm.send if kind == "send" else self._comm.recv
                fn(t.data_ptr(), t.numel(), _NCCL_DTYPES[t.dtype], peer, s)
        finally:
            self.nccl.groupEnd()

    # -- the protocol ---------------------------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", async_op: bool = False) -> _Work | None:
        check_op(op)
        if op == "avg":
            tensor.div_(self.size)  # before the sum: no overflow in FP16
            op = "sum"
        p = self._ptr(tensor)
        self._comm.allReduce(p, p, tensor.numel(), _NCCL_DTYPES[tensor.dtype], _NCCL_OPS[op], self._begin())
        return self._end(async_op)

    def reduce_scatter(self, output: torch.Tensor, input: torch.Tensor, op: str = "sum") -> None:
        check_op(op, input.dtype)
        check_reduce_scatter(self.size, output, input)
        if op == "avg":
            input, op = input / self.size, "sum"
        self._comm.reduceScatter(self._ptr(input), self._ptr(output), output.numel(), _NCCL_DTYPES[output.dtype],
                                 _NCCL_OPS[op], self._begin())
        self._end(False)

    def all_gather(self, output: torch.Tensor, input: torch.Tensor) -> None:
        if output.numel() != input.numel() * self.size:
            raise ValueError(f"all_gather: output has {output.numel()} elements, expected size {self.size} × "
                             f"input {input.numel()}")
        self._comm.allGather(self._ptr(input), self._ptr(output), input.numel(), _NCCL_DTYPES[input.dtype],
                             self._begin())
        self._end(False)

    def reduce(self, tensor: torch.Tensor, dst: int, op: str = "sum") -> None:
        check_op(op)
        if op == "avg":
            tensor.div_(self.size)
            op = "sum"
        p = self._ptr(tensor)
        self._comm.reduce(p, p, tensor.numel(), _NCCL_DTYPES[tensor.dtype], _NCCL_OPS[op], dst, self._begin())
        self._end(False)

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        self._comm.bcast(self._ptr(tensor), tensor.numel(), _NCCL_DTYPES[tensor.dtype], src, self._begin())
        self._end(False)

    def isend(self, tensor: torch.Tensor, dst: int) -> _Work:
        self._ptr(tensor)
        self._pending.append(("send", tensor, dst))
        return _Work(self, None)

    def irecv(self, tensor: torch.Tensor, src: int) -> _Work:
        self._ptr(tensor)
        self._pending.append(("recv", tensor, src))
        return _Work(self, None)

    def exchange(self, sends: Sequence[tuple[torch.Tensor, int]],
                 recvs: Sequence[tuple[torch.Tensor, int]]) -> _Work:
        """The non-empty sends and receives in one ``ncclGroupStart``/``ncclGroupEnd`` on the side
        stream, issued now; the handle's event marks their end."""
        for t, peer in sends:
            if t.numel():
                self._ptr(t)
                self._pending.append(("send", t, peer))
        for t, peer in recvs:
            if t.numel():
                self._ptr(t)
                self._pending.append(("recv", t, peer))
        self._flush()
        return _Work(self, self._record())

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self.isend(tensor, dst).wait()

    def recv(self, tensor: torch.Tensor, src: int) -> None:
        self.irecv(tensor, src).wait()

    def synchronize(self, timeout_s: float | None = None) -> None:
        """Block the host until everything issued on this communicator is done.

        Raises:
            RuntimeError: NCCL reported an asynchronous error, or nothing finished within
                ``timeout_s`` (default: the communicator's); the communicator is then aborted.
        """
        self._flush()
        ev = self._record()
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        while not ev.query():
            try:
                self._comm.check_async_error()
            except Exception as exc:
                self._comm.abort()
                raise RuntimeError(f"NCCL error on rank {self.rank}: {exc}") from exc
            if time.monotonic() > deadline:
                self._comm.abort()
                raise RuntimeError(f"NCCL operations on rank {self.rank} did not finish within "
                                   f"{self.timeout_s} s: a peer rank may have died (communicator aborted)")
            time.sleep(1e-4)

    def barrier(self) -> None:
        self.all_reduce(torch.zeros(1, device=self.device))
        self.synchronize()

    def split(self, color: int | None, key: int = 0) -> "NcclCommunicator | None":
        """Collective: new communicators per ``color`` ordered by ``(key, rank)``; their unique ids
        are created by each group's first member and all-gathered over this communicator."""
        mine = torch.zeros(3 + UNIQUE_ID_BYTES, dtype=torch.int64)
        mine[0], mine[1], mine[2] = (-1 if color is None else color), key, self.rank
        infos = torch.empty(self.size * mine.numel(), dtype=torch.int64, device=self.device)
        self.all_gather(infos, mine.to(self.device))
        rows = infos.cpu().view(self.size, -1)[:, :3].tolist()
        if color is None:
            members = []
        else:
            members = sorted((r for r in rows if r[0] == color), key=lambda r: (r[1], r[2]))
        first = members[0][2] if members else -1
        if first == self.rank:
            mine[3:] = torch.tensor(list(unique_id_bytes(self.nccl.get_unique_id())), dtype=torch.int64)
        self.all_gather(infos, mine.to(self.device))  # second round: the ids
        if not members:
            return None
        uid = unique_id_bytes(infos.cpu().view(self.size, -1)[first, 3:].tolist())
        new_rank = [m[2] for m in members].index(self.rank)
        return NcclCommunicator(new_rank, len(members), uid, self.device, self.timeout_s)

    def close(self) -> None:
        """Destroy the NCCL communicator (after :meth:`synchronize`)."""
        self._comm.destroy()
