"""Brier-n maths: indicator sums, n-gram windows, aggregation into BrierLM (CALM.md section 4).

Brier(P, y) = 2 P(y) - sum_x P(x)^2 is strictly proper and needs no likelihood: with two independent
samples x1, x2 ~ P,
    1{x1 = y} + 1{x2 = y} - 1{x1 = x2}
is an unbiased estimate of it. Brier-n takes the next n-gram as one outcome, so each indicator is a
product of per-token equalities along the n-gram (a cumulative product over the token axis).
BrierLM = 100 * (Brier-1 * ... * Brier-4)^(1/4), 0 when any term is <= 0.

Everything here is plain tensor maths; the estimators (which draw the samples) live in
`calm_lightning.metrics.estimators`.
"""

from __future__ import annotations

import torch
from torch import Tensor

BRIERLM_ORDER = 4  # BrierLM is the geometric mean of Brier-1..Brier-4 (CALM.md section 4)


def accum_dtype(device: torch.device | str) -> torch.dtype:
    """float64 for sums (exact counts over millions of positions), float32 where float64 is missing (MPS)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def ngram_indicators(matches: Tensor, max_n: int) -> Tensor:
    """Indicators that the first n tokens all match, for n = 1..max_n.

    matches: [..., >= max_n] bool/0-1 per-token equalities -> [..., max_n] float, entry n-1 =
    prod_{k < n} matches[..., k].
    """
    return matches[..., :max_n].to(accum_dtype(matches.device)).cumprod(dim=-1)


def exclusive_cumprod(x: Tensor) -> Tensor:
    """[..., m] -> [..., m] with entry k = prod_{k' < k} x[..., k'] (entry 0 is 1)."""
    ones = torch.ones_like(x[..., :1])
    return torch.cat([ones, x[..., :-1]], dim=-1).cumprod(dim=-1)


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
    (see `ngram_valid_mask`). Returns (sums[max_n] float64, counts[max_n] int64).
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


def ngram_valid_mask(starts: Tensor, seq_len: int, max_n: int) -> Tensor:
    """Which n-grams fit in the sequence.

    starts: [P] index of the first target token of each position's n-gram; seq_len: T. Returns
    [P, max_n] bool, entry n-1 True iff starts + n <= T.
    """
    n = torch.arange(1, max_n + 1, device=starts.device)
    return starts[:, None] + n[None, :] <= seq_len


def ngram_windows(per_token: Tensor, max_n: int, step: int, fill: float | bool = 0) -> Tensor:
    """Slide a length-``max_n`` window over the last axis, one window every ``step`` tokens.

    per_token: [B, S] -> [B, S // step, max_n] where window w covers per_token[:, w*step : w*step + max_n]
    (padded with ``fill`` past the end). Used to gather each start position's n-gram from per-token
    quantities computed once by teacher forcing.
    """
    pad = per_token.new_full((per_token.shape[0], max_n), fill)
    padded = torch.cat([per_token, pad], dim=1)  # [B, S + max_n]
    num_windows = per_token.shape[1] // step
    return padded.unfold(1, max_n, step)[:, :num_windows]  # [B, S // step, max_n]


def exact_brier(prob_of_target: Tensor | float, sum_sq: Tensor | float) -> Tensor:
    """Brier score of a known distribution: 2 P(y) - sum_x P(x)^2 (higher is better, max 1)."""
    p = torch.as_tensor(prob_of_target)
    return 2 * p - torch.as_tensor(sum_sq, dtype=p.dtype, device=p.device)


def brierlm_from_sums(sums: Tensor, counts: Tensor, order: int | None = None) -> dict[str, Tensor]:
    """Turn running sums into Brier-n and BrierLM.

    sums, counts: [max_n]. Brier-n = sums[n-1] / counts[n-1] (0 where nothing was counted).
    BrierLM = 100 * geometric mean of Brier-1..Brier-``order`` (default min(4, max_n)), and 0 when
    any of those terms is <= 0 (the geometric mean is undefined there; report the Brier-n too).
    Returns {"brier1": ..., "brierN": ..., "brierlm": ...}, 0-d float tensors.
    """
    max_n = sums.shape[-1]
    order = min(BRIERLM_ORDER, max_n) if order is None else order
    if not 1 <= order <= max_n:
        raise ValueError(f"order must be in [1, {max_n}], got {order}")
    dtype = accum_dtype(sums.device)
    sums = sums.to(dtype)
    counts = counts.to(dtype)
    briers = torch.where(counts > 0, sums / counts.clamp_min(1.0), torch.zeros_like(sums))
    out = {f"brier{n + 1}": briers[n] for n in range(max_n)}
    terms = briers[:order]
    geo = torch.exp(torch.log(terms.clamp_min(torch.finfo(dtype).tiny)).mean())
    out["brierlm"] = torch.where((terms > 0).all(), 100.0 * geo, torch.zeros_like(geo))
    return out
