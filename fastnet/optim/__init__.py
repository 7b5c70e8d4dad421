"""Optimizers and large-batch LR schedules."""

from __future__ import annotations

from typing import Iterable

import torch

from fastnet.optim.schedules import SCHEDULES, build_schedule, scale_lr

OPTIMIZERS = ("sgd",)


def build_optimizer(name: str, params: Iterable[torch.nn.Parameter], *, lr: float, momentum: float,
                    weight_decay: float, nesterov: bool = False) -> torch.optim.Optimizer:
    """Build a registered optimizer over ``params``.

    Raises:
        ValueError: an unknown name (the message lists the valid ones) or a negative hyperparameter.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}; valid optimizers: {', '.join(OPTIMIZERS)}")
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)


__all__ = ["OPTIMIZERS", "SCHEDULES", "build_optimizer", "build_schedule", "scale_lr"]
