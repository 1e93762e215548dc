"""Brier-n maths: indicator sums, n-gram windows, aggregation into BrierLM (CALM.md section 4).

Brier(P, y) = 2 P(y) - sum_x P(x)^2 is strictly proper and needs no likelihood: with two independent
samples x1, x2 ~ P,
    1{x1 = y} + 1{x2 = y} - 1{x1 = x2}
is an unbiased estimate of it; with S >= 2 samples the U-statistic
    2 * mean_s 1{x_s = y}  -  mean_{s < t} 1{x_s = x_t}
is too (`sample_accuracy` - `sample_collision`; S = 2 is the two-sample form, kept as a reference in
tests/brier_reference.py). Brier-n takes the next n-gram as one
outcome, so each indicator is a product of per-token equalities along the n-gram (a cumulative
product over the token axis). BrierLM = 100 * (Brier-1 * ... * Brier-4)^(1/4), 0 when any term is <= 0.

Uncertainty (`brier_intervals`): each evaluation block b (one row of tokens[B, T]) is a cluster of
correlated positions with score sum S_b and count n_b per n. Brier-n = sum_b S_b / sum_b n_b is a
ratio estimator; its cluster-robust (CR1) variance is
    var = G/(G-1) * sum_b (S_b - m n_b)^2 / (sum_b n_b)^2,    m = Brier-n,  G = number of blocks,
expanded as sum S^2 - 2 m sum S n + m^2 sum n^2 so that only additive sums need to be kept.

Everything here is plain tensor maths; the estimators (which draw the samples) live in
`calm_lightning.metrics.estimators`.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import torch
from torch import Tensor

BRIERLM_ORDER = 4  # BrierLM is the geometric mean of Brier-1..Brier-4 (CALM.md section 4)


def accum_dtype(device: torch.device | str) -> torch.dtype:
    """float64 for sums (exact counts over millions of positions), float32 where float64 is missing (MPS)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def exclusive_cumprod(x: Tensor) -> Tensor:
    """[..., m] -> [..., m] with entry k = prod_{k' < k} x[..., k'] (entry 0 is 1)."""
    ones = torch.ones_like(x[..., :1])
    return torch.cat([ones, x[..., :-1]], dim=-1).cumprod(dim=-1)


