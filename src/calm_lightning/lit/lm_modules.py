"""LightningModules for the two language models: CALM (next-vector) and the token baseline.

Both log ``val/brier1..4`` and ``val/brierlm`` from the same `BrierLM` metric so their curves share
TensorBoard charts, with their uncertainty (each validation sequence one cluster):
``val/brier{n}_se``, ``val/brier{n}_lo`` / ``_hi`` and ``val/brierlm_lo`` / ``_hi`` (95% intervals);
CALM logs its head loss, the baseline its cross-entropy.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import lightning as L
import torch

from calm_lightning.lit.common import ShardedGradientClipping, check_finite, experiment_from_dict
from calm_lightning.lit.optim import build_optimizer
from calm_lightning.metrics.brier import BrierLM
from calm_lightning.metrics.estimators import estimate_brier
from calm_lightning.models.autoencoder import ChunkAutoencoder
from calm_lightning.models.calm import CALM
from calm_lightning.models.config import AutoencoderConfig
from calm_lightning.models.token_lm import TokenLM


class _LanguageModelLitModule(ShardedGradientClipping, L.LightningModule):
    """Shared training/validation loop; subclasses build ``self.model`` and say how to get a loss."""

    model: torch.nn.Module
    _compiled_loss = None  # set by compile_training

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.cfg = experiment_from_dict(config)
        self.brier = BrierLM(max_n=self.cfg.eval.brier_max_n)
        # calm eval / calm compare set a list here to keep every block's (sums, counts) for paired
        # comparisons between runs scored on the same blocks; None in training.
        self.block_records: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def build_model(self) -> torch.nn.Module:
        """A fresh network of this module's architecture (random weights)."""
        raise NotImplementedError

    def compute_loss(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def loss_name(self) -> str:
        return "loss"

    def training_objective(self, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """What the optimiser minimises, and the parts to log under ``train/`` (default: the loss alone)."""
        loss = self.compute_loss(tokens)
        return loss, {self.loss_name: loss}

    def compile_training(self) -> None:
        """``trainer.compile``: run the training steps' loss through ``torch.compile``. The network
        itself stays a plain module (same state dict, same checkpoints; validation, Brier rollouts
        and generation run eagerly): ``self.model.loss`` is what gets compiled."""
        self._compiled_loss = torch.compile(self.model.loss)

    def model_loss(self, tokens: torch.Tensor):
        """``self.model.loss(tokens)``; in training mode the compiled one after ``compile_training``."""
        compiled = self._compiled_loss if self.training else None
        return (compiled or self.model.loss)(tokens)

    def training_step(self, batch: torch.Tensor, batch_idx: int):
        loss, parts = self.training_objective(batch)
        if not check_finite(loss, self.global_step, self.cfg.trainer.nan_policy):
            self.log("train/skipped_steps", 1.0, reduce_fx="sum")
            return None
        self.log_dict({f"train/{k}": v for k, v in parts.items()})
        self.log("loss", loss, prog_bar=True, logger=False)
        return loss

    def validation_loss(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The validation loss and what the Brier estimate may reuse of its forward pass (None)."""
        return self.compute_loss(batch), None

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        loss, shared = self.validation_loss(batch)
        self.log(f"val/{self.loss_name}", loss, sync_dist=True)
        # Seeded per batch so that validation is reproducible and comparable across steps.
        gen = torch.Generator(device=batch.device).manual_seed(self.cfg.trainer.seed + batch_idx)
        sums, counts = estimate_brier(self.model, batch, max_n=self.cfg.eval.brier_max_n,
                                      estimator=self.cfg.eval.estimator, generator=gen,
                                      num_samples=self.cfg.eval.num_samples, hidden=shared)
        self.brier.update(sums, counts)  # [B, max_n] each: one block per validation sequence
        if self.block_records is not None:
            self.block_records.append((sums.detach().cpu(), counts.detach().cpu()))

    def on_validation_epoch_end(self) -> None:
        scores = self.brier.compute()
        self.log_dict({f"val/{k}": v for k, v in scores.items()})
        self.brier.reset()

    def configure_optimizers(self):
        return build_optimizer(self.model, self.cfg.optim, self.cfg.trainer.max_steps)


class CALMLitModule(_LanguageModelLitModule):
    """CALM with a generative head. The frozen autoencoder's weights come with the module's state dict;
    for a fresh run the CLI loads them from the export (`artifacts.load_autoencoder`)."""

    def __init__(self, config: dict[str, Any], autoencoder_config: dict[str, Any], tokenizer_fingerprint: str = ""):
        super().__init__(config)
        self.save_hyperparameters()
        self.model = self.build_model()

    def build_model(self) -> CALM:
        autoencoder = ChunkAutoencoder(AutoencoderConfig(**self.hparams.autoencoder_config))
        return CALM(self.cfg.model.backbone, self.cfg.model.head, autoencoder)

    def compute_loss(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.training_objective(tokens)[0]

    def training_objective(self, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.model_loss(tokens)
        objective = out.objective(self.model.aux_weight)
        if out.aux_ce is None:
            return objective, {self.loss_name: out.loss}
        return objective, {self.loss_name: out.loss, "aux_ce": out.aux_ce, "objective": objective}

    def validation_loss(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # one backbone pass for both the loss and the Brier estimate (the reference shares it too)
        hidden = self.model.hidden_states(tokens)  # [B, L, D]
        return self.model.loss(tokens, hidden=hidden).loss, hidden

    @property
    def loss_name(self) -> str:
        return "head_loss"

    def load_autoencoder_weights(self, autoencoder: ChunkAutoencoder) -> None:
        self.model.autoencoder.load_state_dict(autoencoder.state_dict())

    def setup(self, stage: str) -> None:
        # FSDP leaves the modules it ignores where they are (train.build_strategy ignores the frozen
        # AE), so put the AE on the compute device here; other strategies move it anyway.
        if self._trainer is not None:
            self.model.autoencoder.to(self.trainer.strategy.root_device)


class TokenLMLitModule(_LanguageModelLitModule):
    """The token-level Transformer baseline (same backbone, LM head, cross-entropy)."""

    def __init__(self, config: dict[str, Any], vocab_size: int, tokenizer_fingerprint: str = ""):
        super().__init__(config)
        self.save_hyperparameters()
        self.model = self.build_model()

    def build_model(self) -> TokenLM:
        return TokenLM(
            self.cfg.model.backbone,
            self.hparams.vocab_size,
            tie_embeddings=self.cfg.model.tie_embeddings,
            fused_ce=self.cfg.model.fused_ce,
        )

    def compute_loss(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model_loss(tokens)

    @property
    def loss_name(self) -> str:
        return "ce"


def autoencoder_config_dict(model: ChunkAutoencoder) -> dict[str, Any]:
    return dataclasses.asdict(model.cfg)
