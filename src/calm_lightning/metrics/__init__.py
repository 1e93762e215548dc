"""Likelihood-free evaluation: Brier-n estimators and the BrierLM metric (plain PyTorch + torchmetrics)."""

from calm_lightning.metrics.brier import BrierLM
from calm_lightning.metrics.estimators import (
    ESTIMATORS,
    calm_chunk_estimate,
    calm_rollout_estimate,
    estimate_brier,
    token_low_variance_estimate,
    token_two_sample_estimate,
)
from calm_lightning.metrics.functional import (
    brier_indicator_sums,
    brierlm_from_sums,
    exact_brier,
    masked_brier_indicator_sums,
)

__all__ = [
    "BrierLM",
    "ESTIMATORS",
    "brier_indicator_sums",
    "brierlm_from_sums",
    "calm_chunk_estimate",
    "calm_rollout_estimate",
    "estimate_brier",
    "exact_brier",
    "masked_brier_indicator_sums",
    "token_low_variance_estimate",
    "token_two_sample_estimate",
]
