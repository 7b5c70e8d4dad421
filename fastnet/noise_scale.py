"""The gradient noise scale, measured during data-parallel training (McCandlish, Kaplan, Amodei et
al. 2018, "An Empirical Model of Large-Batch Training", §2.2 and Appendix A.1).

The simple noise scale ``B_simple = tr(Σ) / |G|²`` (``G``: the true gradient, ``Σ``: the
per-example gradient covariance) predicts the critical batch size: training at batch ``B`` takes
about ``1 + B_simple / B`` times the optimal number of steps. It is estimated from the squared norms
of one gradient averaged over two batch sizes ``B_small < B_big``. Since
``E|G_B|² = |G|² + tr(Σ)/B``, Appendix A.1's unbiased estimates are

    |G|²  ≈ (B_big·|G_big|² − B_small·|G_small|²) / (B_big − B_small)
    tr(Σ) ≈ (|G_small|² − |G_big|²) / (1/B_small − 1/B_big)

Each step's pair is noisy (``|G|²`` can come out negative), so the paper averages each estimate
separately over steps with an exponential moving average and divides the averages:
:class:`GradientNoiseScale`.

Data-parallel training already has the two batch sizes: each rank's local gradient before the
all-reduce (``B_small`` = the local batch) and the all-reduced one (``B_big`` = the global batch);
``|G_small|²`` is averaged over the ranks (each is an estimate of the same expectation).
:class:`fastnet.comm.gradients.synchronizer.GradientSynchronizer` measures both norms (``measure_grad_norms``).
With one process the micro-batches of gradient accumulation are the small batches
(:class:`MicroBatchGradNorms`).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch


def noise_scale_estimates(small_sq: float, big_sq: float, b_small: float, b_big: float) -> tuple[float, float]:
    """One step's unbiased estimates ``(|G|², tr(Σ))`` (module docstring; McCandlish et al., A.1).

    Args:
        small_sq: ``|G_small|²``, the squared L2 norm of a gradient averaged over ``b_small`` examples
            (or the mean of several such norms).
        big_sq: ``|G_big|²``, the same for the gradient averaged over ``b_big`` examples.
        b_small, b_big: the two batch sizes in examples, ``0 < b_small < b_big``.

    Raises:
        ValueError: batch sizes that are not ``0 < b_small < b_big``.
    """
    if not 0 < b_small < b_big:
        raise ValueError(f"Invalid batch sizes for the noise scale: b_small={b_small}, b_big={b_big} (need "
                         f"0 < b_small < b_big: two processes or two accumulated micro-batches at least)")
    g2 = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    return g2, trace


class GradientNoiseScale:
    """Exponential moving averages of the ``|G|²`` and ``tr(Σ)`` estimates and their ratio
    ``B_simple`` (McCandlish et al. 2018, A.1), with Adam-style bias correction so the first steps
    are not pulled towards 0.

    Args:
        decay: the EMA's decay per update, in ``[0, 1)`` (0: no smoothing). Default 0.95.

    ``state_dict()`` keys: ``decay``, ``g2`` and ``trace`` (the uncorrected averages), ``updates``.

    Raises:
        ValueError: a decay outside ``[0, 1)``.
    """

    def __init__(self, decay: float = 0.95) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"Invalid noise-scale EMA decay: {decay} (must be in [0, 1))")
        self.decay = decay
        self._g2 = 0.0
        self._trace = 0.0
        self.updates = 0

    def update(self, small_sq: float, big_sq: float, b_small: float, b_big: float) -> bool:
        """Fold in one step's squared norms (as :func:`noise_scale_estimates`). A non-finite norm (an
        overflowing FP16 step) is ignored. Returns whether the step was used."""
        if not (math.isfinite(small_sq) and math.isfinite(big_sq)):
            return False
        g2, trace = noise_scale_estimates(small_sq, big_sq, b_small, b_big)
        self._g2 = self.decay * self._g2 + (1.0 - self.decay) * g2
        self._trace = self.decay * self._trace + (1.0 - self.decay) * trace
        self.updates += 1
        return True

    def _corrected(self, value: float) -> float | None:
        return value / (1.0 - self.decay ** self.updates) if self.updates else None

    @property
    def grad_sq_norm(self) -> float | None:
        """Smoothed ``|G|²`` (bias-corrected); None before the first update."""
        return self._corrected(self._g2)

    @property
    def trace(self) -> float | None:
        """Smoothed ``tr(Σ)`` (bias-corrected), per example; None before the first update."""
        return self._corrected(self._trace)

    @property
    def b_simple(self) -> float | None:
        """``B_simple = tr(Σ)/|G|²`` in examples; None before the first update or while the smoothed
        ``|G|²`` is not positive (the gradient is still lost in its noise)."""
        g2, trace = self.grad_sq_norm, self.trace
        return trace / g2 if g2 is not None and g2 > 0 else None

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "g2": self._g2, "trace": self._trace, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._g2, self._trace, self.updates = float(state["g2"]), float(state["trace"]), int(state["updates"])


class MicroBatchGradNorms:
    """Squared norms of each micro-batch's gradient under gradient accumulation (one process).

    Call :meth:`after_backward` after each micro-batch's backward with the accumulated gradient
    tensors (e.g. :meth:`fastnet.precision.Precision.grad_buffers`; any dtype, the same tensors every
    micro-batch). With the loss divided by the ``accum`` micro-batches, micro-batch ``k`` adds
    ``g_k / accum``; the difference to the previous accumulation gives it exactly. Costs one copy of
    the gradients and two passes over them per micro-batch.

    :meth:`result` returns ``(mean_k |g_k|², |mean_k g_k|²)`` as 0-dim float64 tensors on the
    gradients' device (no host sync): ``|G_small|²`` at ``B_small`` = the micro-batch and ``|G_big|²``
    at ``B_big`` = ``accum`` micro-batches.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._prev: list[torch.Tensor] | None = None
        self._small: torch.Tensor | None = None
        self._count = 0

    @torch.no_grad()
    def after_backward(self, grads: Iterable[torch.Tensor]) -> None:
        grads = list(grads)
        if not grads:
            return
        cur = [g.detach().double() for g in grads]
        diff = cur if self._prev is None else torch._foreach_sub(cur, self._prev)
        sq = torch.stack(torch._foreach_norm(diff)).square().sum()
        self._small = sq if self._small is None else self._small + sq
        self._prev = [c.clone() if c.data_ptr() == g.data_ptr() else c for c, g in zip(cur, grads)]
        self._count += 1

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(|G_small|², |G_big|²)`` of the accumulated step (see the class docstring).

        Raises:
            RuntimeError: fewer than two micro-batches were recorded since :meth:`reset`.
        """
        if self._count < 2 or self._prev is None or self._small is None:
            raise RuntimeError(f"the micro-batch noise estimate needs >= 2 micro-batches per step; got {self._count}")
        n = self._count
        big = torch.stack(torch._foreach_norm(self._prev)).square().sum()
        return self._small * n, big  # |g_k|² = n²|g_k/n|², averaged over n: n · Σ|g_k/n|²
