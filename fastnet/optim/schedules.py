"""Large-batch learning-rate schedules, per iteration.

* Linear scaling rule (Goyal et al. 2017, §2.1): ``lr = base_lr × B / 256`` — :func:`scale_lr`.
* Gradual warm-up (Goyal et al. §2.2): over the first ``W`` iterations the LR rises linearly
  from ``warmup_start_lr`` to the peak: ``lr(t) = s + (peak − s)·t/W`` for ``0 <= t <= W``.
* After warm-up, with progress ``p = (t − W)/(T − W)`` in [0, 1]:
  - :class:`WarmupConstantLR`: ``peak``;
  - :class:`WarmupCosineLR`: ``end + (peak − end)·(1 + cos πp)/2`` (Loshchilov & Hutter 2017);
  - :class:`WarmupPolyLR`: ``end + (peak − end)·(1 − p)^power``, power 2 in You et al. 2017 §4;
  - :class:`WarmupMultiStepLR`: ``peak·γ^k`` with k the number of milestones (iterations) passed.

All are ``torch.optim.lr_scheduler.LRScheduler`` subclasses stepped once per optimizer step; the
peak of each parameter group is the LR it was constructed with (``initial_lr``), so groups keep
their ratios. ``state_dict()`` holds ``last_epoch`` (= iterations done) and the constructor args.
"""

from __future__ import annotations

import math
from typing import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


def scale_lr(base_lr: float, global_batch_size: int, reference_batch_size: int = 256) -> float:
    """Linear scaling rule: the LR for batch ``B`` given ``base_lr`` tuned at ``reference_batch_size``."""
    if base_lr < 0 or global_batch_size <= 0 or reference_batch_size <= 0:
        raise ValueError(f"Invalid LR scaling inputs: base_lr={base_lr}, global_batch_size={global_batch_size}, "
                         f"reference_batch_size={reference_batch_size} (need lr >= 0 and batches > 0)")
    return base_lr * global_batch_size / reference_batch_size


class _WarmupDecayLR(LRScheduler):
    """Warm-up then ``_decay(p)``, a factor in [0, 1] times the peak (``p``: progress after warm-up)."""

    def __init__(self, optimizer: Optimizer, total_steps: int, warmup_steps: int = 0,
                 warmup_start_lr: float = 0.0, end_lr: float = 0.0, last_epoch: int = -1) -> None:
        if total_steps <= 0:
            raise ValueError(f"Invalid total_steps: {total_steps} (must be > 0)")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"Invalid warmup_steps: {warmup_steps} (must be in [0, total_steps={total_steps}])")
        if warmup_start_lr < 0 or end_lr < 0:
            raise ValueError(f"Invalid warmup_start_lr {warmup_start_lr} or end_lr {end_lr} (must be >= 0)")
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        self.warmup_start_lr, self.end_lr = warmup_start_lr, end_lr
        super().__init__(optimizer, last_epoch)

    def _decay(self, progress: float, step: int) -> float:
        raise NotImplementedError

    def lr_at(self, peak: float, step: int) -> float:
        """The LR at iteration ``step`` (0-based) for a group whose peak LR is ``peak``."""
        w, t = self.warmup_steps, min(step, self.total_steps)
        if t < w:
            start = min(self.warmup_start_lr, peak)
            return start + (peak - start) * t / w
        span = self.total_steps - w
        p = (t - w) / span if span > 0 else 1.0
        end = min(self.end_lr, peak)
        return end + (peak - end) * self._decay(p, t)

    def get_lr(self) -> list[float]:  # type: ignore[override]
        return [self.lr_at(group["initial_lr"], self.last_epoch) for group in self.optimizer.param_groups]


class WarmupConstantLR(_WarmupDecayLR):
    def _decay(self, progress: float, step: int) -> float:
        return 1.0


