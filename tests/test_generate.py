"""Batched KV-cached generation: cache == recomputation, padding invariance, EOS, alignment, context."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from calm_lightning.errors import CalmError
from calm_lightning.models.autoencoder import ChunkAutoencoder
from calm_lightning.models.calm import CALM
from calm_lightning.models.config import AutoencoderConfig, BackboneConfig, HeadConfig
from calm_lightning.models.token_lm import TokenLM
from calm_lightning.sampling import generate as generate_mod
from calm_lightning.sampling.generate import GenerationConfig, align_prompts, generate
from calm_lightning.sampling.temperature import temperature_sample

V, K, LATENT = 40, 4, 8
EOS = 0  # the fill / end-of-text id in these tests


def backbone_cfg(max_seq_len: int) -> BackboneConfig:
    return BackboneConfig(n_layers=2, d_model=32, n_heads=4, ffn_size=64, max_seq_len=max_seq_len)


def tiny_token_lm(max_seq_len: int = 64) -> TokenLM:
    torch.manual_seed(0)
    model = TokenLM(backbone_cfg(max_seq_len), V)
    nn.init.normal_(model.lm_head.weight, std=0.5)  # peaked enough that draws are not uniform noise
    return model.eval()


def tiny_calm(max_seq_len: int = 16) -> CALM:
    torch.manual_seed(0)
    ae = ChunkAutoencoder(
        AutoencoderConfig(
            vocab_size=V, chunk_size=K, latent_size=LATENT, d_model=16, ffn_size=32, mask_token_id=V - 1
        )
    )
    head = HeadConfig(name="energy", num_samples=2)
    head.energy.noise_size, head.energy.num_target_samples = 4, 4
    model = CALM(backbone_cfg(max_seq_len), head, ae)
    # The energy head's output layer starts at zero (every sample the same latent): randomise it so
    # that samples depend on the noise and the hidden state.
    nn.init.normal_(model.head.out_proj.weight, std=1.0)
    nn.init.normal_(model.head.out_proj.bias, std=1.0)
    return model.eval()


def prompts_of(lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, V, (n,), generator=g).tolist() for n in lengths]


def deterministic_calm(model: CALM) -> CALM:
    """Replace the head's random draw by a fixed function of the hidden state (a deterministic rule)."""
    proj = torch.randn(model.backbone_cfg.d_model, LATENT, generator=torch.Generator().manual_seed(3)) * 3

    def sample_chunks(hidden, num_samples=1, generator=None):
        tokens = model.autoencoder.decode(hidden.float() @ proj)  # [P, K]
        return tokens[:, None].expand(-1, num_samples, -1)  # [P, S, K]

    model.sample_chunks = sample_chunks
    return model


@pytest.fixture
def argmax_tokens(monkeypatch):
    """The baseline picks the most likely token: a deterministic rule."""
    monkeypatch.setattr(
        generate_mod, "sample_next_tokens", lambda logits, t, g: logits.argmax(-1, keepdim=True)
    )


# ---------------------------------------------------------------------------------------------------
# KV cache == recomputation without a cache, with the same random draws


