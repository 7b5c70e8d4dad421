"""One dispatch point for fastnet's fused multi-tensor CUDA kernels (``kernels/fastnet_kernels.cu``).

Each operation takes lists of tensors and runs, on CUDA tensors with CuPy installed, one kernel
launch for the whole list (compiled at first use by ``cupy.RawModule``, cached per device, launched
on PyTorch's current stream; tensors are passed by device address, lists of them through a tensor
table; float32, float16 and bfloat16), and
otherwise its PyTorch reference twin, which is also the test oracle.

The CUDA path is **opt-in** (``FASTNET_KERNELS=1``, read once at import) until it has run on a GPU:
no device was available when it was written (fastnet issue 6), so by default the reference path
runs everywhere.

* :func:`pack` — gradients (fp32/fp16) → one flat fusion buffer, times ``scale``, cast to its dtype.
* :func:`unpack_unscale` — flat buffer (fp32/fp16) → fp32 tensors times ``inv_scale``; returns a 0-dim
  bool device tensor "found inf/NaN" (Micikevicius et al. 2018, dynamic loss scaling).
* :func:`copy_cast` — fp32 tensors → fp32/fp16 tensors (master weights → model copy).
* :func:`lars_step` — LARS (You et al. 2017, Alg. 1; formulas of :mod:`fastnet.optim.lars`) on fp32
  masters with momentum, weight decay and the exclusion rule, optionally writing the FP16 model
  copy; two launches (per-chunk norms, then update), deterministic.

Raises: TypeError for dtypes a kernel lacks (listed) or mixed devices; ValueError for mismatched
lengths / sizes.
"""

from __future__ import annotations

import functools
import os
import sys
from importlib import resources
from pathlib import Path
from typing import Sequence

import torch

CHUNK = 4096  # elements per LARS block; must match kernels/fastnet_kernels.cu
_THREADS = 256
_CODES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
_ENABLED = os.environ.get("FASTNET_KERNELS", "0") == "1"


def kernel_source() -> str:
    """The CUDA C source, from the installed package (``fastnet._cuda``) or the repository's ``kernels/``."""
    try:
        return (resources.files("fastnet._cuda") / "fastnet_kernels.cu").read_text()
    except (ModuleNotFoundError, FileNotFoundError):
        return (Path(__file__).resolve().parents[1] / "kernels" / "fastnet_kernels.cu").read_text()


@functools.lru_cache(maxsize=None)
def _cupy():
    try:
        import cupy
    except ImportError:
        return None
    return cupy


def _nvidia_roots() -> list[Path]:
    """The CUDA toolkit pieces pip installs: ``site-packages/nvidia/cu13`` (CUDA 13 wheels, which
    torch's cu13 builds depend on) or ``nvidia/cuda_runtime`` + ``nvidia/cuda_nvrtc`` (CUDA 12
    wheels), then ``$CUDA_PATH`` / ``/usr/local/cuda``."""
    roots = []
    for entry in sys.path:
        base = Path(entry) / "nvidia"
        if base.is_dir():
            roots += [base / "cu13", base / "cuda_runtime", base / "cuda_nvrtc", base / "cuda_nvcc"]
    roots += [Path(p) for p in (os.environ.get("CUDA_PATH"), "/usr/local/cuda") if p]
    return [r for r in roots if r.is_dir()]


def cuda_include_dirs() -> list[str]:
    """Directories holding ``cuda_fp16.h`` (recent CuPy no longer bundles it): every NVRTC compile
    of ``kernels/fastnet_kernels.cu`` gets them as ``-I``, at run time and in the CI compile test."""
    return [str(r / "include") for r in _nvidia_roots() if (r / "include" / "cuda_fp16.h").is_file()]


def nvrtc_compile(source: str, arch: str, include_dirs: Sequence[str] = ()) -> str:
    """Compile CUDA C ``source`` to PTX for ``arch`` (e.g. ``"sm_90"``) with NVRTC through ctypes
    (``libnvrtc`` from the pip wheel or the toolkit): no GPU needed. Returns the PTX text.

    Raises:
        RuntimeError: NVRTC not found (install the CUDA wheels: torch's CUDA builds bring
            ``nvidia-cuda-nvrtc``), or a compile error (the message holds NVRTC's log).
    """
    import ctypes

    libs = [p for r in _nvidia_roots() for d in ("lib", "lib64") for p in sorted((r / d).glob("libnvrtc.so*"))
            if "builtins" not in p.name and ".alt." not in p.name]
    if not libs:
        raise RuntimeError("NVRTC not found: install a CUDA build of torch (it depends on nvidia-cuda-nvrtc) or "
                           "set CUDA_PATH to a CUDA toolkit")
    nvrtc = ctypes.CDLL(str(libs[0]))
    prog = ctypes.c_void_p()

    def check(status: int, what: str) -> None:
        if status != 0:
            nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
            raise RuntimeError(f"NVRTC {what} failed: {nvrtc.nvrtcGetErrorString(status).decode()}")

    check(nvrtc.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"fastnet_kernels.cu", 0, None, None),
          "create")
    opts = [f"--gpu-architecture=compute_{arch.split('_')[1]}".encode(), b"-std=c++17",
            *[f"-I{d}".encode() for d in include_dirs]]
    status = nvrtc.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    if status != 0:
        raise RuntimeError(f"NVRTC compile for {arch} failed:\n{log.value.decode(errors='replace')}")
    nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    check(nvrtc.nvrtcGetPTX(prog, ptx), "GetPTX")
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    return ptx.value.decode()


