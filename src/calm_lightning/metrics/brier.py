"""BrierLM as a torchmetrics Metric with additive states (CALM.md section 4).

The estimators in `calm_lightning.metrics.estimators` turn a batch tokens[B, T] into per-block sums
of Brier-n estimates and the number of (position, n) pairs they cover, one row per evaluation block
(a validation sequence); this Metric only adds up totals and second moments over blocks, so the
result is a running mean over every evaluated position (never a mean of batch means), its
cluster-robust standard error treats each block as one cluster of correlated positions, and every
state syncs across processes by summation.

Usage:
    metric = BrierLM(max_n=4)
    sums, counts = estimate_brier(model, tokens, max_n=4)  # [B, 4] each
    metric.update(sums, counts)
    metric.compute()  # {"brier1": ..., "brier1_se": ..., "brier1_lo": ..., "brier1_hi": ..., ...,
                      #  "brierlm": ..., "brierlm_lo": ..., "brierlm_hi": ...}
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from calm_lightning.metrics.functional import brier_intervals, normal_quantile


class BrierLM(Metric):
    """Running Brier-1..Brier-``max_n`` and BrierLM = 100 * geometric mean of Brier-1..4, with
    cluster-robust standard errors and normal intervals (`functional.brier_intervals`).

    States (all summed over blocks b and over processes): ``sums[n]`` = sum_b S_b^n, ``counts[n]`` =
    sum_b n_b^n, ``blocks[n]`` = G_n (blocks with n_b^n > 0), and the [max_n, max_n] moments
    ``sum_ss`` = sum_b S_b^i S_b^j, ``sum_sn`` = sum_b S_b^i n_b^j, ``sum_nn`` = sum_b n_b^i n_b^j
    (their diagonals are the per-n moments of the variance, the rest the cross terms that BrierLM's
    delta method needs).

    Args:
        max_n: largest n-gram scored (4 for the paper's BrierLM).
        order: how many Brier-n terms enter the geometric mean; default min(4, max_n).
        confidence: coverage of the reported intervals (normal quantile; 0.95 -> +-1.96 se).
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    sums: Tensor
    counts: Tensor
    blocks: Tensor
    sum_ss: Tensor
    sum_sn: Tensor
    sum_nn: Tensor

    def __init__(self, max_n: int = 4, order: int | None = None, confidence: float = 0.95, **kwargs):
        super().__init__(**kwargs)
        if max_n < 1:
            raise ValueError(f"max_n must be >= 1, got {max_n}")
        normal_quantile(confidence)  # validates it
        self.max_n = max_n
        self.order = order
        self.confidence = confidence
        # float64 sums: exact over millions of positions (a float32 sum would drift).
        f64 = dict(dtype=torch.float64)
        self.add_state("sums", default=torch.zeros(max_n, **f64), dist_reduce_fx="sum")
        self.add_state("counts", default=torch.zeros(max_n, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("blocks", default=torch.zeros(max_n, dtype=torch.int64), dist_reduce_fx="sum")
        for name in ("sum_ss", "sum_sn", "sum_nn"):
            self.add_state(name, default=torch.zeros(max_n, max_n, **f64), dist_reduce_fx="sum")

    def update(self, sums: Tensor, counts: Tensor) -> None:
        """Add evaluation blocks. sums: [B, max_n] summed Brier-n estimates of each block (one row of
        the tokens batch); counts: [B, max_n] positions scored per block and n.

        A 1-D pair sums[max_n], counts[max_n] (the pre-interval API) is accepted as ONE block: the
        point estimates are unchanged, but the standard errors are only meaningful if every such
        update is an independent cluster.
        """
        if sums.ndim == 1 and counts.ndim == 1:  # one block
            sums, counts = sums[None], counts[None]
        if sums.ndim != 2 or sums.shape[-1] != self.max_n or counts.shape != sums.shape:
            raise ValueError(
                f"expected sums and counts of shape (B, {self.max_n}) or ({self.max_n},), "
                f"got {tuple(sums.shape)}, {tuple(counts.shape)}"
            )
        s = sums.detach().to(device=self.sums.device, dtype=self.sums.dtype)  # [B, max_n]
        c = counts.detach().to(device=self.counts.device)
        n = c.to(self.sums.dtype)  # [B, max_n]
        self.sums += s.sum(dim=0)
        self.counts += c.sum(dim=0, dtype=torch.int64)
        self.blocks += (c > 0).sum(dim=0, dtype=torch.int64)
        self.sum_ss += s.T @ s
        self.sum_sn += s.T @ n
        self.sum_nn += n.T @ n

    def compute(self) -> dict[str, Tensor]:
        """{"brier<n>", "brier<n>_se", "brier<n>_lo", "brier<n>_hi" for n = 1..max_n, "brierlm",
        "brierlm_lo", "brierlm_hi"} over everything seen so far (see `functional.brier_intervals` for
        the formulas, and for the interval reported when a term is not clearly positive)."""
        return brier_intervals(
            self.sums,
            self.counts,
            self.blocks,
            self.sum_ss,
            self.sum_sn,
            self.sum_nn,
            order=self.order,
            confidence=self.confidence,
        )
