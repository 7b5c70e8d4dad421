"""LARS against hand-computed values of You et al. 2017, Algorithm 1, for both code paths."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastnet.optim.lars import LARS, param_groups

PATHS = [pytest.param(True, id="foreach"), pytest.param(False, id="reference")]
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: dict(rtol=1e-6, atol=1e-7), torch.float64: dict(rtol=1e-12, atol=1e-14)}


def _param(values, dtype):
    return torch.nn.Parameter(torch.tensor(values, dtype=dtype))


def _step(params_grads, **kw):
    params = [p for p, _ in params_grads]
    for p, g in params_grads:
        p.grad = torch.tensor(g, dtype=p.dtype)
    opt = LARS(params, **kw)
    opt.step()
    return opt


@pytest.mark.parametrize("foreach", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_step_matches_formula(foreach, dtype):
    # ‖w‖ = 5, ‖g‖ = 1: λ = η‖w‖/(‖g‖ + β‖w‖ + ε) = 0.1·5 / (1 + 0.01·5) = 0.5/1.05
    w = _param([[3.0, 0.0], [0.0, 4.0]], dtype)
    _step([(w, [[0.6, 0.0], [0.0, 0.8]])], lr=0.5, momentum=0.9, weight_decay=0.01, trust_coefficient=0.1,
          eps=0.0, foreach=foreach)
    lam = 0.5 / 1.05
    expected = [[3.0 - 0.5 * lam * (0.6 + 0.03), 0.0], [0.0, 4.0 - 0.5 * lam * (0.8 + 0.04)]]
    torch.testing.assert_close(w.detach(), torch.tensor(expected, dtype=dtype), **TOL[dtype])


@pytest.mark.parametrize("foreach", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_norms_give_local_lr_one(foreach, dtype):
    w0 = _param([[0.0, 0.0]], dtype)  # ‖w‖ = 0: u = γ(g + β·0)
    g0 = _param([[1.0, 2.0]], dtype)  # ‖g‖ = 0: u = γ(0 + β·w)
    _step([(w0, [[0.5, -1.0]]), (g0, [[0.0, 0.0]])], lr=0.1, momentum=0.0, weight_decay=0.5,
          trust_coefficient=0.001, foreach=foreach)
    torch.testing.assert_close(w0.detach(), torch.tensor([[-0.05, 0.1]], dtype=dtype), **TOL[dtype])
    torch.testing.assert_close(g0.detach(), torch.tensor([[1.0 - 0.05, 2.0 - 0.1]], dtype=dtype), **TOL[dtype])


@pytest.mark.parametrize("foreach", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_excluded_1d_params_get_plain_momentum_sgd(foreach, dtype):
    bias = _param([1.0, -2.0, 3.0], dtype)  # 1-D: excluded by default, no weight decay
    _step([(bias, [0.5, 0.5, -1.0])], lr=0.2, momentum=0.9, weight_decay=0.1, trust_coefficient=0.001,
          foreach=foreach)
    torch.testing.assert_close(bias.detach(), torch.tensor([0.9, -2.1, 3.2], dtype=dtype), **TOL[dtype])
    kept = _param([1.0, -2.0, 3.0], dtype)  # no exclusion rule: adapted like any layer
    _step([(kept, [0.5, 0.5, -1.0])], lr=0.2, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001,
          eps=0.0, exclude=None, foreach=foreach)
    lam = 0.001 * math.sqrt(14) / math.sqrt(1.5)
    expected = [1.0 - 0.2 * lam * 0.5, -2.0 - 0.2 * lam * 0.5, 3.0 + 0.2 * lam]
    torch.testing.assert_close(kept.detach(), torch.tensor(expected, dtype=dtype), **TOL[dtype])


@pytest.mark.parametrize("foreach", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("eta", [10.0, 0.01])
def test_trust_clipping_is_larcs(foreach, dtype, clip, eta):
    # λ = η‖w‖/‖g‖ = 2η: 20 (above γ = 0.1) or 0.02 (below). LARC's clip (Apex: λ ← min(λ/γ, 1), then
    # the step at γ) gives the tensor the LR min(λ, γ); unclipped it is γ·λ.
    w = _param([[2.0, 0.0]], dtype)
    _step([(w, [[0.0, 1.0]])], lr=0.1, momentum=0.0, weight_decay=0.0, trust_coefficient=eta, eps=0.0,
          trust_clip=clip, foreach=foreach)
    lam = 2 * eta
    tensor_lr = min(lam, 0.1) if clip else 0.1 * lam
    torch.testing.assert_close(w.detach(), torch.tensor([[2.0, -tensor_lr]], dtype=dtype), **TOL[dtype])


@pytest.mark.parametrize("foreach", PATHS)
def test_excluded_group_takes_its_own_lr_through_the_schedule(foreach):
    """param_groups(excluded_lr=…): biases/BN step at their own peak LR, warmed up from the same start
    LR; the adapted tensors are unchanged by it (the reference is excluded_lr=None)."""
    from fastnet.optim import build_schedule

    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    x = torch.randn(8, 4)
    opts = [LARS(param_groups(net, 5e-4, "1d", excluded_lr=lr_ex), lr=2.0, momentum=0.0, foreach=foreach)
            for net, lr_ex in zip(nets, (None, 0.5))]
    scheds = [build_schedule("poly", o, total_steps=4, warmup_steps=2, warmup_start_lr=0.2, steps_per_epoch=4)
              for o in opts]
    # warm-up from the same start (0.2) to each group's own peak (2.0, 0.5), then the same decay factor
    expected = [(0.2, 0.2), (1.1, 0.35), (2.0, 0.5)]
    for step in range(3):
        before = [[p.detach().clone() for p in net.parameters()] for net in nets]
        lrs = [[g["lr"] for g in o.param_groups] for o in opts]
        for net, o in zip(nets, opts):
            o.zero_grad()
            net(x).square().sum().backward()
        grads = [[p.grad.clone() for p in net.parameters()] for net in nets]
        for o, s in zip(opts, scheds):
            o.step()
            s.step()
        for k, name in enumerate(("weight", "bias", "bn_weight", "bn_bias")):
            if name == "weight":  # adapted: identical in both (same weights and gradients so far)
                torch.testing.assert_close(nets[1][0].weight, nets[0][0].weight)
                continue
            p = list(nets[1].parameters())[k]
            torch.testing.assert_close(p.detach(), before[1][k] - lrs[1][1] * grads[1][k])
        assert lrs[0][1] == lrs[0][0] and lrs[1] == pytest.approx(expected[step])
    with pytest.raises(ValueError, match="excluded_lr"):
        param_groups(nets[0], 0.0, "1d", excluded_lr=-1.0)


@pytest.mark.parametrize("foreach", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nesterov", [False, True])
def test_two_steps_momentum_and_nesterov(foreach, dtype, nesterov):
    lr, m, eta = 0.5, 0.9, 0.2
    w = _param([[3.0, 4.0]], dtype)
    opt = LARS([w], lr=lr, momentum=m, weight_decay=0.0, trust_coefficient=eta, eps=0.0, nesterov=nesterov,
               foreach=foreach)
    ref_w, v = [3.0, 4.0], [0.0, 0.0]
    for g in ([0.0, 2.0], [1.0, 1.0]):
        w.grad = torch.tensor([g], dtype=dtype)
        opt.step()
        lam = eta * math.hypot(*ref_w) / math.hypot(*g)
        u = [lr * lam * gi for gi in g]
        v = [m * vi + ui for vi, ui in zip(v, u)]
        step = [ui + m * vi for ui, vi in zip(u, v)] if nesterov else v
        ref_w = [wi - si for wi, si in zip(ref_w, step)]
    torch.testing.assert_close(w.detach(), torch.tensor([ref_w], dtype=dtype), **TOL[dtype])
    torch.testing.assert_close(opt.state[w]["momentum_buffer"], torch.tensor([v], dtype=dtype), **TOL[dtype])


@settings(max_examples=40, deadline=None)
@given(shapes=st.lists(st.lists(st.integers(1, 5), min_size=1, max_size=3), min_size=1, max_size=6),
       momentum=st.sampled_from([0.0, 0.9]), nesterov=st.booleans(), clip=st.booleans(),
       wd=st.sampled_from([0.0, 5e-4]), seed=st.integers(0, 2**16), zero_first=st.booleans())
def test_foreach_and_reference_agree(shapes, momentum, nesterov, clip, wd, seed, zero_first):
    nesterov = nesterov and momentum > 0
    g = torch.Generator().manual_seed(seed)
    runs = []
    for foreach in (True, False):
        params = [torch.nn.Parameter(torch.randn(*s, generator=torch.Generator().manual_seed(seed + i)))
                  for i, s in enumerate(shapes)]
        if zero_first:
            params[0].data.zero_()
        opt = LARS(params, lr=0.3, momentum=momentum, weight_decay=wd, trust_coefficient=0.02, nesterov=nesterov,
                   trust_clip=clip, foreach=foreach)
        g.manual_seed(seed)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        runs.append(params)
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def _train(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("foreach", PATHS)
def test_state_dict_round_trip_resumes_same_trajectory(foreach):
    full = _model()
    opt = LARS(full.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-4, foreach=foreach)
    _train(full, opt, 5, 1)
    _train(full, opt, 5, 2)
    part = _model()
    opt_a = LARS(part.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-4, foreach=foreach)
    _train(part, opt_a, 5, 1)
    saved_model, saved_opt = part.state_dict(), opt_a.state_dict()
    resumed = _model()
    resumed.load_state_dict(saved_model)
    opt_b = LARS(resumed.parameters(), lr=0.1, foreach=foreach)  # hyperparameters come from the state dict
    opt_b.load_state_dict(saved_opt)
    _train(resumed, opt_b, 5, 2)
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kw,match", [({"lr": -0.1}, "Invalid lr: -0.1"), ({"momentum": -1}, "Invalid momentum: -1"),
                                      ({"weight_decay": -1e-4}, "Invalid weight_decay: -0.0001"),
                                      ({"trust_coefficient": -0.001}, "Invalid trust_coefficient: -0.001"),
                                      ({"momentum": 0.0, "nesterov": True}, "Nesterov needs momentum")])
def test_bad_hyperparameters(kw, match):
    with pytest.raises(ValueError, match=match):
        LARS([torch.nn.Parameter(torch.ones(2, 2))], **kw)


def test_bad_group_values_sparse_grads_and_duplicates():
    p = torch.nn.Parameter(torch.ones(2, 2))
    with pytest.raises(ValueError, match="Invalid trust_coefficient in parameter group: -1"):
        LARS([{"params": [p], "trust_coefficient": -1}])
    with pytest.raises(ValueError, match="more than one parameter group"):
        LARS([{"params": [p]}, {"params": [p]}])
    emb = torch.nn.Embedding(5, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        LARS(emb.parameters()).step()


def test_params_without_grad_are_skipped():
    a, b = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2, 2))
    a.grad = torch.ones(2, 2)
    opt = LARS([a, b], lr=0.1)
    opt.step()
    assert torch.equal(b, torch.ones(2, 2)) and b not in opt.state and not torch.equal(a, torch.ones(2, 2))


def test_param_groups_rules_on_resnet20():
    from fastnet.models import build_model
    from fastnet.optim import build_optimizer, param_groups
    model = build_model("resnet20", 10, 32)
    n_1d = sum(1 for p in model.parameters() if p.ndim <= 1)  # BN γ, β and the fc bias
    groups = param_groups(model, 5e-4, "1d")
    assert [len(g["params"]) for g in groups] == [len(list(model.parameters())) - n_1d, n_1d]
    assert groups[1]["weight_decay"] == 0.0 and groups[1]["lars_exclude"] is True
    assert groups[0]["weight_decay"] == 5e-4 and groups[0]["lars_exclude"] is False
    assert len(param_groups(model, 5e-4, "bn_bias")[1]["params"]) == n_1d
    assert len(param_groups(model, 5e-4, "none")) == 1
    with pytest.raises(ValueError, match="valid rules: 1d, bn_bias, none"):
        param_groups(model, 5e-4, "conv")
    opt = build_optimizer("lars", model, lr=1.0, momentum=0.9, weight_decay=5e-4, trust_coefficient=0.002)
    assert isinstance(opt, LARS) and opt.param_groups[0]["trust_coefficient"] == 0.002


def test_excluded_group_overrides_rule():
    w = torch.nn.Parameter(torch.ones(2, 2))  # 2-D, but the group says excluded: plain SGD, no decay
    w.grad = torch.full((2, 2), 0.5)
    LARS([{"params": [w], "lars_exclude": True, "weight_decay": 0.0}], lr=0.1, momentum=0.0,
         trust_coefficient=1e-6).step()
    torch.testing.assert_close(w.detach(), torch.full((2, 2), 0.95))
