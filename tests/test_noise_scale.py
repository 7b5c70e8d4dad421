"""The gradient noise scale (McCandlish et al. 2018, A.1) against cases with a known answer: a
linear model whose per-example gradients are computed exactly, on 1, 2 and 3 ranks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from fastnet.noise_scale import GradientNoiseScale, MicroBatchGradNorms, noise_scale_estimates
from tests.conftest import init_gloo, run_trainer, spawn_ranks, FAST

N, D = 512, 6  # examples, features


def _problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = x @ torch.randn(D, generator=g, dtype=torch.float64) + 0.5 * torch.randn(N, generator=g, dtype=torch.float64)
    w = torch.randn(D, generator=g, dtype=torch.float64)  # where the gradient is taken
    return x, y, w


def _per_example_grads(x, y, w) -> torch.Tensor:
    """∇_w ½(x·w − y)² = (x·w − y)·x, one row per example (exact)."""
    return (x @ w - y)[:, None] * x


def test_estimates_are_unbiased_for_the_true_gradient_and_trace():
    x, y, w = _problem()
    grads = _per_example_grads(x, y, w)
    true_g = grads.mean(0)
    true_g2 = true_g.square().sum().item()
    true_trace = (grads - true_g).square().sum(1).mean().item()  # tr(Σ) of one example drawn uniformly
    gen = torch.Generator().manual_seed(1)
    b_small, parts, draws = 4, 4, 20000
    idx = torch.randint(0, N, (draws, parts, b_small), generator=gen)  # i.i.d. examples (with replacement)
    small = grads[idx].mean(2)  # (draws, parts, D): each part a small batch
    small_sq = small.square().sum(2).mean(1)  # mean over the parts, as over the ranks
    big_sq = small.mean(1).square().sum(1)  # the all-reduced (averaged) gradient
    g2, trace = noise_scale_estimates(small_sq, big_sq, b_small, b_small * parts)
    assert g2.mean().item() == pytest.approx(true_g2, rel=0.05)
    assert trace.mean().item() == pytest.approx(true_trace, rel=0.05)
    noise = GradientNoiseScale(decay=0.999)
    for s, b in zip(small_sq.tolist(), big_sq.tolist()):
        noise.update(s, b, b_small, b_small * parts)
    assert noise.b_simple == pytest.approx(true_trace / true_g2, rel=0.15)


def test_moving_averages_are_bias_corrected_and_resume_exactly():
    noise = GradientNoiseScale(decay=0.9)
    assert noise.b_simple is None and noise.grad_sq_norm is None
    noise.update(5.0, 2.0, 1, 4)  # |G|² = (4·2 − 5)/3 = 1, tr = 3/(3/4) = 4
    assert noise.grad_sq_norm == pytest.approx(1.0) and noise.trace == pytest.approx(4.0)
    assert noise.b_simple == pytest.approx(4.0)
    assert not noise.update(math.inf, 1.0, 1, 4)  # an overflowing FP16 step is ignored
    noise.update(9.0, 3.0, 1, 4)  # |G|² = 1, tr = 8: EMA (0.9·0.1·(1) + 0.1·(1)) / 0.19 ...
    expect_trace = (0.9 * 0.1 * 4 + 0.1 * 8) / (1 - 0.81)
    assert noise.trace == pytest.approx(expect_trace)
    again = GradientNoiseScale(decay=0.9)
    again.load_state_dict(noise.state_dict())
    assert again.b_simple == noise.b_simple
    with pytest.raises(ValueError, match="b_small"):
        noise_scale_estimates(1.0, 1.0, 4, 4)
    with pytest.raises(ValueError, match="decay"):
        GradientNoiseScale(decay=1.0)


def test_micro_batch_norms_match_each_micro_batch_gradient():
    """One process, accumulation of 3 micro-batches with the loss divided by 3 (as the trainer does)."""
    x, y, w0 = _problem(2)
    model = nn.Linear(D, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w0[None])
    norms = MicroBatchGradNorms()
    micro = [slice(0, 8), slice(8, 16), slice(16, 24)]
    for sl in micro:
        loss = 0.5 * (model(x[sl]).squeeze(1) - y[sl]).square().mean() / len(micro)
        loss.backward()
        norms.after_backward([model.weight.grad])
    small, big = norms.result()
    grads = _per_example_grads(x[:24], y[:24], w0)
    exact_small = sum(grads[sl].mean(0).square().sum() for sl in micro) / len(micro)
    torch.testing.assert_close(small, exact_small)
    torch.testing.assert_close(big, grads.mean(0).square().sum())
    norms.reset()
    norms.after_backward([model.weight.grad])
    with pytest.raises(RuntimeError, match=">= 2 micro-batches"):
        norms.result()


def _sync_worker(rank, world, port, queue):
    import torch.distributed as dist

    from fastnet.comm import GradientSynchronizer
    from fastnet.comm.communicators.torchdist import TorchCommunicator

    init_gloo(rank, world, port)
    try:
        x, y, w0 = _problem(3)
        model = nn.Sequential(nn.Linear(D, 1, bias=False), nn.Linear(1, 1)).double()
        with torch.no_grad():
            model[0].weight.copy_(w0[None])
            model[1].weight.fill_(1.0)
            model[1].bias.zero_()
        sync = GradientSynchronizer(TorchCommunicator(), model.parameters(), algorithm="ring",
                                    fusion_threshold_bytes=16, measure_grad_norms=True)  # several buckets
        sl = slice(10 * rank, 10 * rank + 10)
        (0.5 * (model(x[sl]).squeeze(1) - y[sl]).square().mean()).backward()
        sync.synchronize()
        local, reduced = sync.grad_sq_norms()
        nbuckets = len(sync.buckets)
        sync.close()
        queue.put((rank, local.item(), reduced.item(), nbuckets))
    finally:  # gloo's threads must not meet interpreter shutdown (a SIGABRT at exit)
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_synchronizer_measures_local_and_averaged_gradient_norms(world):
    x, y, w0 = _problem(3)
    local_grads = []
    for rank in range(world):
        sl = slice(10 * rank, 10 * rank + 10)
        r = x[sl] @ w0 - y[sl]
        gw = (r[:, None] * x[sl]).mean(0)  # first layer's weight (the second is 1, bias 0)
        g_out_w = (r * (x[sl] @ w0)).mean()  # second layer's weight: ∂/∂a of a·(x·w) + b
        g_out_b = r.mean()
        local_grads.append(torch.cat([gw, g_out_w[None], g_out_b[None]]))
    averaged = torch.stack(local_grads).mean(0)
    for rank, local, reduced, buckets in spawn_ranks(_sync_worker, world):
        assert buckets > 1
        assert local == pytest.approx(local_grads[rank].square().sum().item(), rel=1e-6)
        assert reduced == pytest.approx(averaged.square().sum().item(), rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("nproc,micro", [(1, 16), (2, 16), (3, 16)])
def test_trainer_logs_the_noise_scale_on_1_2_and_3_ranks(tmp_path, nproc, micro):
    """Global batch 96: 1 process accumulates 6 micro-batches (B_small = 16), 2 and 3 ranks compare
    their local batches (48, 32) with the global one; the estimate is logged and summarized."""
    from fastnet.metrics import read_metrics

    out = tmp_path / "run"
    res = run_trainer([*FAST, "--global-batch-size", "96", "--micro-batch-size", str(micro), "--epochs", "1",
                       "--log-interval", "2", "--grad-noise-scale", "on", "--out-dir", str(out)], nproc=nproc)
    assert res.returncode == 0, res.stderr
    records = read_metrics(out / "metrics.jsonl")
    logged = [r["grad_noise_scale"] for r in records if r["kind"] == "step"]
    assert logged and all(v is not None and 0 < v < 10_000 for v in logged), logged
    summary = records[-1]
    assert summary["kind"] == "summary" and summary["grad_noise_scale"] == logged[-1]


def test_noise_scale_without_two_batch_sizes_is_refused(tmp_path):
    res = run_trainer([*FAST, "--global-batch-size", "32", "--micro-batch-size", "32", "--max-steps", "1",
                       "--grad-noise-scale", "on", "--out-dir", str(tmp_path / "run")])
    assert res.returncode != 0 and "grad_noise_scale needs two batch sizes" in res.stderr
