"""Context-free chunk autoencoder: K tokens <-> one latent vector (CALM.md section 1).

Encoder: embedding -> per-token residual SwiGLU blocks -> flatten K*d -> Linear(K*d -> d) -> chunk
blocks -> RMSNorm -> Linear(d -> 2l) = (mu, log_sigma).
Decoder: Linear(l -> d) -> chunk blocks -> Linear(d -> K*d) -> K token states -> per-token blocks ->
RMSNorm -> logits through the encoder's embedding matrix (tied: the very same Parameter).

Objective of one chunk (minimised), section 1 of the paper:
    loss = sum_k CE(token_k) + beta * sum_i max(lambda, KL_i)   (averaged over chunks; the floor per
           chunk as the reference code, or on the batch-mean KL: ``kl_clip_reduction``),
    KL_i = KL(N(mu_i, sigma_i^2) || N(0, 1)) = 0.5 * (mu_i^2 + sigma_i^2 - 1) - log sigma_i,
with the robustness tricks applied only in training mode: input token masking (masked ids become
``mask_token_id``; labels stay the originals) and dropout on the sampled latent z.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from calm_lightning.models.argmax import projection_argmax
from calm_lightning.models.config import AutoencoderConfig
from calm_lightning.models.fused_ce import linear_cross_entropy
from calm_lightning.models.layers import ResidualSwiGLUBlock, RMSNorm

# log sigma is clamped to this range for numerical stability: exp(2 log sigma) in the KL cannot
# overflow, and sigma cannot underflow to exactly zero (which would make the posterior a point mass
# and the KL infinite). The paper's learned sigma is ~0.3 (log sigma ~ -1.2), well inside.
LOG_SIGMA_MIN = -10.0
LOG_SIGMA_MAX = 4.0

INIT_STD = 0.02


@dataclass
class AutoencoderOutput:
    """What one training/validation step of the autoencoder produces.

    loss: scalar, ce + beta * clipped KL (``clipped_kl`` with ``cfg.kl_clip_reduction``; what is optimised).
    ce: scalar, cross-entropy summed over the K tokens of a chunk, averaged over the batch (nats/chunk).
    kl: scalar, the *unclipped* KL of the posterior to N(0, I) summed over dims, averaged over the batch
        (nats/chunk; the information actually carried by z).
    kl_per_dim: [l] unclipped KL per latent dimension, averaged over the batch.
    active_dims: scalar, dimensions above the free-bits floor (``active_dims``, same reduction).
    logits: [B, K, V], or None when ``cfg.fused_ce`` computes the loss without them.
    mu, log_sigma: [B, l] (log_sigma clamped by default); z: [B, l] the posterior sample before latent dropout.
    """

    loss: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor
    kl_per_dim: torch.Tensor
    active_dims: torch.Tensor
    logits: torch.Tensor | None
    mu: torch.Tensor
    log_sigma: torch.Tensor
    z: torch.Tensor


def gaussian_kl_per_dim(mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) per dimension, in float32. mu, log_sigma: [..., l] -> [..., l]."""
    mu, log_sigma = mu.float(), log_sigma.float()
    return 0.5 * (mu.pow(2) + torch.exp(2.0 * log_sigma) - 1.0) - log_sigma


KL_CLIP_REDUCTIONS = ("chunk", "batch")


def clipped_kl(kl: torch.Tensor, kl_clip: float, reduction: str = "chunk") -> torch.Tensor:
    """Free-bits KL of a batch of chunks. kl: [..., l] KL per chunk and dimension -> scalar.

    ``"chunk"`` (reference code, the default): mean over chunks of sum_i max(kl_clip, KL_bi); each
    chunk's dimension is floored on its own, so a dimension's KL gets a gradient in exactly the chunks
    where it exceeds ``kl_clip``.
    ``"batch"`` (Kingma et al. 2016's free bits): sum_i max(kl_clip, mean_b KL_bi); a dimension escapes
    the floor's zero gradient only when it carries more than ``kl_clip`` nats on average over the batch.
    """
    kl = kl.flatten(0, -2) if kl.dim() > 1 else kl.unsqueeze(0)  # [chunks, l]
    if reduction == "chunk":
        return kl.clamp_min(kl_clip).sum(-1).mean()
    if reduction == "batch":
        return kl.mean(0).clamp_min(kl_clip).sum()
    raise ValueError(f"kl_clip_reduction must be one of {KL_CLIP_REDUCTIONS}, got {reduction!r}")


