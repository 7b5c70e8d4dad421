"""Process-group set-up for ``torchrun`` (env:// rendezvous) or a single process.

``torchrun`` exports RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT;
:func:`setup` reads them here and nowhere else. Under ``mpiexec`` (no RANK, but MPICH's PMI_RANK or
Open MPI's OMPI_COMM_WORLD_RANK), the ranks come from mpi4py's ``COMM_WORLD`` and the node from its
shared-memory split, and rank 0 broadcasts the rendezvous address (MASTER_ADDR / MASTER_PORT if
set, else its host and a free port) over MPI. Backend: gloo on CPU, nccl on CUDA, each rank
pinned to ``cuda:LOCAL_RANK``. Every collective is bounded by ``timeout_s``: when a rank dies,
the survivors' next collective raises instead of hanging.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from typing import Iterator, Mapping

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class World:
    """Where this process sits: global ``rank`` of ``size`` and ``local_rank`` of ``local_size`` on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    value = environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"Invalid {name}={value!r} in the environment (expected an integer)") from None


def setup(device: str = "auto", backend: str = "auto", timeout_s: float = 300.0,
          environ: Mapping[str, str] | None = None) -> World:
    """Initialise the default process group if WORLD_SIZE > 1 and pick this rank's device.

    Args:
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        backend: ``auto`` (nccl on CUDA, gloo on CPU), ``gloo`` or ``nccl``.
        timeout_s: collective timeout in seconds.

    Raises:
        RuntimeError: ``device="cuda"`` without a CUDA device, or more local ranks than GPUs.
        ValueError: a malformed rank variable, or ``nccl`` on CPU.
    """
    env = os.environ if environ is None else environ
    init_method = "env://"
    if "RANK" not in env and ("PMI_RANK" in env or "OMPI_COMM_WORLD_RANK" in env):
        rank, size, local_rank, local_size, init_method = _mpi_rendezvous(env)
    elif "RANK" not in env and "SLURM_PROCID" in env and _env_int(env, "SLURM_STEP_NUM_TASKS", 1) > 1:
        rank, size, local_rank, local_size, init_method = _slurm_rendezvous(env)
    else:
        rank, size = _env_int(env, "RANK", 0), _env_int(env, "WORLD_SIZE", 1)
        local_rank = _env_int(env, "LOCAL_RANK", rank)
        local_size = _env_int(env, "LOCAL_WORLD_SIZE", size)
    if not 0 <= rank < size:
        raise ValueError(f"Invalid RANK={rank} for WORLD_SIZE={size}")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but torch sees no CUDA device; use --device cpu")
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s); "
                               f"start at most {torch.cuda.device_count()} processes per node")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if backend == "nccl" and not use_cuda:
        raise ValueError("backend 'nccl' needs CUDA tensors; use --backend gloo on CPU")
    if size > 1 and not dist.is_initialized():
        kwargs = {"device_id": dev} if use_cuda else {}
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend=backend, store=attempt_store(init_method, rank, size, timeout, env),
                                rank=rank, world_size=size, timeout=timeout, **kwargs)
    return World(rank, size, local_rank, local_size, dev)


def attempt_store(init_method: str, rank: int, size: int, timeout: datetime.timedelta,
                  environ: Mapping[str, str] | None = None) -> dist.Store:
    """The rendezvous store of ``init_method`` (``env://`` or ``tcp://host:port``), its keys under
    ``fastnet/attempt_<TORCHELASTIC_RESTART_COUNT>/`` (``attempt_0`` without torchrun).

    torchrun's elastic agent keeps one store for the whole job and restarts the workers on it after
    a failure (``--max-restarts``); torch 2.14's env:// rendezvous then reuses it unprefixed, so a
    restarted worker reads the previous attempt's gloo addresses (``connectFullMesh ... Connection
    refused``) and, for the groups made after, waits on keys nobody writes. Keying each attempt apart
    makes every restart rendezvous afresh. Use it for ``init_process_group(store=...)`` in your own
    script under ``torchrun --max-restarts``.

    Raises:
        ValueError: a malformed ``TORCHELASTIC_RESTART_COUNT``.
    """
    env = os.environ if environ is None else environ
    attempt = _env_int(env, "TORCHELASTIC_RESTART_COUNT", 0)
    store, _, _ = next(dist.rendezvous(init_method, rank, size, timeout=timeout))
    store.set_timeout(timeout)
    return dist.PrefixStore(f"fastnet/attempt_{attempt}", store)


def _slurm_rendezvous(env: Mapping[str, str]) -> tuple[int, int, int, int, str]:
    """A task of an ``srun`` step of several tasks (no torchrun, no MPI): ranks from ``SLURM_PROCID``,
    ``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID`` and ``SLURM_STEP_TASKS_PER_NODE``; the rendezvous at
    ``MASTER_ADDR`` (default: the allocation's first node, from ``scontrol show hostnames``) and
    ``MASTER_PORT`` (default: 20000 + the job id mod 20000, the same for every task of the job). A
    batch script's own ``SLURM_*`` (no step) describe the job, not a rank, and are not read.

    Raises:
        ValueError: no ``MASTER_ADDR`` and no ``scontrol`` to find the first node (set it).
    """
    import shutil
    import subprocess

    rank, size = _env_int(env, "SLURM_PROCID", 0), _env_int(env, "SLURM_STEP_NUM_TASKS", 1)
    local_rank = _env_int(env, "SLURM_LOCALID", 0)
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE", "").split("(")[0].split(",")[0]  # "2(x3),1" -> "2"
    local_size = int(per_node) if per_node.isdigit() else size
    host = env.get("MASTER_ADDR")
    if not host:
        nodes = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
        if shutil.which("scontrol") and nodes:
            host = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                                  timeout=30).stdout.split()[0]
        elif nodes and all(c not in nodes for c in "[],"):
            host = nodes  # one node, no range to expand
        else:
            raise ValueError(f"under srun without torchrun: set MASTER_ADDR (the allocation's first node; "
                             f"SLURM_JOB_NODELIST={nodes!r} needs scontrol to expand)")
    port = env.get("MASTER_PORT") or str(20000 + _env_int(env, "SLURM_JOB_ID", 0) % 20000)
    return rank, size, local_rank, local_size, f"tcp://{host}:{port}"


