"""Continuous Autoregressive Language Model (CALM.md section 2).

A sequence of T tokens is read as L = T/K chunks. Position j's input is chunk j's discrete tokens,
embedded by CALM's own embedding (not the autoencoder's), concatenated and compressed:
    x_j = LayerNorm(W2 SiLU(W1 [e(t_{jK}); ...; e(t_{jK+K-1})]))      W1: K*D -> 2D, W2: 2D -> D
The backbone's hidden state h_j conditions a generative head that models chunk j+1's latent; the
targets are the frozen autoencoder's posteriors N(mu, sigma^2) of chunks 1..L-1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from calm_lightning.models.autoencoder import ChunkAutoencoder
from calm_lightning.models.backbone import INIT_STD, KVCache, Transformer
from calm_lightning.models.config import BackboneConfig, HeadConfig
from calm_lightning.models.fused_ce import linear_cross_entropy
from calm_lightning.models.heads import build_head


@dataclass
class CALMOutput:
    """loss: scalar mean head loss over all B*(L-1) positions; per_position: [B, L-1] float32 losses;
    aux_ce: the auxiliary next-chunk token cross-entropy (mean per token), None when it is off."""

    loss: torch.Tensor
    per_position: torch.Tensor
    aux_ce: torch.Tensor | None = None

    def objective(self, aux_weight: float) -> torch.Tensor:
        """What training minimises: the head loss, plus ``aux_weight`` x the auxiliary CE when on."""
        return self.loss if self.aux_ce is None else self.loss + aux_weight * self.aux_ce


class CALM(nn.Module):
    """Backbone + input compression + generative head over a frozen ``ChunkAutoencoder``.

    The autoencoder is frozen: its parameters have ``requires_grad=False``, it stays in eval mode
    whatever ``train()`` is called with, and its targets are computed under ``torch.no_grad()``. Its
    weights stay in ``state_dict()`` (prefix ``autoencoder.``) so a CALM checkpoint is self-contained;
    optimisers must therefore take only parameters with ``requires_grad`` (``trainable_parameters()``).
    """

    def __init__(self, backbone_cfg: BackboneConfig, head_cfg: HeadConfig, autoencoder: ChunkAutoencoder):
        super().__init__()
        self.backbone_cfg = backbone_cfg
        self.head_cfg = head_cfg
        self.chunk_size = autoencoder.chunk_size
        self.latent_size = autoencoder.latent_size
        K, D = self.chunk_size, backbone_cfg.d_model

        self.autoencoder = autoencoder
        self.autoencoder.requires_grad_(False)
        self.autoencoder.eval()

        self.embed = nn.Embedding(autoencoder.cfg.vocab_size, D)
        bias = backbone_cfg.compress_bias
        self.compress = nn.Sequential(
            nn.Linear(K * D, 2 * D, bias=bias),
            nn.SiLU(),
            nn.Linear(2 * D, D, bias=bias),
            nn.LayerNorm(D, eps=backbone_cfg.compress_norm_eps),
        )
        self.backbone = Transformer(backbone_cfg)
        self.head = build_head(D, self.latent_size, head_cfg, backbone_cfg.n_layers)
        # Beyond the paper (head_cfg.aux_token_weight > 0): h_j -> K token states -> logits of chunk
        # j+1's tokens; a direct, low-variance training signal for the backbone. Not built when off.
        self.aux_weight = float(head_cfg.aux_token_weight)
        if self.aux_weight > 0:
            self.aux_expand = nn.Linear(D, K * D, bias=False)
            self.aux_out = nn.Linear(D, autoencoder.cfg.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """normal(0, 0.02) embedding and compression linears; the backbone and head initialise themselves."""
        nn.init.normal_(self.embed.weight, mean=0.0, std=INIT_STD)
        if self.aux_weight > 0:
            nn.init.normal_(self.aux_expand.weight, mean=0.0, std=INIT_STD)
            nn.init.normal_(self.aux_out.weight, mean=0.0, std=INIT_STD)
        for module in self.compress:
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()

    def train(self, mode: bool = True) -> CALM:
        super().train(mode)
        self.autoencoder.eval()  # frozen: never masking or dropout, whatever the outer mode
        return self

    def trainable_parameters(self):
        """Parameters that receive gradients (everything but the frozen autoencoder)."""
        return (p for p in self.parameters() if p.requires_grad)

    def new_cache(self) -> KVCache:
        return self.backbone.new_cache()

    def hidden_states(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Backbone states of each chunk. tokens: [B, T] with T = L*K -> [B, L, D].

        h_j (computed from chunks 0..j) conditions the prediction of chunk j+1. ``positions`` ([L] or
        [B, L]), ``kv_cache`` and ``attn_mask`` ([.., L, S+L]) count chunks, as in ``Transformer.forward``;
        with a cache, feeding one chunk (T = K) at a time decodes incrementally.
        """
        B, T = tokens.shape
        K = self.chunk_size
        if T % K:
            raise ValueError(f"sequence length {T} is not a multiple of the chunk size K={K}")
        e = self.embed(tokens).view(B, T // K, -1)  # [B, T, D] -> [B, L, K*D]
        return self.backbone(self.compress(e), positions=positions, kv_cache=kv_cache, attn_mask=attn_mask)

    def loss(self, tokens: torch.Tensor, hidden: torch.Tensor | None = None) -> CALMOutput:
        """Head loss of h_0..h_{L-2} against the AE posteriors of chunks 1..L-1.

        tokens: [B, T] with T = L*K, L >= 2; hidden: ``hidden_states(tokens)`` [B, L, D] if already
        computed. Returns CALMOutput(loss scalar, per_position [B, L-1]).
        """
        B, T = tokens.shape
        K = self.chunk_size
        h = self.hidden_states(tokens) if hidden is None else hidden  # [B, L, D]
        L = h.shape[1]
        if L < 2:
            raise ValueError(f"need at least two chunks (T >= {2 * K}) to have a target, got T={T}")
        with torch.no_grad():
            mu, log_sigma = self.autoencoder.encode(tokens[:, K:].reshape(B, L - 1, K))  # [B, L-1, l] each
        P = B * (L - 1)
        per = self.head.loss(
            h[:, :-1].reshape(P, -1),  # [P, D]
            mu.float().reshape(P, -1),  # [P, l]
            log_sigma.float().reshape(P, -1),  # [P, l]
        )  # [P]
        per_position = per.float().view(B, L - 1)
        aux = self.aux_loss(h[:, :-1], tokens[:, K:]) if self.aux_weight > 0 and torch.is_grad_enabled() else None
        return CALMOutput(loss=per_position.mean(), per_position=per_position, aux_ce=aux)

    def aux_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean auxiliary CE of the next chunk's K tokens given the states before them.

        hidden: [B, L', D] (h_0..h_{L'-1}); targets: [B, L'*K] (chunks 1..L') -> scalar."""
        D = hidden.shape[-1]
        states = self.aux_expand(hidden).reshape(-1, D)  # [B*L'*K, D]: one state per target token
        loss_sum, _ = linear_cross_entropy(states, self.aux_out.weight, targets.reshape(-1))
        return loss_sum / targets.numel()

    @torch.no_grad()
    def sample_chunks(
        self, hidden: torch.Tensor, num_samples: int = 1, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Sample next chunks: head latents decoded greedily by the AE. hidden: [P, D] -> tokens [P, S, K]."""
        trunk = self.sample_trunks(hidden, num_samples=num_samples, generator=generator)  # [P, S, K, d]
        return self.autoencoder.decode_position(trunk)  # [P, S, K]

    @torch.no_grad()
    def sample_trunks(
        self, hidden: torch.Tensor, num_samples: int = 1, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Head samples through the AE decoder's chunk-level trunk only, for decoding positions on demand
        (``autoencoder.decode_position``). hidden: [P, D] -> trunk states [P, S, K, d]."""
        z = self.head.sample(hidden, num_samples=num_samples, generator=generator)  # [P, S, l]
        return self.autoencoder.decode_trunk(z.to(self.autoencoder.embedding.weight.dtype))
