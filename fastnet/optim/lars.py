"""LARS: layer-wise adaptive rate scaling (You, Gitman & Ginsburg 2017, "Scaling SGD Batch Size
to 32K for ImageNet Training", Algorithm 1), as used at batch 64K by Jia et al. 2018.

For each parameter tensor ``w`` with gradient ``g`` (one "layer"), global LR ``γ_t``, trust
coefficient ``η``, weight decay ``β``, momentum ``m``:

  1. local LR   ``λ = η·‖w‖ / (‖g‖ + β·‖w‖ + ε)``; ``λ = 1`` when ``‖w‖ = 0`` or ``‖g‖ = 0``;
  2. update     ``u = γ_t·λ·(g + β·w)``; with trust clipping (the "clip" mode of LARC, NVIDIA Apex
     ``apex.parallel.LARC``: ``λ ← min(λ/γ_t, 1)``) the tensor's LR is ``min(λ, γ_t)`` instead of
     ``γ_t·λ``: the local LR λ is used as an LR of its own, capped at the global one;
  3. momentum   ``v ← m·v + u``  (``v₀ = 0``);
  4. step       ``w ← w − v``, or with Nesterov ``w ← w − (u + m·v)``.

Excluded parameters (by default every tensor with ``ndim <= 1``: biases and BatchNorm/LayerNorm
γ, β — Jia et al. 2018, §3.2) get neither weight decay nor adaptation: ``λ = 1``, ``β = 0``,
i.e. plain momentum SGD at their group's LR — the global LR in the reference (the TensorFlow/MLPerf
LARS), or a peak LR of their own (:func:`param_groups` ``excluded_lr``), decayed by the same
schedule.

Two code paths, chosen by ``foreach`` like ``torch.optim``: a multi-tensor path (``torch._foreach_*``;
all norms in one pass, trust ratios computed as one device tensor, then one host sync per
parameter group and step to hand the per-tensor scales to the fused ``_foreach`` kernels) and a
per-parameter reference path (no host sync). They agree to rounding (tested in float32 and float64).
On CUDA with ``FASTNET_KERNELS=1`` the step runs as two fused launches of
:func:`fastnet.kernels.lars_step` instead (no host sync; unverified on a GPU so far, hence opt-in).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from fastnet import kernels
from fastnet.optim.functional import lars


def _check_hparams(lr: float, momentum: float, weight_decay: float, trust_coefficient: float, eps: float,
                   nesterov: bool) -> None:
    for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay),
                        ("trust_coefficient", trust_coefficient), ("eps", eps)):
        if not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"Invalid {name}: {value} (must be a number >= 0)")
    if nesterov and momentum <= 0:
        raise ValueError(f"Invalid nesterov with momentum {momentum}: Nesterov needs momentum > 0")


def exclude_1d(p: Tensor) -> bool:
    """The default exclusion rule: biases and normalisation parameters (``ndim <= 1``)."""
    return p.ndim <= 1


class LARS(Optimizer):
    """LARS optimizer (You et al. 2017, Algorithm 1; see the module docstring for the exact update).

    Args:
        params: an iterable of parameters or of dicts (parameter groups). A group may set ``lr``,
            ``momentum``, ``weight_decay``, ``trust_coefficient``, ``eps``, ``nesterov``,
            ``trust_clip`` and ``lars_exclude`` (True: every tensor of the group is excluded;
            False: none is; None: the ``exclude`` rule decides per tensor).
        lr: global LR ``γ`` (the scheduler's value). momentum: ``m``. weight_decay: ``β``.
        trust_coefficient: ``η`` (default 0.001). eps: ``ε`` in the local-LR denominator.
        nesterov: Nesterov momentum. trust_clip: LARC's "clip" mode (Apex ``LARC(clip=True)``): an
            adapted tensor's LR is ``min(λ, γ)`` instead of ``γ·λ``.
        exclude: per-tensor rule for groups with ``lars_exclude=None``; default :func:`exclude_1d`.
        foreach: multi-tensor path (True) or per-parameter path (False); None (default) picks, like
            torch.optim, the multi-tensor path when all of a group's tensors are on CUDA and the
            per-parameter path on CPU, where it is faster (measured: docs/BENCHMARKS.md).

    Raises:
        ValueError: a negative hyperparameter (named), Nesterov without momentum, or a parameter
            in two groups. RuntimeError: a sparse gradient.

    State per parameter: ``momentum_buffer`` (same shape/dtype as the parameter), as torch.optim.SGD,
    so ``state_dict()``/``load_state_dict()`` round-trip and resume the same trajectory.
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.1, *, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 1e-9, nesterov: bool = False,
                 trust_clip: bool = False, exclude: Callable[[Tensor], bool] | None = exclude_1d,
                 foreach: bool | None = None) -> None:
        _check_hparams(lr, momentum, weight_decay, trust_coefficient, eps, nesterov)
        self.exclude = exclude or (lambda p: False)
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                        eps=eps, nesterov=nesterov, trust_clip=trust_clip, lars_exclude=None, foreach=foreach)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key in ("lr", "momentum", "weight_decay", "trust_coefficient", "eps"):
            if key in param_group and (not isinstance(param_group[key], (int, float)) or param_group[key] < 0):
                raise ValueError(f"Invalid {key} in parameter group: {param_group[key]} (must be a number >= 0)")
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # older checkpoints keep loading
            group.setdefault("trust_clip", False)
            group.setdefault("lars_exclude", None)
            group.setdefault("foreach", None)
        self.exclude = getattr(self, "exclude", exclude_1d)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, bufs, excluded = [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients; use dense gradients "
                                       "(e.g. nn.Embedding(sparse=False)) or torch.optim.SparseAdam for that layer")
                params.append(p)
                grads.append(p.grad)
                bufs.append(self.state[p].get("momentum_buffer"))
                rule = group["lars_exclude"]
                excluded.append(self.exclude(p) if rule is None else bool(rule))
            if not params:
                continue
            if kernels.use_cuda_kernels(params) and all(p.dtype == torch.float32 and p.is_contiguous() and
                                                        g.is_contiguous() for p, g in zip(params, grads)):
                bufs = [torch.zeros_like(p) if b is None else b for p, b in zip(params, bufs)]
                kernels.lars_step(params, grads, bufs, excluded, lr=group["lr"], momentum=group["momentum"],
                                  weight_decay=group["weight_decay"], trust_coefficient=group["trust_coefficient"],
                                  eps=group["eps"], nesterov=group["nesterov"], clip=group["trust_clip"])
            else:
                lars(params, grads, bufs, excluded, lr=group["lr"], momentum=group["momentum"],
                 weight_decay=group["weight_decay"], trust_coefficient=group["trust_coefficient"], eps=group["eps"],
                     nesterov=group["nesterov"], clip=group["trust_clip"],
                     foreach=all(p.is_cuda for p in params) if group["foreach"] is None else group["foreach"])
            if group["momentum"] > 0:
                for p, buf in zip(params, bufs):
                    self.state[p]["momentum_buffer"] = buf
        return loss


