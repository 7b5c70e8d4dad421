"""Numeric precision policies of the trainer.

* ``fp32``: everything in float32.
* ``amp``: ``torch.autocast`` (float16 compute where safe) with float32 parameters and
  ``torch.amp.GradScaler`` dynamic loss scaling (init 2^16, ×2 after 2000 clean steps, ×0.5 and
  skip on inf/NaN). Gradients are all-reduced before ``step``, so every rank sees the same
  inf/NaN and skips together.

Usage per optimizer step: ``with policy.autocast(): loss = ...``; ``policy.backward(loss)`` per
micro-batch; gradient all-reduce; ``policy.step(optimizer)`` (returns False when skipped).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

PRECISIONS = ("fp32", "amp")


class Precision:
    """A precision policy. ``state_dict()`` keys: ``scaler`` (GradScaler state, or None)."""

    def __init__(self, name: str, device: torch.device) -> None:
        if name not in PRECISIONS:
            raise ValueError(f"Unknown precision {name!r}; valid precisions: {', '.join(PRECISIONS)}")
        self.name, self.device = name, device
        self.scaler = torch.amp.GradScaler(device.type) if name == "amp" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.name == "amp":
            return torch.autocast(self.device.type, dtype=torch.float16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Apply the update unless gradients overflowed. Returns whether the step was taken (one host sync with amp)."""
        if self.scaler is None:
            optimizer.step()
            return True
        scale = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= scale

    @property
    def loss_scale(self) -> float:
        return float(self.scaler.get_scale()) if self.scaler else 1.0

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict() if self.scaler else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
