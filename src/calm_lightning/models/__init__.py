"""Plain-PyTorch models of calm-lightning (never imports lightning or omegaconf)."""

from calm_lightning.models.autoencoder import AutoencoderOutput, ChunkAutoencoder
from calm_lightning.models.backbone import KVCache, Transformer
from calm_lightning.models.calm import CALM, CALMOutput
from calm_lightning.models.config import (
    AutoencoderConfig,
    BackboneConfig,
    DiffusionHeadConfig,
    EnergyHeadConfig,
    FlowHeadConfig,
    HeadConfig,
)
from calm_lightning.models.heads import HEADS, GenerativeHead, build_head
from calm_lightning.models.token_lm import TokenLM

__all__ = [
    "AutoencoderConfig",
    "AutoencoderOutput",
    "BackboneConfig",
    "CALM",
    "CALMOutput",
    "ChunkAutoencoder",
    "DiffusionHeadConfig",
    "EnergyHeadConfig",
    "FlowHeadConfig",
    "GenerativeHead",
    "HEADS",
    "HeadConfig",
    "KVCache",
    "TokenLM",
    "Transformer",
    "build_head",
]
