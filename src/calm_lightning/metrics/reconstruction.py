"""Autoencoder reconstruction accuracy as a torchmetrics Metric with additive (sum) states."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class ReconstructionAccuracy(Metric):
    """Token- and whole-chunk accuracy of decoded chunks against the originals.

    ``update(pred[..., K], target[..., K])``; ``compute()`` -> dict(token=..., chunk=...).
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in ("correct_tokens", "total_tokens", "correct_chunks", "total_chunks"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        eq = pred == target  # [..., K]
        self.correct_tokens += eq.sum()
        self.total_tokens += eq.numel()
        whole = eq.all(dim=-1)
        self.correct_chunks += whole.sum()
        self.total_chunks += whole.numel()

    def compute(self) -> dict[str, torch.Tensor]:
        return {
            "token": self.correct_tokens.float() / self.total_tokens.clamp(min=1),
            "chunk": self.correct_chunks.float() / self.total_chunks.clamp(min=1),
        }
