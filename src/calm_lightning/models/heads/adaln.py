"""The conditional MLP with adaLN shared by the flow and diffusion heads (CALM.md section 3, MAR/DiT style).

Written once; each head decides what x and t mean (flow: x_t and t in [0, 1] scaled; diffusion: x_t
and the integer timestep) and how many outputs it needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from calm_lightning.models.layers import timestep_embedding


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift (scale 0 at initialisation = identity)."""
    return x * (1 + scale) + shift


class SharedTimestepSampling:
    """Mixin for heads that sample through ``AdaLNMLP`` with one timestep per solver step: their FLOPs at
    sampling are ``param_split(..., sampling=True)`` (the time MLP leaves the per-evaluation count)."""

    @classmethod
    def sample_param_split(cls, cfg, hidden_size: int, latent_size: int, num_backbone_layers: int) -> tuple[int, int]:
        return cls.param_split(cfg, hidden_size, latent_size, num_backbone_layers, sampling=True)


class AdaLNBlock(nn.Module):
    """x + gate * MLP(LN(x) * (1 + scale) + shift), (shift, scale, gate) = Linear(SiLU(y)); no-affine LN."""

    def __init__(self, width: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.modulation = nn.Linear(width, 3 * width)

    def forward(self, x: torch.Tensor, y_act: torch.Tensor) -> torch.Tensor:
        """x: [..., w], y_act = SiLU(y): broadcastable to x (e.g. [G, 1, w] for x [G, S, w]) -> x's shape."""
        shift, scale, gate = self.modulation(y_act).chunk(3, dim=-1)
        return x + gate * self.mlp(_modulate(self.norm(x), shift, scale))


class AdaLNMLP(nn.Module):
    """Conditional denoiser/velocity MLP: (x[B, l], t[B], h[B, D]) -> [B, out_size].

    Input Linear(l -> w); y = MLP(sinusoidal(t)) + Linear(h) (``embed_condition``, computed once per
    position; ``forward`` takes its output); num_blocks AdaLNBlocks; final adaLN
    (shift, scale) on a no-affine LN -> Linear(w -> out_size). Every adaLN modulation linear and the output
    linear are zero-initialised (CALM.md section 3), so the net starts as the constant 0 and each block
    as the identity. The sinusoidal embedding uses w frequencies (no separate constant).
    """

    def __init__(
        self,
        latent_size: int,
        cond_size: int,
        width: int,
        num_blocks: int,
        out_size: int | None = None,
        eps: float = 1e-5,
    ):
        super().__init__()
        self.width = width
        self.input_proj = nn.Linear(latent_size, width)
        self.time_embed = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.cond_proj = nn.Linear(cond_size, width)
        self.blocks = nn.ModuleList(AdaLNBlock(width, eps) for _ in range(num_blocks))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=eps)
        self.final_modulation = nn.Linear(width, 2 * width)
        self.out_proj = nn.Linear(width, out_size or latent_size)
        self.reset_parameters()

    @staticmethod
    def param_split(
        latent_size: int, cond_size: int, width: int, num_blocks: int, out_size: int, sampling: bool = False
    ) -> tuple[int, int]:
        """Parameters as (the condition projection, run once per position by ``embed_condition``; the
        rest, run per evaluation). Every Linear has a bias; the LayerNorms have no affine. ``sampling``:
        one timestep for every row (``forward`` with t of size 1), so the time MLP runs once per solver
        step for the whole batch and is not counted per evaluation."""
        w = width
        block = 2 * (w * w + w) + (w * 3 * w + 3 * w)  # MLP w -> w -> w, modulation w -> 3w
        per_eval = sum(
            [
                latent_size * w + w,  # input_proj
                0 if sampling else 2 * (w * w + w),  # time_embed MLP
                num_blocks * block,
                w * 2 * w + 2 * w,  # final_modulation
                w * out_size + out_size,  # out_proj
            ]
        )
        return cond_size * w + w, per_eval

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in [b.modulation for b in self.blocks] + [self.final_modulation, self.out_proj]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def embed_condition(self, cond: torch.Tensor, repeats: int = 1) -> torch.Tensor:
        """Linear(h), computed once per position and then repeated: cond [P, D] -> [P*repeats, w].

        Heads replicate each position N times (training) or S times (sampling) and sampling calls the
        net once per solver step, so projecting before repeating saves (N - 1)/N of this matmul.
        """
        return self.cond_proj(cond.to(self.cond_proj.weight.dtype)).repeat_interleave(repeats, dim=0)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond_emb: torch.Tensor) -> torch.Tensor:
        """x: [B, l]; t: [B] float timesteps, or [1] (one timestep for every row); cond_emb: [G, w] from
        ``embed_condition``, G dividing B: row b is conditioned on cond_emb[b // (B / G)] -> [B, out_size].

        With one timestep the condition path (time MLP, every adaLN modulation) depends on the condition
        alone, so it runs on the G distinct conditions and is broadcast over the B / G rows of each: the
        same function with B / G times fewer of those matmuls (sampling: one t per solver step, S
        samples per position). With a timestep per row, cond_emb is repeated to B rows first.
        """
        dtype = self.input_proj.weight.dtype
        B, G = x.shape[0], cond_emb.shape[0]
        if B % G:
            raise ValueError(f"{G} conditions do not divide {B} rows")
        if t.numel() != 1 and G != B:
            cond_emb, G = cond_emb.repeat_interleave(B // G, dim=0), B
        y = self.time_embed(timestep_embedding(t.reshape(-1), self.width).to(dtype))  # [G or 1, w]
        y_act = F.silu(y + cond_emb).unsqueeze(1)  # [G, 1, w]
        h = self.input_proj(x.to(dtype)).view(G, B // G, -1)  # [G, B/G, w]
        for block in self.blocks:
            h = block(h, y_act)
        shift, scale = self.final_modulation(y_act).chunk(2, dim=-1)
        return self.out_proj(_modulate(self.final_norm(h), shift, scale)).view(B, -1)
