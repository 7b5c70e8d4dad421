"""Numeric precision policies: FP32, autocast, and FP16/BF16 models with FP32 master weights.

Policies (``--precision``):
  * ``fp32``: everything in float32.
  * ``amp``: ``torch.autocast`` (float16) over an FP32 model with ``torch.amp.GradScaler`` — the
    library baseline.
  * ``fp16``: the scheme of Jia et al. 2018 (§3.1) and Micikevicius et al. 2018 ("Mixed Precision
    Training"): model parameters and activations in float16 except normalisation layers, which stay
    float32; an FP32 master copy of every parameter; the backward pass of the scaled loss gives
    float16 gradients, which are all-reduced in float16 (half the bytes), then unscaled into FP32
    master gradients, checked for inf/NaN, stepped by any optimizer on the masters, and copied back
    to the model. Dynamic loss scaling on by default.
  * ``bf16``: the same with bfloat16; loss scaling off by default (bfloat16 has float32's range).

Flat buffers (:class:`MasterWeights`): the model's low-precision parameters are views into one
contiguous buffer and their gradients views into another (likewise for the FP32 normalisation
parameters), and the masters and master gradients are views into one FP32 buffer each, so
all-reduce, unscale, the overflow check and the copy back are one operation per buffer instead of
one per tensor.

One optimizer step with ``fp16``/``bf16``: ``backward(loss)`` per micro-batch → all-reduce of
:meth:`Precision.grad_buffers` → :meth:`Precision.step` (unscale, one host sync for the global
overflow decision, optimizer step on masters, copy back, loss-scale update) → :meth:`zero_grad`.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterable

import torch
import torch.distributed as dist
import torch.nn as nn

from fastnet import kernels

PRECISIONS = ("fp32", "amp", "fp16", "bf16")
LOW_PRECISION = {"fp16": torch.float16, "bf16": torch.bfloat16}
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


class DynamicLossScaler:
    """Dynamic loss scaling with ``torch.amp.GradScaler``'s defaults and semantics: start at
    ``init_scale``; on a step whose gradients hold inf/NaN, skip it and multiply the scale by
    ``backoff_factor``; after ``growth_interval`` consecutive clean steps multiply it by
    ``growth_factor``. Disabled, the scale is 1 and nothing is ever skipped for overflow.

    Additions (Megatron-LM's and DeepSpeed's dynamic scalers): the scale never falls below
    ``min_scale``; with ``hysteresis`` h > 1 the scale backs off only after h consecutive
    overflowing steps (each is still skipped); ``max_skips_at_min`` consecutive overflowing steps
    at the floor raise FloatingPointError instead of skipping forever (the gradients are inf/NaN
    whatever the scale: a NaN in the data or the model, or a diverged run).

    ``state_dict()`` keys: ``scale`` (float), ``growth_tracker`` (clean steps since the last change),
    ``overflow_tracker`` (consecutive overflowing steps), ``skips_at_min`` (consecutive skips at
    the floor); checkpoints without the last two load with 0.

    Raises:
        ValueError: ``init_scale <= 0``, ``growth_factor <= 1``, ``backoff_factor`` not in (0, 1),
            ``growth_interval < 1``, ``min_scale`` not in (0, ``init_scale``], ``hysteresis < 1``
            or ``max_skips_at_min < 1``.
    """

    __slots__ = ("enabled", "scale", "growth_factor", "backoff_factor", "growth_interval", "growth_tracker",
                 "min_scale", "hysteresis", "max_skips_at_min", "overflow_tracker", "skips_at_min")

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000, enabled: bool = True, *, min_scale: float = 1.0,
                 hysteresis: int = 1, max_skips_at_min: int = 10) -> None:
        if not (math.isfinite(init_scale) and init_scale > 0):
            raise ValueError(f"Invalid init_scale: {init_scale} (must be finite and > 0)")
        if not growth_factor > 1:
            raise ValueError(f"Invalid growth_factor: {growth_factor} (must be > 1)")
        if not 0 < backoff_factor < 1:
            raise ValueError(f"Invalid backoff_factor: {backoff_factor} (must be in (0, 1))")
        if growth_interval < 1:
            raise ValueError(f"Invalid growth_interval: {growth_interval} (must be >= 1)")
        if not 0 < min_scale <= init_scale:
            raise ValueError(f"Invalid min_scale: {min_scale} (must be in (0, init_scale={init_scale}])")
        if hysteresis < 1:
            raise ValueError(f"Invalid hysteresis: {hysteresis} (must be >= 1)")
        if max_skips_at_min < 1:
            raise ValueError(f"Invalid max_skips_at_min: {max_skips_at_min} (must be >= 1)")
        self.enabled = enabled
        self.scale = float(init_scale) if enabled else 1.0
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self.min_scale, self.hysteresis, self.max_skips_at_min = float(min_scale), hysteresis, max_skips_at_min
        self.growth_tracker = self.overflow_tracker = self.skips_at_min = 0

    def update(self, found_inf: bool) -> None:
        """Advance after a step. Raises FloatingPointError after ``max_skips_at_min`` consecutive
        overflowing steps at ``min_scale``."""
        if not self.enabled:
            return
        if found_inf:
            self.growth_tracker = 0
            self.overflow_tracker += 1
            at_min = self.scale <= self.min_scale
            self.skips_at_min = self.skips_at_min + 1 if at_min else 0
            if self.skips_at_min >= self.max_skips_at_min:
                raise FloatingPointError(
                    f"gradients overflowed (inf/NaN) in {self.skips_at_min} consecutive steps with the loss scale at "
                    f"its minimum {self.min_scale}: the inf/NaN does not come from the scale. Check the data and the "
                    f"model for NaN, lower the LR, or lower --min-loss-scale")
            if self.overflow_tracker >= self.hysteresis:
                self.scale = max(self.scale * self.backoff_factor, self.min_scale)
                self.overflow_tracker = 0
        else:
            self.overflow_tracker = self.skips_at_min = 0
            self.growth_tracker += 1
            if self.growth_tracker == self.growth_interval:
                self.scale *= self.growth_factor
                self.growth_tracker = 0

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "growth_tracker": self.growth_tracker, "overflow_tracker": self.overflow_tracker,
                "skips_at_min": self.skips_at_min}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale, self.growth_tracker = float(state["scale"]), int(state["growth_tracker"])
        self.overflow_tracker = int(state.get("overflow_tracker", 0))
        self.skips_at_min = int(state.get("skips_at_min", 0))


def flat_view(flat: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    """A view of ``flat[offset:offset + like.numel()]`` with ``like``'s shape and memory layout
    (contiguous or channels_last), so an elementwise op on views matches the flat buffer order."""
    n = like.numel()
    chunk = flat[offset:offset + n]
    if like.dim() == 4 and not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last):
        n_, c, h, w = like.shape
        return chunk.view(n_, h, w, c).permute(0, 3, 1, 2)
    return chunk.view(like.shape)


class MasterWeights:
    """Casts ``model`` to ``dtype`` (normalisation layers stay FP32) and builds the flat buffers.

    Buffers (all 1-D): per model dtype ``d`` in (``dtype``, float32), ``param_flat[d]`` and
    ``grad_flat[d]`` of ``d``, holding that dtype's parameters in registration order; ``master``
    and ``master_grad`` (float32, all parameters: the low-precision ones first, then the FP32 ones).
    Every ``p.grad`` stays a view into ``grad_flat`` (never set it to None: :meth:`zero_grad`
    zeroes the buffers). Parameters that received no gradient are skipped by the optimizer step
    (their master gets ``grad = None``, exactly as torch.optim skips parameters without
    gradients): in data-parallel training the caller passes the parameters used on *no* rank
    (:attr:`fastnet.comm.GradientSynchronizer.unused_parameters`), so every rank skips the same
    ones; alone, a post-accumulate-grad hook per parameter records which ones received one.

    ``state_dict()`` keys: ``master`` (the FP32 flat buffer).
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        self.dtype = dtype
        keep = {id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)}
        for m in model.modules():  # cast parameters and buffers module by module, norms stay FP32
            if not isinstance(m, NORM_LAYERS):
                for name, p in m.named_parameters(recurse=False):
                    if p.is_floating_point():
                        p.data = p.data.to(dtype)
                for name, b in m.named_buffers(recurse=False):
                    if b.is_floating_point():
                        setattr(m, name, b.to(dtype))
        self.params = [p for p in model.parameters() if p.requires_grad]
        low = [p for p in self.params if id(p) not in keep]
        full = [p for p in self.params if id(p) in keep]
        device = self.params[0].device if self.params else torch.device("cpu")
        total = sum(p.numel() for p in self.params)
        self.master = torch.empty(total, dtype=torch.float32, device=device)
        self.master_grad = torch.zeros(total, dtype=torch.float32, device=device)
        self.param_flat: dict[torch.dtype, torch.Tensor] = {}
        self.grad_flat: dict[torch.dtype, torch.Tensor] = {}
        self.segments: list[tuple[torch.dtype, int, int]] = []  # (model dtype, master offset, numel)
        self.layout: list[tuple[torch.dtype, int, int]] = []  # per parameter: (dtype, offset in its buffer, numel)
        self.master_params: list[nn.Parameter] = []
        self._master_of: dict[int, nn.Parameter] = {}
        offset = 0
        for seg_dtype, members in ((dtype, low), (torch.float32, full)):
            n = sum(p.numel() for p in members)
            if n == 0:
                continue
            pflat = torch.empty(n, dtype=seg_dtype, device=device)
            gflat = torch.zeros(n, dtype=seg_dtype, device=device)
            local = 0
            for p in members:
                view = flat_view(pflat, local, p)
                view.copy_(p.data)
                flat_view(self.master, offset + local, p).copy_(p.data)
                p.data = view
                p.grad = flat_view(gflat, local, p)
                mp = nn.Parameter(flat_view(self.master, offset + local, p))
                mp.grad = flat_view(self.master_grad, offset + local, p)
                self.master_params.append(mp)
                self._master_of[id(p)] = mp
                self.layout.append((seg_dtype, local, p.numel()))
                local += p.numel()
            self.param_flat[seg_dtype], self.grad_flat[seg_dtype] = pflat, gflat
            self.segments.append((seg_dtype, offset, n))
            offset += n
        self._layout_of = {id(p): entry for p, entry in zip(low + full, self.layout)}
        self._ready: set[int] = set()
        self._handles = [p.register_post_accumulate_grad_hook(self._mark_ready) for p in self.params]

    def _mark_ready(self, p: torch.Tensor) -> None:
        self._ready.add(id(p))

    def grad_location(self, p: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``(flat gradient buffer, element offset)`` of model parameter ``p``'s gradient, for
        :class:`fastnet.comm.GradientSynchronizer`'s ``storage``. Raises KeyError for a parameter
        not managed here."""
        seg_dtype, offset, _ = self._layout_of[id(p)]
        return self.grad_flat[seg_dtype], offset

    def master_of(self, p: nn.Parameter) -> nn.Parameter:
        """The FP32 master of model parameter ``p``. Raises KeyError for a parameter not managed here."""
        return self._master_of[id(p)]

    def grad_buffers(self) -> list[torch.Tensor]:
        """The flat gradient buffers (low precision first), for one all-reduce each."""
        return [self.grad_flat[d] for d, _, _ in self.segments]

    def buckets(self, fusion_threshold_bytes: int) -> list[torch.Tensor]:
        """Fusion buckets as 1-D views of the flat gradient buffers, for the comm layer.

        Parameters are taken in reverse registration order (about the order backward produces their
        gradients), one dtype per bucket; a bucket closes once it holds ``fusion_threshold_bytes``
        or more, so every boundary falls between two parameters and a bucket exceeds the threshold
        only by its last parameter. The views alias the buffers: reducing them reduces the gradients.

        Raises:
            ValueError: ``fusion_threshold_bytes <= 0``.
        """
        if fusion_threshold_bytes <= 0:
            raise ValueError(f"Invalid fusion threshold: {fusion_threshold_bytes} bytes (must be > 0)")
        out = []
        for seg_dtype, flat in self.grad_flat.items():
            end = flat.numel()  # the bucket being filled is flat[off:end], growing towards the front
            for _, off, _ in reversed([entry for entry in self.layout if entry[0] == seg_dtype]):
                if (end - off) * flat.element_size() >= fusion_threshold_bytes:
                    out.append(flat[off:end])
                    end = off
            if end > 0:
                out.append(flat[:end])
        return out

    def unscale_(self, inv_scale: float) -> torch.Tensor:
        """``master_grad = float32(grad) × inv_scale``; returns a 0-dim bool device tensor: any inf/NaN."""
        flags = [kernels.unpack_unscale(self.grad_flat[d], [self.master_grad[off:off + n]], inv_scale)
                 for d, off, n in self.segments]
        return torch.stack(flags).any() if flags else torch.zeros((), dtype=torch.bool)

    def step(self, optimizer: torch.optim.Optimizer, skip: Iterable[nn.Parameter] | None = None) -> None:
        """Optimizer step on the masters, then copy the masters back into the model (one cast-copy
        per buffer). Skipped: the masters of ``skip`` (model parameters; the data-parallel caller
        passes those used on no rank), or with ``skip=None`` those whose parameter got no gradient
        in this process since :meth:`zero_grad`."""
        skipped = ({id(p) for p in skip} if skip is not None else
                   {id(p) for p in self.params if id(p) not in self._ready})
        unused = [(mp, mp.grad) for p in self.params if id(p) in skipped for mp in (self._master_of[id(p)],)]
        for mp, _ in unused:
            mp.grad = None
        try:
            optimizer.step()
        finally:
            for mp, view in unused:  # back to the flat master-gradient views
                mp.grad = view
        self.copy_to_model()

    def copy_to_model(self) -> None:
        kernels.copy_cast([self.master[off:off + n] for _, off, n in self.segments],
                          [self.param_flat[d] for d, _, _ in self.segments])

    def zero_grad(self) -> None:
        for g in self.grad_flat.values():
            g.zero_()
        self._ready.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"master": self.master.detach().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["master"].shape != self.master.shape:
            raise ValueError(f"checkpoint masters have {state['master'].numel()} elements, this model "
                             f"{self.master.numel()}: the checkpoint belongs to another model")
        self.master.copy_(state["master"])
        self.copy_to_model()


def check_device_support(name: str, device: torch.device) -> None:
    """Raise RuntimeError if ``device`` has no arithmetic for the policy's dtype.

    CUDA: fp16 needs compute capability >= 5.3, bf16 ``torch.cuda.is_bf16_supported()``. CPU: both
    run everywhere, but only CPUs with AMX or AVX512-FP16/BF16 run them fast; elsewhere they are
    emulated and several times slower than fp32 (measured: docs/BENCHMARKS.md).
    """
    if device.type != "cuda" or name not in ("fp16", "bf16", "amp"):
        return
    major, minor = torch.cuda.get_device_capability(device)
    if name in ("fp16", "amp") and (major, minor) < (5, 3):
        raise RuntimeError(f"precision {name!r} needs FP16 arithmetic (compute capability >= 5.3); "
                           f"{torch.cuda.get_device_name(device)} has {major}.{minor}: use --precision fp32")
    if name == "bf16" and not torch.cuda.is_bf16_supported():
        raise RuntimeError(f"precision 'bf16' is not supported on {torch.cuda.get_device_name(device)}: "
                           f"use --precision fp16 or fp32")


class Precision:
    """A precision policy (module docstring). Create it, then :meth:`prepare` the model before
    building the optimizer over :meth:`optimizer_params`.

    ``state_dict()`` keys: ``scaler`` (loss-scaler state or None), ``master`` (FP32 masters, for
    ``fp16``/``bf16``).

    Raises:
        ValueError: an unknown policy name (the valid ones are listed).
        RuntimeError: the device has no arithmetic for the policy's dtype (:func:`check_device_support`).
    """

    def __init__(self, name: str, device: torch.device, *, loss_scaling: bool | None = None,
                 init_scale: float = 2.0**16, growth_interval: int = 2000, min_scale: float = 1.0,
                 hysteresis: int = 1) -> None:
        if name not in PRECISIONS:
            raise ValueError(f"Unknown precision {name!r}; valid precisions: {', '.join(PRECISIONS)}")
        check_device_support(name, device)
        self.name, self.device = name, device
        self.masters: MasterWeights | None = None
        self.grad_scaler = torch.amp.GradScaler(device.type, init_scale=init_scale,
                                                growth_interval=growth_interval) if name == "amp" else None
        enabled = name == "fp16" if loss_scaling is None else loss_scaling
        self.scaler = DynamicLossScaler(init_scale, growth_interval=growth_interval,
                                        enabled=enabled and name in LOW_PRECISION, min_scale=min_scale,
                                        hysteresis=hysteresis)

    @property
    def loss_scaling(self) -> bool:
        """Whether overflowing steps are skipped (and a non-finite loss is therefore not fatal)."""
        return self.grad_scaler is not None or self.scaler.enabled

    @property
    def loss_scale(self) -> float:
        return float(self.grad_scaler.get_scale()) if self.grad_scaler else self.scaler.scale

    def prepare(self, model: nn.Module) -> nn.Module:
        """Cast the model and build the master weights (``fp16``/``bf16``); others: unchanged."""
        if self.name in LOW_PRECISION:
            self.masters = MasterWeights(model, LOW_PRECISION[self.name])
        return model

    def optimizer_params(self, groups: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Parameter groups over the model → the same groups over what the optimizer must update
        (the FP32 masters for ``fp16``/``bf16``)."""
        if self.masters is None:
            return list(groups)
        return [{**g, "params": [self.masters.master_of(p) for p in g["params"]]} for g in groups]

    def cast_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(LOW_PRECISION[self.name]) if self.masters is not None else x

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.name == "amp":
            return torch.autocast(self.device.type, dtype=torch.float16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of the loss (float32 scalar) times the loss scale."""
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
        elif self.scaler.enabled:
            (loss.float() * self.scaler.scale).backward()
        else:
            loss.backward()

    def grad_buffers(self, params: Iterable[nn.Parameter]) -> list[torch.Tensor]:
        """The gradient tensors to all-reduce: the flat buffers with masters, else each ``p.grad``."""
        if self.masters is not None:
            return self.masters.grad_buffers()
        return [p.grad for p in params if p.grad is not None]

    def step(self, optimizer: torch.optim.Optimizer, skip: Iterable[nn.Parameter] | None = None) -> bool:
        """Unscale, check, step, update the scale. Call after the gradients are all-reduced, so every
        rank sees the same inf/NaN and takes the same decision. Returns whether the step was taken.
        ``skip``: model parameters used on no rank (:meth:`MasterWeights.step`; with ``fp32``/``amp``
        their ``grad`` is already None); required with FP16/BF16 masters in a torch.distributed
        process of several ranks (None would skip per rank, by the rank's own gradients). One host sync (the overflow flag) with
        ``fp16``/``bf16``/``amp``; none with ``fp32``.

        Raises:
            FloatingPointError: inf/NaN gradients with loss scaling off, or overflow that persists at
                the minimum loss scale (:class:`DynamicLossScaler`).
            RuntimeError: ``skip=None`` with masters in a multi-rank torch.distributed process."""
        if self.grad_scaler is not None:
            scale = self.grad_scaler.get_scale()
            self.grad_scaler.step(optimizer)
            self.grad_scaler.update()
            return self.grad_scaler.get_scale() >= scale
        if self.masters is None:
            optimizer.step()
            return True
        if skip is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise RuntimeError(
                f"Precision.step(optimizer) without skip= in a process of {dist.get_world_size()} ranks: the "
                f"masters to skip would be those without a gradient on this rank, which differ across ranks "
                f"(a parameter used on one rank only), and the ranks' weights would silently diverge. Pass "
                f"skip=sync.unused_parameters (fastnet's GradientSynchronizer: used on no rank), or skip=() "
                f"where every rank has every gradient (DDP)")
        found_inf = bool(self.masters.unscale_(1.0 / self.scaler.scale).item())
        if found_inf and not self.scaler.enabled:
            raise FloatingPointError(f"inf/NaN gradients with precision {self.name!r} and loss scaling off; "
                                     f"enable it with --loss-scaling true or lower the LR")
        if not found_inf:
            self.masters.step(optimizer, skip)
        self.scaler.update(found_inf)
        return not found_inf

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        if self.masters is not None:
            self.masters.zero_grad()
        else:
            optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"scaler": self.grad_scaler.state_dict() if self.grad_scaler else
                                 self.scaler.state_dict()}
        if self.masters is not None:
            state.update(self.masters.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.grad_scaler is not None and state.get("scaler"):
            self.grad_scaler.load_state_dict(state["scaler"])
        elif state.get("scaler") and "growth_tracker" in state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        if self.masters is not None:
            if "master" not in state:
                raise ValueError(f"checkpoint has no FP32 master weights; it was not written with precision "
                                 f"{self.name!r}: resume with the precision it was trained with")
            self.masters.load_state_dict(state)
