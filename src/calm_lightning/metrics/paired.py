"""Paired comparison of Brier-n between runs scored on the same evaluation blocks (CALM.md section 4).

Two runs evaluated on the same blocks share the blocks' difficulty, so the difference of their
Brier-n has a much smaller variance than two independent standard errors suggest. With per-block
sums S_b and counts n_b of each run (the estimators' output, kept per block), a run's Brier-n is
the ratio m = sum_b S_b / N, N = sum_b n_b, whose linearisation (influence) per block is
z_b = (S_b - m n_b) / N; for a difference of two runs (their positions may differ, e.g. CALM's
chunk-aligned starts against the baseline's every token) the influences subtract:

    D = m_A - m_B,   Var(D) ~ G / (G - 1) * sum_b (z_b^A - z_b^B)^2,

the same CR1 cluster-robust form that `BrierLM` uses for one run (G blocks). A difference is
called significant at level 1 - alpha when |D| > z_{1-alpha/2} * se(D) (two-sided, normal).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from calm_lightning.metrics.functional import normal_quantile


def _influence(sums: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """sums, counts: [G, max_n] per block -> (mean [max_n], influence z [G, max_n]), float64."""
    s, n = sums.double(), counts.double()
    total = n.sum(0)  # [max_n]
    mean = s.sum(0) / total
    return mean, (s - mean * n) / total


def _cr1(z: Tensor) -> Tensor:
    g = z.shape[0]
    return (z.square().sum(0) * g / max(g - 1, 1)).sqrt()


@dataclass
class Estimate:
    """mean, se, lo, hi: [max_n] each (a 95% interval unless another confidence was asked for)."""

    mean: Tensor
    se: Tensor
    lo: Tensor
    hi: Tensor


def block_estimate(sums: Tensor, counts: Tensor, confidence: float = 0.95) -> Estimate:
    """Brier-n of one run from its per-block sums and counts [G, max_n], with the CR1 standard error."""
    mean, z = _influence(sums, counts)
    se = _cr1(z)
    q = normal_quantile(confidence)
    return Estimate(mean, se, mean - q * se, mean + q * se)


@dataclass
class Difference:
    """diff = A - B, se, z = diff / se and significant (|z| > the normal quantile): [max_n] each."""

    diff: Tensor
    se: Tensor
    z: Tensor
    significant: Tensor


def paired_difference(
    a_sums: Tensor, a_counts: Tensor, b_sums: Tensor, b_counts: Tensor, confidence: float = 0.95
) -> Difference:
    """Brier-n of run A minus run B on the same G blocks (row b of each is the same block)."""
    if a_sums.shape[0] != b_sums.shape[0]:
        raise ValueError(f"paired runs need the same blocks, got {a_sums.shape[0]} and {b_sums.shape[0]}")
    n = min(a_sums.shape[1], b_sums.shape[1])
    mean_a, z_a = _influence(a_sums[:, :n], a_counts[:, :n])
    mean_b, z_b = _influence(b_sums[:, :n], b_counts[:, :n])
    diff = mean_a - mean_b
    se = _cr1(z_a - z_b)
    z = diff / se
    return Difference(diff, se, z, z.abs() > normal_quantile(confidence))


def pearson(x: Tensor, y: Tensor) -> float:
    """Pearson correlation of two 1-D samples (nan for fewer than 3 points or no spread)."""
    x, y = x.double().flatten(), y.double().flatten()
    if x.numel() < 3:
        return float("nan")
    x, y = x - x.mean(), y - y.mean()
    denom = (x.square().sum() * y.square().sum()).sqrt()
    return float((x * y).sum() / denom) if denom > 0 else float("nan")
