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
    brier_intervals,
    brierlm_from_sums,
    cluster_covariance,
    normal_quantile,
)

__all__ = [
    "BrierLM",
    "ESTIMATORS",
    "brier_intervals",
    "brierlm_from_sums",
    "calm_chunk_estimate",
    "calm_rollout_estimate",
    "cluster_covariance",
    "estimate_brier",
    "normal_quantile",
    "token_low_variance_estimate",
    "token_two_sample_estimate",
]
