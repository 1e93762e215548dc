"""Exact Brier-n of the unigram and bigram floors against brute-force enumeration."""

from __future__ import annotations

import itertools

import pytest
import torch

from calm_lightning.metrics.floors import CountModel, floor_brier

V = 5


def brute_force(stream: torch.Tensor, tokens: torch.Tensor, max_n: int, unit: int, kind: str):
    """Brier-n = 2 P(y) - sum_x P(x)^2 by enumerating every n-gram, per block."""
    uni = torch.bincount(stream, minlength=V).double()
    uni /= uni.sum()
    pairs = torch.zeros(V, V, dtype=torch.float64)
    for a, b in zip(stream[:-1].tolist(), stream[1:].tolist()):
        pairs[a, b] += 1
    rows = pairs.sum(1, keepdim=True)
    bigram = torch.where(rows > 0, pairs / rows.clamp_min(1), uni.expand(V, V))  # back-off rows

    def prob(seq, ctx):
        p, prev = 1.0, ctx
        for x in seq:
            p *= float(uni[x] if kind == "unigram" else bigram[prev, x])
            prev = x
        return p

    B, T = tokens.shape
    sums = torch.zeros(B, max_n, dtype=torch.float64)
    counts = torch.zeros(B, max_n, dtype=torch.long)
    for b in range(B):
        for cp in range(unit - 1, T - 1, unit):
            ctx = int(tokens[b, cp])
            for n in range(1, max_n + 1):
                if cp + n > T - 1:
                    continue
                y = tokens[b, cp + 1 : cp + 1 + n].tolist()
                collision = sum(prob(x, ctx) ** 2 for x in itertools.product(range(V), repeat=n))
                sums[b, n - 1] += 2 * prob(y, ctx) - collision
                counts[b, n - 1] += 1
    return sums, counts


@pytest.mark.parametrize("kind", ["unigram", "bigram"])
@pytest.mark.parametrize("unit", [1, 2, 4])
def test_floors_match_enumeration(kind, unit):
    gen = torch.Generator().manual_seed(0)
    stream = torch.randint(0, 4, (300,), generator=gen)  # token 4 never occurs: a backed-off context
    model = CountModel.fit(stream, V, max_n=3)
    tokens = torch.tensor([[0, 1, 4, 2, 3, 3, 1, 0, 2], [4, 4, 0, 1, 2, 3, 0, 1, 1]])
    sums, counts = floor_brier(model, tokens, 3, unit, kind)
    want_sums, want_counts = brute_force(stream, tokens, 3, unit, kind)
    assert torch.equal(counts, want_counts)
    torch.testing.assert_close(sums, want_sums, rtol=0, atol=1e-12)


def test_bigram_floor_is_perfect_on_a_deterministic_cycle():
    stream = torch.arange(4).repeat(50)  # 0 1 2 3 0 1 ...: every next token is certain
    model = CountModel.fit(stream, V, max_n=4)
    sums, counts = floor_brier(model, stream[:40].view(2, 20), 4, 1, "bigram")
    torch.testing.assert_close(sums / counts, torch.ones(2, 4, dtype=torch.float64))
    uni_sums, _ = floor_brier(model, stream[:40].view(2, 20), 4, 1, "unigram")
    torch.testing.assert_close(uni_sums[:, 0] / counts[:, 0], torch.full((2,), 2 * 0.25 - 0.25, dtype=torch.float64))
