"""LightningModule for the robust chunk autoencoder (CALM.md §1)."""

from __future__ import annotations

import dataclasses
from typing import Any

import lightning as L
import torch
from torch import nn

from calm_lightning.lit.common import ShardedGradientClipping, check_finite, experiment_from_dict
from calm_lightning.lit.optim import build_optimizer
from calm_lightning.metrics.reconstruction import ReconstructionAccuracy
from calm_lightning.models.autoencoder import ChunkAutoencoder


def _sigma_key(sigma: float) -> str:
    return f"noise{sigma:g}".replace(".", "p")


class AutoencoderLitModule(ShardedGradientClipping, L.LightningModule):
    """Trains `ChunkAutoencoder` on the K-token chunks of each [B, T] block.

    Validation decodes z = mu, z ~ posterior, and z = mu + N(0, s^2) for each robustness sigma s,
    and logs token and whole-chunk accuracy for each.
    """

    _compiled_forward = None  # set by compile_training

    def __init__(self, config: dict[str, Any], vocab_size: int, mask_token_id: int, tokenizer_fingerprint: str = ""):
        super().__init__()
        self.save_hyperparameters()
        self.cfg = experiment_from_dict(config)
        self.model = self.build_model()
        self.noise_sigmas = list(self.cfg.eval.noise_sigmas)
        conditions = ["mu", "posterior"] + [_sigma_key(s) for s in self.noise_sigmas]
        self.val_acc = nn.ModuleDict({c: ReconstructionAccuracy() for c in conditions})
        self.last_val: dict[str, float] = {}

    def build_model(self) -> ChunkAutoencoder:
        """A fresh autoencoder of this module's architecture (random weights)."""
        ae_cfg = dataclasses.replace(self.cfg.model.autoencoder, vocab_size=self.hparams.vocab_size)
        if ae_cfg.mask_token_id is None:
            ae_cfg.mask_token_id = self.hparams.mask_token_id
        return ChunkAutoencoder(ae_cfg)

    @property
    def chunk_size(self) -> int:
        return self.model.chunk_size

    def _chunks(self, batch: torch.Tensor) -> torch.Tensor:
        return batch.reshape(-1, self.chunk_size)  # [B*L, K]

    def compile_training(self) -> None:
        """``trainer.compile``: the training steps' forward through ``torch.compile``; the network
        stays a plain module (same state dict and checkpoints; validation and export run eagerly)."""
        self._compiled_forward = torch.compile(self.model.forward)

    def training_step(self, batch: torch.Tensor, batch_idx: int):
        out = (self._compiled_forward or self.model)(self._chunks(batch))
        if not check_finite(out.loss, self.global_step, self.cfg.trainer.nan_policy):
            self.log("train/skipped_steps", 1.0, reduce_fx="sum")
            return None
        self.log_dict(
            {
                "train/loss": out.loss,
                "train/ce": out.ce,
                "train/kl": out.kl,
                "train/active_dims": out.active_dims,
                "train/sigma": out.log_sigma.float().exp().mean(),
            },
            prog_bar=False,
        )
        self.log("loss", out.loss, prog_bar=True, logger=False)
        return out.loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        chunks = self._chunks(batch)
        out = self.model(chunks)  # eval mode: no masking or latent dropout
        self.log_dict({"val/loss": out.loss, "val/ce": out.ce, "val/kl": out.kl}, sync_dist=True)
        mu, log_sigma = out.mu, out.log_sigma
        sigma = log_sigma.exp()
        self.val_acc["mu"].update(self.model.decode(mu), chunks)
        self.val_acc["posterior"].update(self.model.decode(mu + sigma * torch.randn_like(mu)), chunks)
        for s in self.noise_sigmas:
            self.val_acc[_sigma_key(s)].update(self.model.decode(mu + s * torch.randn_like(mu)), chunks)
        self.log("val/sigma", sigma.float().mean(), sync_dist=True)
        self.log("val/active_dims", out.active_dims, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        results: dict[str, float] = {}
        for cond, metric in self.val_acc.items():
            acc = metric.compute()
            for kind in ("token", "chunk"):
                key = f"val/{kind}_acc_{cond}"
                self.log(key, acc[kind])
                results[key] = float(acc[kind])
            metric.reset()
        self.last_val = results

    def configure_optimizers(self):
        return build_optimizer(self.model, self.cfg.optim, self.cfg.trainer.max_steps)