def _is_norm_or_bias(module: torch.nn.Module, name: str) -> bool:
    norms = (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm)
    return isinstance(module, norms) or name == "bias"


EXCLUDE_RULES = ("1d", "bn_bias", "none")


def param_groups(model: torch.nn.Module, weight_decay: float, exclude: str = "1d",
                 excluded_lr: float | None = None) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into an adapted group and an excluded group.

    ``exclude``: ``"1d"`` (every tensor with ``ndim <= 1``), ``"bn_bias"`` (parameters of
    BatchNorm/LayerNorm/GroupNorm modules and every ``bias``), or ``"none"``. The excluded group has
    ``weight_decay = 0`` and ``lars_exclude = True`` (no LARS adaptation; Jia et al. 2018, §3.2); the
    other has ``weight_decay`` and ``lars_exclude = False``. Empty groups are left out. Any
    torch.optim optimizer accepts the groups (the extra key is ignored by those that don't use it).
    ``excluded_lr``: the excluded group's own peak LR (its ``lr``: the schedules of
    :mod:`fastnet.optim.schedules` warm it up from the same start LR, or from itself if lower, and
    decay it by the same factor as the global one); None (the reference) leaves it at the global LR. With one
    γ for both groups, the adapted tensors move at most ``γ·η`` of their norm per step while biases
    and BN take plain momentum steps of ``γ·g``: at a large-batch γ (e.g. 19.2 at 8192) the excluded
    group overheats long before the adapted one is fast.

    Raises:
        ValueError: an unknown rule (the valid ones are listed), a negative weight decay or excluded_lr.
    """
    if exclude not in EXCLUDE_RULES:
        raise ValueError(f"Unknown lars_exclude rule {exclude!r}; valid rules: {', '.join(EXCLUDE_RULES)}")
    if weight_decay < 0:
        raise ValueError(f"Invalid weight_decay: {weight_decay} (must be >= 0)")
    if excluded_lr is not None and not excluded_lr >= 0:
        raise ValueError(f"Invalid excluded_lr: {excluded_lr} (must be >= 0, or None for the global LR)")
    adapted, excluded = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            skip = (exclude == "1d" and p.ndim <= 1) or (exclude == "bn_bias" and _is_norm_or_bias(module, name))
            (excluded if skip else adapted).append(p)
    groups = [{"params": adapted, "weight_decay": weight_decay, "lars_exclude": False},
              {"params": excluded, "weight_decay": 0.0, "lars_exclude": True,
               **({"lr": excluded_lr} if excluded_lr is not None else {})}]
    return [g for g in groups if g["params"]]
