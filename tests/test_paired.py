"""Paired Brier differences on shared blocks: exact on toys, calibrated, and tighter than unpaired."""

from __future__ import annotations

import math

import pytest
import torch

from calm_lightning.metrics.paired import block_estimate, paired_difference, pearson


def test_block_estimate_is_the_ratio_with_the_cr1_error():
    sums = torch.tensor([[2.0], [1.0], [3.0]])
    counts = torch.tensor([[4], [2], [4]])
    est = block_estimate(sums, counts)
    m = 6.0 / 10.0
    z = torch.tensor([2 - m * 4, 1 - m * 2, 3 - m * 4]) / 10
    assert float(est.mean) == pytest.approx(m)
    assert float(est.se) == pytest.approx(math.sqrt(1.5 * float(z.square().sum())))


def _blocks(gen, difficulty, shift, positions=32):
    """Per-block sums of a score = block difficulty + shift + noise, 0/1-ish per position."""
    p = (difficulty + shift).clamp(0.01, 0.99)  # [G]
    scores = torch.bernoulli(p[:, None].expand(-1, positions), generator=gen)
    return scores.sum(-1, keepdim=True), torch.full((p.numel(), 1), positions)


def test_paired_difference_is_calibrated_and_beats_unpaired():
    # Two models scored on the same 60 blocks whose difficulty varies a lot: the paired SE is much
    # smaller than sqrt(se_A^2 + se_B^2), and covers the true difference ~95% of the time.
    gen = torch.Generator().manual_seed(0)
    covered, ratio, reps, true_diff = 0, [], 400, 0.05
    for _ in range(reps):
        difficulty = torch.rand(60, generator=gen) * 0.8 + 0.1
        a = _blocks(gen, difficulty, true_diff)
        b = _blocks(gen, difficulty, 0.0)
        d = paired_difference(*a, *b)
        # The truth on these blocks: mean of the clamped probabilities' difference.
        truth = float(((difficulty + true_diff).clamp(0.01, 0.99) - difficulty.clamp(0.01, 0.99)).mean())
        covered += abs(float(d.diff) - truth) <= 1.96 * float(d.se)
        unpaired = math.hypot(float(block_estimate(*a).se), float(block_estimate(*b).se))
        ratio.append(float(d.se) / unpaired)
    assert 0.92 <= covered / reps <= 0.98
    assert sum(ratio) / reps < 0.5  # pairing removes the shared block difficulty


def test_paired_difference_needs_the_same_blocks_and_flags_significance():
    sums = torch.tensor([[10.0, 5.0], [12.0, 6.0], [11.0, 4.0], [9.0, 5.0]])
    counts = torch.full((4, 2), 20)
    same = paired_difference(sums, counts, sums, counts)
    assert bool((same.diff == 0).all()) and not bool(same.significant.any())
    better = paired_difference(sums + torch.tensor([[4.0, 0.0]]), counts, sums, counts)
    assert bool(better.significant[0]) and not bool(better.significant[1])
    with pytest.raises(ValueError):
        paired_difference(sums, counts, sums[:3], counts[:3])


def test_pearson():
    x = torch.arange(5.0)
    assert pearson(x, -2 * x + 1) == pytest.approx(-1.0)
    assert math.isnan(pearson(x[:2], x[:2]))
