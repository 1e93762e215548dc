"""Brier-n estimators for CALM and the token baseline (CALM.md section 4).

Each estimator scores every start position of a batch of true sequences ``tokens[B, T]`` and returns
``(sums[B, max_n], counts[B, max_n])`` ready for `BrierLM.update`: per evaluation block (row b of
the batch), the sum over its positions of an unbiased estimate of Brier-n = 2 P(y_{1:n}) -
sum_x P(x_{1:n})^2, and how many positions were scored for each n (a position whose n-gram runs past
the end of the sequence is left out of that n). Keeping the blocks apart is what lets `BrierLM`
give a cluster-robust standard error (positions of one sequence are correlated).

Work happens in "units": one token for the baseline, one K-token chunk for CALM. A start position j
(unit index, j = 0..L-2) has the true units 0..j as context and the tokens from unit j+1 on as its
n-gram. Three quantities are needed per start:

- Accuracy, E[1{x_{1:n} = y_{1:n}}] = P(y_{1:n}) = prod_k P(y_k | y_{<k}, context). An indicator can
  only be 1 along the true prefix, so samples drawn once per position under teacher forcing (one
  forward pass over [B, T]) give it for every start: the n-gram indicator of start j is the product
  of per-token matches of the samples at units j, j+1, ... against the true tokens.
- Collision, E[1{x1_{1:n} = x2_{1:n}}] with x1, x2 two free-running continuations. While they agree
  they share their context, so one branch per start suffices: at every rollout step draw two samples
  from the branch's predictive distribution, record whether they agree token by token, and continue
  the branch with the first. The probability that the branch agrees on every unit up to step r and
  passes through a given x_{1:r} is P(x_{1:r})^2, which makes cumprod(agreement) unbiased for the
  collision probability (within a chunk the comparison is token-wise, giving partial n).
- S samples (CALM, ``num_samples`` = S >= 2): the U-statistic 2 mean_s 1{x_s = y} - mean_{s<t}
  1{x_s = x_t} (`functional.sample_accuracy`, `sample_collision`), S = 2 being the form above. Accuracy uses the S
  teacher-forced samples; for collisions beyond the first chunk (K < max_n), S > 2 rolls out S
  branches per start, each continued with its own sample: two branches that agree so far share
  their context, so their next chunks are two independent draws from it, and 1{branches s, t agree
  on x_{1:n}} is unbiased for sum_x P(x_{1:n})^2 for every pair. (S = 2 keeps the single branch.)
- Low-variance variant for models with logits (CALM.md section 4, last bullet): accuracy exact,
  2 prod_k P(y_k | true prefix); collision 1{agreed on the first n-1 tokens} * sum_x q_n(x)^2, the
  exact sum of squares of the n-th token's distribution along the branch. Still unbiased.

The batched branch rollout every estimator shares is in `metrics/rollout.py`.

Random draws are injectable so that the batched rollouts can be checked exactly against a plain
per-position loop: ``uniforms`` (token models, inverse-CDF sampling) and ``draw`` (CALM).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from calm_lightning.errors import CalmError
from calm_lightning.metrics.functional import (
    accum_dtype,
    exclusive_cumprod,
    ngram_valid_mask,
    ngram_windows,
    reduce_brier_blocks,
)
from calm_lightning.metrics.rollout import (
    DrawFn,
    branch_rollout,
    check_max_n,
    check_num_samples,
    empty_sums,
    new_cache,
    sample_sums,
)

ESTIMATORS = ("auto", "two_sample", "low_variance")

# --------------------------------------------------------------------------------------------------
# Token-level models (TokenLM: forward(tokens, positions, kv_cache, attn_mask) -> logits)
# --------------------------------------------------------------------------------------------------


def inverse_cdf_sample(probs: Tensor, uniforms: Tensor) -> Tensor:
    """Categorical draws by inverse CDF. probs: [..., V] (need not be normalised); uniforms: [..., S]
    in [0, 1) -> indices [..., S]. Index k is returned with probability probs[k] / sum(probs)."""
    V = probs.shape[-1]
    cdf = probs.cumsum(dim=-1)  # [..., V]
    flat_cdf = cdf.reshape(-1, V)
    scaled = (uniforms.to(cdf.dtype) * cdf[..., -1:]).reshape(flat_cdf.shape[0], -1)  # [P, S]
    idx = torch.searchsorted(flat_cdf, scaled, right=True).clamp_max(V - 1)
    return idx.reshape(uniforms.shape)


def _token_uniforms(
    tokens: Tensor, max_n: int, generator: torch.Generator | None, uniforms: Tensor | None
) -> Tensor:
    """Uniforms [B, T-1, max_n, 2] for (start, rollout step, sample); drawn here unless given."""
    B, T = tokens.shape
    shape = (B, T - 1, max_n, 2)
    if uniforms is None:
        gen_device = generator.device if generator is not None else tokens.device
        uniforms = torch.rand(shape, generator=generator, device=gen_device)
    if tuple(uniforms.shape) != shape:
        raise ValueError(f"uniforms must have shape {shape}, got {tuple(uniforms.shape)}")
    return uniforms.to(tokens.device)


def _token_rollout(
    model, tokens: Tensor, max_n: int, uniforms: Tensor
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """`branch_rollout` for a token LM; states are logits [B, N, V], units single tokens."""
    cache = new_cache(model) if max_n > 1 else None
    logits = model(tokens, kv_cache=cache)  # [B, T, V]

    def forward(units, positions, kv_cache):
        return model(units[..., 0], positions=positions, kv_cache=kv_cache)  # [B, N, V]

    def draw(states, r):
        probs = torch.softmax(states.float(), dim=-1)  # [B, N, V]
        n = states.shape[1]
        return inverse_cdf_sample(probs, uniforms[:, :n, r])[..., None]  # [B, N, 2, 1]

    return branch_rollout(logits, cache, forward, draw, max_n)


@torch.no_grad()
def token_two_sample_estimate(
    model,
    tokens: Tensor,
    max_n: int = 4,
    generator: torch.Generator | None = None,
    uniforms: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Plain two-sample Brier-n estimate for a token LM, every start position, batched rollouts.

    tokens: [B, T]. uniforms: optional [B, T-1, max_n, 2] in [0, 1) driving the inverse-CDF draws of
    (start, step, sample) (drawn from ``generator`` when None). Returns (sums[B, max_n],
    counts[B, max_n]), one row per sequence (evaluation block).
    """
    check_max_n(max_n)
    if tokens.shape[1] < 2:
        return empty_sums(tokens.shape[0], max_n, tokens.device)
    u = _token_uniforms(tokens, max_n, generator, uniforms)
    return sample_sums(tokens, 1, max_n, _token_rollout(model, tokens, max_n, u))


