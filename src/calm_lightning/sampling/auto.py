"""Per-context choice between the exact and the batch temperature sampler, by predicted cost.

The exact sampler (`sampling/exact.py`) costs a random number of draws whose mean is
E = (n + 1{a>0} sum_x P(x)^(s-1)) / sum_x P(x)^s (``expected_exact_draws``): about 2 / sum_x P(x)^2
at T = 1/2, so 20 draws on a peaked next-chunk distribution (collision rate 0.1) and thousands on a
flat one. The batch sampler always costs N. Every draw is a head sample decoded by the autoencoder,
so draws are the cost that matters.

``auto_temperature_sample`` takes a *pilot* of m fresh draws per context, estimates E from it, and
sends each context to whichever sampler is predicted cheaper:

- sum_x P(x)^s is estimated by sum over distinct pilot chunks of C(c, s) / C(m, s) (c = its count
  among the m pilot draws, C the generalised binomial of the batch sampler), the U-statistic of
  "s draws all equal" for integer s (unbiased) and nearly unbiased otherwise; sum_x P(x)^(s-1)
  likewise. No repeated pilot chunk means an estimate of 0 and an infinite E: batch.
- a context goes to the exact sampler when ``EXACT_OVERHEAD`` * E + ``EXACT_FIXED`` <= N: the vectorised
  exact sampler makes (and discards past each event) 1.3-1.6 draws per expected draw at T = 1/2 and 1/3
  once E >= 10 (1.5-2.2 at T = 0.4, where the Bernoulli factory restarts), and at least one block of 8
  however peaked P is (categorical toys with E from 2.5 to 900: ``benchmarks/bench_sampling.py``,
  record ``exact_overhead``). The rule is a cost model, not part of any sampler's exactness.
- both samplers then draw *fresh* samples: the pilot only decides. Reusing the pilot's draws would
  make the chosen sampler's input depend on the choice (a selection bias); fresh draws keep each
  sampler's output distribution exactly what it is alone (exact: P^(1/T) / Z_T up to its cap;
  batch: its documented approximation). The pilot costs m draws (m / N of the batch cost); where the
  caller passes ``lazy_draw_fn`` (generation does) the pilot is decoded lazily too, since the estimate
  reads only repeat counts: on a flat distribution one position per pilot draw instead of K.

So ``auto`` is never far above batch's cost (pilot) and far below it when the distribution is
peaked, and wherever it chooses exact its samples are exact rather than approximate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from calm_lightning.sampling.exact import ExactSampleStats, exact_temperature_sample
from calm_lightning.sampling.lazy import LazyChunks, batch_sample, lazy_chunk_counts
from calm_lightning.sampling.temperature import (
    BatchSampleInfo,
    DrawFn,
    LazyDrawFn,
    _relative_weights,
    _sorted_runs,
    _weight_dtype,
    inverse_temperature,
)

# Draws the exact sampler makes ~ EXACT_OVERHEAD * expected draws + EXACT_FIXED (module docstring).
EXACT_OVERHEAD = 1.5
EXACT_FIXED = 8
DEFAULT_PILOT = 16


def pilot_counts(pilot: torch.Tensor | LazyChunks) -> torch.Tensor:
    """Run lengths of each context's equal pilot chunks: [C, m] (0 = unused run id), from tokens
    [C, m, K] or from lazily decoded candidates (``lazy_chunk_counts``: the same lengths, fewer decodes)."""
    if isinstance(pilot, LazyChunks):
        return lazy_chunk_counts(pilot)[1]
    return _sorted_runs(pilot, stable=False)[2]


def estimate_power_sum(pilot: torch.Tensor | LazyChunks, s: float, counts: torch.Tensor | None = None) -> torch.Tensor:
    """Estimate sum_x P(x)^s per context from m i.i.d. draws. pilot: [C, m, K] (or ``LazyChunks``) -> float64 [C].

    sum over distinct chunks of C(c, s) / C(m, s): the batch sampler's weight ratios with m as the
    largest count (level s, no fallback since m >= s); needs m >= s (else every estimate is 0).
    ``counts``: ``pilot_counts(pilot)`` when the caller already has them.
    """
    size = pilot_counts(pilot) if counts is None else counts  # [C, m]
    m = size.shape[1]
    if m < s:
        return torch.zeros(size.shape[0], dtype=torch.float64, device=size.device)
    top = torch.full_like(size[:, :1], m)
    ratios = _relative_weights(size, top, m, s, size.device, _weight_dtype(size.device))
    return ratios.masked_fill(size == 0, 0.0).sum(-1)


def estimate_exact_draws(pilot: torch.Tensor | LazyChunks, temperature: float) -> torch.Tensor:
    """Pilot estimate of the exact sampler's expected draws per context. pilot: [C, m, K] (or
    ``LazyChunks``) -> float64 [C] (inf where no pilot chunk repeated floor(1/T) times, i.e. the
    estimated sum P^s is 0)."""
    s, n, a = inverse_temperature(temperature)
    counts = pilot_counts(pilot)  # grouped once for both power sums
    z = estimate_power_sum(pilot, s, counts)
    extra = estimate_power_sum(pilot, s - 1, counts) if a > 0 else torch.zeros_like(z)
    return torch.where(z > 0, (n + extra) / z.clamp_min(1e-300), torch.full_like(z, float("inf")))


@dataclass
class AutoSampleInfo:
    """What ``auto_temperature_sample`` did per call.

    exact: [C] bool, the context went to the exact sampler (else to the batch sampler).
    estimated_draws: [C] float64, the pilot's estimate of the exact sampler's expected draws.
    pilot: draws per context spent deciding (m).
    exact_stats: ``ExactSampleStats`` over the exact contexts (in their order), or None.
    batch_info: ``BatchSampleInfo`` over the batch contexts, or None.
    draws_made: every draw requested from ``draw_fn`` (pilot included).
    """

    exact: torch.Tensor
    estimated_draws: torch.Tensor
    pilot: int
    exact_stats: ExactSampleStats | None
    batch_info: BatchSampleInfo | None
    draws_made: int


def auto_temperature_sample(
    draw_fn: DrawFn,
    num_contexts: int,
    temperature: float,
    *,
    num_candidates: int = 200,
    pilot: int = DEFAULT_PILOT,
    max_draws: int = 100_000,
    generator: torch.Generator | None = None,
    index_device: torch.device | str | None = None,
    lazy_draw_fn: LazyDrawFn | None = None,
) -> tuple[torch.Tensor, AutoSampleInfo]:
    """One chunk per context from P^(1/T), each context by the sampler predicted cheaper (module docstring).

    draw_fn(context_index [C'], num) -> [C', num, K]; ``num_candidates`` is the batch sampler's N and the
    cost the exact sampler must beat; ``pilot`` (m) draws per context decide; ``max_draws`` caps the exact
    sampler as in ``exact_temperature_sample``; ``lazy_draw_fn`` as in ``temperature_sample`` (the batch
    side then decodes lazily). Returns chunks [C, K] and ``AutoSampleInfo``.
    """
    s, _, _ = inverse_temperature(temperature)
    pilot = max(int(pilot), math.ceil(s))  # fewer than s draws cannot show s equal ones
    contexts = torch.arange(num_contexts, device=index_device)
    # The pilot only needs its chunks' repeat counts: decoded lazily where possible (same counts)
    sample = draw_fn(contexts, pilot) if lazy_draw_fn is None else lazy_draw_fn(contexts, pilot)
    estimated = estimate_exact_draws(sample, temperature)  # [C]
    use_exact = EXACT_OVERHEAD * estimated + EXACT_FIXED <= num_candidates  # [C] on the draws' device
    chunk_size = sample.K if isinstance(sample, LazyChunks) else sample.shape[-1]
    chunks = torch.zeros(num_contexts, chunk_size, dtype=torch.long, device=estimated.device)
    draws_made = num_contexts * pilot
    exact_stats = batch_info = None

    exact_idx = use_exact.nonzero().squeeze(-1)
    if exact_idx.numel():
        sub = exact_idx.to(contexts.device)
        got, exact_stats = exact_temperature_sample(
            lambda idx, num: draw_fn(sub[idx], num),
            exact_idx.numel(),
            temperature,
            max_draws=max_draws,
            generator=generator,
            index_device=index_device,
        )
        chunks[exact_idx] = got
        draws_made += exact_stats.draws_made
    batch_idx = (~use_exact).nonzero().squeeze(-1)
    if batch_idx.numel():
        got, batch_info = batch_sample(
            draw_fn, lazy_draw_fn, batch_idx.to(contexts.device), num_candidates, temperature, generator
        )
        chunks[batch_idx] = got
        draws_made += batch_idx.numel() * num_candidates
    return chunks, AutoSampleInfo(use_exact, estimated, pilot, exact_stats, batch_info, draws_made)
