"""Energy head: a one-step implicit sampler trained with the energy score (CALM.md section 2).

The head maps (h, eps) to a latent, eps ~ U[-0.5, 0.5]^noise_size, so one network evaluation gives one
sample; its distribution is only known through samples, which is all the energy score needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from calm_lightning.models.heads import register_head
from calm_lightning.models.heads.base import GenerativeHead, resolve_num_blocks
from calm_lightning.models.heads.energy_loss import energy_score_loss
from calm_lightning.models.layers import SwiGLU

if TYPE_CHECKING:
    from calm_lightning.models.config import HeadConfig


@dataclass
class EnergyHeadConfig:
    """Energy-score head (CALM.md section 2): ``model.head.energy.*``."""

    noise_size: int = 64  # dimension of the uniform noise eps ~ U[-0.5, 0.5]
    num_blocks: int = 0  # residual blocks; 0 = max(1, backbone layers // 4)
    num_target_samples: int = 100  # M: posterior samples per position in the energy loss
    alpha: float = 1.0  # exponent of the distance in the energy score, strictly proper in (0, 2)
    shared_target_noise: bool = True  # one N(0, I) bank of M per batch, sign-flipped per position; False = i.i.d.
    ffn_bias: bool = False  # biases in each block's gated FFN (reference: true)
    init: str = "xavier"  # xavier (uniform) | normal: N(0, 0.02) for every Linear (reference); last Linear zero either way


class EnergyBlock(nn.Module):
    """e + SwiGLU(SiLU(Linear(SiLU(Linear([LN(e), c]))))): fuse the noise stream e with the condition c.

    As the reference block: Linear(2w -> w) -> SiLU -> Linear(w -> w) -> SiLU -> gated FFN. The SiLU
    before the SwiGLU matters: without it the second Linear and the SwiGLU's input projections
    collapse into one linear map. Params ~6 w^2: 2w^2 (fuse) + w^2 + 3w^2 (SwiGLU with hidden width w).
    """

    def __init__(self, width: int, ffn_bias: bool = False, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=eps)
        self.fuse = nn.Sequential(nn.Linear(2 * width, width), nn.SiLU(), nn.Linear(width, width))
        self.ffn = SwiGLU(width, width, bias=ffn_bias)

    def condition(self, c: torch.Tensor) -> torch.Tensor:
        """The condition's share of the fuse's first Linear, W_c c: [..., w] -> [..., w].

        Linear([LN(e), c]) = W_e LN(e) + W_c c + b, and c is the same for all N samples of a position,
        so W_c c is computed once per position and broadcast (the same weights: checkpoints unchanged).
        """
        w = c.shape[-1]
        return F.linear(c, self.fuse[0].weight[:, w:])

    def forward(self, e: torch.Tensor, c_proj: torch.Tensor) -> torch.Tensor:
        """e: [..., w]; c_proj: ``condition(c)``, broadcastable to e (e.g. [P, 1, w] for e [P, S, w])."""
        first, act, second = self.fuse
        w = e.shape[-1]
        z = F.linear(self.norm(e), first.weight[:, :w], first.bias) + c_proj
        return e + self.ffn(act(second(act(z))))


@register_head("energy")
class EnergyHead(GenerativeHead):
    """Noise + condition -> latent in one pass; loss = energy score against the AE posterior.

    noise eps[B, noise_size] -> Linear -> LN = e;  h[B, D] -> Linear -> LN = c;
    num_blocks x EnergyBlock(e, c);  LN -> Linear -> SiLU -> Linear(w -> l) (zero-initialised).
    One network evaluation per sample, so `calm compare` has nothing to sweep (one-step).
    """

    config_class = EnergyHeadConfig

    @classmethod
    def validate(cls, cfg: HeadConfig) -> list[str]:
        e = cfg.energy
        checks = [
            (e.num_target_samples >= 1, "num_target_samples", f"must be >= 1, got {e.num_target_samples}"),
            (e.noise_size >= 1, "noise_size", f"must be >= 1 (without noise the head is deterministic), got {e.noise_size}"),
            (e.init in ("xavier", "normal"), "init", f"must be xavier or normal, got {e.init!r}"),
            (0.0 < e.alpha < 2.0, "alpha", f"must be in (0, 2) to be strictly proper, got {e.alpha}"),
        ]
        return [f"{cls.key(k)}: {msg}" for ok, k, msg in checks if not ok]

    @classmethod
    def param_split(
        cls, cfg: HeadConfig, hidden_size: int, latent_size: int, num_backbone_layers: int
    ) -> tuple[int, int]:
        """cond_proj, cond_norm and each block's W_c (w^2, ``EnergyBlock.condition``) once per position;
        the rest (~6 w^2 per block) once per sample. LayerNorm: 2w; SwiGLU(w, w): 3w^2 (+ 3w with ffn_bias)."""
        D, lat, w = hidden_size, latent_size, cfg.width or hidden_size
        n, nb = cfg.energy.noise_size, resolve_num_blocks(cfg.energy.num_blocks, num_backbone_layers)
        block = 2 * w + (w * w + w) + (w * w + w) + 3 * w * w  # norm, fuse (W_e half + b), fuse[2], ffn
        if cfg.energy.ffn_bias:
            block += 3 * w  # the gated FFN's biases (w1, w3, w2: w each)
        per_position = D * w + w + 2 * w + nb * w * w  # cond_proj, cond_norm, W_c per block
        per_eval = (n * w + w + 2 * w) + nb * block + (2 * w + w * w + w) + (w * lat + lat)
        return per_position, per_eval  # noise_proj + norm, blocks, out_norm + out_hidden, out_proj

    def __init__(self, hidden_size: int, latent_size: int, cfg: HeadConfig, num_backbone_layers: int):
        super().__init__(hidden_size, latent_size, cfg, num_backbone_layers)
        w = cfg.width or hidden_size
        self.width = w
        self.noise_size = cfg.energy.noise_size
        self.noise_proj = nn.Linear(self.noise_size, w)
        eps = cfg.norm_eps
        self.noise_norm = nn.LayerNorm(w, eps=eps)
        self.cond_proj = nn.Linear(hidden_size, w)
        self.cond_norm = nn.LayerNorm(w, eps=eps)
        num_blocks = resolve_num_blocks(cfg.energy.num_blocks, num_backbone_layers)
        self.blocks = nn.ModuleList(EnergyBlock(w, cfg.energy.ffn_bias, eps) for _ in range(num_blocks))
        self.out_norm = nn.LayerNorm(w, eps=eps)
        self.out_hidden = nn.Linear(w, w)
        self.out_act = nn.SiLU()
        self.out_proj = nn.Linear(w, latent_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """xavier-uniform Linears (``energy.init=xavier``) or N(0, 0.02) (``normal``, the reference's HF
        init), zero biases, unit LayerNorms; the last Linear zero."""
        normal = self.cfg.energy.init == "normal"
        for m in self.modules():
            if isinstance(m, nn.Linear):
                if normal:
                    nn.init.normal_(m.weight, mean=0.0, std=0.02)
                else:
                    nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()
        # CALM.md section 2: the last linear starts at zero (every sample starts at the origin).
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def condition(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        """Everything that depends on h alone, once per position: hidden [..., D] -> per block W_c c
        ([..., w] each), with c = LN(Linear(h))."""
        c = self.cond_norm(self.cond_proj(hidden.to(self.cond_proj.weight.dtype)))  # [..., w]
        return [block.condition(c) for block in self.blocks]

    def generate(self, cond: list[torch.Tensor], noise: torch.Tensor) -> torch.Tensor:
        """One network evaluation per noise row. cond: ``condition(h)``, each broadcastable against
        noise's leading dims; noise: [..., noise_size] -> [..., l] float32."""
        e = self.noise_norm(self.noise_proj(noise.to(self.noise_proj.weight.dtype)))  # [..., w]
        for block, c_proj in zip(self.blocks, cond):
            e = block(e, c_proj)
        return self.out_proj(self.out_act(self.out_hidden(self.out_norm(e)))).float()

    def forward(self, hidden: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """hidden: [B, D], noise: [B, noise_size] -> latents [B, l] (float32)."""
        return self.generate(self.condition(hidden), noise)

    def _draw_noise(
        self, batch: int, device: torch.device, generator: torch.Generator | None
    ) -> torch.Tensor:
        """eps ~ U[-0.5, 0.5]^noise_size (the unit uniform, centred): [batch, noise_size] float32."""
        return torch.rand(batch, self.noise_size, generator=generator, device=device).sub_(0.5)

    def _samples(
        self, hidden: torch.Tensor, num_samples: int, generator: torch.Generator | None
    ) -> torch.Tensor:
        """hidden [P, D] -> [P, S, l]: all P*S samples in one batched pass with independent noise.

        The condition branch runs once per position (then broadcast), not once per sample.
        """
        P = hidden.shape[0]
        cond = [c.unsqueeze(1) for c in self.condition(hidden)]  # [P, 1, w] each
        noise = self._draw_noise(P * num_samples, hidden.device, generator)  # [P*S, noise_size]
        return self.generate(cond, noise.view(P, num_samples, -1))  # [P, S, l]

    def loss(self, hidden: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
        """Energy-score loss per position (CALM.md section 2; formula in ``energy_score_loss``).

        hidden: [P, D]; mu, log_sigma: [P, l] the AE posterior (treated as constants).
        N = cfg.num_samples head samples, M = cfg.energy.num_target_samples posterior samples. -> [P] float32.
        """
        samples = self._samples(hidden, self.cfg.num_samples, None)  # [P, N, l]
        sigma = log_sigma.detach().float().exp()
        e = self.cfg.energy
        return energy_score_loss(
            samples, mu, sigma, e.num_target_samples, e.alpha, shared_noise=e.shared_target_noise
        )

    def sample(
        self, hidden: torch.Tensor, num_samples: int = 1, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """hidden: [P, D] -> latents [P, S, l] (float32), one network evaluation each, batched.

        ``generator`` (on hidden's device) makes the draw reproducible.
        """
        return self._samples(hidden, num_samples, generator)