@functools.lru_cache(maxsize=None)
def _module(device_index: int):
    cupy = _cupy()
    with cupy.cuda.Device(device_index):
        return cupy.RawModule(code=kernel_source(),
                              options=("-std=c++17", *(f"-I{d}" for d in cuda_include_dirs())))


def use_cuda_kernels(tensors: Sequence[torch.Tensor], dense_ok: bool = False) -> bool:
    """True when the fused kernels will run: enabled, CuPy importable, CUDA tensors, every tensor
    float32/float16/bfloat16 and laid out as the kernel needs (:func:`kernel_tensors_ok`).
    Otherwise the PyTorch reference path runs (never an error)."""
    return (_ENABLED and bool(tensors) and tensors[0].is_cuda and kernel_tensors_ok(tensors, dense_ok)
            and _cupy() is not None)


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: its elements fill ``numel`` consecutive slots in some dimension
    order (contiguous, channels_last, any permutation of a contiguous tensor)."""
    expected = 1
    for d in sorted(range(t.dim()), key=t.stride):
        if t.size(d) == 1:
            continue
        if t.stride(d) != expected:
            return False
        expected *= t.size(d)
    return True


def kernel_tensors_ok(tensors: Sequence[torch.Tensor], dense_ok: bool = False) -> bool:
    """Every tensor has a kernel dtype and is contiguous; with ``dense_ok`` (kernels whose result
    does not depend on element order, i.e. LARS: per-tensor norms and an elementwise update over
    tensors of one layout) dense non-overlapping tensors such as channels_last ones are accepted
    too, walked in storage order. The elementwise pack/unpack/copy kernels follow logical
    (row-major) order, as their references do, so they need contiguous tensors."""
    return all(t.dtype in _CODES and (t.is_contiguous() or (dense_ok and _dense(t)))
               for t in tensors)


def tensor_table(tensors: Sequence[torch.Tensor], device: torch.device | None = None, dense_ok: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ptrs, offsets)`` int64 tensors on ``device``: the tensors' addresses and the exclusive
    prefix sums of their element counts (``offsets[-1]`` = total). Empty list → ``([], [0])``.

    Cached by (device, addresses, element counts): the optimizer's masters and the flat gradient
    buffers are the same tensors every step, so in steady state a call builds nothing and copies
    nothing to the device (the first call per list does one small host-to-device copy).

    Raises:
        ValueError: a non-contiguous tensor (the kernels index them flat; with ``dense_ok`` a dense
            non-overlapping one, e.g. channels_last, is indexed in storage order).
    """
    for t in tensors:
        if not (t.is_contiguous() or (dense_ok and _dense(t))):
            raise ValueError(f"tensor tables need contiguous tensors, got shape {tuple(t.shape)} strides {t.stride()}")
    device = device or (tensors[0].device if tensors else torch.device("cpu"))
    return _table(str(device), tuple(t.data_ptr() for t in tensors), tuple(t.numel() for t in tensors))


