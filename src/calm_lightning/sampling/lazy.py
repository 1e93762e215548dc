"""The batch temperature sampler with candidates decoded one position at a time, only where needed.

The batch sampler needs, per context, the repeat count of each distinct candidate chunk and then the
tokens of the one candidate it picks. Decoding all N candidates fully (N x K positions through the
autoencoder's per-token blocks and the V-way output argmax) is almost all of its cost, and most of
it is wasted: a candidate whose first j tokens no other candidate of its context shares is a
distinct chunk with count 1, whatever its other tokens are. The autoencoder's decoder is a chunk-level
trunk (one state per position) followed by blocks that act on each position alone, so position k
of any subset of candidates can be decoded on its own.

``lazy_chunk_counts`` refines groups of candidates position by position: groups start as "all N",
position k is decoded only for candidates whose group (equal tokens at 0..k-1) has >= 2 members,
and each group splits by its token at k. After K positions every group of size >= 2 holds candidates
equal at all K tokens and every singleton is a distinct chunk: exactly the counts a full decode
gives, so ``lazy_batch_temperature_sample`` samples exactly the batch sampler's distribution
(``batch_temperature_sample``: same weights on the same counts). The chosen candidate's missing
positions are decoded at the end. On flat next-chunk distributions almost every candidate is a
singleton after position 0, so the decode costs about 1/K of a full one (plus the trunk).
"""

from __future__ import annotations

import torch

from calm_lightning.sampling.temperature import (
    BatchSampleInfo,
    DrawFn,
    LazyDrawFn,
    _run_weights,
    _sorted_runs,
    batch_temperature_sample,
    inverse_temperature,
)


class LazyChunks:
    """Candidate chunks decoded position by position on demand, from the autoencoder's trunk states.

    trunk: [C, N, K, d] (``ChunkAutoencoder.decode_trunk`` of the candidates' latents);
    decode_position(h [R, d]) -> tokens [R]. ``decoded`` counts the positions decoded so far.
    """

    def __init__(self, trunk: torch.Tensor, decode_position):
        self.C, self.N, self.K = trunk.shape[:3]
        self.trunk = trunk.reshape(self.C * self.N, self.K, -1)  # [C N, K, d]
        self.decode_position = decode_position
        self.tokens = torch.full((self.C * self.N, self.K), -1, dtype=torch.long, device=trunk.device)
        self.decoded = 0

    def position(self, k: int, flat: torch.Tensor) -> torch.Tensor:
        """Tokens at position k of candidates ``flat`` (indices into C N). -> [len(flat)]."""
        missing = flat[self.tokens[flat, k] < 0]
        if missing.numel():
            self.tokens[missing, k] = self.decode_position(self.trunk[missing, k])
            self.decoded += int(missing.numel())
        return self.tokens[flat, k]

    def chunks(self, flat: torch.Tensor) -> torch.Tensor:
        """Whole chunks of candidates ``flat``. -> [len(flat), K]."""
        return torch.stack([self.position(k, flat) for k in range(self.K)], dim=-1)


