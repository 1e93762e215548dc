"""The generative-head interface: a training loss and a sampler (MAR style), nothing else.

Every head maps a backbone hidden state h (the condition) to a distribution over latent vectors of
size l. CALM trains it against the frozen autoencoder's posterior N(mu, sigma^2) of the next chunk and
samples from it to generate.
"""

from __future__ import annotations

import abc

import torch
from torch import nn

from calm_lightning.models.config import HeadConfig


class GenerativeHead(nn.Module, abc.ABC):
    """Interface shared by the energy, flow and diffusion heads.

    Args:
        hidden_size: D, width of the conditioning hidden state.
        latent_size: l, size of the latent vectors produced.
        cfg: the head section of the model config (``cfg.name`` selects the head in the registry).
        num_backbone_layers: used to size the head when ``num_blocks`` is 0 (layers / 4, at least 1).
    """

    def __init__(self, hidden_size: int, latent_size: int, cfg: HeadConfig, num_backbone_layers: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.latent_size = latent_size
        self.cfg = cfg
        self.num_backbone_layers = num_backbone_layers

    @abc.abstractmethod
    def loss(self, hidden: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
        """Per-position training loss.

        hidden: [P, D] conditions; mu, log_sigma: [P, l] target posterior of the next chunk.
        Returns [P] losses (float32); the caller averages (and may mask).
        """

    @abc.abstractmethod
    def sample(self, hidden: torch.Tensor, num_samples: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw latents. hidden: [P, D] -> [P, S, l] with S = num_samples, independent per (p, s)."""

    @property
    def evals_per_sample(self) -> int:
        """Network evaluations needed for one sample (1 for energy, solver steps for flow/diffusion)."""
        return 1


def resolve_num_blocks(num_blocks: int, num_backbone_layers: int) -> int:
    return num_blocks if num_blocks > 0 else max(1, num_backbone_layers // 4)
