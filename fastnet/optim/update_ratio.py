"""‖Δw‖/‖w‖ per parameter class over one optimizer step.

The ratio of a step's update to the weights is what LARS controls (You et al. 2017, "Scaling SGD
Batch Size to 32K", §3: with one global LR it differs by orders of magnitude between layers; LARS
bounds each adapted tensor's at ``γ·η`` per step before momentum). Measuring it for the adapted
tensors and for the excluded ones (biases and BatchNorm γ/β, plain momentum steps at their group's
LR) shows which group a large-batch LR overheats.

Classes: a parameter group with ``lars_exclude`` (:func:`fastnet.optim.lars.param_groups`) is
``adapted`` (False) or ``excluded`` (True); in a group without the key (e.g. torch.optim.SGD) each
tensor is ``excluded`` when ``ndim <= 1`` (the LARS default rule), else ``adapted``, so SGD and LARS
runs compare like for like. Per class: ``sqrt(Σ‖Δw_i‖²) / sqrt(Σ‖w_i‖²)`` over its tensors.
"""

from __future__ import annotations

import torch


class UpdateRatio:
    """Measures one step: call :meth:`before` just before ``optimizer.step()`` and :meth:`after` just
    after. Costs one copy of the parameters (held between the two calls) and one host sync in
    :meth:`after`; the trainer measures only the steps it logs (``--log-update-ratio``)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self._before: list[tuple[str, torch.Tensor, torch.Tensor]] | None = None

    def _classes(self):
        for group in self.optimizer.param_groups:
            rule = group.get("lars_exclude")
            for p in group["params"]:
                excluded = (p.ndim <= 1) if rule is None else bool(rule)
                yield ("excluded" if excluded else "adapted"), p

    @torch.no_grad()
    def before(self) -> None:
        self._before = [(name, p, p.detach().clone()) for name, p in self._classes()]

    @torch.no_grad()
    def after(self) -> dict[str, float]:
        """``{"adapted": ratio, "excluded": ratio}`` (only the classes present; 0 for all-zero weights).

        Raises:
            RuntimeError: :meth:`before` was not called for this step.
        """
        if self._before is None:
            raise RuntimeError("UpdateRatio.after() without before(): call before() just before optimizer.step()")
        sums: dict[str, list[torch.Tensor]] = {}
        for name, p, old in self._before:
            d, w = sums.setdefault(name, [torch.zeros((), dtype=torch.float64, device=p.device)] * 2)
            sums[name] = [d + (p.detach() - old).double().square().sum(), w + old.double().square().sum()]
        self._before = None
        out = {}
        for name, (d, w) in sums.items():
            d, w = d.item(), w.item()
            out[name] = (d / w) ** 0.5 if w > 0 else 0.0
        return out