def active_dims(kl: torch.Tensor, kl_clip: float, reduction: str = "chunk") -> torch.Tensor:
    """Latent dimensions above the free-bits floor, in the sense of ``clipped_kl``'s reduction.

    kl: [..., l] -> float scalar. ``"chunk"``: mean over chunks of the number of dimensions with
    KL_bi > kl_clip (the dimensions that get a KL gradient, per chunk); ``"batch"``: the number of
    dimensions whose batch-mean KL exceeds kl_clip.
    """
    kl = kl.flatten(0, -2) if kl.dim() > 1 else kl.unsqueeze(0)  # [chunks, l]
    if reduction == "chunk":
        return (kl > kl_clip).float().sum(-1).mean()
    if reduction == "batch":
        return (kl.mean(0) > kl_clip).float().sum()
    raise ValueError(f"kl_clip_reduction must be one of {KL_CLIP_REDUCTIONS}, got {reduction!r}")


class ChunkAutoencoder(nn.Module):
    """Maps chunks of K tokens to Gaussian posteriors over l-dimensional latents and back.

    ``cfg.mask_token_id`` may be filled in after construction (e.g. once the tokenizer is known); it is
    read at every training forward and must be an int in [0, V) by then.
    """

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.cfg = cfg
        self.chunk_size = cfg.chunk_size
        self.latent_size = cfg.latent_size
        K, d, latent, f, eps = cfg.chunk_size, cfg.d_model, cfg.latent_size, cfg.ffn_size, cfg.norm_eps

        self.embedding = nn.Embedding(cfg.vocab_size, d)  # also the output matrix (tied)
        # encoder
        self.enc_token_blocks = nn.ModuleList(
            ResidualSwiGLUBlock(d, f, eps) for _ in range(cfg.num_token_blocks)
        )
        bias = cfg.linear_bias  # the reference code's squeeze/expand/latent_to_hidden have biases
        self.enc_compress = nn.Linear(K * d, d, bias=bias)
        self.enc_chunk_blocks = nn.ModuleList(
            ResidualSwiGLUBlock(d, f, eps) for _ in range(cfg.num_chunk_blocks)
        )
        self.enc_norm = RMSNorm(d, eps)
        # A bias here lets log_sigma settle at a common level independent of the normalised state.
        self.to_posterior = nn.Linear(d, 2 * latent, bias=True)
        # decoder
        self.dec_in = nn.Linear(latent, d, bias=bias)
        self.dec_chunk_blocks = nn.ModuleList(
            ResidualSwiGLUBlock(d, f, eps) for _ in range(cfg.num_chunk_blocks)
        )
        self.dec_expand = nn.Linear(d, K * d, bias=bias)
        self.dec_token_blocks = nn.ModuleList(
            ResidualSwiGLUBlock(d, f, eps) for _ in range(cfg.num_token_blocks)
        )
        self.dec_norm = RMSNorm(d, eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """normal(0, 0.02) for the embedding and every linear, zero biases, unit norm gains."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()

    # ------------------------------------------------------------------ encoder / decoder
    def encode(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior of each chunk, deterministic (no masking, no dropout, no sampling).

        tokens: [..., K] -> (mu [..., l], log_sigma [..., l]), log_sigma clamped to
        [LOG_SIGMA_MIN, LOG_SIGMA_MAX] unless ``cfg.log_sigma_clamp`` is false (the reference code).
        """
        if tokens.shape[-1] != self.chunk_size:
            raise ValueError(f"expected chunks of {self.chunk_size} tokens, got shape {tuple(tokens.shape)}")
        h = self.embedding(tokens)  # [..., K, d]
        for block in self.enc_token_blocks:
            h = block(h)
        h = self.enc_compress(h.flatten(-2))  # [..., K*d] -> [..., d]
        for block in self.enc_chunk_blocks:
            h = block(h)
        mu, log_sigma = self.to_posterior(self.enc_norm(h)).chunk(2, dim=-1)  # 2 x [..., l]
        if not self.cfg.log_sigma_clamp:
            return mu, log_sigma
        return mu, log_sigma.clamp(LOG_SIGMA_MIN, LOG_SIGMA_MAX)

    def decode_trunk(self, z: torch.Tensor) -> torch.Tensor:
        """The chunk-level part of the decoder. z: [..., l] -> token states [..., K, d] before the
        per-token blocks (which act on each position alone: ``decode_position``)."""
        h = self.dec_in(z)  # [..., d]
        for block in self.dec_chunk_blocks:
            h = block(h)
        return self.dec_expand(h).unflatten(-1, (self.chunk_size, -1))  # [..., K*d] -> [..., K, d]

    def token_states(self, h: torch.Tensor) -> torch.Tensor:
        """Per-token blocks + final norm. h: [..., d] trunk states (any positions) -> [..., d]."""
        for block in self.dec_token_blocks:
            h = block(h)
        return self.dec_norm(h)

    def decode_states(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised token states before the output matrix. z: [..., l] -> [..., K, d]."""
        return self.token_states(self.decode_trunk(z))

    def decode_position(self, h: torch.Tensor, stats: dict | None = None) -> torch.Tensor:
        """Greedy tokens of trunk states at any positions. h: [..., d] (from ``decode_trunk``) -> [...]."""
        return projection_argmax(self.token_states(h), self.embedding.weight, self.cfg.argmax_screen, stats)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Token logits of each latent. z: [..., l] -> [..., K, V] (in the compute dtype)."""
        return F.linear(self.decode_states(z), self.embedding.weight)  # tied output matrix

    def decode(self, z: torch.Tensor, stats: dict | None = None) -> torch.Tensor:
        """Greedy reconstruction. z: [..., l] -> tokens [..., K], the argmax of ``decode_logits`` (the same
        tokens, computed with the bf16 screen of ``models/argmax.py`` where ``cfg.argmax_screen`` selects it)."""
        return self.decode_position(self.decode_trunk(z), stats)

    # ------------------------------------------------------------------ training objective
    def mask_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Input token masking (training mode only): each id independently becomes ``mask_token_id``
        with probability ``token_mask_prob``. tokens: [..., K] -> [..., K]; identity in eval mode."""
        p = self.cfg.token_mask_prob
        if not self.training or p <= 0.0:
            return tokens
        mask_id = self.cfg.mask_token_id
        mask = torch.rand(tokens.shape, device=tokens.device) < p
        return torch.where(mask, torch.full_like(tokens, mask_id), tokens)

    def _check_mask_token_id(self) -> None:
        if self.cfg.token_mask_prob <= 0.0:
            return
        mask_id = self.cfg.mask_token_id
        if mask_id is None or isinstance(mask_id, bool) or not isinstance(mask_id, int):
            raise ValueError(
                "AutoencoderConfig.mask_token_id must be set to an int (the tokenizer's mask id) before "
                f"training with token_mask_prob={self.cfg.token_mask_prob}; got {mask_id!r}"
            )
        if not 0 <= mask_id < self.cfg.vocab_size:
            raise ValueError(f"mask_token_id={mask_id} is outside the vocabulary [0, {self.cfg.vocab_size})")

    def forward(self, tokens: torch.Tensor) -> AutoencoderOutput:
        """Training objective of a batch of chunks. tokens: [B, K] -> AutoencoderOutput (see there).

        z = mu + sigma * eps is sampled in both modes (the ELBO's reconstruction term); masking and
        latent dropout happen only in training mode. For a deterministic reconstruction use
        ``decode(encode(tokens)[0])``.
        """
        self._check_mask_token_id()
        mu, log_sigma = self.encode(self.mask_tokens(tokens))  # [B, l] each
        z = mu + torch.exp(log_sigma) * torch.randn_like(mu)  # [B, l], reparameterised
        z_in = F.dropout(z, p=self.cfg.latent_dropout, training=self.training)
        K = self.chunk_size
        if self.cfg.fused_ce:  # labels: the unmasked ids
            states = self.decode_states(z_in).flatten(0, -2)  # [B*K, d]
            ce_sum, _ = linear_cross_entropy(states, self.embedding.weight, tokens.flatten())
            ce = ce_sum * (K / tokens.numel())  # summed over a chunk's K tokens, averaged over chunks
            logits = None
        else:
            logits = self.decode_logits(z_in)  # [B, K, V]
            ce = F.cross_entropy(logits.float().flatten(0, -2), tokens.flatten()) * K
        kl = gaussian_kl_per_dim(mu, log_sigma).flatten(0, -2)  # [B, l] per chunk and dimension
        reduction = self.cfg.kl_clip_reduction
        loss = ce + self.cfg.beta * clipped_kl(kl, self.cfg.kl_clip, reduction)
        kl_per_dim = kl.mean(0)  # [l], batch mean
        return AutoencoderOutput(
            loss=loss,
            ce=ce,
            kl=kl_per_dim.sum(),
            kl_per_dim=kl_per_dim,
            active_dims=active_dims(kl, self.cfg.kl_clip, reduction),
            logits=logits,
            mu=mu,
            log_sigma=log_sigma,
            z=z,
        )
