"""Reference forms of the Brier-n estimators, for tests only: the paper's two-sample indicator form
and closed forms the package's vectorised estimators (`metrics/estimators.py`) must agree with."""

from __future__ import annotations

import torch
from torch import Tensor

from calm_lightning.metrics.functional import accum_dtype, sample_accuracy, sample_collision


def ngram_indicators(matches: Tensor, max_n: int) -> Tensor:
    """Indicators that the first n tokens all match, for n = 1..max_n.

    matches: [..., >= max_n] bool/0-1 per-token equalities -> [..., max_n] float, entry n-1 =
    prod_{k < n} matches[..., k].
    """
    return matches[..., :max_n].to(accum_dtype(matches.device)).cumprod(dim=-1)


def brier_indicator_sums(x1: Tensor, x2: Tensor, y: Tensor, max_n: int) -> Tensor:
    """Sum over positions of the two-sample Brier-n estimate, n = 1..max_n.

    x1, x2: [P, >= max_n] two independent sampled continuations per position; y: [P, >= max_n] the
    true continuation. Returns [max_n] (float64, float32 on MPS):
        sums[n-1] = sum_p 1{x1[p, :n] = y[p, :n]} + 1{x2[p, :n] = y[p, :n]} - 1{x1[p, :n] = x2[p, :n]}.
    """
    valid = torch.ones(x1.shape[0], max_n, dtype=torch.bool, device=x1.device)
    return masked_brier_indicator_sums(x1, x2, y, valid)[0]


def masked_brier_indicator_sums(x1: Tensor, x2: Tensor, y: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Like `brier_indicator_sums`, counting only the (position, n) pairs where ``valid`` is True.

    valid: [P, max_n] bool, False where position p's n-gram runs past the end of the sequence
    (see `functional.ngram_valid_mask`). Returns (sums[max_n] float64, counts[max_n] int64).
    """
    max_n = valid.shape[-1]
    acc1 = ngram_indicators(x1 == y, max_n)
    acc2 = ngram_indicators(x2 == y, max_n)
    coll = ngram_indicators(x1 == x2, max_n)
    return reduce_brier_terms(acc1 + acc2, coll, valid)


def reduce_brier_terms(accuracy: Tensor, collision: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Sum per-position Brier-n estimates ``accuracy - collision`` over the valid entries.

    accuracy: [..., max_n] estimate of 2 P(y_{1:n}); collision: [..., max_n] estimate of
    sum_x P(x_{1:n})^2; valid: [..., max_n] bool. Returns (sums[max_n] float64, counts[max_n] int64),
    summed over every leading dimension.
    """
    max_n = valid.shape[-1]
    dtype = accum_dtype(valid.device)
    score = (accuracy.to(dtype) - collision.to(dtype)).masked_fill(~valid, 0.0)
    sums = score.reshape(-1, max_n).sum(dim=0)
    counts = valid.reshape(-1, max_n).sum(dim=0, dtype=torch.int64)
    return sums, counts


def sample_brier_terms(samples: Tensor, target: Tensor, max_n: int) -> tuple[Tensor, Tensor]:
    """The S-sample U-statistic of Brier-n, n = 1..max_n, per position.

    samples: [..., S, >= max_n] S >= 2 independent sampled continuations; target: [..., >= max_n].
    Returns (accuracy, collision), each [..., max_n] (float64, float32 on MPS), with
        accuracy[n-1]  = 2/S * sum_s 1{x_s[:n] = y[:n]}                    (unbiased for 2 P(y_{1:n}))
        collision[n-1] = 2/(S(S-1)) * sum_{s<t} 1{x_s[:n] = x_t[:n]}       (unbiased for sum_x P(x_{1:n})^2)
    so accuracy - collision is unbiased for Brier-n; S = 2 gives 1{x1=y} + 1{x2=y} - 1{x1=x2}.
    """
    return sample_accuracy(samples, target, max_n), sample_collision(samples, max_n)


def exact_brier(prob_of_target: Tensor | float, sum_sq: Tensor | float) -> Tensor:
    """Brier score of a known distribution: 2 P(y) - sum_x P(x)^2 (higher is better, max 1)."""
    p = torch.as_tensor(prob_of_target)
    return 2 * p - torch.as_tensor(sum_sq, dtype=p.dtype, device=p.device)