def _split_groups(group: torch.Tensor, token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split each row's groups by a token (0 = not decoded: only for candidates alone in their group).

    group, token: [C, N]. Returns the new group ids [C, N] (0 .. G-1, in lexicographic order of
    (old group, token), so the final order is the full sort's) and their sizes [C, N] by id."""
    key = group * (int(token.max()) + 1) + token  # (group, token) -> one distinct int64
    perm, run, size = _sorted_runs(key.unsqueeze(-1), stable=False)
    return torch.empty_like(run).scatter_(-1, perm, run), size


def lazy_chunk_counts(chunks: LazyChunks) -> tuple[torch.Tensor, torch.Tensor]:
    """Group each context's candidates by whole-chunk equality, decoding only what tells them apart.

    Returns group [C, N] (group id of each candidate, 0 .. G-1 per context) and size [C, N] (the size
    of group g at index g, 0 for unused ids): the run lengths of a full decode's sorted chunks.
    """
    C, N, K = chunks.C, chunks.N, chunks.K
    device = chunks.tokens.device
    group = torch.zeros(C, N, dtype=torch.long, device=device)
    size = torch.zeros(C, N, dtype=torch.long, device=device)
    size[:, 0] = N
    for k in range(K):
        active = size.gather(-1, group) >= 2  # [C, N] candidates not yet known to be distinct
        if not bool(active.any()):
            break
        flat = active.flatten().nonzero().squeeze(-1)
        token = torch.zeros(C * N, dtype=torch.long, device=device)
        token[flat] = chunks.position(k, flat) + 1  # 0 = "not decoded" (a singleton: its group stays alone)
        group, size = _split_groups(group, token.view(C, N))
    return group, size


def lazy_batch_temperature_sample(
    chunks: LazyChunks, temperature: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, BatchSampleInfo]:
    """``batch_temperature_sample`` on lazily decoded candidates: the same distribution over chunks.

    Returns chunks [C, K] and ``BatchSampleInfo`` (index: a candidate of the chosen chunk).
    """
    s = inverse_temperature(temperature)[0]
    group, size = lazy_chunk_counts(chunks)
    weights, level, max_count = _run_weights(size, temperature)  # [C, N] by group id
    cdf = weights.cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=cdf.dtype)
    chosen = torch.searchsorted(cdf, (1 - u) * cdf[:, -1:])  # [C, 1] group id (positive weight)
    index = (group == chosen).to(torch.uint8).argmax(-1)  # [C] its first candidate
    rows = torch.arange(chunks.C, device=index.device) * chunks.N + index
    out = chunks.chunks(rows)  # [C, K]
    info = BatchSampleInfo(level, level < s, index, max_count, (size > 0).sum(-1), chunks.N, chunks.decoded)
    return out, info


def batch_sample(
    draw_fn: DrawFn,
    lazy_draw_fn: LazyDrawFn | None,
    contexts: torch.Tensor,
    num_candidates: int,
    temperature: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, BatchSampleInfo]:
    """The batch sampler over N = ``num_candidates`` draws for each of ``contexts``: lazily decoded when
    ``lazy_draw_fn`` is given (the same chunks for the same generator), else from ``draw_fn``'s tokens."""
    if lazy_draw_fn is not None:
        return lazy_batch_temperature_sample(lazy_draw_fn(contexts, num_candidates), temperature, generator)
    return batch_temperature_sample(draw_fn(contexts, num_candidates), temperature, generator=generator)


def lazy_candidates(model, hidden: torch.Tensor, num: int, generator: torch.Generator | None = None) -> LazyChunks:
    """``num`` head samples per row of ``hidden`` [P, D] of a CALM, decoded on demand: the same draws as
    ``model.sample_chunks(hidden, num, generator)``, as ``LazyChunks`` (C = P, N = num)."""
    return LazyChunks(model.sample_trunks(hidden, num_samples=num, generator=generator), model.autoencoder.decode_position)


def lazy_prefix_tokens(chunks: LazyChunks, targets: torch.Tensor, num_positions: int) -> torch.Tensor:
    """Candidates' tokens as far as the Brier estimators can tell them apart from the target and from
    each other (the U-statistic compares only n-token prefixes, n <= ``num_positions``).

    chunks: S samples per context (``C``, ``N`` = S); targets: [C, >= num_positions] true tokens.
    Position k of a sample is decoded only while its prefix 0..k-1 equals the target's or another
    sample's; after that no n-gram of it can match anything, and its remaining positions hold a
    sentinel -(3 + s) (distinct per sample s, below every real token and the estimators' pad values
    -1 / -2). Every indicator 1{x_s[:n] = y[:n]}, 1{x_s[:n] = x_t[:n]} is then what a full decode
    gives. Returns [C, S, K].
    """
    C, S, K = chunks.C, chunks.N, chunks.K
    device = chunks.tokens.device
    sentinel = -(3 + torch.arange(S, device=device))
    out = sentinel.view(1, S, 1).expand(C, S, K).clone()
    group = torch.zeros(C, S, dtype=torch.long, device=device)
    size = torch.zeros(C, S, dtype=torch.long, device=device)
    size[:, 0] = S
    on_target = torch.ones(C, S, dtype=torch.bool, device=device)
    for k in range(min(num_positions, K)):
        alive = on_target | (size.gather(-1, group) >= 2)  # [C, S] prefix still shared with something
        if not bool(alive.any()):
            break
        flat = alive.flatten().nonzero().squeeze(-1)
        token = torch.zeros(C * S, dtype=torch.long, device=device)
        decoded = chunks.position(k, flat)
        out.view(C * S, K)[flat, k] = decoded
        token[flat] = decoded + 1
        on_target = out[:, :, k] == targets[:, k : k + 1]
        group, size = _split_groups(group, token.view(C, S))
    return out
