"""The auto temperature sampler: its pilot estimates, its per-context choice, and exactness where it
chooses the exact sampler (sampling/auto.py)."""

from __future__ import annotations

import math

import pytest
import torch

from calm_lightning.config.schema import SAMPLERS as CONFIG_SAMPLERS
from calm_lightning.sampling import auto
from calm_lightning.sampling.auto import auto_temperature_sample, estimate_exact_draws, estimate_power_sum
from calm_lightning.sampling.exact import expected_exact_draws
from calm_lightning.sampling.temperature import SAMPLERS, temperature_sample
from test_temperature import ALPHA, ToyChunkSampler, chi_square_pvalue, tempered


def chunks_of(ids: list[list[int]]) -> torch.Tensor:
    """[C, m] outcome ids -> [C, m, 2] chunks (id, 0)."""
    t = torch.tensor(ids)
    return torch.stack([t, torch.zeros_like(t)], dim=-1)


def test_samplers_are_the_same_in_the_config_schema():
    assert CONFIG_SAMPLERS == SAMPLERS


def test_power_sum_estimate_exact_values():
    pilot = chunks_of([[0, 0, 0, 1], [0, 1, 2, 3], [5, 5, 5, 5]])
    # s = 2: sum_x C(c_x, 2) / C(4, 2): (3 + 0) / 6, 0, 6 / 6
    assert estimate_power_sum(pilot, 2.0).tolist() == pytest.approx([0.5, 0.0, 1.0], abs=1e-12)
    # s = 1: every estimate is 1 (sum of c / m)
    assert estimate_power_sum(pilot, 1.0).tolist() == pytest.approx([1.0, 1.0, 1.0], abs=1e-12)
    # s = 2.5: C(3, 2.5) / C(4, 2.5) with C(c, s) = Gamma(c+1) / (Gamma(c-s+1) Gamma(s+1))
    c = lambda k, s: math.gamma(k + 1) / (math.gamma(k - s + 1) * math.gamma(s + 1))  # noqa: E731
    assert float(estimate_power_sum(pilot[:1], 2.5)) == pytest.approx(c(3, 2.5) / c(4, 2.5), rel=1e-10)
    # draws = (n + 1{a>0} sum P^(s-1)) / sum P^s, inf where nothing repeated
    est = estimate_exact_draws(pilot, 0.5)
    assert est[0] == pytest.approx(4.0) and math.isinf(est[1]) and est[2] == pytest.approx(2.0)


@pytest.mark.parametrize("s", [2.0, 3.0, 2.5])
def test_power_sum_estimate_is_unbiased(s):
    """Mean over 4000 pilots of m = 16 draws vs sum_x P(x)^s. The plug-in sum (c/m)^s overshoots by
    ~(1 - sum P^2) / m = 4% relative at s = 2 here, ~14 standard errors: it fails this test (seen)."""
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    reps, m = 4000, 16
    sampler = ToyChunkSampler(probs.repeat(reps, 1), chunks_of([[0, 1, 2, 3]] * reps), seed=3)
    est = estimate_power_sum(sampler(torch.arange(reps), m), s)
    truth = float(probs.pow(s).sum())
    se = float(est.std()) / math.sqrt(reps)
    # s = 2 is the unbiased U-statistic; non-integer s is nearly unbiased (sampling/temperature.py)
    assert abs(float(est.mean()) - truth) < 4 * se + (0 if s == int(s) else 0.01 * truth)


def test_auto_routes_peaked_contexts_to_exact_and_flat_ones_to_batch():
    peaked = torch.zeros(1000, dtype=torch.float64)
    peaked[:3] = torch.tensor([0.7, 0.2, 0.1])
    flat = torch.full((1000,), 1e-3, dtype=torch.float64)
    probs = torch.stack([peaked, flat] * 8)
    outcomes = chunks_of([list(range(1000))] * 16)
    sampler = ToyChunkSampler(probs, outcomes, seed=0)
    chunks, info = auto_temperature_sample(sampler, 16, 0.5, num_candidates=200, generator=torch.Generator().manual_seed(1))
    assert info.exact.tolist() == [True, False] * 8
    assert info.exact_stats is not None and info.batch_info is not None
    # draws: pilot + exact's + batch's 8 x 200; exact needs ~2 / 0.54 = 3.7 draws per context
    assert info.draws_made == 16 * info.pilot + info.exact_stats.draws_made + 8 * 200
    assert info.exact_stats.draws_made < 8 * 200 / 4
    assert float(expected_exact_draws(peaked, 0.5)) == pytest.approx(2 / 0.54)
    sampler.outcome_index(chunks)  # every chunk comes from its context's support


