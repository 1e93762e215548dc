"""Lazy candidate decoding for the batch sampler: the same counts and the same picks as a full decode,
with less decoding (sampling/lazy.py)."""

from __future__ import annotations

import pytest
import torch

from calm_lightning.sampling.lazy import LazyChunks, lazy_batch_temperature_sample, lazy_chunk_counts
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