def _mpi_rendezvous(env: Mapping[str, str]) -> tuple[int, int, int, int, str]:
    """Under mpiexec: (rank, size, local rank, local size, tcp:// init method) from mpi4py."""
    import socket

    from fastnet.comm.communicators.mpi import _mpi

    comm = _mpi().COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    local = comm.Split_type(_mpi().COMM_TYPE_SHARED, key=rank)
    local_rank, local_size = local.Get_rank(), local.Get_size()
    local.Free()
    address = None
    if rank == 0:
        host = env.get("MASTER_ADDR") or ("127.0.0.1" if local_size == size else socket.gethostbyname(socket.gethostname()))
        port = env.get("MASTER_PORT")
        if port is None:
            with socket.socket() as s:
                s.bind(("", 0))
                port = str(s.getsockname()[1])
        address = f"tcp://{host}:{port}"
    return rank, size, local_rank, local_size, comm.bcast(address, root=0)


def broadcast_from_rank0(module: torch.nn.Module, world: World) -> None:
    """Make every rank start from rank 0's parameters and buffers (one broadcast per tensor)."""
    if not world.distributed:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


BUFFER_SYNC = ("average", "broadcast", "none")


@torch.no_grad()
def sync_buffers(module: torch.nn.Module, world: World, policy: str = "average") -> None:
    """Make every rank hold the same buffers (BatchNorm running mean/var, ``num_batches_tracked``).

    Collective. ``average``: floating buffers averaged over ranks (one fused all-reduce per dtype;
    timm's ``distribute_bn(reduce=True)``), the others (integer counters) from rank 0;
    ``broadcast``: every buffer from rank 0 (DDP's ``broadcast_buffers``, done here before each
    evaluation and checkpoint instead of every forward); ``none``: nothing (ranks keep their own
    statistics). Running statistics are only read in eval mode, but each training step updates them
    from their current value, so syncing the live ones would make the later statistics depend on when
    syncs happen: the trainer syncs inside :func:`synced_buffers` (a copy for evaluation and
    checkpoints) and only once for good, at the end.

    Raises:
        ValueError: an unknown policy (valid ones listed).
    """
    if policy not in BUFFER_SYNC:
        raise ValueError(f"Unknown buffer_sync {policy!r}; valid policies: {', '.join(BUFFER_SYNC)}")
    if not world.distributed or policy == "none":
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for b in module.buffers():
        key = b.dtype if policy == "average" and b.is_floating_point() else None
        by_dtype.setdefault(key, []).append(b)  # type: ignore[arg-type]
    for dtype, bufs in by_dtype.items():
        if dtype is None:
            for b in bufs:
                dist.broadcast(b, src=0)
            continue
        flat = torch.cat([b.reshape(-1) for b in bufs])
        dist.all_reduce(flat)
        flat.div_(world.size)
        off = 0
        for b in bufs:
            b.copy_(flat[off:off + b.numel()].view_as(b))
            off += b.numel()


@contextlib.contextmanager
def synced_buffers(module: torch.nn.Module, world: World, policy: str = "average") -> Iterator[None]:
    """Within the block ``module`` holds the agreed buffers (:func:`sync_buffers`, collective);
    afterwards each rank's own again, bit for bit. Evaluations and checkpoints read the agreed
    statistics while training goes on with the live ones, so when they happen never changes the run
    (an exact resume restores each rank's live buffers: the checkpoint's ``buffers``)."""
    if not world.distributed or policy == "none":
        yield
        return
    live = [b.detach().clone() for b in module.buffers()]
    sync_buffers(module, world, policy)
    try:
        yield
    finally:
        load_buffers(module, live)


def load_buffers(module: torch.nn.Module, tensors) -> None:
    """Copy ``tensors`` (one per buffer, in ``module.buffers()`` order) into the module's buffers."""
    with torch.no_grad():
        for b, saved in zip(module.buffers(), tensors):
            b.copy_(saved)


def gather_objects(obj: object, world: World) -> list[object] | None:
    """Collective: every rank's picklable ``obj`` on rank 0 (a list indexed by rank), None elsewhere."""
    if not world.distributed:
        return [obj]
    out: list[object] | None = [None] * world.size if world.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_reduce_sum(values: list[float], world: World) -> list[float]:
    """Sum a few scalars over all ranks (float64 on the rank's device; one host sync)."""
    t = torch.tensor(values, dtype=torch.float64, device=world.device)
    if world.distributed:
        dist.all_reduce(t)
    return t.tolist()


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_peer_failure(exc: BaseException) -> bool:
    """True for the error a surviving rank sees when a peer died or a collective timed out (torch's
    ``DistError`` family, a ``TimeoutError``, or gloo's "connection closed/reset by peer")."""
    if isinstance(exc, (TimeoutError, getattr(dist, "DistError", TimeoutError))):
        return True
    text = str(exc).lower()
    return any(s in text for s in ("closed by peer", "reset by peer", "connection reset", "broken pipe",
                                   "timed out", "timeout"))
