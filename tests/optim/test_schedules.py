import math

import pytest
import torch

from fastnet.optim import build_optimizer, build_schedule, scale_lr
from fastnet.optim.schedules import WarmupCosineLR, WarmupMultiStepLR, WarmupPolyLR


def _opt(lr=3.2):
    return build_optimizer("sgd", torch.nn.Linear(2, 1), lr=lr, momentum=0.9, weight_decay=0.0)


def _lrs(sched, n):
    out = []
    for _ in range(n):
        out.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    return out


def test_linear_scaling_rule_for_8192():
    assert scale_lr(0.1, 8192) == pytest.approx(3.2)
    with pytest.raises(ValueError, match="base_lr=-1"):
        scale_lr(-1, 256)


def test_warmup_then_cosine_breakpoints():
    s = WarmupCosineLR(_opt(), total_steps=100, warmup_steps=10, warmup_start_lr=0.1)
    lrs = _lrs(s, 101)
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[5] == pytest.approx(0.1 + (3.2 - 0.1) * 0.5)
    assert lrs[10] == pytest.approx(3.2)  # end of warm-up
    assert lrs[55] == pytest.approx(1.6)  # halfway through the decay
    assert lrs[100] == pytest.approx(0.0, abs=1e-12)  # end


def test_poly2_breakpoints():
    s = WarmupPolyLR(_opt(), total_steps=110, warmup_steps=10, power=2.0)
    lrs = _lrs(s, 111)
    assert lrs[10] == pytest.approx(3.2)
    assert lrs[60] == pytest.approx(3.2 * 0.25)
    assert lrs[110] == pytest.approx(0.0, abs=1e-12)


def test_multistep():
    s = WarmupMultiStepLR(_opt(), total_steps=100, milestones=[30, 60], gamma=0.1, warmup_steps=5)
    lrs = _lrs(s, 100)
    assert lrs[5] == pytest.approx(3.2) and lrs[29] == pytest.approx(3.2)
    assert lrs[30] == pytest.approx(0.32) and lrs[60] == pytest.approx(0.032)


def test_state_dict_round_trip_continues_schedule():
    a = WarmupCosineLR(_opt(), total_steps=50, warmup_steps=5)
    _lrs(a, 20)
    b = WarmupCosineLR(_opt(), total_steps=50, warmup_steps=5)
    b.load_state_dict(a.state_dict())
    assert _lrs(a, 10) == pytest.approx(_lrs(b, 10))


def test_build_schedule_errors():
    with pytest.raises(ValueError, match="valid schedules: constant, cosine, multistep, poly"):
        build_schedule("linear", _opt(), total_steps=10, warmup_steps=0, warmup_start_lr=0, steps_per_epoch=1)
    with pytest.raises(ValueError, match="warmup_steps: 11"):
        WarmupCosineLR(_opt(), total_steps=10, warmup_steps=11)
    with pytest.raises(ValueError, match="valid optimizers"):
        build_optimizer("adam", torch.nn.Linear(2, 1), lr=1, momentum=0, weight_decay=0)
    assert math.isclose(build_schedule("multistep", _opt(), total_steps=100, warmup_steps=0, warmup_start_lr=0,
                                       steps_per_epoch=10, milestones_epochs=(2.0,)).milestones[0], 20)


def test_batch_size_increase_schedule():
    from fastnet.optim import BatchSizeSchedule
    s = BatchSizeSchedule(256, milestones=[30, 60, 80], factor=5, max_batch=8192)
    assert [s.batch_size(e) for e in (0, 29, 30, 59, 60, 80, 90)] == [256, 256, 1280, 1280, 6400, 8192, 8192]
    with pytest.raises(ValueError, match="batch factor: 0.5"):
        BatchSizeSchedule(256, factor=0.5)
    with pytest.raises(ValueError, match="milestones"):
        BatchSizeSchedule(256, milestones=[3, 1])


@pytest.mark.parametrize("name", ["cosine", "poly", "multistep", "constant"])
def test_position_schedule_equals_stepping_from_the_start(name):
    """Re-planning a resumed run: a schedule rebuilt for a longer plan and placed at step s gives the LR
    the longer plan has at s (and then steps on as it would)."""
    from fastnet.optim.schedules import position_schedule

    def build(total):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.8)
        return opt, build_schedule(name, opt, total_steps=total, warmup_steps=5, warmup_start_lr=0.1,
                                   steps_per_epoch=10, milestones_epochs=[2, 4])

    opt_a, straight = build(60)
    lrs = []
    for _ in range(40):
        lrs.append(opt_a.param_groups[0]["lr"])
        opt_a.step()
        straight.step()
    opt_b, replanned = build(60)  # e.g. after a 30-step run, resumed with twice the epochs
    position_schedule(replanned, 30)
    assert opt_b.param_groups[0]["lr"] == lrs[30]
    for step in range(31, 40):
        opt_b.step()
        replanned.step()
        assert opt_b.param_groups[0]["lr"] == pytest.approx(lrs[step], rel=1e-12)
    with pytest.raises(ValueError, match="Invalid step -1"):
        position_schedule(replanned, -1)
