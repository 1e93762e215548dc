"""Batched, KV-cached generation for CALM (one K-token chunk per step) and the token baseline.

One interface for both models: ``generate(model, prompts, cfg, fill_id=...)``. CALM draws each next
chunk with the likelihood-free temperature samplers (``temperature.py``); the baseline draws each
next token from softmax(logits / T). The loop runs once per step (chunk or token) for the whole batch:
one backbone call per step, never one per row.

Prompts of different lengths share one batch by left padding with whole padding chunks. A key-padding
mask keeps every real query from attending to them, and each row's RoPE positions start at 0 on its
own first real chunk, so a prompt is continued exactly as it would be alone (up to float round-off).
Padding queries attend only to themselves, which keeps their softmax finite; nothing real reads them.

CALM reads whole chunks only. A prompt whose length is not a multiple of K is completed on the left
with the end-of-text token (``fill_id``), which the model saw in training as the boundary before a
document: the prompt then reads as "a document starting with this text", never as arbitrary filler.
A prompt with no tokens becomes one chunk of end-of-text tokens. Both rules apply to the baseline
too (K = 1, so only the empty prompt changes), so CALM and baseline see the same context.

Context: a model trained on ``max_seq_len`` positions (chunks for CALM, tokens for the baseline)
generates while the whole sequence, completed prompt plus ceil(max_new_tokens / K) new steps, fits
in ``max_seq_len``; otherwise ``generate`` raises ``CalmError`` before any model call.

Stopping: a row stops after emitting ``eos_id`` (kept as its last token; the rest of that chunk is
dropped) or after ``max_new_tokens`` tokens (a last chunk is cut to fit). Finished rows leave the
batch: their cache rows are dropped, so they cost neither backbone nor sampler work.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from calm_lightning.errors import CalmError
from calm_lightning.models.calm import CALM
from calm_lightning.models.token_lm import TokenLM
from calm_lightning.sampling.auto import AutoSampleInfo
from calm_lightning.sampling.exact import ExactSampleStats
from calm_lightning.sampling.lazy import LazyChunks, lazy_candidates
from calm_lightning.sampling.temperature import (
    SAMPLERS,
    BatchSampleInfo,
    inverse_temperature,
    temperature_sample,
)

StepCallback = Callable[[list[list[int]]], None]


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64  # tokens to add per prompt (at most)
    temperature: float = 1.0  # in (0, 1]
    sampler: str = "batch"  # CALM only: exact | batch | auto (per context, the cheaper: sampling/auto.py)
    num_candidates: int = 200  # CALM batch sampler (also auto's batch side): N, at least 1/T
    max_draws: int = 4096  # CALM exact sampler: cap on draws per context and step
    eos_id: int | None = None  # stop a row after it emits this token; None = never

    def validate(self) -> None:
        """CalmError on a value no model can use (so callers can check before loading a model)."""
        s, _, _ = inverse_temperature(self.temperature)  # T in (0, 1]
        if self.sampler not in SAMPLERS:
            raise CalmError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if self.max_new_tokens < 1:
            raise CalmError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.max_draws < 1:
            raise CalmError(f"max_draws must be >= 1, got {self.max_draws}")
        if self.sampler in ("batch", "auto") and self.num_candidates < s:
            raise CalmError(
                f"num_candidates must be >= 1/T = {s:g} for the {self.sampler} sampler at T={self.temperature:g}, "
                f"got {self.num_candidates}"
            )


@dataclass
class GenerationOutput:
    tokens: list[list[int]]  # new tokens per prompt (up to and including eos, if emitted)
    steps: int  # model steps taken (chunks for CALM, tokens for the baseline)
    stats: list[dict] = field(default_factory=list)  # per step: sampler statistics (CALM at T < 1)


def align_prompts(prompts: list[list[int]], K: int, fill_id: int) -> list[list[int]]:
    """Left-complete each prompt to a positive multiple of K with ``fill_id`` (module docstring)."""
    return [[fill_id] * ((-len(p)) % K if p else K) + list(p) for p in prompts]


def _left_pad(
    prompts: list[list[int]], K: int, pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack aligned prompts. Returns tokens [B, L*K], chunk key mask [B, L], positions [B, L]."""
    lengths = torch.tensor([len(p) // K for p in prompts])  # [B] chunks per prompt
    L = int(lengths.max())
    tokens = torch.full((len(prompts), L * K), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, L * K - len(p) :] = torch.tensor(p, dtype=torch.long)
    idx = torch.arange(L)
    start = (L - lengths)[:, None]  # [B, 1] first real chunk of each row
    key_mask = idx[None, :] >= start  # [B, L]
    positions = (idx[None, :] - start).clamp(min=0)  # [B, L], 0 on the padding too
    return tokens.to(device), key_mask.to(device), positions.to(device)


def _prefill_mask(key_mask: torch.Tensor) -> torch.Tensor:
    """Causal and key-padding mask [B, 1, L, L]; padding queries attend to themselves to stay finite."""
    L = key_mask.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=key_mask.device).tril()
    mask = causal[None] & key_mask[:, None, :]  # [B, L, L]
    mask |= torch.eye(L, dtype=torch.bool, device=key_mask.device)[None]
    return mask[:, None]


def check_context(prompt_lengths: list[int], max_new_tokens: int, K: int, max_seq_len: int) -> None:
    """CalmError unless every completed prompt plus ceil(max_new_tokens / K) steps fits in max_seq_len.

    prompt_lengths: token counts after ``align_prompts`` (multiples of K).
    """
    unit = f"chunks of K={K} tokens" if K > 1 else "tokens"
    longest = max(prompt_lengths) // K
    if longest >= max_seq_len:
        raise CalmError(
            f"prompt is {max(prompt_lengths)} tokens ({longest} {unit}) but the model's context is "
            f"{max_seq_len} {unit} (model.backbone.max_seq_len), leaving no room to generate; shorten the prompt"
        )
    total = longest + -(-max_new_tokens // K)
    if total > max_seq_len:
        raise CalmError(
            f"prompt ({longest} {unit}) plus max_new_tokens={max_new_tokens} needs {total} {unit} but the "
            f"model's context is {max_seq_len} (model.backbone.max_seq_len); shorten the prompt or max_new_tokens"
        )


def sample_next_tokens(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Token baseline: one draw of softmax(logits / T) per row. logits: [B, V] -> tokens [B, 1]."""
    probs = F.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


def _sample_next_chunks(
    model: CALM, hidden: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None
) -> tuple[torch.Tensor, dict]:
    """CALM: one chunk per row from P^(1/T) by the configured sampler. hidden: [B, D] -> tokens [B, K]."""

    def draw(context: torch.Tensor, num: int) -> torch.Tensor:  # [C'] -> [C', num, K]
        return model.sample_chunks(hidden.index_select(0, context), num_samples=num, generator=generator)

    def lazy_draw(context: torch.Tensor, num: int) -> LazyChunks:  # the same draws, decoded on demand
        return lazy_candidates(model, hidden.index_select(0, context), num, generator)

    chunks, info = temperature_sample(
        draw,
        hidden.shape[0],
        cfg.temperature,
        sampler=cfg.sampler,
        num_candidates=cfg.num_candidates,
        max_draws=cfg.max_draws,
        generator=generator,
        index_device=hidden.device,
        lazy_draw_fn=lazy_draw,
    )
    return chunks, _summarise(info)


def _summarise(info: ExactSampleStats | BatchSampleInfo | AutoSampleInfo | None) -> dict:
    """Per-step sampler statistics: ``draws_made`` (head samples drawn, every sampler), fallbacks per sampler
    kind, and ``positions_decoded`` where the batch sampler decoded lazily."""
    if isinstance(info, ExactSampleStats):
        return {
            "sampler": "exact",
            "draws_made": info.draws_made,
            "draws": int(info.draws.sum()),
            "max_draws": int(info.draws.max()),
            "exact_fallbacks": info.num_fallbacks,
        }
    if isinstance(info, BatchSampleInfo):
        return {
            "sampler": "batch",
            "draws_made": int(info.index.numel()) * int(info.num_candidates),
            "batch_fallbacks": int(info.fell_back.sum()),
            "mean_distinct": float(info.num_distinct.double().mean()),
        } | ({} if info.positions_decoded is None else {"positions_decoded": info.positions_decoded})
    if isinstance(info, AutoSampleInfo):
        exact, batch = info.exact_stats, info.batch_info
        return {
            "sampler": "auto",
            "draws_made": info.draws_made,
            "exact_contexts": int(info.exact.sum()),
            "batch_contexts": int((~info.exact).sum()),
            "exact_fallbacks": exact.num_fallbacks if exact is not None else 0,
            "batch_fallbacks": int(batch.fell_back.sum()) if batch is not None else 0,
        }
    return {}


def _forward(model: CALM | TokenLM, tokens, positions, cache, mask) -> torch.Tensor:
    """Last position's state: CALM hidden [B, D] or baseline logits [B, V]."""
    if isinstance(model, CALM):
        return model.hidden_states(tokens, positions=positions, kv_cache=cache, attn_mask=mask)[:, -1]
    return model(tokens, positions=positions, kv_cache=cache, attn_mask=mask)[:, -1]


@torch.no_grad()
def generate(
    model: CALM | TokenLM,
    prompts: list[list[int]],
    cfg: GenerationConfig,
    *,
    fill_id: int,
    generator: torch.Generator | None = None,
    on_step: StepCallback | None = None,
) -> GenerationOutput:
    """Continue each prompt (a list of token ids) by up to ``cfg.max_new_tokens`` tokens.

    ``fill_id`` completes prompts to whole chunks (module docstring), normally end-of-text. Rows stop
    individually at ``cfg.eos_id`` or the token budget; the loop ends when all have stopped.
    ``on_step(new_tokens_per_row)`` is called after every step with the tokens each prompt gained in
    it (``[]`` for rows already finished), e.g. to stream text. ``generator`` (on the model's device)
    drives every random choice. The model should be in eval mode; its mode is left as it is.
    """
    cfg.validate()
    if not prompts:
        return GenerationOutput(tokens=[], steps=0)
    is_calm = isinstance(model, CALM)
    K = model.chunk_size if is_calm else 1
    device = next(model.parameters()).device
    aligned = align_prompts(prompts, K, fill_id)
    check_context([len(p) for p in aligned], cfg.max_new_tokens, K, model.backbone.cfg.max_seq_len)
    steps_needed = -(-cfg.max_new_tokens // K)

    tokens, key_mask, positions = _left_pad(aligned, K, fill_id, device)
    B = tokens.shape[0]
    padded = bool(len({len(p) for p in aligned}) > 1)  # equal lengths: no mask, fused causal path
    cache = model.backbone.new_cache()
    state = _forward(model, tokens, positions, cache, _prefill_mask(key_mask) if padded else None)
    next_pos = positions[:, -1] + 1  # [B]

    rows = list(range(B))  # original prompt index of each live batch row
    new: list[list[int]] = [[] for _ in range(B)]
    stats: list[dict] = []
    steps = 0
    for _ in range(steps_needed):
        if is_calm:
            chunk, info = _sample_next_chunks(model, state, cfg, generator)  # [B', K]
            stats.append(info)
        else:
            chunk = sample_next_tokens(state, cfg.temperature, generator)  # [B', 1]
        steps += 1
        gained: list[list[int]] = [[] for _ in range(B)]
        keep = []  # batch rows that go on
        for i, piece in enumerate(chunk.tolist()):  # one device sync per step
            b = rows[i]
            stop = cfg.eos_id is not None and cfg.eos_id in piece
            if stop:
                piece = piece[: piece.index(cfg.eos_id) + 1]
            piece = piece[: cfg.max_new_tokens - len(new[b])]
            new[b].extend(piece)
            gained[b] = piece
            if not stop and len(new[b]) < cfg.max_new_tokens:
                keep.append(i)
        if on_step is not None:
            on_step(gained)
        if not keep:
            break
        if len(keep) < len(rows):  # finished rows leave the batch
            index = torch.tensor(keep, device=device)
            cache.select(index)
            key_mask, next_pos, chunk = key_mask[index], next_pos[index], chunk[index]
            rows = [rows[i] for i in keep]
            padded = padded and not bool(key_mask.all())
        key_mask = torch.cat([key_mask, key_mask.new_ones(len(rows), 1)], dim=1)  # [B', S+1]
        step_mask = key_mask[:, None, None, :] if padded else None  # [B', 1, 1, S+1]
        state = _forward(model, chunk, next_pos[:, None], cache, step_mask)
        next_pos = next_pos + 1
    return GenerationOutput(tokens=new, steps=steps, stats=stats)