def reduce_brier_blocks(accuracy: Tensor, collision: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Sum per-position Brier-n estimates ``accuracy - collision`` over the valid entries, one sum per
    evaluation block: the first axis (B, one row of the tokens batch) is kept, every other leading
    axis is summed. accuracy, collision, valid:
    [B, ..., max_n]. Returns (sums[B, max_n] float64, counts[B, max_n] int64) for `BrierLM.update`.
    """
    B, max_n = valid.shape[0], valid.shape[-1]
    dtype = accum_dtype(valid.device)
    score = (accuracy.to(dtype) - collision.to(dtype)).masked_fill(~valid, 0.0)
    sums = score.reshape(B, -1, max_n).sum(dim=1)
    counts = valid.reshape(B, -1, max_n).sum(dim=1, dtype=torch.int64)
    return sums, counts


def _prefix_match_counts(equal: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Sum over ``dims`` of prod_{k < n} equal[..., k] for n = 1..m: equal [..., m] bool -> [..., m]
    (without ``dims``) int64. A running AND over the m <= max_n token axis (cheaper than a cumprod)."""
    run, out = None, []
    for k in range(equal.shape[-1]):
        run = equal[..., k] if run is None else run & equal[..., k]
        out.append(run.sum(dim=dims))
    return torch.stack(out, dim=-1)


def sample_accuracy(samples: Tensor, target: Tensor, max_n: int) -> Tensor:
    """2/S * sum_s 1{x_s[:n] = y[:n]}. samples: [..., S, >= max_n]; target: [..., >= max_n] -> [..., max_n]."""
    S = samples.shape[-2]
    hits = _prefix_match_counts(samples[..., :max_n] == target[..., None, :max_n], (-1,))  # [..., max_n]
    return hits.to(accum_dtype(samples.device)) * (2.0 / S)


def sample_collision(samples: Tensor, max_n: int) -> Tensor:
    """2/(S(S-1)) * sum_{s<t} 1{x_s[:n] = x_t[:n]}, all S(S-1)/2 pairs at once.

    samples: [..., S, >= max_n], S >= 2 -> [..., max_n]. The [..., S, S, n] equality tensor is
    symmetric with an all-ones diagonal, so sum_{s<t} = (sum_{s,t} - S) / 2 (no loop over pairs).
    """
    S = samples.shape[-2]
    if S < 2:
        raise ValueError(f"the collision term needs S >= 2 samples, got {S}")
    x = samples[..., :max_n]
    agree = _prefix_match_counts(x[..., :, None, :] == x[..., None, :, :], (-2, -1))  # [..., max_n]
    twice_pairs = agree.to(accum_dtype(samples.device)) - S
    return twice_pairs / (S * (S - 1))


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


def normal_quantile(confidence: float) -> float:
    """z with P(|Z| <= z) = confidence for a standard normal Z (1.96 for 0.95)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def cluster_covariance(
    sums: Tensor, counts: Tensor, blocks: Tensor, sum_ss: Tensor, sum_sn: Tensor, sum_nn: Tensor
) -> Tensor:
    """Cluster-robust (CR1) covariance of the ratio estimators Brier-i = sum_b S_b^i / sum_b n_b^i.

    sums, counts, blocks: [max_n] sum_b S_b^i, sum_b n_b^i and G_i (blocks with n_b^i > 0);
    sum_ss, sum_sn, sum_nn: [max_n, max_n] sum_b S_b^i S_b^j, sum_b S_b^i n_b^j, sum_b n_b^i n_b^j.
    With m_i = Brier-i and N_i = sum_b n_b^i (linearisation of the ratio):
        cov_ij = c_ij * sum_b (S_b^i - m_i n_b^i)(S_b^j - m_j n_b^j) / (N_i N_j)
               = c_ij * (SS_ij - m_j SN_ij - m_i SN_ji + m_i m_j NN_ij) / (N_i N_j),
    c_ij = sqrt(c_i c_j), c_i = G_i / (G_i - 1) (the CR1 small-sample factor; G_i = G for every n
    unless some blocks are too short for the longer n-grams). Returns [max_n, max_n] float64; rows and
    columns of an n with G_n < 2 are NaN (one block carries no estimate of its own spread).
    """
    dtype = accum_dtype(sums.device)
    sums, counts, g = sums.to(dtype), counts.to(dtype), blocks.to(dtype)
    N = counts.clamp_min(1.0)
    m = torch.where(counts > 0, sums / N, torch.zeros_like(sums))
    resid = (
        sum_ss.to(dtype)
        - sum_sn.to(dtype) * m[None, :]
        - sum_sn.to(dtype).T * m[:, None]
        + sum_nn.to(dtype) * (m[:, None] * m[None, :])
    )
    c = torch.where(g > 1, g / (g - 1).clamp_min(1.0), torch.full_like(g, math.nan))
    cov = (c[:, None] * c[None, :]).sqrt() * resid / (N[:, None] * N[None, :])
    diag = torch.diagonal(cov)
    diag.clamp_(min=0.0)  # round-off of the expanded sums can leave a tiny negative variance
    return cov


def brier_intervals(
    sums: Tensor,
    counts: Tensor,
    blocks: Tensor,
    sum_ss: Tensor,
    sum_sn: Tensor,
    sum_nn: Tensor,
    order: int | None = None,
    confidence: float = 0.95,
) -> dict[str, Tensor]:
    """Brier-n and BrierLM (as `brierlm_from_sums`) plus their standard errors and intervals.

    Arguments as in `cluster_covariance`. Adds, with z = `normal_quantile(confidence)`:
    - brier{n}_se = sqrt(cov_nn); brier{n}_lo / _hi = Brier-n -/+ z * se (normal interval);
    - brierlm_lo / _hi, when every Brier-i (i <= k = order) is > 0: the delta method on
      log BrierLM = log 100 + (1/k) sum_{i<=k} log Brier-i, var(log BrierLM) = g^T cov g with
      g_i = 1 / (k Brier-i) (cov's cross terms included), interval BrierLM * exp(-/+ z sqrt(var))
      (positive and asymmetric, like a ratio's). It widens without bound as a term nears 0+, which
      is what the data say about a geometric mean there; on a toy it covers as advertised, while
      capping it at the bound below or switching to that bound as soon as some lo_i <= 0 both
      under-covered (about 92% for 95%, tests/test_brier_intervals.py);
    - when some Brier-i <= 0 (BrierLM = 0 by the <= 0 rule) the log is undefined; reported is
      lo = 0 and hi = 100 * (prod_i max(hi_i, 0))^(1/k), BrierLM with every term at its own upper
      bound (0 when some term is clearly negative, hi_i < 0).
    Values are NaN where a term has fewer than two blocks.
    """
    out = brierlm_from_sums(sums, counts, order=order)
    max_n = sums.shape[-1]
    order = min(BRIERLM_ORDER, max_n) if order is None else order
    z = normal_quantile(confidence)
    cov = cluster_covariance(sums, counts, blocks, sum_ss, sum_sn, sum_nn)
    briers = torch.stack([out[f"brier{n + 1}"] for n in range(max_n)]).to(cov.dtype)
    se = torch.diagonal(cov).sqrt()
    lo, hi = briers - z * se, briers + z * se
    for n in range(max_n):
        out[f"brier{n + 1}_se"] = se[n]
        out[f"brier{n + 1}_lo"] = lo[n]
        out[f"brier{n + 1}_hi"] = hi[n]
    terms = briers[:order]
    grad = 1.0 / (order * terms)  # d log BrierLM / d Brier-i
    var_log = grad @ cov[:order, :order] @ grad
    point = out["brierlm"].to(cov.dtype)
    half = z * var_log.clamp_min(0.0).sqrt()
    clipped_hi = 100.0 * torch.exp(torch.log(hi[:order].clamp_min(0.0)).mean())  # exp(-inf) = 0
    smooth = (terms > 0).all()
    nan = torch.tensor(math.nan, dtype=cov.dtype, device=cov.device)
    defined = torch.isfinite(se[:order]).all()
    out["brierlm_lo"] = torch.where(defined, torch.where(smooth, point * torch.exp(-half), 0.0 * point), nan)
    out["brierlm_hi"] = torch.where(defined, torch.where(smooth, point * torch.exp(half), clipped_hi), nan)
    return out
