"""Reference floors for BrierLM: the exact Brier-n of unigram and bigram models (CALM.md section 4).

A run is only interesting if it beats trivial models, so `calm compare` and `calm eval --floors`
score, on the same positions and blocks as the run, two count models fitted on the training split:

- unigram: p(x) = count(x) / total;
- bigram: p(b | a) = count(a b) / count(a .), backing off to the unigram for a context token a that
  never occurs (as a context) in the training split.

Their Brier-n is exact, no sampling: for a start whose context ends in token c and whose next n true
tokens are y_1..y_n,
    Brier-n = 2 P(y_{1:n} | c) - sum_{x_{1:n}} P(x_{1:n} | c)^2,
with P(y_{1:n} | c) = prod_k p(y_k | y_{k-1}) (y_0 = c; unigram: prod_k p(y_k)) and the sum of
squares factorising over the chain: unigram (sum_x p(x)^2)^n; bigram s_n(c) with s_0 = 1,
s_k(a) = sum_b p(b | a)^2 s_{k-1}(b), i.e. s_k = M s_{k-1} for M_ab = p(b | a)^2 (a sparse
matrix-vector product per k over the seen pairs, so any vocabulary size works).

Plain PyTorch; the result has the estimators' form (``sums[B, max_n]``, ``counts[B, max_n]``) for
`BrierLM.update`, so floors get the same cluster-robust intervals as the runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

FLOOR_MODELS = ("unigram", "bigram")


@dataclass
class CountModel:
    """Unigram and bigram counts of a training stream (float64 probabilities).

    unigram: [V] p(x). pair_keys: sorted [E] keys a * V + b of the bigrams seen; pair_probs: [E]
    p(b | a) for them. seen_context: [V] bool, a occurs as a context. collision: [max_n + 1, V]
    bigram s_k(a) for k = 0..max_n; unigram_collision: [max_n + 1] (sum_x p(x)^2)^k.
    """

    vocab_size: int
    unigram: Tensor
    pair_keys: Tensor
    pair_probs: Tensor
    seen_context: Tensor
    collision: Tensor
    unigram_collision: Tensor

    @property
    def max_n(self) -> int:
        return self.collision.shape[0] - 1

    @classmethod
    def fit(cls, stream: Tensor, vocab_size: int, max_n: int) -> CountModel:
        """stream: 1-D LongTensor of training tokens (documents concatenated as the shards hold them)."""
        stream = stream.long().flatten()
        V = vocab_size
        unigram = torch.bincount(stream, minlength=V).double()
        unigram /= unigram.sum()
        keys, counts = torch.unique(stream[:-1] * V + stream[1:], return_counts=True)  # sorted keys
        ctx = keys // V
        ctx_total = torch.zeros(V, dtype=torch.float64).index_add_(0, ctx, counts.double())
        probs = counts.double() / ctx_total[ctx]
        seen = ctx_total > 0
        # s_k(a) = sum over seen pairs (a, b) of p(b|a)^2 s_{k-1}(b) (a sparse mat-vec as one scatter-add);
        # unseen contexts back off to the unigram.
        nxt_tok, sq = keys % V, probs.square()
        uni_sq = unigram.square()
        collision = [torch.ones(V, dtype=torch.float64)]
        for _ in range(max_n):
            prev = collision[-1]
            nxt = torch.zeros(V, dtype=torch.float64).index_add_(0, ctx, sq * prev[nxt_tok])  # [V]
            nxt = torch.where(seen, nxt, (uni_sq * prev).sum())
            collision.append(nxt)
        unigram_collision = uni_sq.sum() ** torch.arange(max_n + 1, dtype=torch.float64)
        return cls(V, unigram, keys, probs, seen, torch.stack(collision), unigram_collision)

    def bigram_prob(self, a: Tensor, b: Tensor) -> Tensor:
        """p(b | a) elementwise (backed off to p(b) for unseen contexts a). a, b: [...] -> [...] float64."""
        key = a.long() * self.vocab_size + b.long()
        at = torch.searchsorted(self.pair_keys, key.flatten()).clamp_max(self.pair_keys.numel() - 1)
        hit = self.pair_keys[at] == key.flatten()
        p = torch.where(hit, self.pair_probs[at], torch.zeros((), dtype=torch.float64)).view(key.shape)
        return torch.where(self.seen_context[a.long()], p, self.unigram[b.long()])


def floor_brier(model: CountModel, tokens: Tensor, max_n: int, unit: int, kind: str) -> tuple[Tensor, Tensor]:
    """Exact Brier-1..max_n of a count model on the estimators' positions, per block.

    tokens: [B, T] evaluation blocks; unit: 1 for token-level positions (every start), K for CALM
    (starts at chunk boundaries: the context ends with a chunk's last token); kind: unigram | bigram.
    A start is scored for n when its n-gram fits in the block. Returns (sums [B, max_n] float64,
    counts [B, max_n] int64), like the Brier estimators.
    """
    if kind not in FLOOR_MODELS:
        raise ValueError(f"floor model must be one of {FLOOR_MODELS}, got {kind!r}")
    if max_n > model.max_n:
        raise ValueError(f"the count model was fitted for max_n <= {model.max_n}, got {max_n}")
    tokens = tokens.long().cpu()
    B, T = tokens.shape
    ctx_pos = torch.arange(unit - 1, T - 1, unit)  # [P] index of each start's last context token
    sums = torch.zeros(B, max_n, dtype=torch.float64)
    counts = torch.zeros(B, max_n, dtype=torch.long)
    if ctx_pos.numel() == 0:
        return sums, counts
    accuracy = torch.ones(B, ctx_pos.numel(), dtype=torch.float64)  # P(y_{1:n} | c), built up over n
    for n in range(1, max_n + 1):
        valid = ctx_pos + n <= T - 1  # [P] the n-gram fits
        nxt = tokens[:, (ctx_pos + n).clamp_max(T - 1)]  # [B, P] y_n
        if kind == "unigram":
            accuracy = accuracy * model.unigram[nxt]
            collision = model.unigram_collision[n].expand_as(accuracy)
        else:
            prev = tokens[:, (ctx_pos + n - 1).clamp_max(T - 1)]  # [B, P] y_{n-1} (y_0 = c)
            accuracy = accuracy * model.bigram_prob(prev, nxt)
            collision = model.collision[n][tokens[:, ctx_pos]]  # [B, P] s_n(c)
        brier = 2 * accuracy - collision  # [B, P]
        sums[:, n - 1] = (brier * valid).sum(-1)
        counts[:, n - 1] = int(valid.sum())
    return sums, counts
