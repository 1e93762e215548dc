"""Llama-style decoder-only Transformer shared by CALM and the token baseline (CALM.md section 2).

Pre-norm blocks (RMSNorm -> attention with RoPE -> residual; RMSNorm -> SwiGLU -> residual), no
biases, final RMSNorm. Attention runs through ``F.scaled_dot_product_attention`` with either
``is_causal`` (no cache, no mask: the fast path) or an explicit boolean mask. A ``KVCache`` makes
incremental decoding and branching (several continuations of one cached prefix) possible; a
``BranchKVCache`` makes the many short branches of Brier-n rollouts cheap (each attends only its own
keys beside the shared prefix, no mask over every branch's keys).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from calm_lightning.models.config import BackboneConfig
from calm_lightning.models.layers import RMSNorm, SwiGLU

INIT_STD = 0.02


class KVCache:
    """Keys and values of every layer: per layer k, v of shape [B, H, S, hd] (post-RoPE keys).

    ``Transformer.forward`` appends to it in place. ``select``, ``repeat_interleave`` and ``crop`` also
    work in place and return the cache itself (so both ``cache.crop(n)`` and ``c = cache.crop(n)`` work);
    call ``clone()`` first to keep the original, e.g. before branching.
    """

    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers

    @property
    def length(self) -> int:
        """S, the number of cached positions (0 when empty)."""
        k = self.keys[0]
        return 0 if k is None else k.shape[2]

    @property
    def batch_size(self) -> int | None:
        k = self.keys[0]
        return None if k is None else k.shape[0]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this block's k, v [B, H, T, hd] to ``layer``; returns all keys/values [B, H, S+T, hd]."""
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)  # [B, H, S+T, hd]
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def _apply(self, fn) -> KVCache:
        self.keys = [None if k is None else fn(k) for k in self.keys]
        self.values = [None if v is None else fn(v) for v in self.values]
        return self

    def select(self, index: torch.Tensor) -> KVCache:
        """Keep/gather batch rows: index [B'] (long; repeats allowed) -> cache of batch B'. In place."""
        return self._apply(lambda t: t.index_select(0, index.to(t.device)))

    def crop(self, length: int) -> KVCache:
        """Keep the first ``length`` cached positions. In place."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a cache of length {self.length} to {length}")
        return self._apply(lambda t: t[:, :, :length])

    def clone(self) -> KVCache:
        """A new cache holding the same tensors (they are never modified in place, so sharing is safe)."""
        other = KVCache(self.n_layers)
        other.keys, other.values = list(self.keys), list(self.values)
        return other


class BranchKVCache:
    """KV cache of batched branch rollouts: many short branches off one cached true sequence.

    Brier-n estimation (``metrics/rollout.py``) grows, from every start position j of a true
    sequence, branches a few units long, all advanced together: row i of a rollout step is one branch
    with start position ``starts[i]``, fed one new unit. Row i attends the true keys at positions <=
    starts[i] (shared by every branch, from ``prefix``) and the keys its own branch wrote at earlier
    steps, its current unit included. That is the attention a boolean mask over one concatenated
    cache would give, at O(R (L + t)) score entries per step instead of O(R (L + R t)) (R rows, L true
    keys, t steps taken), which is what makes S-branch rollouts at K = 1 affordable.

    prefix: a filled ``KVCache`` of the true sequence ([B, H, L, hd] per layer; not modified).
    Call ``start_step(starts)`` before each step: starts [R] long. The rows of a step must be the
    first R rows of the previous step's (branches only ever end, from the back), so row i's history
    is row i of the stored own keys [B, H, R_prev, t, hd].
    """

    # score entries [B, H, rows, keys] per chunk of rows: small enough to stay in cache
    max_scores = 1 << 22

    def __init__(self, prefix: KVCache):
        if prefix.length == 0:
            raise ValueError("a BranchKVCache needs the true sequence's keys in its prefix cache")
        self.prefix = prefix
        self.own_keys: list[torch.Tensor | None] = [None] * prefix.n_layers
        self.own_values: list[torch.Tensor | None] = [None] * prefix.n_layers
        self.starts: torch.Tensor | None = None
        self._chunks: dict[int, list[tuple[int, int, int]]] = {}

    @property
    def length(self) -> int:
        """L, the number of true positions (branch keys are per row and not counted)."""
        return self.prefix.length

    def start_step(self, starts: torch.Tensor) -> None:
        """Name the rows of the next step: starts [R] (long), the start position of each branch row."""
        self.starts = starts
        self._chunks = {}

    def _row_chunks(self, per_row: int) -> list[tuple[int, int, int]]:
        """(lo, hi, keys) per chunk of rows: rows lo..hi-1 need only the first ``keys`` true keys."""
        if per_row not in self._chunks:
            R, L = self.starts.shape[0], self.prefix.length
            step = max(1, self.max_scores // max(1, per_row))
            bounds = list(range(0, R, step)) + [R]
            maxima = [int(self.starts[lo:hi].max()) for lo, hi in zip(bounds[:-1], bounds[1:])]
            self._chunks[per_row] = [
                (lo, hi, min(L, m + 1)) for lo, hi, m in zip(bounds[:-1], bounds[1:], maxima)
            ]
        return self._chunks[per_row]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: [B, H, R, hd] (post-RoPE), one new unit per branch row -> y [B, H, R, hd].

        Stores k, v as each row's newest own key/value, then attends prefix + own keys: one softmax
        over both (float32), computed chunk by chunk over rows, each chunk against only the true keys
        up to its last start."""
        if self.starts is None or self.starts.shape[0] != q.shape[2]:
            raise ValueError("call start_step(starts) with one start per row before each rollout step")
        B, H, R, hd = q.shape
        own_k, own_v = k[:, :, :, None], v[:, :, :, None]  # [B, H, R, 1, hd]
        if self.own_keys[layer] is not None:
            own_k = torch.cat([self.own_keys[layer][:, :, :R], own_k], dim=3)  # [B, H, R, t, hd]
            own_v = torch.cat([self.own_values[layer][:, :, :R], own_v], dim=3)
        self.own_keys[layer], self.own_values[layer] = own_k, own_v
        pk, pv = self.prefix.keys[layer], self.prefix.values[layer]  # [B, H, L, hd]
        L, t = pk.shape[2], own_k.shape[3]
        q = q * (1.0 / math.sqrt(hd))
        key_pos = torch.arange(L, device=q.device)
        out = []
        for lo, hi, n in self._row_chunks(B * H * (L + t)):
            qc = q[:, :, lo:hi]  # [B, H, r, hd]
            scores = (qc @ pk[:, :, :n].transpose(-1, -2)).float()  # [B, H, r, n]
            scores.masked_fill_(key_pos[None, :n] > self.starts[lo:hi, None], float("-inf"))
            # own keys, t (a few) per row: product and sum (batched tiny matmuls are slow on CPU)
            own = (own_k[:, :, lo:hi] * qc[..., None, :]).sum(-1).float()  # [B, H, r, t]
            top = torch.maximum(scores.amax(-1), own.amax(-1))[..., None]  # finite: own keys always count
            scores.sub_(top).exp_()
            own = (own - top).exp()
            denom = scores.sum(-1, keepdim=True) + own.sum(-1, keepdim=True)  # [B, H, r, 1]
            y = scores.to(v.dtype) @ pv[:, :, :n] + (own.to(v.dtype)[..., None] * own_v[:, :, lo:hi]).sum(-2)
            out.append((y / denom).to(v.dtype))  # [B, H, r, hd]
        return out[0] if len(out) == 1 else torch.cat(out, dim=2)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary angles computed on the fly (no table, so no position limit), in float32.

    positions: [T] or [B, T] (any integer or float dtype) -> cos, sin of shape [..., T, hd/2].
    Frequencies theta^(-2i/hd), i = 0 .. hd/2 - 1.
    """
    inv_freq = theta ** (
        -torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    )
    angles = positions.float()[..., None] * inv_freq  # [..., T, hd/2]
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+hd/2}) by the position's angle ("rotate-half" layout), in float32.

    x: [B, H, T, hd]; cos, sin: [T, hd/2] or [B, 1, T, hd/2] -> [B, H, T, hd] in x's dtype.
    """
    x1, x2 = x.float().chunk(2, dim=-1)  # [B, H, T, hd/2] each
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
        kv_cache: KVCache | BranchKVCache | None,
        layer: int,
    ) -> torch.Tensor:
        """x: [B, T, D] -> [B, T, D]."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).unbind(2)  # 3 x [B, T, H, hd]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if isinstance(kv_cache, BranchKVCache):
            y = kv_cache.attend(layer, q, k, v)  # [B, H, T, hd], T = branch rows
        else:
            if kv_cache is not None:
                k, v = kv_cache.update(layer, k, v)  # [B, H, S+T, hd]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))  # [B, T, H*hd]


class Block(nn.Module):
    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.d_model, cfg.ffn_size)

    def forward(self, x, cos, sin, attn_mask, is_causal, kv_cache, layer):
        """x: [B, T, D] -> [B, T, D]."""
        x = x + self.attn(self.attn_norm(x), cos, sin, attn_mask, is_causal, kv_cache, layer)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    """Decoder-only Transformer over a sequence of D-dimensional inputs (embedding done by the caller)."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        if cfg.d_model % cfg.n_heads:
            raise ValueError(f"d_model={cfg.d_model} is not divisible by n_heads={cfg.n_heads}")
        if (cfg.d_model // cfg.n_heads) % 2:
            raise ValueError(f"head dim {cfg.d_model // cfg.n_heads} must be even for RoPE")
        self.cfg = cfg
        self.n_layers = cfg.n_layers
        self.head_dim = cfg.d_model // cfg.n_heads
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """normal(0, 0.02) for every linear; with ``cfg.scaled_residual_init`` (default) the two residual
        output projections of each block (attention ``proj`` and FFN ``w2``) use 0.02 / sqrt(2 * n_layers)
        so the residual stream's variance does not grow with depth (GPT-2 style; the reference code's
        HF Llama uses 0.02 throughout)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
        if not self.cfg.scaled_residual_init:
            return
        out_std = INIT_STD / math.sqrt(2 * self.n_layers)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=out_std)
            nn.init.normal_(block.ffn.w2.weight, mean=0.0, std=out_std)

    def new_cache(self) -> KVCache:
        return KVCache(self.n_layers)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        kv_cache: KVCache | BranchKVCache | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the blocks and the final norm.

        x: [B, T, D]. positions: LongTensor [T] or [B, T] fed to RoPE; default cache.length + arange(T).
        kv_cache: appended in place with this block's keys/values (S = its length before the call); or
            a ``BranchKVCache``, whose rows (T of them, one unit each) are branches of a rollout step.
        attn_mask: bool, True = may attend, broadcastable to [B, H, T, S + T]; default causal over the
            new block and full over the cache. Every query must be allowed at least one key.
        Returns [B, T, D].
        """
        B, T, _ = x.shape
        past = kv_cache.length if kv_cache is not None else 0
        branching = isinstance(kv_cache, BranchKVCache)
        if branching and (positions is None or attn_mask is not None):
            raise ValueError("a BranchKVCache step needs explicit positions and no attn_mask (it masks itself)")
        if positions is None:
            positions = torch.arange(past, past + T, device=x.device)  # [T]
        if positions.shape[-1] != T or positions.dim() not in (1, 2):
            raise ValueError(f"positions must be [T] or [B, T] with T={T}, got {tuple(positions.shape)}")
        cos, sin = rope_cos_sin(positions, self.head_dim, self.cfg.rope_theta)  # [..., T, hd/2]
        if positions.dim() == 2:
            cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, hd/2], broadcast over heads

        is_causal = False
        if branching:
            pass  # each row attends its start's true keys and its own branch (BranchKVCache.attend)
        elif attn_mask is not None:
            if attn_mask.dtype != torch.bool:
                raise ValueError(
                    f"attn_mask must be a bool tensor (True = may attend), got {attn_mask.dtype}"
                )
            attn_mask = attn_mask.to(x.device)
        elif past == 0:
            is_causal = T > 1  # the fused causal path
        elif T > 1:
            # query i (absolute index past + i) sees every cached key and new keys up to itself
            key_idx = torch.arange(past + T, device=x.device)
            query_idx = torch.arange(past, past + T, device=x.device)
            attn_mask = key_idx[None, :] <= query_idx[:, None]  # [T, S+T]
        # else: one new query with a cache attends to everything, no mask needed

        use_ckpt = (
            self.cfg.activation_checkpointing
            and self.training
            and kv_cache is None
            and torch.is_grad_enabled()
        )
        for layer, block in enumerate(self.blocks):
            if use_ckpt:
                # Never with a cache: recomputation would append the keys/values a second time.
                x = checkpoint(block, x, cos, sin, attn_mask, is_causal, None, layer, use_reentrant=False)
            else:
                x = block(x, cos, sin, attn_mask, is_causal, kv_cache, layer)
        return self.norm(x)