def reference_generate(model, prompts, cfg: GenerationConfig, generator) -> list[list[int]]:
    """No cache: rerun the full forward on the whole sequence every step (equal-length prompts only)."""
    seq = torch.tensor(prompts)  # [B, T]
    start = seq.shape[1]
    for _ in range(-(-cfg.max_new_tokens // (model.chunk_size if isinstance(model, CALM) else 1))):
        if isinstance(model, CALM):
            h = model.hidden_states(seq)[:, -1]  # [B, D]

            def draw(ctx, n, h=h):
                return model.sample_chunks(h.index_select(0, ctx), num_samples=n, generator=generator)

            nxt, _ = temperature_sample(
                draw,
                len(prompts),
                cfg.temperature,
                sampler=cfg.sampler,
                num_candidates=cfg.num_candidates,
                max_draws=cfg.max_draws,
                generator=generator,
            )
        else:
            probs = torch.softmax(model(seq)[:, -1] / cfg.temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
        seq = torch.cat([seq, nxt], dim=1)
    return seq[:, start : start + cfg.max_new_tokens].tolist()


@pytest.mark.parametrize(
    "kind, temperature, sampler",
    [
        ("token", 1.0, "batch"),
        ("token", 0.5, "batch"),
        ("calm", 1.0, "batch"),
        ("calm", 0.5, "batch"),
        ("calm", 0.5, "exact"),
        ("calm", 0.5, "auto"),
    ],
)
def test_kv_cache_equals_recomputation(kind, temperature, sampler):
    model = tiny_token_lm() if kind == "token" else tiny_calm()
    prompts = prompts_of([8, 8, 8])
    cfg = GenerationConfig(
        max_new_tokens=24, temperature=temperature, sampler=sampler, num_candidates=16, max_draws=64
    )
    out = generate(model, prompts, cfg, fill_id=EOS, generator=torch.Generator().manual_seed(7))
    ref = reference_generate(model, prompts, cfg, torch.Generator().manual_seed(7))
    assert out.tokens == ref
    assert out.steps == -(-24 // (K if kind == "calm" else 1))
    assert len({tuple(t) for t in out.tokens}) == 3  # the rows really differ: the check is not vacuous
    if kind == "calm" and temperature < 1:
        assert len(out.stats) == out.steps and out.stats[0]["sampler"] == sampler


# ---------------------------------------------------------------------------------------------------
# Left padding: a prompt continues the same in a mixed batch as alone


@pytest.mark.parametrize("kind", ["token", "calm"])
def test_mixed_lengths_match_each_prompt_alone(kind, argmax_tokens):
    model = tiny_token_lm() if kind == "token" else deterministic_calm(tiny_calm())
    prompts = prompts_of([3, 13, 1, 8, 0])
    cfg = GenerationConfig(max_new_tokens=10)  # not a multiple of K: the last chunk is cut
    out = generate(model, prompts, cfg, fill_id=EOS)
    alone = [generate(model, [p], cfg, fill_id=EOS).tokens[0] for p in prompts]
    assert out.tokens == alone
    assert all(len(t) == 10 for t in out.tokens)
    assert len({tuple(t) for t in out.tokens}) > 1


def test_prompt_is_left_completed_with_end_of_text():
    model = deterministic_calm(tiny_calm())
    cfg = GenerationConfig(max_new_tokens=8)
    p = prompts_of([5])[0]
    assert align_prompts([p, [], [1] * 8], K, EOS) == [[EOS] * 3 + p, [EOS] * K, [1] * 8]
    assert (
        generate(model, [p], cfg, fill_id=EOS).tokens
        == generate(model, [[EOS] * 3 + p], cfg, fill_id=EOS).tokens
    )
    assert (
        generate(model, [[]], cfg, fill_id=EOS).tokens
        == generate(model, [[EOS] * K], cfg, fill_id=EOS).tokens
    )


# ---------------------------------------------------------------------------------------------------
# Stopping


def _truncate_at(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


@pytest.mark.parametrize("kind", ["token", "calm"])
def test_eos_stops_each_row_where_it_first_appears(kind, argmax_tokens):
    model = tiny_token_lm() if kind == "token" else deterministic_calm(tiny_calm())
    prompts = prompts_of([4, 9, 6, 12], seed=5)
    cfg = GenerationConfig(max_new_tokens=16)
    free = generate(model, prompts, cfg, fill_id=EOS).tokens
    # Use as "eos" a token one row emits mid-way (mid-chunk for CALM) and some other row not as early,
    # so rows stop at different steps and the survivors go on in a smaller batch.
    eos = next(
        t
        for row in free
        for j, t in enumerate(row[:-2])
        if t not in row[:j]
        and (kind == "token" or j % K != K - 1)
        and len({len(_truncate_at(r, t)) for r in free}) > 1
    )
    expected = [_truncate_at(row, eos) for row in free]
    seen: list[list[int]] = [[] for _ in prompts]

    def on_step(gained):
        for b, piece in enumerate(gained):
            seen[b].extend(piece)

    out = generate(
        model, prompts, GenerationConfig(max_new_tokens=16, eos_id=eos), fill_id=EOS, on_step=on_step
    )
    assert out.tokens == expected == seen
    assert any(len(t) < 16 for t in out.tokens) and all(len(t) <= 16 for t in out.tokens)


def test_all_rows_at_eos_end_the_loop(monkeypatch):
    model = tiny_token_lm()
    monkeypatch.setattr(
        generate_mod, "sample_next_tokens", lambda logits, t, g: torch.full((logits.shape[0], 1), 7)
    )
    out = generate(model, prompts_of([3, 5]), GenerationConfig(max_new_tokens=20, eos_id=7), fill_id=EOS)
    assert out.tokens == [[7], [7]] and out.steps == 1

    calm = tiny_calm()
    calm.sample_chunks = lambda h, num_samples=1, generator=None: torch.tensor([5, 7, 6, 7]).expand(
        h.shape[0], num_samples, K
    )
    out = generate(calm, prompts_of([3, 8]), GenerationConfig(max_new_tokens=20, eos_id=7), fill_id=EOS)
    assert out.tokens == [[5, 7], [5, 7]] and out.steps == 1


def test_streamed_steps_add_up_to_the_output():
    model = tiny_calm()
    calls: list[list[list[int]]] = []
    out = generate(
        model,
        prompts_of([4, 7]),
        GenerationConfig(max_new_tokens=10),
        fill_id=EOS,
        generator=torch.Generator().manual_seed(0),
        on_step=calls.append,
    )
    assert len(calls) == out.steps == 3
    assert [sum((c[b] for c in calls), []) for b in range(2)] == out.tokens
    assert [len(c[0]) for c in calls] == [4, 4, 2]


# ---------------------------------------------------------------------------------------------------
# Errors


def test_context_overflow_and_bad_settings_are_calm_errors():
    lm = tiny_token_lm(max_seq_len=16)
    cfg = GenerationConfig(max_new_tokens=6)
    generate(lm, [[1] * 10], cfg, fill_id=EOS)  # 10 + 6 = 16 fits exactly
    with pytest.raises(CalmError, match="needs 17 tokens"):
        generate(lm, [[1] * 10], GenerationConfig(max_new_tokens=7), fill_id=EOS)
    with pytest.raises(CalmError, match="prompt is 16 tokens"):
        generate(lm, [[1] * 16, [1]], cfg, fill_id=EOS)

    calm = tiny_calm(max_seq_len=8)
    generate(calm, [[1] * 18], GenerationConfig(max_new_tokens=12), fill_id=EOS)  # 5 + 3 = 8 chunks
    with pytest.raises(CalmError, match="needs 9 chunks"):
        generate(calm, [[1] * 18], GenerationConfig(max_new_tokens=13), fill_id=EOS)
    with pytest.raises(CalmError, match=r"prompt is 32 tokens \(8 chunks"):
        generate(calm, [[1] * 29], GenerationConfig(max_new_tokens=1), fill_id=EOS)

    for bad, match in [
        (GenerationConfig(temperature=0.0), "temperature"),
        (GenerationConfig(temperature=1.5), "temperature"),
        (GenerationConfig(temperature=0.25, sampler="batch", num_candidates=3), "num_candidates"),
        (GenerationConfig(sampler="greedy"), "sampler"),
        (GenerationConfig(max_new_tokens=0), "max_new_tokens"),
    ]:
        with pytest.raises(CalmError, match=match):
            generate(calm, [[1]], bad, fill_id=EOS)


def test_sampling_package_does_not_need_lightning():
    code = (
        "import sys; sys.modules['lightning'] = None; sys.modules['omegaconf'] = None; "
        "import calm_lightning.sampling.generate"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