@torch.no_grad()
def token_low_variance_estimate(
    model,
    tokens: Tensor,
    max_n: int = 4,
    generator: torch.Generator | None = None,
    uniforms: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Lower-variance Brier-n estimate for a token LM (it has logits), CALM.md section 4:

        2 prod_{k<n} P(y_{k+1} | true prefix)  -  prod_{k<n-1} 1{a_k = b_k} * sum_x q_{n-1}(x)^2

    with (a_k, b_k) the sample pair drawn at rollout step k of the branch (continued along a) and
    q_k its predictive distribution there. Same arguments and return as `token_two_sample_estimate`.
    """
    check_max_n(max_n)
    B, T = tokens.shape
    if T < 2:
        return empty_sums(B, max_n, tokens.device)
    u = _token_uniforms(tokens, max_n, generator, uniforms)
    num_starts = T - 1
    agree = torch.zeros(B, num_starts, max_n, dtype=torch.bool, device=tokens.device)
    dtype = accum_dtype(tokens.device)
    sum_sq = torch.zeros(B, num_starts, max_n, dtype=dtype, device=tokens.device)
    log_p_target = None
    for r, logits, pair in _token_rollout(model, tokens, max_n, u):
        log_q = torch.log_softmax(logits.float(), dim=-1)  # [B, N_r, V]
        n_r = logits.shape[1]
        if r == 0:  # teacher forcing: log P(y_{j+1} | y_{<=j})
            log_p_target = log_q.gather(-1, tokens[:, 1:, None])[..., 0].to(dtype)  # [B, T-1]
        sum_sq[:, :n_r, r] = log_q.exp().square().sum(dim=-1).to(dtype)
        agree[:, :n_r, r] = pair[:, :, 0, 0] == pair[:, :, 1, 0]
    window = ngram_windows(log_p_target, max_n, 1, fill=float("-inf"))  # [B, T-1, max_n]
    accuracy = 2 * window.cumsum(dim=-1).exp()
    collision = exclusive_cumprod(agree.to(dtype)) * sum_sq  # [B, T-1, max_n]
    valid = ngram_valid_mask(torch.arange(1, T, device=tokens.device), T, max_n).expand(B, -1, -1)
    return reduce_brier_blocks(accuracy, collision, valid)


# --------------------------------------------------------------------------------------------------
# CALM (hidden_states at chunk level, sample_chunks: head sample decoded by the autoencoder)
# --------------------------------------------------------------------------------------------------


def _calm_draw(model, generator: torch.Generator | None, num_samples: int = 2) -> DrawFn:
    def draw(hidden, r):
        B, N, D = hidden.shape
        chunks = model.sample_chunks(
            hidden.reshape(B * N, D), num_samples, generator=generator
        )  # [B*N, S, K]
        return chunks.view(B, N, num_samples, -1).to(torch.long)  # [B, N, S, K]

    return draw


def _lazy_calm_draw(model, tokens: Tensor, max_n: int, generator, num_samples: int) -> DrawFn:
    """The teacher-forced draw of ``_calm_draw`` (same head samples), decoding only the positions the
    estimator can use (``lazy_prefix_tokens``: the same sums as a full decode). K >= max_n only."""
    from calm_lightning.sampling.lazy import lazy_candidates, lazy_prefix_tokens

    K = model.chunk_size

    def draw(hidden, r):
        B, N, D = hidden.shape  # N = L - 1 start positions; start j's target is chunk j + 1
        chunks = lazy_candidates(model, hidden.reshape(B * N, D), num_samples, generator)  # B N contexts x S
        targets = tokens[:, K : K * (N + 1)].reshape(B * N, K)
        return lazy_prefix_tokens(chunks, targets, max_n).view(B, N, num_samples, K)

    return draw


def _check_calm_tokens(model, tokens: Tensor) -> int:
    K = model.chunk_size
    if tokens.shape[1] % K:
        raise CalmError(f"sequence length {tokens.shape[1]} is not a multiple of the chunk size K={K}")
    return K


@torch.no_grad()
def calm_rollout_estimate(
    model,
    tokens: Tensor,
    max_n: int = 4,
    generator: torch.Generator | None = None,
    draw: DrawFn | None = None,
    num_samples: int = 2,
    hidden: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """S-sample Brier-n estimate for CALM at chunk-aligned start positions, any K.

    ceil(max_n / K) chunks are drawn per start: the first at every true position (teacher forcing,
    S = ``num_samples`` head samples each, shared with the accuracy term), the rest along batched
    branch rollouts (none when K >= max_n): one branch continued with the first sample for S = 2 (the
    two-sample estimator), S branches each continued with its own sample for S > 2 (so S times the
    rollout backbone work). Collisions compare tokens inside a chunk, so n need not be a multiple of K.

    tokens: [B, T] with T = L*K. draw: optional replacement for ``model.sample_chunks``, see `DrawFn`
    (it must return S samples; with S > 2 branches, rollout steps keep its first sample per branch).
    Returns (sums[B, max_n], counts[B, max_n]), one row per sequence; start j's n-gram is
    tokens[(j+1)K : (j+1)K + n]. ``hidden``: ``model.hidden_states(tokens)`` [B, L, D] if the caller
    has it (the validation step shares its loss pass); used when no rollout needs the KV cache
    (K >= max_n), recomputed otherwise.
    """
    check_max_n(max_n)
    check_num_samples(num_samples)
    K = _check_calm_tokens(model, tokens)
    B, T = tokens.shape
    if T < 2 * K:
        return empty_sums(B, max_n, tokens.device)
    num_steps = math.ceil(max_n / K)
    branches = num_samples if num_samples > 2 and num_steps > 1 else 1
    cache = new_cache(model) if num_steps > 1 else None
    if hidden is None or cache is not None:
        hidden = model.hidden_states(tokens, kv_cache=cache)  # [B, L, D]

    def forward(units, positions, kv_cache):
        n = units.shape[1]
        return model.hidden_states(units.reshape(B, n * K), positions=positions, kv_cache=kv_cache)

    if draw is None and num_steps == 1 and hasattr(model, "sample_trunks"):
        draw = _lazy_calm_draw(model, tokens, max_n, generator, num_samples)
        draw_one = None  # no rollout steps
    elif draw is None:
        draw, draw_one = _calm_draw(model, generator, num_samples), _calm_draw(model, generator, 1)
    else:
        given = draw
        draw_one = lambda h, r: given(h, r)[:, :, :1]  # noqa: E731
    rollout = branch_rollout(hidden, cache, forward, draw, num_steps, branches=branches, draw_one=draw_one)
    return sample_sums(tokens, K, max_n, rollout, num_samples)


@torch.no_grad()
def calm_chunk_estimate(
    model,
    tokens: Tensor,
    max_n: int = 4,
    generator: torch.Generator | None = None,
    draw: DrawFn | None = None,
    num_samples: int = 2,
    hidden: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """CALM with K >= max_n: S = ``num_samples`` decoded head samples per chunk-aligned position
    cover the whole n-gram, so no rollout is needed. Hidden states h_0..h_{L-2} of one forward pass,
    S head samples each (``model.sample_chunks(h, S)``), targets chunk j+1's first max_n tokens,
    scored by the U-statistic (CALM.md section 4, generalised from the two-sample form):

        Brier-n ~ 2/S sum_s 1{x_s[:n] = y[:n]} - 2/(S(S-1)) sum_{s<t} 1{x_s[:n] = x_t[:n]}

    Returns (sums[B, max_n], counts[B, max_n]) with counts = L-1 in every row and n.
    """
    if model.chunk_size < max_n:
        raise CalmError(f"calm_chunk_estimate needs K >= max_n, got K={model.chunk_size}, max_n={max_n}")
    return calm_rollout_estimate(
        model, tokens, max_n, generator=generator, draw=draw, num_samples=num_samples, hidden=hidden
    )


# --------------------------------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------------------------------


def is_calm_like(model) -> bool:
    """CALM (or anything with its evaluation API) rather than a token LM."""
    return (
        hasattr(model, "chunk_size") and hasattr(model, "hidden_states") and hasattr(model, "sample_chunks")
    )


def estimate_brier(
    model,
    tokens: Tensor,
    max_n: int = 4,
    estimator: str = "auto",
    generator: torch.Generator | None = None,
    num_samples: int = 2,
    hidden: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Brier-1..max_n sums and counts per sequence, (sums[B, max_n], counts[B, max_n]), for one batch
    of true sequences tokens[B, T].

    CALM with K >= max_n -> `calm_chunk_estimate`; CALM with K < max_n -> `calm_rollout_estimate`,
    both with ``num_samples`` head samples per position; token LM -> `token_low_variance_estimate`
    for estimator "auto"/"low_variance", else `token_two_sample_estimate` (both draw two samples;
    ``num_samples`` is for CALM only). ``hidden``: CALM's ``hidden_states(tokens)`` when the caller
    already computed them (same numbers, one backbone pass fewer). Runs under no_grad in the model's
    current mode (set eval yourself).
    """
    if estimator not in ESTIMATORS:
        raise CalmError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    if is_calm_like(model):
        if estimator == "low_variance":
            raise CalmError(
                "the low_variance estimator needs logits; CALM only has a sampler (use auto or two_sample)"
            )
        if model.chunk_size >= max_n:
            return calm_chunk_estimate(model, tokens, max_n, generator=generator, num_samples=num_samples,
                                       hidden=hidden)
        return calm_rollout_estimate(model, tokens, max_n, generator=generator, num_samples=num_samples,
                                     hidden=hidden)
    if estimator in ("auto", "low_variance"):
        return token_low_variance_estimate(model, tokens, max_n, generator=generator)
    return token_two_sample_estimate(model, tokens, max_n, generator=generator)