class WarmupCosineLR(_WarmupDecayLR):
    def _decay(self, progress: float, step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupPolyLR(_WarmupDecayLR):
    def __init__(self, optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, warmup_start_lr: float = 0.0,
                 end_lr: float = 0.0, power: float = 2.0, last_epoch: int = -1) -> None:
        if power <= 0:
            raise ValueError(f"Invalid power: {power} (must be > 0)")
        self.power = power
        super().__init__(optimizer, total_steps, warmup_steps, warmup_start_lr, end_lr, last_epoch)

    def _decay(self, progress: float, step: int) -> float:
        return (1.0 - progress) ** self.power


class WarmupMultiStepLR(_WarmupDecayLR):
    def __init__(self, optimizer: Optimizer, total_steps: int, milestones: Sequence[int], gamma: float = 0.1,
                 warmup_steps: int = 0, warmup_start_lr: float = 0.0, last_epoch: int = -1) -> None:
        if list(milestones) != sorted(milestones):
            raise ValueError(f"Invalid milestones: {list(milestones)} (must be increasing iteration counts)")
        if not 0 < gamma <= 1:
            raise ValueError(f"Invalid gamma: {gamma} (must be in (0, 1])")
        self.milestones, self.gamma = list(milestones), gamma
        super().__init__(optimizer, total_steps, warmup_steps, warmup_start_lr, 0.0, last_epoch)

    def _decay(self, progress: float, step: int) -> float:
        return self.gamma ** sum(1 for m in self.milestones if step >= m)

    def lr_at(self, peak: float, step: int) -> float:
        if step < self.warmup_steps:
            return super().lr_at(peak, step)
        return peak * self._decay(0.0, step)


SCHEDULES = {"constant": WarmupConstantLR, "cosine": WarmupCosineLR, "poly": WarmupPolyLR,
             "multistep": WarmupMultiStepLR}


def build_schedule(name: str, optimizer: Optimizer, *, total_steps: int, warmup_steps: int,
                   warmup_start_lr: float, steps_per_epoch: int, milestones_epochs: Sequence[float] = (),
                   gamma: float = 0.1, power: float = 2.0) -> _WarmupDecayLR:
    """Build a registered schedule. Raises ValueError listing the valid names for an unknown one."""
    if name not in SCHEDULES:
        raise ValueError(f"Unknown lr_schedule {name!r}; valid schedules: {', '.join(sorted(SCHEDULES))}")
    common = dict(total_steps=total_steps, warmup_steps=warmup_steps, warmup_start_lr=warmup_start_lr)
    if name == "multistep":
        ms = [round(e * steps_per_epoch) for e in milestones_epochs]
        return WarmupMultiStepLR(optimizer, milestones=ms, gamma=gamma, **common)
    if name == "poly":
        return WarmupPolyLR(optimizer, power=power, **common)
    return SCHEDULES[name](optimizer, **common)


def position_schedule(scheduler: _WarmupDecayLR, step: int) -> None:
    """Place ``scheduler`` at iteration ``step`` (iterations done) and set every group's LR to the
    schedule's LR there, as if it had been stepped ``step`` times from the start.

    This is how a resumed run is re-planned: the schedule is rebuilt for the (possibly changed)
    options — more epochs, another base LR or warm-up — and continues at the checkpoint's step, so
    the LR of step ``s`` is the new plan's LR of step ``s`` (never a finished schedule's 0).
    Call it after ``optimizer.load_state_dict`` (which restores the checkpoint's LRs).

    Raises:
        ValueError: ``step < 0``.
    """
    if step < 0:
        raise ValueError(f"Invalid step {step} (must be >= 0)")
    scheduler.last_epoch = step
    lrs = scheduler.get_lr()
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = list(lrs)


class BatchSizeSchedule:
    """Increase the global batch instead of decaying the LR (Smith, Kindermans, Ying & Le 2018,
    "Don't Decay the Learning Rate, Increase the Batch Size", §2–3).

    ``batch_size(epoch) = min(base × factor^k, max_batch)`` with ``k`` the number of milestones
    (epochs) ``<= epoch``. The trainer honours it per epoch through the accumulation steps, keeping
    the micro-batch fixed; the LR schedule is unchanged (typically constant after warm-up).

    Raises:
        ValueError: non-positive batch, factor < 1, or milestones not increasing.
    """

    def __init__(self, base: int, milestones: Sequence[float] = (), factor: float = 5.0,
                 max_batch: int | None = None) -> None:
        if base <= 0:
            raise ValueError(f"Invalid base batch size: {base} (must be > 0)")
        if factor < 1:
            raise ValueError(f"Invalid batch factor: {factor} (must be >= 1)")
        if list(milestones) != sorted(milestones):
            raise ValueError(f"Invalid batch milestones: {list(milestones)} (must be increasing epochs)")
        if max_batch is not None and max_batch < base:
            raise ValueError(f"Invalid max batch {max_batch}: smaller than the base batch {base}")
        self.base, self.milestones, self.factor, self.max_batch = base, list(milestones), factor, max_batch

    def batch_size(self, epoch: int) -> int:
        b = round(self.base * self.factor ** sum(1 for m in self.milestones if epoch >= m))
        return min(b, self.max_batch) if self.max_batch else b
