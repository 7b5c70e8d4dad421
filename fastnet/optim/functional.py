"""Functional LARS (You, Gitman & Ginsburg 2017, Algorithm 1): :func:`lars` over lists of tensors,
a multi-tensor path (``torch._foreach_*``) and a per-parameter reference path. The formulas and the
excluded-tensor rule are those of :mod:`fastnet.optim.lars` (its docstring, steps 1–4); the optimizer
class there and the fused CUDA step :func:`fastnet.kernels.lars_step` both call :func:`lars`.
This module imports neither.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _trust_ratio(w_norm: Tensor, g_norm: Tensor, *, trust_coefficient: float, weight_decay: float,
                 eps: float) -> Tensor:
    """``λ`` of step 1 for any shape of norms (elementwise); stays on the norms' device."""
    ratio = trust_coefficient * w_norm / (g_norm + weight_decay * w_norm + eps)
    return torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))


def _tensor_lr(lam: Tensor, lr: float, clip: bool) -> Tensor:
    """An adapted tensor's LR (step 2): ``γ·λ``, or LARC's clip ``min(λ, γ)``."""
    return lam.clamp(max=lr) if clip else lam * lr


def _single_tensor_lars(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor | None], excluded: list[bool],
                        *, lr: float, momentum: float, weight_decay: float, trust_coefficient: float, eps: float,
                        nesterov: bool, clip: bool) -> None:
    for i, (w, g) in enumerate(zip(params, grads)):
        if excluded[i]:
            u = g.mul(lr)
        else:
            lam = _trust_ratio(torch.linalg.vector_norm(w), torch.linalg.vector_norm(g),
                               trust_coefficient=trust_coefficient, weight_decay=weight_decay, eps=eps)
            u = g.add(w, alpha=weight_decay).mul_(_tensor_lr(lam, lr, clip))
        if momentum > 0:
            buf = bufs[i]
            if buf is None:
                buf = bufs[i] = torch.zeros_like(w)
            buf.mul_(momentum).add_(u)
            w.sub_(u.add(buf, alpha=momentum) if nesterov else buf)
        else:
            w.sub_(u)


def _multi_tensor_lars(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor | None], excluded: list[bool],
                       *, lr: float, momentum: float, weight_decay: float, trust_coefficient: float, eps: float,
                       nesterov: bool, clip: bool) -> None:
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, w in enumerate(params):
        groups.setdefault((w.device, w.dtype), []).append(i)
    for idx in groups.values():
        ws, gs = [params[i] for i in idx], [grads[i] for i in idx]
        adapt = [k for k, i in enumerate(idx) if not excluded[i]]
        plain = [k for k, i in enumerate(idx) if excluded[i]]
        updates: list[Tensor] = [gs[0]] * len(idx)
        if plain:  # excluded tensors: u = γ·g
            for k, u in zip(plain, torch._foreach_mul([gs[k] for k in plain], lr)):
                updates[k] = u
        if adapt:  # u = γ·λ·(g + β·w), λ from all norms in one pass
            wa, ga = [ws[k] for k in adapt], [gs[k] for k in adapt]
            w_norm = torch.stack(torch._foreach_norm(wa))
            g_norm = torch.stack(torch._foreach_norm(ga))
            scale = _tensor_lr(_trust_ratio(w_norm, g_norm, trust_coefficient=trust_coefficient,
                                            weight_decay=weight_decay, eps=eps), lr, clip)
            # One host sync: per-tensor scales as Python floats keep every _foreach op on its fused
            # fast path (a list of 0-dim device tensors would fall back to one kernel per tensor).
            d = torch._foreach_add(ga, wa, alpha=weight_decay) if weight_decay else torch._foreach_mul(ga, 1.0)
            torch._foreach_mul_(d, scale.tolist())
            for k, u in zip(adapt, d):
                updates[k] = u
        if momentum > 0:
            for i in idx:
                if bufs[i] is None:
                    bufs[i] = torch.zeros_like(params[i])
            vs = [bufs[i] for i in idx]
            torch._foreach_mul_(vs, momentum)
            torch._foreach_add_(vs, updates)
            if nesterov:
                torch._foreach_add_(updates, vs, alpha=momentum)
                torch._foreach_sub_(ws, updates)
            else:
                torch._foreach_sub_(ws, vs)
        else:
            torch._foreach_sub_(ws, updates)


def lars(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor | None], excluded: list[bool], *,
         lr: float, momentum: float, weight_decay: float, trust_coefficient: float, eps: float, nesterov: bool,
         clip: bool, foreach: bool = True) -> None:
    """Functional LARS step (module docstring, steps 1–4) over lists of equal length.

    Args:
        params: tensors updated in place (any shape; float32/float64, or any floating dtype).
        grads: their gradients, same shapes and dtypes; not modified.
        momentum_buffers: per tensor ``v`` or None; None entries are filled with new zero buffers in place.
        excluded: per tensor, True for no weight decay and no adaptation.
        foreach: the multi-tensor path (True) or the per-parameter reference (False).
    """
    fn = _multi_tensor_lars if foreach else _single_tensor_lars
    fn(params, grads, momentum_buffers, excluded, lr=lr, momentum=momentum, weight_decay=weight_decay,
       trust_coefficient=trust_coefficient, eps=eps, nesterov=nesterov, clip=clip)