def test_auto_is_exact_where_it_chooses_exact():
    """Contexts on the decision boundary (the pilot decides either way): those sent to the exact
    sampler must follow P^(1/T) exactly, in a chi-square test and in the top chunk's frequency (a
    two-sided z-test at ALPHA). Reusing the pilot's draws as the exact sampler's first ones fails the
    z-test (a pilot with many repeats of the top chunk both routes its context to exact and, reused,
    favours that chunk: 0.563 against 0.515, z ~ 6.7; seen with a patched sampler)."""
    probs = torch.tensor([0.14] + [0.86 / 40] * 40, dtype=torch.float64)  # sum P^2 ~ 0.038: E ~ 52
    reps = 12000
    sampler = ToyChunkSampler(probs.repeat(reps, 1), chunks_of([list(range(41))] * reps), seed=5)
    chunks, info = auto_temperature_sample(sampler, reps, 0.5, num_candidates=104,
                                           generator=torch.Generator().manual_seed(6))
    routed = info.exact
    assert 0.2 < float(routed.double().mean()) < 0.8, "not on the boundary: the test has no power"
    observed = torch.bincount(chunks[routed, 0], minlength=41)  # outcome id = first token
    target = tempered(probs, 0.5)
    total = int(routed.sum())
    assert chi_square_pvalue(observed, target * total) > ALPHA
    p_top = float(target[0])
    z = (float(observed[0]) - total * p_top) / math.sqrt(total * p_top * (1 - p_top))
    assert abs(z) < 3.29  # two-sided 1e-3


def test_auto_entry_point_and_pilot_size(monkeypatch):
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0]] * 4, dtype=torch.float64)
    sampler = ToyChunkSampler(probs, chunks_of([[0, 1, 2, 3]] * 4), seed=2)
    chunks, info = temperature_sample(sampler, 4, 0.05, "auto", num_candidates=40)
    assert info.pilot == 20  # raised to 1/T: fewer pilot draws cannot show 1/T equal ones
    assert chunks.shape == (4, 2)
    monkeypatch.setattr(auto, "EXACT_FIXED", float("inf"))  # exact never predicted cheaper
    _, info = temperature_sample(sampler, 4, 0.5, "auto", num_candidates=20)
    assert not bool(info.exact.any()) and info.exact_stats is None and info.batch_info.num_candidates == 20


def test_lazy_pilot_decides_and_samples_as_the_full_one():
    """With ``lazy_draw_fn`` the pilot is decoded lazily (sampling/lazy.py): the same draws must give the
    same estimates, the same routing and the same chunks as full decoding, with fewer positions decoded.
    Peaked and flat contexts, so both samplers run."""
    from test_sampling_lazy import fake_lazy

    peaked = torch.zeros(1000, dtype=torch.float64)
    peaked[:3] = torch.tensor([0.7, 0.2, 0.1])
    flat = torch.full((1000,), 1e-3, dtype=torch.float64)
    probs = torch.stack([peaked, flat] * 8)
    outcomes = torch.stack([torch.arange(1000) % 7, torch.arange(1000) // 7, torch.arange(1000) % 3], dim=-1)
    outcomes = outcomes.expand(16, 1000, 3)  # 3-token chunks that share first tokens: lazy must look further
    full_sampler, lazy_sampler = ToyChunkSampler(probs, outcomes, seed=4), ToyChunkSampler(probs, outcomes, seed=4)
    pilots = []

    def lazy_draw(idx, num):
        chunks = fake_lazy(lazy_sampler(idx, num))
        pilots.append(chunks)
        return chunks

    full, full_info = auto_temperature_sample(full_sampler, 16, 0.5, num_candidates=200,
                                              generator=torch.Generator().manual_seed(8))
    lazy, lazy_info = auto_temperature_sample(lazy_sampler, 16, 0.5, num_candidates=200,
                                              generator=torch.Generator().manual_seed(8), lazy_draw_fn=lazy_draw)
    assert torch.equal(lazy_info.estimated_draws, full_info.estimated_draws)
    assert lazy_info.exact.tolist() == full_info.exact.tolist() == [True, False] * 8
    assert torch.equal(lazy, full) and lazy_info.draws_made == full_info.draws_made
    assert 16 * 16 <= pilots[0].decoded < 16 * 16 * 3  # the pilot: fewer positions than a full decode
