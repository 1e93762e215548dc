"""Generative heads behind one interface and a registry: ``HEADS[name]`` and ``build_head``."""

from __future__ import annotations

from calm_lightning.models.config import HeadConfig
from calm_lightning.models.heads.base import GenerativeHead

HEADS: dict[str, type[GenerativeHead]] = {}


def register_head(name: str):
    def deco(cls: type[GenerativeHead]) -> type[GenerativeHead]:
        HEADS[name] = cls
        return cls

    return deco


def build_head(hidden_size: int, latent_size: int, cfg: HeadConfig, num_backbone_layers: int) -> GenerativeHead:
    if cfg.name not in HEADS:
        raise KeyError(f"unknown head {cfg.name!r}; registered: {sorted(HEADS)}")
    return HEADS[cfg.name](hidden_size, latent_size, cfg, num_backbone_layers)


# Importing the implementations registers them.
from calm_lightning.models.heads import diffusion, energy, flow  # noqa: E402,F401
