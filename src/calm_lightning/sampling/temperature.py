"""Likelihood-free temperature sampling over whole K-token chunks (CALM paper, section 5 / CALM.md 5).

Target: P_T(x) proportional to P(x)^(1/T), T in (0, 1], using only a sampler of P. An outcome x is a
whole decoded chunk, LongTensor [K], and two outcomes are equal when all K tokens are equal. Every
function works on C contexts at once with tensor ops (no Python loop over contexts) and takes its
device from its inputs. Write s = 1/T, n = floor(s), a = s - n.

Two samplers:

- ``exact_temperature_sample`` (`sampling/exact.py`): the rejection + Bernoulli-factory algorithm. Exact for any T in
  (0, 1] but its cost is random and explodes on large supports; a per-context cap ``max_draws`` bounds it.
- ``batch_temperature_sample``: the paper's batch approximation from N candidates per context,
  extended here to non-integer s by generalised binomial weights C(c, s) (design and reasons in
  its docstring). Fixed cost, biased for finite N, consistent as N -> infinity.
- ``auto_temperature_sample`` (`sampling/auto.py`): per context, whichever of the two a small pilot
  of draws predicts cheaper (exact on peaked distributions, batch on flat ones).

``temperature_sample`` is the single entry point used by generation.

A *draw function* is ``draw_fn(context_index: LongTensor[C'], num: int) -> LongTensor[C', num, K]``:
``num`` independent samples of P for each listed context (indices into the C contexts). It owns its
randomness; the ``generator`` arguments here drive only the samplers' own coins.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch

from calm_lightning.errors import CalmError

if TYPE_CHECKING:
    from calm_lightning.sampling.auto import AutoSampleInfo
    from calm_lightning.sampling.exact import ExactSampleStats
    from calm_lightning.sampling.lazy import LazyChunks

DrawFn = Callable[[torch.Tensor, int], torch.Tensor]
LazyDrawFn = Callable[[torch.Tensor, int], "LazyChunks"]  # the same draws, undecoded (sampling/lazy.py)

SAMPLERS = ("exact", "batch", "auto")

# 1/T closer than this (relative) to an integer is snapped to it, so that T = 1/3 really is n = 3, a = 0.
_INTEGER_SNAP = 1e-9


def inverse_temperature(temperature: float) -> tuple[float, int, float]:
    """Split s = 1/T into (s, n, a) with n = floor(s), a = s - n in [0, 1); validates T in (0, 1]."""
    temperature = float(temperature)
    if not (0.0 < temperature <= 1.0) or math.isnan(temperature):
        raise CalmError(f"temperature must be in (0, 1], got {temperature}")
    s = 1.0 / temperature
    if abs(s - round(s)) <= _INTEGER_SNAP * s:
        s = float(round(s))
    n = math.floor(s)
    return s, n, s - n


def _weight_dtype(device: torch.device) -> torch.dtype:
    # Weights in float64 where the backend has it (exact worked examples, little lgamma round-off).
    return torch.float32 if device.type == "mps" else torch.float64


# ---------------------------------------------------------------------------------------------------
# Grouping identical chunks per context
# ---------------------------------------------------------------------------------------------------


class ChunkCounts(NamedTuple):
    """Identical chunks grouped per context (all [C, N] unless noted; candidate order as given).

    group: id of the candidate's group within its context, 0 .. num_groups - 1 (lexicographic order).
    count: number of candidates of the context equal to this one (its group's size).
    first_index: index of the group's representative, its first occurrence in the row.
    num_groups: [C] number of distinct chunks per context.
    """

    group: torch.Tensor
    count: torch.Tensor
    first_index: torch.Tensor
    num_groups: torch.Tensor


def _check_candidates(candidates: torch.Tensor) -> None:
    if candidates.dim() != 3 or candidates.shape[1] < 1 or candidates.is_floating_point():
        raise ValueError(
            f"candidates must be an integer tensor [C, N >= 1, K], got {tuple(candidates.shape)}"
        )


def _sort_words(candidates: torch.Tensor) -> list[torch.Tensor]:
    """Pack each chunk [K] into as few int64 words as the token range allows, most significant first.

    candidates: [C, N, K] -> list of [C, N] keys whose lexicographic order is the chunks' order, so
    equal chunks <-> equal word tuples (exact bit packing: no hashing, hence no collisions). With
    K = 4 and a vocabulary below 2^15 this is a single word.
    """
    candidates = candidates.long()
    k = candidates.shape[-1]
    lo, hi = (int(v) for v in torch.aminmax(candidates))
    if lo < 0:
        candidates, hi = candidates - lo, hi - lo  # values in [0, hi]
    bits = max(1, hi.bit_length())
    per_word = max(1, 63 // bits)  # columns packed per non-negative int64
    words = []
    for start in range(0, k, per_word):
        cols = candidates[..., start : start + per_word]  # [C, N, k']
        weights = _place_values(bits, cols.shape[-1], cols.device)
        # Integer matmul is exact (the word fits in 63 bits) and one kernel on CPU; CUDA lacks it.
        words.append(cols @ weights if cols.device.type == "cpu" else (cols * weights).sum(-1))
    return words


@functools.lru_cache(maxsize=64)
def _place_values(bits: int, width: int, device: torch.device) -> torch.Tensor:
    """[width] int64 place values 2^(bits (width - 1 - j)): token j of a word is its j-th digit."""
    return torch.tensor([1 << (bits * (width - 1 - j)) for j in range(width)], device=device)


def _sorted_runs(
    candidates: torch.Tensor, stable: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lexicographic sort of each row of chunks, cut into runs of equal chunks.

    candidates: [C, N, K]. Returns perm [C, N] (original index of each sorted slot), run [C, N] (run
    id of each sorted slot, 0 .. R-1 in sorted order) and size [C, N] (length of run r at index r,
    0 for r >= R). With ``stable`` each run's first slot holds its smallest original index; the
    sampler does without (any occurrence of a chunk is the same chunk).
    """
    words = _sort_words(candidates)
    keys, perm = words[-1].sort(dim=-1, stable=stable)
    for word in reversed(words[:-1]):  # LSD radix over words: later passes must be stable
        keys, order = word.gather(-1, perm).sort(dim=-1, stable=True)
        perm = perm.gather(-1, order)
    # After the radix passes ``keys`` is the sorted first (most significant) word; a run also ends
    # where any later word changes, so compare words[1:] (the first is already covered).
    new_run = keys[:, 1:] != keys[:, :-1]  # [C, N - 1]
    for word in words[1:]:
        sorted_word = word.gather(-1, perm)
        new_run |= sorted_word[:, 1:] != sorted_word[:, :-1]
    run = torch.nn.functional.pad(new_run.cumsum(-1), (1, 0))  # [C, N], run id per sorted slot
    size = torch.zeros_like(run).scatter_add_(-1, run, torch.ones_like(run))  # [C, N] by run id
    return perm, run, size


def unique_counts(candidates: torch.Tensor) -> ChunkCounts:
    """Group identical chunks within each context.

    candidates: LongTensor [C, N, K] (N chunks of K tokens per context). Chunks are compared as whole
    tuples. One stable sort per int64 word (tokens are bit-packed, so usually a single sort).
    Returns ``ChunkCounts`` in the candidates' own order.
    """
    _check_candidates(candidates)
    perm, run, size = _sorted_runs(candidates)
    group = torch.empty_like(run).scatter_(-1, perm, run)  # back to the candidates' order
    count = size.gather(-1, group)
    first_slot = size.cumsum(-1) - size  # [C, N] sorted slot where run r starts
    first_index = perm.gather(-1, first_slot.gather(-1, group))  # stable sort: the first occurrence
    return ChunkCounts(group, count, first_index, run[:, -1] + 1)


# ---------------------------------------------------------------------------------------------------
# Batch approximation
# ---------------------------------------------------------------------------------------------------


@dataclass
class BatchSampleInfo:
    """What the batch sampler did per context ([C] each).

    level: exponent actually used, s' = s - max(0, n - max_count); equals 1/T unless it fell back.
    fell_back: level < 1/T (no chunk was repeated floor(1/T) times).
    index: chosen candidate (an occurrence of the chosen chunk).
    max_count, num_distinct: largest repeat count and number of distinct chunks among the N candidates.
    num_candidates: N.
    positions_decoded: chunk positions the autoencoder decoded (lazy decoding, `sampling/lazy.py`;
        N K when every candidate is decoded fully), or None where not counted.
    """

    level: torch.Tensor
    fell_back: torch.Tensor
    index: torch.Tensor
    max_count: torch.Tensor
    num_distinct: torch.Tensor
    num_candidates: int = 0
    positions_decoded: int | None = None


# Largest (N + 1)^2 for which the weight table w(M, c) is cached (float64: 32 MiB); above, per call.
_MAX_WEIGHT_TABLE = 1 << 22


def _log_weight_terms(num_candidates: int, n: int, a: float, device: torch.device, dtype: torch.dtype):
    """lgamma(c + 1) for c in 0..N, and lgamma(j + 1 - a) for j in -n..N at row j + n (+inf for j < 0)."""
    log_factorial = torch.lgamma(torch.arange(1, num_candidates + 2, device=device, dtype=dtype))
    j_grid = torch.arange(-n, num_candidates + 1, device=device, dtype=dtype)
    return log_factorial, torch.lgamma(j_grid + (1 - a)).masked_fill(j_grid < 0, float("inf"))


def _relative_weights(
    count: torch.Tensor, max_count: torch.Tensor, num_candidates: int, s: float, device, dtype
) -> torch.Tensor:
    """w = C(c, level) / C(max_count, level), level = s - max(0, n - max_count); broadcasts count, max_count.

    C(c, level) > 0 iff j = c - floor(level) = c + drop - n >= 0, and then log C(c, level) =
    lgamma(c + 1) - lgamma(j + 1 - a) - lgamma(level + 1); the last term cancels in the ratio, and
    dividing by the largest weight (C(c, s) grows with c) keeps exp from overflowing.
    """
    n = math.floor(s)
    log_factorial, log_gamma_shifted = _log_weight_terms(num_candidates, n, s - n, device, dtype)
    drop = (n - max_count).clamp_min(0)  # whole steps down the fallback cascade
    top = log_factorial.take(max_count) - log_gamma_shifted.take(max_count + drop)
    return (log_factorial.take(count) - log_gamma_shifted.take(count + drop) - top).exp()


@functools.lru_cache(maxsize=16)
def _weight_table(num_candidates: int, s: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """w(M, c) for M, c in 0..N, flattened [(N + 1)^2]: a chunk's weight depends only on its count c
    and on its context's largest count M (which fixes the level), so one lookup replaces the lgamma
    and exp work per candidate."""
    grid = torch.arange(num_candidates + 1, device=device)
    table = _relative_weights(grid.unsqueeze(0), grid.unsqueeze(1), num_candidates, s, device, dtype)
    return table.masked_fill(grid.unsqueeze(0) > grid.unsqueeze(1), 0.0).flatten()  # c <= M only


def _run_weights(size: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weights per run, C(c, level) / C(max_count, level) in [0, 1], from the run sizes.

    size: [C, N] run lengths by run id (0 = unused id, weight 0). Returns weights [C, N], level [C]
    and max_count [C]. The same ratios as C(c, level) / C(max_count, level) with generalised binomials
    (tests/test_temperature.py checks them against an lgamma reference).
    """
    s, n, _ = inverse_temperature(temperature)
    dtype = _weight_dtype(size.device)
    num_candidates = size.shape[-1]
    max_count = size.amax(-1, keepdim=True)  # [C, 1]
    if (num_candidates + 1) ** 2 <= _MAX_WEIGHT_TABLE:
        table = _weight_table(num_candidates, s, size.device, dtype)
        weights = table.take(max_count * (num_candidates + 1) + size)  # [C, N]
    else:
        weights = _relative_weights(size, max_count, num_candidates, s, size.device, dtype)
    level = s - (n - max_count[:, 0]).clamp_min(0).to(dtype)  # [C]
    return weights, level, max_count[:, 0]


def batch_temperature_probs(
    candidates: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output distribution of the batch sampler over the given candidates.

    candidates: LongTensor [C, N, K]. Returns probs [C, N] (float64, or float32 on MPS), each group's
    mass on its first occurrence and 0 elsewhere, and level [C] (see ``BatchSampleInfo``).
    """
    _check_candidates(candidates)
    perm, _, size = _sorted_runs(candidates)
    weights, level, _ = _run_weights(size, temperature)
    probs_by_run = weights / weights.sum(-1, keepdim=True)  # [C, N], 0 on unused run ids
    first_slot = (size.cumsum(-1) - size).clamp_max(size.shape[-1] - 1)  # unused ids add 0 to slot N-1
    probs_sorted = torch.zeros_like(probs_by_run).scatter_add_(-1, first_slot, probs_by_run)
    return torch.zeros_like(probs_sorted).scatter_(-1, perm, probs_sorted), level


def batch_temperature_sample(
    candidates: torch.Tensor, temperature: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, BatchSampleInfo]:
    """Batch approximation of P^(1/T): pick one of N candidate chunks per context by repeat counts.

    candidates: LongTensor [C, N, K], N independent draws of P per context. Returns chunks [C, K]
    and ``BatchSampleInfo``.

    Rule (paper, T = 1/n): count each distinct chunk x among the N candidates (c_x); pick x with
    probability proportional to binom(c_x, n). If no chunk has c_x >= n, fall back to n-1, n-2, ...;
    level 1 weights chunks by c_x, which is plain sampling from the candidates. Since only the
    largest count matters, the level is min(n, max_x c_x), resolved per context without a loop.
    binom(c, n) / binom(N, n) is the unbiased estimator of P(x)^n, hence the rule.

    Worked example (``tests/test_temperature.py`` checks it): N = 6 candidates A A A B B C at
    T = 1/2 (n = 2). Weights binom(3,2) = 3, binom(2,2) = 1, binom(1,2) = 0, so P(A) = 3/4,
    P(B) = 1/4, P(C) = 0. At T = 1/4 no chunk appears 4 times, so the level falls back to 3 and
    only A qualifies: P(A) = 1. With six distinct candidates every level falls back to 1: uniform.

    Non-integer s = 1/T = n + a (our design): weight w(c) = Gamma(c+1) / (Gamma(c-s+1) Gamma(s+1)),
    the generalised binomial coefficient C(c, s) (the falling factorial c^(s) / Gamma(s+1)), and 0
    when c - s + 1 <= 0. Why this one:

    - It *is* binom(c, n) for integer s: the paper's rule is the special case.
    - Consistent: c^(s) = c^s (1 + O(1/c)) and c / N -> P(x), so the normalised weights converge to
      P(x)^s / Z_T as N -> infinity.
    - Nearly unbiased at finite N: with Poisson counts, E[c^(s)] = (N P)^s (1 + eps) where eps is
      1% at N P = 2 and 1e-4 at N P = 5, decaying exponentially; with multinomial counts
      E[C(c, s)] / C(N, s) / P^s is 1.0001 at N = 100, P = 0.05 (s = 2.5). The plug-in alternative
      binom(c, n) ((c-n)/(N-n))^a is off by 3% there (Jensen) and by 25-45% at N = 20.
    - Continuous in T for every count (no jump at integer 1/T), and positive exactly for
      c >= floor(s), the same trigger as the integer rule. The fallback cascade lowers the exponent
      by whole steps, s -> s-1 -> ..., i.e. level s' = s - max(0, n - max_count), ending at 1 + a
      (all candidates distinct: uniform, as at level 1).

    Implementation: one sort per row of bit-packed chunks, run lengths by scatter-add, weights
    from lgamma tables over 0..N (no overflow at large N or small T), one uniform per context
    through the inverse CDF (``generator``).
    """
    _check_candidates(candidates)
    s = inverse_temperature(temperature)[0]
    perm, run, size = _sorted_runs(candidates, stable=False)
    weights, level, max_count = _run_weights(size, temperature)  # [C, N] by run id
    cdf = weights.cumsum(-1)  # [C, N]
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=cdf.dtype)
    # v = (1 - u) * total lies in (0, total]: the first run with cdf >= v has positive weight.
    chosen = torch.searchsorted(cdf, (1 - u) * cdf[:, -1:])  # [C, 1] run id
    index = perm.gather(-1, torch.searchsorted(run, chosen))  # [C, 1] an occurrence (first sorted slot)
    k = candidates.shape[-1]
    chunks = candidates.gather(1, index.unsqueeze(-1).expand(-1, -1, k))[:, 0]  # [C, K]
    info = BatchSampleInfo(level, level < s, index[:, 0], max_count, run[:, -1] + 1, candidates.shape[1])
    return chunks, info


# ---------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------


def temperature_sample(
    draw_fn: DrawFn,
    num_contexts: int,
    temperature: float,
    sampler: str = "exact",
    *,
    num_candidates: int = 200,
    block_size: int = 8,
    max_block_size: int = 1024,
    max_draws: int = 100_000,
    generator: torch.Generator | None = None,
    index_device: torch.device | str | None = None,
    lazy_draw_fn: LazyDrawFn | None = None,
) -> tuple[torch.Tensor, ExactSampleStats | BatchSampleInfo | AutoSampleInfo | None]:
    """Sample one chunk per context from P^(1/T) / Z_T with one of the samplers.

    draw_fn(context_index [C'], num) -> [C', num, K]. ``sampler="exact"`` uses
    ``exact_temperature_sample`` (``block_size``, ``max_block_size``, ``max_draws``); ``"batch"`` draws
    ``num_candidates`` (N) per context and uses ``batch_temperature_sample``; ``"auto"`` chooses per
    context (``auto_temperature_sample``: exact where a pilot predicts fewer draws than N). T = 1 is one
    plain draw per context for all (info is then None). Context indices live on ``index_device``
    (default CPU). ``lazy_draw_fn(context_index, num) -> LazyChunks`` (optional) gives the same draws
    undecoded: the batch sampler then decodes only the positions that tell candidates apart
    (``sampling/lazy.py``; same chunks for the same generator). Returns chunks [C, K] and the sampler's info.
    """
    from calm_lightning.sampling.auto import auto_temperature_sample  # both build on this module
    from calm_lightning.sampling.exact import exact_temperature_sample
    from calm_lightning.sampling.lazy import batch_sample

    s, _, _ = inverse_temperature(temperature)
    if sampler not in SAMPLERS:
        raise CalmError(f"unknown temperature sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    contexts = torch.arange(num_contexts, device=index_device)
    if s == 1.0:
        return draw_fn(contexts, 1)[:, 0], None
    if sampler == "exact":
        return exact_temperature_sample(
            draw_fn,
            num_contexts,
            temperature,
            block_size=block_size,
            max_block_size=max_block_size,
            max_draws=max_draws,
            generator=generator,
            index_device=index_device,
        )
    if num_candidates < 1:
        raise CalmError(f"num_candidates must be >= 1, got {num_candidates}")
    if sampler == "auto":
        return auto_temperature_sample(
            draw_fn,
            num_contexts,
            temperature,
            num_candidates=num_candidates,
            max_draws=max_draws,
            generator=generator,
            index_device=index_device,
            lazy_draw_fn=lazy_draw_fn,
        )
    return batch_sample(draw_fn, lazy_draw_fn, contexts, num_candidates, temperature, generator)