@functools.lru_cache(maxsize=256)
def _table(device: str, ptrs: tuple[int, ...], numels: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = torch.zeros(len(numels) + 1, dtype=torch.int64)
    if numels:
        offsets[1:] = torch.tensor(numels, dtype=torch.int64).cumsum(0)
    return torch.tensor(ptrs, dtype=torch.int64).to(device), offsets.to(device)


def group_by_dtype(tensors: Sequence[torch.Tensor]) -> dict[torch.dtype, list[int]]:
    """Indices of ``tensors`` per dtype, in first-seen order (a kernel takes one dtype per table)."""
    out: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        out.setdefault(t.dtype, []).append(i)
    return out


def _code(dtype: torch.dtype) -> str:
    if dtype not in _CODES:
        raise TypeError(f"fastnet's kernels take float32, float16 and bfloat16 tensors, got {dtype}")
    return _CODES[dtype]


def kernel_args(args: tuple) -> tuple:
    """The launch arguments as the kernels' C signatures take them: a tensor as its device address
    (``np.uint64(data_ptr())``: a ``T*`` parameter; no DLPack handshake, which CuPy refuses for
    bfloat16), a Python float as ``float``, anything else as ``int``."""
    import numpy as np

    return tuple(np.uint64(a.data_ptr()) if isinstance(a, torch.Tensor) else
                 np.float32(a) if isinstance(a, float) else np.int32(a) for a in args)


def _launch(name: str, device: torch.device, total: int, args: tuple, blocks: int | None = None) -> None:
    """Launch kernel ``name`` on ``device``'s current PyTorch stream, inside that device (CuPy's
    current device selects the module and context). Every tensor argument is recorded on the stream,
    so a table evicted from the LRU caches while the kernel still reads it is not handed out again
    by PyTorch's caching allocator before the kernel is done."""
    cupy = _cupy()
    stream = torch.cuda.current_stream(device)
    for a in args:
        if isinstance(a, torch.Tensor):
            a.record_stream(stream)
    grid = blocks if blocks is not None else max(1, min(-(-total // _THREADS), 65535))
    with cupy.cuda.Device(device.index):
        fn = _module(device.index).get_function(name)
        with cupy.cuda.ExternalStream(stream.cuda_stream):
            fn((grid,), (_THREADS,), kernel_args(args))


def _check_lengths(**lists: Sequence) -> None:
    lens = {k: len(v) for k, v in lists.items()}
    if len(set(lens.values())) > 1:
        raise ValueError(f"tensor lists of different lengths: {lens}")


def pack(tensors: Sequence[torch.Tensor], out: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``out[:] = cat(flatten(t) for t in tensors) × scale``, cast to ``out.dtype`` (1-D, numel = total).

    Raises ValueError if ``out`` has the wrong size."""
    total = sum(t.numel() for t in tensors)
    if out.dim() != 1 or out.numel() != total:
        raise ValueError(f"pack: out must be 1-D with {total} elements, got shape {tuple(out.shape)}")
    if not use_cuda_kernels([*tensors, out]):
        if tensors:
            flat = torch.cat([t.reshape(-1).float() for t in tensors])
            out.copy_(flat.mul_(scale) if scale != 1.0 else flat)
        return out
    off = 0
    for dtype, idx in group_by_dtype(tensors).items():  # one launch per source dtype
        members = [tensors[i] for i in idx]
        n = sum(t.numel() for t in members)
        if idx != list(range(idx[0], idx[-1] + 1)):
            raise ValueError("pack: tensors of one dtype must be adjacent in the list")
        ptrs, offsets = tensor_table(members)
        _launch(f"pack_{_code(dtype)}_{_code(out.dtype)}", out.device, n,
                (ptrs, offsets, len(members), out[off:off + n], float(scale)))
        off += n
    return out


def unpack_unscale(flat: torch.Tensor, outs: Sequence[torch.Tensor], inv_scale: float) -> torch.Tensor:
    """``outs[i][:] = float32(flat[segment i]) × inv_scale`` (``outs`` fp32, in order, covering ``flat``).
    Returns a 0-dim bool tensor on the device: any result inf/NaN. No host sync.

    Raises ValueError if the sizes do not add up, TypeError for non-fp32 outputs."""
    total = sum(o.numel() for o in outs)
    if flat.numel() != total:
        raise ValueError(f"unpack_unscale: flat has {flat.numel()} elements, the outputs {total}")
    if any(o.dtype != torch.float32 for o in outs):
        raise TypeError("unpack_unscale writes float32 outputs (FP32 master gradients)")
    if not use_cuda_kernels([flat, *outs]):
        off = 0
        for o in outs:
            o.copy_(flat[off:off + o.numel()].view(o.shape)).mul_(inv_scale)
            off += o.numel()
        return ~torch.stack([torch.isfinite(o).all() for o in outs]).all() if outs else torch.tensor(False)
    found = torch.zeros(1, dtype=torch.int32, device=flat.device)
    ptrs, offsets = tensor_table(outs)
    _launch(f"unpack_unscale_{_code(flat.dtype)}", flat.device, total,
            (flat, ptrs, offsets, len(outs), float(inv_scale), found))
    return found[0] != 0


def copy_cast(src: Sequence[torch.Tensor], dst: Sequence[torch.Tensor]) -> None:
    """``dst[i][:] = src[i]`` cast to ``dst[i]``'s dtype (fp32 sources; fp32 or fp16 destinations of
    equal element counts)."""
    _check_lengths(src=src, dst=dst)
    if any(s.numel() != d.numel() for s, d in zip(src, dst)):
        raise ValueError("copy_cast: source and destination element counts differ")
    if not use_cuda_kernels([*src, *dst]):
        for s, d in zip(src, dst):
            d.copy_(s.view(d.shape) if s.is_contiguous() and d.is_contiguous() else s)
        return
    for dtype, idx in group_by_dtype(dst).items():
        if any(src[i].dtype != torch.float32 for i in idx):
            raise TypeError("copy_cast: the kernel copies from float32 sources")
        sp, offsets = tensor_table([src[i] for i in idx])
        dp, _ = tensor_table([dst[i] for i in idx])
        total = sum(dst[i].numel() for i in idx)  # from the host: no device-to-host sync
        _launch(f"copy_f32_{_code(dtype)}", dst[idx[0]].device, total, (sp, dp, offsets, len(idx)))


@functools.lru_cache(maxsize=64)
def _lars_blocks(device: str, numels: tuple[int, ...], excluded: tuple[bool, ...]) -> tuple:
    """The LARS block table on ``device`` (cached: built and copied once per parameter list):
    per-tensor numels, per-block tensor and start, first block per tensor, exclusion flags."""
    block_tensor, block_start, first_block = [], [], [0]
    for t, n in enumerate(numels):
        starts = range(0, n, CHUNK) if n else []
        block_tensor += [t] * len(starts)
        block_start += list(starts)
        first_block.append(len(block_tensor))
    as_dev = functools.partial(torch.tensor, device=device)
    return (as_dev(numels, dtype=torch.int64), as_dev(block_tensor, dtype=torch.int32),
            as_dev(block_start, dtype=torch.int64), as_dev(first_block, dtype=torch.int32),
            as_dev(excluded, dtype=torch.uint8), len(block_tensor))


def lars_step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], bufs: Sequence[torch.Tensor],
              excluded: Sequence[bool], *, lr: float, momentum: float, weight_decay: float,
              trust_coefficient: float, eps: float, nesterov: bool, clip: bool,
              model_copies: Sequence[torch.Tensor | None] | None = None) -> None:
    """One LARS step in place on fp32 ``params`` (momentum ``bufs`` allocated by the caller, zeros
    at the start), then, if given, ``model_copies[i][:] = params[i]`` (fp16 inside the update
    kernel; fp32/bf16 by the copy kernel after it). Same formulas as
    :func:`fastnet.optim.functional.lars`; the reference path calls it. Tensors may be channels_last (any
    dense layout) when each parameter's gradient, buffer and copy share its strides."""
    _check_lengths(params=params, grads=grads, bufs=bufs, excluded=excluded)
    copies = list(model_copies) if model_copies is not None else [None] * len(params)
    same_layout = all(t is None or t.stride() == p.stride() for p, *ts in zip(params, grads, bufs, copies)
                      for t in ts)  # storage order is then one order for all four
    if not (same_layout and use_cuda_kernels([*params, *grads, *bufs, *(c for c in copies if c is not None)],
                                             dense_ok=True)):
        from fastnet.optim.functional import lars

        lars(list(params), list(grads), list(bufs), list(excluded), lr=lr, momentum=momentum,
             weight_decay=weight_decay, trust_coefficient=trust_coefficient, eps=eps, nesterov=nesterov,
             clip=clip, foreach=False)
        for p, c in zip(params, copies):
            if c is not None:
                c.copy_(p)
        return
    if not params:
        return
    if any(p.dtype != torch.float32 or g.dtype != torch.float32 for p, g in zip(params, grads)):
        raise TypeError("lars_step: the kernel updates float32 masters with float32 gradients")
    device = params[0].device
    nt, bt, bs, fb, ex, nblocks = _lars_blocks(str(device), tuple(p.numel() for p in params),
                                               tuple(bool(e) for e in excluded))
    if nblocks == 0:
        return
    half_copies = [c if c is not None and c.dtype == torch.float16 else None for c in copies]  # written by the kernel
    wp, _ = tensor_table(params, dense_ok=True)
    gp, _ = tensor_table(grads, dense_ok=True)
    bp, _ = tensor_table(bufs, dense_ok=True)
    hp, _ = _table(str(device), tuple(c.data_ptr() if c is not None else 0 for c in half_copies), (0,) * len(copies))
    partials = torch.empty(nblocks, 2, dtype=torch.float32, device=device)
    _launch("lars_norms_f32", device, 0, (wp, gp, nt, bt, bs, partials), blocks=nblocks)
    _launch("lars_update_f32", device, 0, (wp, gp, bp, hp, nt, ex, bt, bs, fb, partials, float(lr), float(momentum),
                                           float(weight_decay), float(trust_coefficient), float(eps), int(nesterov),
                                           int(clip)), blocks=nblocks)
    rest = [(p, c) for p, c, h in zip(params, copies, half_copies) if c is not None and h is None]
    for p, c in rest:  # float32 / bfloat16 model copies: the copy kernel (contiguous) or torch's copy
        if p.is_contiguous() and c.is_contiguous():
            copy_cast([p], [c])
        else:
            c.copy_(p)
