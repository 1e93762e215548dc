"""Pieces shared by the LightningModules: config round trip and the non-finite-loss policy."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import OmegaConf

from calm_lightning.config.schema import ExperimentConfig
from calm_lightning.errors import CalmError


def experiment_from_dict(config: dict[str, Any]) -> ExperimentConfig:
    """Rebuild the typed config from the plain dict stored in ``hparams`` (checkpoint-safe)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ExperimentConfig), config))


class NonFiniteLossError(CalmError):
    pass


def check_finite(loss: torch.Tensor, step: int, policy: str) -> bool:
    """True if the loss is usable. With policy "stop" a non-finite loss raises, naming the step; the
    checkpoints written so far are untouched, so the last good one stays available."""
    if torch.isfinite(loss).all():
        return True
    if policy == "stop":
        raise NonFiniteLossError(
            f"non-finite loss ({loss.item()}) at step {step}; stopped, last good checkpoint kept "
            "(set trainer.nan_policy=skip to skip such steps instead)"
        )
    return False
