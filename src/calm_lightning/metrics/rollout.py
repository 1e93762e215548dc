"""The batched branch rollout shared by every Brier-n estimator (`metrics/estimators.py`).

Batched rollouts: after one forward over the true sequence with a KV cache, rollout step r feeds
one unit for every start at once. Start j's branch sits at position j + r and may attend only the
cached true keys <= j and the keys its own branch wrote at earlier steps; a ``BranchKVCache`` over
the true sequence's cache gives exactly that attention, so all starts advance with one backbone call
per step instead of a loop over positions, and each branch row pays for L + r keys, not for every
other branch's keys under a mask.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from calm_lightning.errors import CalmError
from calm_lightning.metrics.functional import (
    accum_dtype,
    ngram_valid_mask,
    ngram_windows,
    reduce_brier_blocks,
    sample_accuracy,
    sample_collision,
)
from calm_lightning.models.backbone import BranchKVCache

# draw(states[B, N, ...], step r) -> units [B, N, S, U]: S independent samples of the next unit for
# the N first start positions (row n = start n) at rollout step r (r = 0: teacher-forced positions);
# S = 2 unless an estimator is asked for more (num_samples).
DrawFn = Callable[[Tensor, int], Tensor]
# forward(units[B, N, U], positions[N], cache) -> states[B, N, ...]; cache is a BranchKVCache whose
# rows are the N branches of the step (None for toy models without a backbone cache).
StepFn = Callable[[Tensor, Tensor, object], Tensor]


def branch_rollout(
    prefix_states: Tensor,
    kv_cache,
    forward: StepFn,
    draw: DrawFn,
    num_steps: int,
    branches: int = 1,
    draw_one: DrawFn | None = None,
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """Roll out ``branches`` branches per start position, all starts in one backbone call per step.

    prefix_states: [B, L, ...] teacher-forced states of the true sequence (already in ``kv_cache``);
    start j = 0..L-2 begins from prefix_states[:, j]. At step r only starts j <= L-2-r are kept (the
    others' n-grams have run past the end), so step r has N_r = L-1-r starts.

    branches = 1: start j's branch sits at position j + r, fed the first sample it drew at step r-1,
    and ``draw`` gives the S samples of every step. branches = S > 1: start j has S branches (rows
    j*S + s), branch s fed its own sample s of step r-1, and from step 1 on each branch draws one
    sample with ``draw_one`` (-> [B, N_r*S, 1, U]), so that sample s of step r continues branch s.

    Yields (r, states[B, N_r * branches, ...], samples[B, N_r, S, U]) for r = 0..num_steps-1 (fewer
    if the sequence is too short). Step 0's samples are drawn at the true positions, so they double
    as the teacher-forced samples of every position.
    """
    L = prefix_states.shape[1]
    device = prefix_states.device
    cache = None if kv_cache is None or num_steps < 2 else BranchKVCache(kv_cache)
    states = prefix_states[:, : L - 1]
    samples = None
    for r in range(num_steps):
        n_r = L - 1 - r
        if n_r <= 0:
            return
        if r > 0:
            # start-major, branch-minor rows: the rows of step r are the first rows of step r - 1
            starts = torch.arange(n_r * branches, device=device) // branches  # [N_r * branches]
            if cache is not None:
                cache.start_step(starts)
            units = samples[:, :n_r, :branches].flatten(1, 2)  # [B, N_r * branches, U]
            states = forward(units, starts + r, cache)  # [B, N_r * branches, ...]
        if r == 0 or branches == 1:
            samples = draw(states, r)  # [B, N_r, S, U]
        else:
            one = draw_one(states, r)  # [B, N_r * S, 1, U]
            samples = one.reshape(one.shape[0], n_r, branches, one.shape[-1])  # [B, N_r, S, U]
        yield r, states, samples


def new_cache(model):
    """A fresh KV cache for ``model`` (None for toy models without a backbone)."""
    if hasattr(model, "new_cache"):
        return model.new_cache()
    backbone = getattr(model, "backbone", None)
    return backbone.new_cache() if hasattr(backbone, "new_cache") else None


def sample_sums(
    tokens: Tensor, unit: int, max_n: int, rollout: Iterator, num_samples: int = 2
) -> tuple[Tensor, Tensor]:
    """Per-block sums of the S-sample U-statistic over starts, from a `branch_rollout` stream:

        2/S sum_s 1{x_s = y}  -  2/(S(S-1)) sum_{s<t} 1{x_s = x_t}     (S = 2: x1, x2 as in CALM.md)

    Accuracy compares the S teacher-forced samples of units j+1, j+2, ... with the truth; collisions
    compare the S continuations of start j's rollout, token by token.
    """
    B, T = tokens.shape
    U, S = unit, num_samples
    num_starts = T // U - 1
    num_steps = math.ceil(max_n / U)
    paths = torch.zeros(B, num_starts, S, num_steps * U, dtype=torch.long, device=tokens.device)
    teacher = None
    for r, _, samples in rollout:
        if samples.shape[2] != S:
            raise ValueError(f"draw returned {samples.shape[2]} samples per position, expected {S}")
        if r == 0:
            teacher = samples  # [B, L-1, S, U] samples at every true position
        n_r = samples.shape[1]
        paths[:, :n_r, :, r * U : (r + 1) * U] = samples  # rows past n_r stay 0: their n-grams are invalid
    # teacher-forced samples along the truth: window j holds samples of units j+1, j+2, ... -> [B, L-1, S, max_n]
    along_truth = ngram_windows(teacher.transpose(1, 2).reshape(B * S, num_starts * U), max_n, U, fill=-1)
    along_truth = along_truth.view(B, S, num_starts, max_n).transpose(1, 2)
    targets = ngram_windows(tokens[:, U:], max_n, U, fill=-2)  # [B, L-1, max_n] (pads never match)
    accuracy = sample_accuracy(along_truth, targets, max_n)  # [B, L-1, max_n]
    collision = sample_collision(paths, max_n)  # [B, L-1, max_n]
    first_target = (torch.arange(num_starts, device=tokens.device) + 1) * U  # [L-1]
    valid = ngram_valid_mask(first_target, T, max_n).expand(B, -1, -1)  # [B, L-1, max_n]
    return reduce_brier_blocks(accuracy, collision, valid)


def empty_sums(batch: int, max_n: int, device) -> tuple[Tensor, Tensor]:
    return (
        torch.zeros(batch, max_n, dtype=accum_dtype(device), device=device),
        torch.zeros(batch, max_n, dtype=torch.int64, device=device),
    )


def check_num_samples(num_samples: int) -> None:
    if num_samples < 2:
        raise CalmError(f"num_samples must be >= 2 (the collision term needs pairs), got {num_samples}")


def check_max_n(max_n: int) -> None:
    if max_n < 1:
        raise CalmError(f"max_n must be >= 1, got {max_n}")
