"""Pieces shared by the LightningModules: config round trip, the non-finite-loss policy and gradient
clipping that also holds under FSDP."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import OmegaConf
from torch.distributed.fsdp import FullyShardedDataParallel

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


class ShardedGradientClipping:
    """Mixin for LightningModules: clip by the global gradient norm under FSDP too.

    Lightning's FSDP precision plugin refuses ``gradient_clip_algorithm="norm"``: each rank holds only
    shards of the gradients, so ``torch.nn.utils.clip_grad_norm_`` would take a per-rank norm. The
    root FSDP module's ``clip_grad_norm_`` all-reduces the shards' norms first; other strategies keep
    Lightning's clipping.
    """

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        root = self.trainer.model
        if gradient_clip_val and isinstance(root, FullyShardedDataParallel) and gradient_clip_algorithm != "value":
            root.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
