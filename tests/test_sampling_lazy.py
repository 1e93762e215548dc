"""Lazy candidate decoding for the batch sampler: the same counts and the same picks as a full decode,
with less decoding (sampling/lazy.py)."""

from __future__ import annotations

import pytest
import torch

from calm_lightning.sampling.lazy import (
    LazyChunks,
    lazy_batch_temperature_sample,
    lazy_chunk_counts,
    lazy_prefix_tokens,
)
from calm_lightning.sampling.temperature import batch_temperature_sample, unique_counts


def fake_lazy(tokens: torch.Tensor) -> LazyChunks:
    """LazyChunks over known tokens [C, N, K]: the 'trunk' carries each token, decoding reads it back."""
    return LazyChunks(tokens.unsqueeze(-1).double(), lambda h: h[:, 0].long())


@pytest.mark.parametrize("vocab, k", [(2, 4), (3, 3), (50, 4), (8192, 2)])
def test_lazy_counts_equal_a_full_decode(vocab, k):
    g = torch.Generator().manual_seed(vocab + k)
    tokens = torch.randint(0, vocab, (30, 64, k), generator=g)
    tokens[:, 32:] = tokens[:, :1]  # half of every row repeats one chunk: groups of every size
    group, size = lazy_chunk_counts(fake_lazy(tokens))
    full = unique_counts(tokens)
    assert torch.equal(size.gather(-1, group), full.count)
    # same partition: equal group <-> equal chunk
    assert torch.equal(group.unsqueeze(-1) == group.unsqueeze(-2), full.group.unsqueeze(-1) == full.group.unsqueeze(-2))


def test_lazy_decodes_only_what_tells_candidates_apart():
    tokens = torch.tensor([[[1, 5, 5], [2, 5, 5], [3, 5, 6], [3, 5, 7]]])  # [1, 4, 3]
    lazy = fake_lazy(tokens)
    group, size = lazy_chunk_counts(lazy)
    # position 0 for all 4; positions 1 and 2 only for the two candidates starting with 3
    assert lazy.decoded == 4 + 2 + 2
    assert sorted(size[0, size[0] > 0].tolist()) == [1, 1, 1, 1]
    flat = torch.randint(0, 8192, (8, 200, 4), generator=torch.Generator().manual_seed(0))
    lazy = fake_lazy(flat)
    lazy_chunk_counts(lazy)
    assert lazy.decoded < 8 * 200 * 1.2  # flat: almost every candidate is alone after one position


@pytest.mark.parametrize("temperature", [0.5, 1 / 3, 0.4, 0.25])
def test_lazy_batch_sampler_picks_what_the_full_one_picks(temperature):
    """Same candidates, same generator seed: the same chunk per context (the groups come out in the
    full sort's order, so the one uniform per context lands on the same chunk)."""
    g = torch.Generator().manual_seed(int(temperature * 100))
    tokens = torch.randint(0, 4, (500, 40, 3), generator=g)
    tokens[:, 20:30] = tokens[:, :1]
    full, full_info = batch_temperature_sample(tokens, temperature, generator=torch.Generator().manual_seed(9))
    lazy, lazy_info = lazy_batch_temperature_sample(fake_lazy(tokens), temperature, torch.Generator().manual_seed(9))
    assert torch.equal(lazy, full)
    assert torch.equal(lazy_info.level, full_info.level) and torch.equal(lazy_info.max_count, full_info.max_count)
    assert torch.equal(lazy_info.num_distinct, full_info.num_distinct)
    assert lazy_info.positions_decoded < 500 * 40 * 3
    # the chosen index is a candidate of the chosen chunk
    assert torch.equal(tokens[torch.arange(500), lazy_info.index], lazy)


def prefix_indicators(samples: torch.Tensor, targets: torch.Tensor, max_n: int):
    """1{x_s[:n] = y[:n]} [C, S, max_n] and 1{x_s[:n] = x_t[:n]} [C, S, S, max_n] by brute force."""
    hit = (samples[..., :max_n] == targets[:, None, :max_n]).int().cumprod(-1)
    pair = (samples[:, :, None, :max_n] == samples[:, None, :, :max_n]).int().cumprod(-1)
    return hit, pair


@pytest.mark.parametrize("vocab, max_n, S", [(2, 4, 2), (3, 4, 8), (3, 2, 5), (40, 3, 16)])
def test_lazy_prefix_tokens_keep_every_brier_indicator(vocab, max_n, S):
    g = torch.Generator().manual_seed(vocab * 10 + S)
    samples = torch.randint(0, vocab, (400, S, 4), generator=g)
    targets = torch.randint(0, vocab, (400, 4), generator=g)
    samples[:100, 0] = targets[:100]  # some samples equal the target, some pairs equal each other
    samples[100:200, 1] = samples[100:200, 0]
    lazy = fake_lazy(samples)
    out = lazy_prefix_tokens(lazy, targets, max_n)
    for got, want in zip(prefix_indicators(out, targets, max_n), prefix_indicators(samples, targets, max_n)):
        assert torch.equal(got, want)
    assert lazy.decoded <= 400 * S * max_n
    if vocab >= 10:  # most samples are told apart by their first token: far fewer positions decoded
        assert lazy.decoded < 0.6 * 400 * S * max_n


@pytest.mark.parametrize("max_n, S", [(4, 2), (2, 8)])
def test_calm_brier_sums_equal_with_lazy_decoding(max_n, S):
    """calm_rollout_estimate (K >= max_n: lazy decode) against the full-decode draw, same seed."""
    from calm_lightning.metrics.estimators import _calm_draw, calm_rollout_estimate
    from test_generate import tiny_calm

    model = tiny_calm().eval()
    V = model.autoencoder.cfg.vocab_size
    tokens = torch.randint(0, V, (3, 8 * model.chunk_size), generator=torch.Generator().manual_seed(0))
    lazy = calm_rollout_estimate(model, tokens, max_n, torch.Generator().manual_seed(4), num_samples=S)
    full_draw = _calm_draw(model, torch.Generator().manual_seed(4), S)
    full = calm_rollout_estimate(model, tokens, max_n, draw=full_draw, num_samples=S)
    assert torch.equal(lazy[0], full[0]) and torch.equal(lazy[1], full[1])
