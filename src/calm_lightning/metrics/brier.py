"""BrierLM as a torchmetrics Metric with additive states (CALM.md section 4).

The estimators in `calm_lightning.metrics.estimators` turn a batch into per-n sums of Brier-n
estimates and the number of (position, n) pairs they cover; this Metric only adds them up, so the
result is a running mean over every evaluated position (never a mean of batch means) and syncs
across processes by summation.

Usage:
    metric = BrierLM(max_n=4)
    sums, counts = estimate_brier(model, tokens, max_n=4)
    metric.update(sums, counts)
    metric.compute()  # {"brier1": ..., ..., "brier4": ..., "brierlm": ...}
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from calm_lightning.metrics.functional import brierlm_from_sums


class BrierLM(Metric):
    """Running Brier-1..Brier-``max_n`` and BrierLM = 100 * geometric mean of Brier-1..4.

    Args:
        max_n: largest n-gram scored (4 for the paper's BrierLM).
        order: how many Brier-n terms enter the geometric mean; default min(4, max_n).
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    sums: Tensor
    counts: Tensor

    def __init__(self, max_n: int = 4, order: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if max_n < 1:
            raise ValueError(f"max_n must be >= 1, got {max_n}")
        self.max_n = max_n
        self.order = order
        # float64 sums: exact over millions of positions (a float32 sum would drift).
        self.add_state("sums", default=torch.zeros(max_n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("counts", default=torch.zeros(max_n, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, sums: Tensor, counts: Tensor) -> None:
        """Add one batch. sums: [max_n] summed Brier-n estimates; counts: [max_n] positions scored per n."""
        if sums.shape != (self.max_n,) or counts.shape != (self.max_n,):
            raise ValueError(
                f"expected sums and counts of shape ({self.max_n},), got {tuple(sums.shape)}, {tuple(counts.shape)}"
            )
        self.sums += sums.detach().to(device=self.sums.device, dtype=self.sums.dtype)
        self.counts += counts.detach().to(device=self.counts.device, dtype=self.counts.dtype)

    def compute(self) -> dict[str, Tensor]:
        """{"brier1": ..., "brier<max_n>": ..., "brierlm": ...} over everything seen so far."""
        return brierlm_from_sums(self.sums, self.counts, order=self.order)
