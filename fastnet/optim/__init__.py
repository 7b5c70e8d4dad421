"""Optimizers and large-batch LR schedules.

Registry :data:`OPTIMIZERS`: ``sgd`` (torch.optim.SGD, momentum, weight decay on every
parameter as in Goyal et al. 2017) and ``lars`` (:class:`fastnet.optim.lars.LARS`, with the
bias/BN exclusion rule of Jia et al. 2018 through :func:`param_groups`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from fastnet.optim.lars import EXCLUDE_RULES, LARS, lars, param_groups
from fastnet.optim.schedules import SCHEDULES, BatchSizeSchedule, build_schedule, scale_lr

OPTIMIZERS = ("lars", "sgd")


def build_optimizer(name: str, model: torch.nn.Module, *, lr: float, momentum: float, weight_decay: float,
                    nesterov: bool = False, trust_coefficient: float = 0.001, trust_clip: bool = False,
                    lars_exclude: str = "1d", eps: float = 1e-9, excluded_lr: float | None = None,
                    map_groups: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None,
                    ) -> torch.optim.Optimizer:
    """Build a registered optimizer over ``model``'s trainable parameters.

    ``excluded_lr`` (LARS only): the excluded group's own peak LR (:func:`param_groups`).
    ``map_groups`` turns the parameter groups over the model into the groups the optimizer really
    updates (e.g. :meth:`fastnet.precision.Precision.optimizer_params`: the FP32 masters).

    Raises:
        ValueError: an unknown name or exclusion rule (the message lists the valid ones), or a
            negative hyperparameter (named).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}; valid optimizers: {', '.join(OPTIMIZERS)}")
    mapped = map_groups or (lambda groups: groups)
    if name == "lars":
        return LARS(mapped(param_groups(model, weight_decay, lars_exclude, excluded_lr)), lr=lr, momentum=momentum,
                    weight_decay=weight_decay, trust_coefficient=trust_coefficient, eps=eps, nesterov=nesterov,
                    trust_clip=trust_clip)
    if excluded_lr is not None:
        raise ValueError(f"excluded_lr {excluded_lr} is a LARS option (the excluded group of biases and BN); "
                         f"optimizer {name!r} has no excluded group")
    groups = mapped([{"params": [p for p in model.parameters() if p.requires_grad]}])
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)


__all__ = ["EXCLUDE_RULES", "LARS", "OPTIMIZERS", "SCHEDULES", "BatchSizeSchedule", "build_optimizer",
           "build_schedule", "lars", "param_groups", "scale_lr"]
