"""The token-level baseline: the same Transformer backbone with a token embedding and an LM head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from calm_lightning.models.backbone import INIT_STD, KVCache, Transformer
from calm_lightning.models.config import BackboneConfig
from calm_lightning.models.fused_ce import linear_cross_entropy


class TokenLM(nn.Module):
    """Next-token language model. With ``tie_embeddings`` the LM head reuses the embedding matrix; with
    ``fused_ce`` (default) the training loss never materialises the [B, T, V] logits."""

    def __init__(self, cfg: BackboneConfig, vocab_size: int, tie_embeddings: bool = False, fused_ce: bool = True):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.tie_embeddings = tie_embeddings
        self.fused_ce = fused_ce
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        self.backbone = Transformer(cfg)
        self.lm_head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        if tie_embeddings:
            self.lm_head.weight = self.embed.weight  # one Parameter, two uses
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """normal(0, 0.02) embedding and LM head (the backbone initialises itself)."""
        nn.init.normal_(self.embed.weight, mean=0.0, std=INIT_STD)
        if not self.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=INIT_STD)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens: [B, T] -> logits [B, T, V] in float32 (see ``Transformer.forward`` for the rest)."""
        h = self.backbone(self.embed(tokens), positions=positions, kv_cache=kv_cache, attn_mask=attn_mask)
        return self.lm_head(h).float()  # [B, T, V]

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over the B*(T-1) predicted positions. tokens: [B, T] -> scalar.

        The LM head and the cross-entropy run in row chunks (``fused_ce.linear_cross_entropy``: the loss and
        gradients of ``F.cross_entropy(self(tokens[:, :-1]) ...)`` without the [B, T-1, V] logits); with
        ``fused_ce=False`` exactly that full-logits expression."""
        targets = tokens[:, 1:].flatten()
        if not self.fused_ce:
            return F.cross_entropy(self(tokens[:, :-1]).flatten(0, 1), targets)
        h = self.backbone(self.embed(tokens[:, :-1]))  # [B, T-1, D]
        loss_sum, _ = linear_cross_entropy(h.flatten(0, 1), self.lm_head.weight, targets)
        return loss_sum / targets.numel()
