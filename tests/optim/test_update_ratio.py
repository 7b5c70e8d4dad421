"""UpdateRatio: ‖Δw‖/‖w‖ per class (adapted / excluded) over one optimizer step, against hand values."""

from __future__ import annotations

import pytest
import torch

from fastnet.optim import build_optimizer
from fastnet.optim.update_ratio import UpdateRatio


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))


@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
def test_ratio_per_class_matches_hand_computation(optimizer):
    net = _net()
    opt = build_optimizer(optimizer, net, lr=0.3, momentum=0.0, weight_decay=0.0)
    net(torch.randn(5, 3)).square().sum().backward()
    old = {n: p.detach().clone() for n, p in net.named_parameters()}
    meter = UpdateRatio(opt)
    meter.before()
    opt.step()
    got = meter.after()
    classes = {"adapted": ["0.weight"], "excluded": ["0.bias", "1.weight", "1.bias"]}  # the 1d rule, both optimizers
    for name, members in classes.items():
        d = sum((dict(net.named_parameters())[m].detach() - old[m]).square().sum() for m in members)
        w = sum(old[m].square().sum() for m in members)
        assert got[name] == pytest.approx((d / w).sqrt().item(), rel=1e-6)
    if optimizer == "lars":  # an adapted tensor moves γ·η of its norm (no weight decay, no momentum)
        assert got["adapted"] == pytest.approx(0.3 * 0.001, rel=1e-4)


def test_after_without_before_is_an_error():
    opt = build_optimizer("sgd", _net(), lr=0.1, momentum=0.0, weight_decay=0.0)
    with pytest.raises(RuntimeError, match="before"):
        UpdateRatio(opt).after()


def test_excluded_lr_is_refused_for_sgd():
    with pytest.raises(ValueError, match="LARS option"):
        build_optimizer("sgd", _net(), lr=0.1, momentum=0.0, weight_decay=0.0, excluded_lr=0.01)
