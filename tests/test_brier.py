"""BrierLM: functional maths, the Metric (incl. a two-process gloo sync), estimators against exact
Brier-n of known distributions, and batched rollouts against a plain per-position loop."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from brier_reference import brier_indicator_sums, exact_brier, masked_brier_indicator_sums, sample_brier_terms
from calm_lightning.errors import CalmError
from calm_lightning.metrics import (
    BrierLM,
    brierlm_from_sums,
    calm_chunk_estimate,
    calm_rollout_estimate,
    estimate_brier,
    token_low_variance_estimate,
    token_two_sample_estimate,
)
from calm_lightning.metrics import estimators as est
from calm_lightning.metrics.estimators import inverse_cdf_sample
from calm_lightning.metrics.functional import (
    exclusive_cumprod,
    ngram_valid_mask,
    ngram_windows,
)
from calm_lightning.models import (
    CALM,
    HEADS,
    AutoencoderConfig,
    BackboneConfig,
    ChunkAutoencoder,
    GenerativeHead,
    HeadConfig,
    TokenLM,
)

MAX_N = 4
Z_TOL = 5.0  # statistical tolerance in standard errors
POINT_KEYS = [f"brier{n}" for n in range(1, MAX_N + 1)] + ["brierlm"]


# ==================================================================================================
# Functional
# ==================================================================================================


def test_indicator_sums_hand_made():
    y = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    x1 = torch.tensor([[1, 2, 0, 4], [5, 6, 7, 8]])  # row 0 matches 2 tokens, row 1 all 4
    x2 = torch.tensor([[1, 9, 3, 4], [0, 6, 7, 8]])  # row 0 matches 1 token, row 1 none
    # per n: acc1 = [2, 2, 1, 1], acc2 = [1, 0, 0, 0]; x1 vs x2: row 0 agrees on 1 token, row 1 on 0
    # -> coll = [1, 0, 0, 0]
    sums = brier_indicator_sums(x1, x2, y, max_n=4)
    assert sums.tolist() == [2.0, 2.0, 1.0, 1.0]
    assert brier_indicator_sums(x1, x2, y, max_n=2).tolist() == [2.0, 2.0]
    # identical samples equal to the target: 1 + 1 - 1 per position and n
    assert brier_indicator_sums(y, y, y, 3).tolist() == [2.0, 2.0, 2.0]


def test_masked_indicator_sums_and_valid_mask():
    y = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    x = y.clone()
    valid = ngram_valid_mask(torch.tensor([3, 4, 5]), seq_len=6, max_n=3)  # starts at 3, 4, 5 of T=6
    assert valid.tolist() == [[True, True, True], [True, True, False], [True, False, False]]
    sums, counts = masked_brier_indicator_sums(x, x, y, valid)
    assert counts.tolist() == [3, 2, 1]
    assert sums.tolist() == [3.0, 2.0, 1.0]


def test_windows_and_exclusive_cumprod():
    per_token = torch.arange(1, 7)[None]  # [1, 6]
    w = ngram_windows(per_token, 3, step=2, fill=0)
    assert w.tolist() == [[[1, 2, 3], [3, 4, 5], [5, 6, 0]]]
    assert exclusive_cumprod(torch.tensor([2.0, 3.0, 4.0])).tolist() == [1.0, 2.0, 6.0]


def test_brierlm_geometric_mean_and_nonpositive_rule():
    counts = torch.tensor([10, 10, 8, 4])
    briers = torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=torch.float64)
    out = brierlm_from_sums(briers * counts, counts)
    assert set(out) == {"brier1", "brier2", "brier3", "brier4", "brierlm"}
    assert out["brier3"].item() == pytest.approx(0.125)
    assert out["brierlm"].item() == pytest.approx(100 * 2 ** (-10 / 4))
    for bad in (0.0, -0.01):
        b = briers.clone()
        b[2] = bad
        out = brierlm_from_sums(b * counts, counts)
        assert out["brierlm"].item() == 0.0
        assert out["brier1"].item() == pytest.approx(0.5)  # the terms are still reported
        assert out["brier3"].item() == pytest.approx(bad)
    # more than 4 terms: BrierLM stays the geometric mean of Brier-1..4
    out = brierlm_from_sums(torch.tensor([0.5, 0.25, 0.125, 0.0625, -1.0]), torch.ones(5))
    assert out["brierlm"].item() == pytest.approx(100 * 2 ** (-10 / 4))
    assert out["brier5"].item() == -1.0


def test_exact_brier():
    p = torch.tensor([0.5, 0.3, 0.2])
    assert exact_brier(p[1], (p**2).sum()).item() == pytest.approx(2 * 0.3 - 0.38)
    # the two-sample estimator's expectation, enumerated
    e = sum(p[a] * p[b] * ((a == 1) + (b == 1) - (a == b)) for a in range(3) for b in range(3))
    assert e.item() == pytest.approx(exact_brier(0.3, 0.38).item())


# ==================================================================================================
# Metric
# ==================================================================================================


def _random_batches(seed: int, num: int, max_n: int = MAX_N):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        counts = torch.randint(1, 50, (max_n,), generator=g)
        sums = torch.rand(max_n, generator=g, dtype=torch.float64) * counts
        out.append((sums, counts))
    return out


def test_metric_running_sums_equal_one_big_batch():
    batches = _random_batches(0, 5)
    metric = BrierLM(max_n=MAX_N)
    for s, c in batches:
        metric.update(s, c)
    total_s = sum(s for s, _ in batches)
    total_c = sum(c for _, c in batches)
    big = BrierLM(max_n=MAX_N)
    big.update(total_s, total_c)
    got, want = metric.compute(), big.compute()
    for k in POINT_KEYS:
        assert torch.allclose(got[k], want[k], rtol=1e-12, atol=0)
    # five 1-D updates are five blocks: the same as one [5, max_n] update, intervals included
    stacked = BrierLM(max_n=MAX_N)
    stacked.update(torch.stack([s for s, _ in batches]), torch.stack([c for _, c in batches]))
    for k, v in stacked.compute().items():
        assert torch.allclose(got[k], v, rtol=1e-12, atol=1e-15), k
    assert torch.isnan(want["brier1_se"])  # one block: no spread to estimate
    # not a mean of batch means
    mean_of_means = torch.stack([s / c for s, c in batches]).mean(0)
    assert not torch.allclose(got["brier1"], mean_of_means[0])
    metric.reset()
    assert metric.counts.sum().item() == 0


def test_metric_with_estimator_batches_equal_full_batch():
    table = _toy_table(3, seed=1)
    model = BigramLM(table)
    tokens = _true_tokens(table, 6, 12, seed=2)
    u = torch.rand(6, 11, MAX_N, 2, generator=torch.Generator().manual_seed(3))
    whole = BrierLM(MAX_N)
    whole.update(*token_two_sample_estimate(model, tokens, MAX_N, uniforms=u))
    parts = BrierLM(MAX_N)
    for rows in (slice(0, 2), slice(2, 6)):
        parts.update(*token_two_sample_estimate(model, tokens[rows], MAX_N, uniforms=u[rows]))
    for name in ("sums", "counts", "blocks", "sum_ss", "sum_sn", "sum_nn"):
        assert torch.allclose(getattr(whole, name), getattr(parts, name), rtol=1e-12, atol=0), name
    assert whole.blocks.tolist() == [6] * MAX_N


def test_metric_rejects_wrong_shapes():
    with pytest.raises(ValueError):
        BrierLM(4).update(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError):
        BrierLM(4).update(torch.zeros(2, 4), torch.zeros(3, 4))


_DDP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.distributed as dist
    from calm_lightning.metrics import BrierLM

    rank, port, in_path, out_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    with open(in_path) as f:
        batches = json.load(f)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    metric = BrierLM(max_n=len(batches[0][0]))
    for s, c in batches[rank::2]:
        metric.update(torch.tensor(s, dtype=torch.float64), torch.tensor(c))
    result = {k: v.item() for k, v in metric.compute().items()}  # compute() syncs across ranks
    with open(out_path + str(rank), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metric_two_process_sync_matches_single_process(tmp_path):
    """Two gloo processes (plain subprocesses, not Lightning DDP) each feed half of the batches."""
    batches = _random_batches(7, 5)  # uneven split: rank 0 gets 3 batches, rank 1 gets 2
    single = BrierLM(MAX_N)
    for s, c in batches:
        single.update(s, c)
    want = {k: v.item() for k, v in single.compute().items()}

    script, data, out = tmp_path / "ddp_brier.py", tmp_path / "batches.json", tmp_path / "out"
    script.write_text(_DDP_SCRIPT)
    data.write_text(json.dumps([[s.tolist(), c.tolist()] for s, c in batches]))
    port = str(_free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), port, str(data), str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in range(2)
    ]
    try:
        errs = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], errs
    for rank in range(2):
        got = json.loads((tmp_path / f"out{rank}").read_text())
        assert got.keys() == want.keys()
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-12, abs=1e-12)


# ==================================================================================================
# Toy models with known distributions
# ==================================================================================================


def _toy_table(V: int, seed: int) -> torch.Tensor:
    """A bigram table [V, V] whose rows range from near-uniform to peaked."""
    g = torch.Generator().manual_seed(seed)
    sharpness = torch.linspace(0.2, 4.0, V, dtype=torch.float64)[:, None]
    return (torch.randn(V, V, generator=g, dtype=torch.float64) * sharpness).softmax(-1)


def _true_tokens(table: torch.Tensor, B: int, T: int, seed: int) -> torch.Tensor:
    """'True' text from a chain half-way between the model and uniform: it is not a sample of the
    model, so a collision term computed along the true prefix is visibly biased."""
    return _markov_tokens(0.5 * table + 0.5 / table.shape[0], B, T, seed)


def _markov_tokens(table: torch.Tensor, B: int, T: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    V = table.shape[0]
    tokens = torch.empty(B, T, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, V, (B,), generator=g)
    for t in range(1, T):
        tokens[:, t] = torch.multinomial(table[tokens[:, t - 1]].float(), 1, generator=g)[:, 0]
    return tokens


class BigramLM(nn.Module):
    """TokenLM-compatible toy: logits depend only on the current token (attention is ignored)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("log_table", table.float().log())

    def forward(self, tokens, positions=None, kv_cache=None, attn_mask=None):
        return self.log_table[tokens]  # [B, T, V]


class TrueContextBigramLM(BigramLM):
    """Deliberately wrong: rollout steps condition on the true token at that position instead of the
    branch's sampled token (the 'collision along the true prefix' mistake)."""

    def __init__(self, table, tokens):
        super().__init__(table)
        self.true_tokens = tokens

    def forward(self, tokens, positions=None, kv_cache=None, attn_mask=None):
        if positions is not None:
            tokens = self.true_tokens[:, positions]
        return self.log_table[tokens]


class BigramCALM(nn.Module):
    """CALM-compatible toy: h_j is a one-hot of chunk j's last token; a chunk sample is K steps of the
    bigram chain from it (tokens within a chunk are therefore dependent, as in a real CALM)."""

    def __init__(self, table: torch.Tensor, chunk_size: int, true_tokens: torch.Tensor | None = None):
        super().__init__()
        self.chunk_size = chunk_size
        self.register_buffer("table", table.float())
        self.true_tokens = true_tokens  # set: the deliberately wrong variant of TrueContextBigramLM

    def hidden_states(self, tokens, positions=None, kv_cache=None, attn_mask=None):
        B, T = tokens.shape
        K = self.chunk_size
        if positions is not None and self.true_tokens is not None:
            return self.hidden_states(self.true_tokens.view(B, -1, K)[:, positions].reshape(B, -1))
        last = tokens.view(B, T // K, K)[..., -1]  # [B, L]
        return nn.functional.one_hot(last, self.table.shape[0]).float()  # [B, L, V]

    def sample_chunks(self, hidden, num_samples=1, generator=None):
        prev = hidden.argmax(-1).repeat_interleave(num_samples)  # [P*S]
        out = []
        for _ in range(self.chunk_size):
            prev = torch.multinomial(self.table[prev], 1, generator=generator)[:, 0]
            out.append(prev)
        return torch.stack(out, -1).view(hidden.shape[0], num_samples, self.chunk_size)  # [P, S, K]


def _exact_sums(table: torch.Tensor, tokens: torch.Tensor, unit: int, max_n: int) -> torch.Tensor:
    """Sum over chunk-aligned starts of the exact Brier-n = 2 P(y_{1:n}) - sum_x P(x_{1:n})^2.

    The n-gram distribution given the context depends only on its last token c (Markov chain), and
    sum_x P(x_{1:n} | c)^2 = S_n(c) with S_0 = 1, S_n(a) = sum_b table[a, b]^2 S_{n-1}(b).
    """
    V = table.shape[0]
    S = [torch.ones(V, dtype=torch.float64)]
    for _ in range(max_n):
        S.append((table**2) @ S[-1])
    B, T = tokens.shape
    sums = torch.zeros(max_n, dtype=torch.float64)
    for b in range(B):
        for j in range(T // unit - 1):
            c = (j + 1) * unit - 1  # last context token
            p = 1.0
            for n in range(1, max_n + 1):
                if c + n > T - 1:
                    break
                p = p * table[tokens[b, c + n - 1], tokens[b, c + n]]
                sums[n - 1] += 2 * p - S[n][tokens[b, c]]
    return sums


def _replicate_stats(fn, num_seeds: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard error over independent seeds of fn(generator) -> sums[max_n]."""
    runs = torch.stack([fn(torch.Generator().manual_seed(1000 + s)) for s in range(num_seeds)])
    return runs.mean(0), runs.std(0) / math.sqrt(num_seeds)


def _within(mean, se, exact) -> torch.Tensor:
    # 1e-4: float32 round-off of the toys' probabilities (the exact Brier-1 term has no noise at all)
    return (mean - exact).abs() <= Z_TOL * se + 1e-4


# TokenLM-compatible toy, both estimators -----------------------------------------------------------

V_TOY, B_TOY, T_TOY, REPS, SEEDS = 3, 8, 12, 16, 40


@pytest.fixture(scope="module")
def toy():
    table = _toy_table(V_TOY, seed=0)
    tokens = _true_tokens(table, B_TOY, T_TOY, seed=1)
    return table, tokens, _exact_sums(table, tokens, 1, MAX_N)


def _token_runs(model_fn, estimator, tokens):
    big = tokens.repeat(REPS, 1)  # REPS independent replicates per seed

    def fn(g):
        return estimator(model_fn(big), big, MAX_N, generator=g)[0].sum(0) / REPS

    return fn


@pytest.mark.parametrize("estimator", [token_two_sample_estimate, token_low_variance_estimate])
def test_token_estimators_unbiased(toy, estimator):
    table, tokens, exact = toy
    mean, se = _replicate_stats(_token_runs(lambda t: BigramLM(table), estimator, tokens), SEEDS)
    assert _within(mean, se, exact).all(), (mean, exact, se)
    # the wrong variant (collisions along the true prefix) must fail this very check for n >= 2
    wrong, wrong_se = _replicate_stats(
        _token_runs(lambda t: TrueContextBigramLM(table, t), estimator, tokens), SEEDS
    )
    assert _within(wrong[:1], wrong_se[:1], exact[:1]).all()  # n = 1 needs no rollout
    assert not _within(wrong[1:], wrong_se[1:], exact[1:]).any(), (wrong, exact, wrong_se)


def test_low_variance_wrong_cumprod_fails(toy, monkeypatch):
    """Counting the n-th agreement too (inclusive instead of exclusive cumprod) is detected."""
    table, tokens, exact = toy
    monkeypatch.setattr(est, "exclusive_cumprod", lambda x: x.cumprod(-1))
    mean, se = _replicate_stats(
        _token_runs(lambda t: BigramLM(table), token_low_variance_estimate, tokens), SEEDS
    )
    assert not _within(mean, se, exact).all()


def test_low_variance_has_lower_variance(toy):
    table, tokens, _ = toy
    _, se_two = _replicate_stats(
        _token_runs(lambda t: BigramLM(table), token_two_sample_estimate, tokens), SEEDS
    )
    _, se_low = _replicate_stats(
        _token_runs(lambda t: BigramLM(table), token_low_variance_estimate, tokens), SEEDS
    )
    assert (se_low < se_two).all()


# CALM-compatible toy, K in {1, 2, 4} -------------------------------------------------------------


@pytest.mark.parametrize("K", [1, 2, 4])
def test_calm_estimators_unbiased(toy, K):
    table, _, _ = toy
    tokens = _true_tokens(table, B_TOY, 12, seed=5)  # T = 12 is a multiple of 1, 2 and 4
    exact = _exact_sums(table, tokens, K, MAX_N)
    estimator = calm_chunk_estimate if K >= MAX_N else calm_rollout_estimate
    big = tokens.repeat(REPS, 1)

    def run(model):
        return lambda g: estimator(model, big, MAX_N, generator=g)[0].sum(0) / REPS

    mean, se = _replicate_stats(run(BigramCALM(table, K)), SEEDS)
    assert _within(mean, se, exact).all(), (mean, exact, se)
    _, counts = estimator(BigramCALM(table, K), tokens, MAX_N)
    L = 12 // K
    want = [sum(1 for j in range(L - 1) if (j + 1) * K + n <= 12) for n in range(1, MAX_N + 1)]
    assert counts.tolist() == [want] * B_TOY  # one row per sequence
    if K < MAX_N:  # rollouts along the true prefix are caught
        wrong, wrong_se = _replicate_stats(run(BigramCALM(table, K, true_tokens=big)), SEEDS)
        first_rollout_n = K  # n <= K is decided within the first chunk
        assert not _within(wrong[first_rollout_n:], wrong_se[first_rollout_n:], exact[first_rollout_n:]).any()


def test_dispatcher_routes(toy):
    table, tokens, _ = toy
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    lm = BigramLM(table)
    assert torch.equal(
        estimate_brier(lm, tokens, generator=g())[0],
        token_low_variance_estimate(lm, tokens, generator=g())[0],
    )
    assert torch.equal(
        estimate_brier(lm, tokens, estimator="two_sample", generator=g())[0],
        token_two_sample_estimate(lm, tokens, generator=g())[0],
    )
    calm = BigramCALM(table, 2)
    assert torch.equal(
        estimate_brier(calm, tokens, generator=g())[0], calm_rollout_estimate(calm, tokens, generator=g())[0]
    )
    with pytest.raises(CalmError):
        estimate_brier(calm, tokens, estimator="low_variance")
    with pytest.raises(CalmError):
        estimate_brier(lm, tokens, estimator="bogus")
    with pytest.raises(CalmError):
        calm_chunk_estimate(calm, tokens, MAX_N)
    with pytest.raises(CalmError):
        estimate_brier(BigramCALM(table, 5), tokens)  # T = 12 is not a multiple of K = 5
    sums, counts = estimate_brier(lm, tokens[:, :1])  # no position to score
    assert counts.sum() == 0 and sums.abs().sum() == 0


# CALM with S >= 2 head samples: the U-statistic ------------------------------------------------


def test_sample_brier_terms_hand_made():
    y = torch.tensor([1, 2, 3])
    x = torch.tensor([[1, 2, 3], [1, 2, 0], [1, 9, 3], [4, 2, 3]])  # S = 4
    acc, coll = sample_brier_terms(x, y, 3)
    # hits per n: n=1 rows 0,1,2; n=2 rows 0,1; n=3 row 0 -> 2/4 * [3, 2, 1]
    assert acc.tolist() == [1.5, 1.0, 0.5]
    # agreeing pairs of 6: n=1 (0,1),(0,2),(1,2); n=2 (0,1); n=3 none -> [3, 1, 0] / 6
    assert torch.allclose(coll, torch.tensor([0.5, 1 / 6, 0.0], dtype=coll.dtype))
    # S = 2 is the two-sample form 1{x1=y} + 1{x2=y} - 1{x1=x2} (brier_indicator_sums)
    g = torch.Generator().manual_seed(0)
    x1, x2, yy = (torch.randint(0, 2, (50, 4), generator=g) for _ in range(3))
    a2, c2 = sample_brier_terms(torch.stack([x1, x2], 1), yy, 4)
    assert torch.equal((a2 - c2).sum(0), brier_indicator_sums(x1, x2, yy, 4))
    with pytest.raises(ValueError):
        sample_brier_terms(x[:1], y, 3)


@pytest.mark.parametrize("K,S", [(4, 3), (4, 8), (2, 4), (1, 3)])
def test_calm_s_sample_estimators_unbiased(toy, K, S):
    """K >= max_n: S samples per chunk; K < max_n: S branches per start (rollout)."""
    table, _, _ = toy
    tokens = _true_tokens(table, B_TOY, 12, seed=5)
    exact = _exact_sums(table, tokens, K, MAX_N)
    big = tokens.repeat(REPS, 1)

    def run(model):
        return lambda g: estimate_brier(model, big, MAX_N, generator=g, num_samples=S)[0].sum(0) / REPS

    mean, se = _replicate_stats(run(BigramCALM(table, K)), SEEDS)
    assert _within(mean, se, exact).all(), (mean, exact, se)
    if K < MAX_N:  # branches rolled out along the true prefix are caught
        wrong, wrong_se = _replicate_stats(run(BigramCALM(table, K, true_tokens=big)), SEEDS)
        assert not _within(wrong[K:], wrong_se[K:], exact[K:]).any()


def _u_statistic_variance(table: torch.Tensor, tokens: torch.Tensor, K: int, S: int) -> torch.Tensor:
    """Exact variance (given the text) of the S-sample Brier-n estimate summed over the chunk-aligned
    starts of BigramCALM with K >= MAX_N, from the U-statistic variance formula (Hoeffding):
        Var U_S = (4 (S-2) zeta_1 + 2 zeta_2) / (S (S-1)),  zeta_1 = Var_x1 E_x2 h,  zeta_2 = Var h,
    h(x1, x2) = 1{x1 = y} + 1{x2 = y} - 1{x1 = x2} on the n-gram, all 4-grams x enumerated."""
    V = table.shape[0]
    grams = torch.cartesian_prod(*[torch.arange(V)] * MAX_N)  # [M, 4]
    B, T = tokens.shape
    ctx = tokens.view(B, T // K, K)[:, :-1, -1].reshape(-1)  # [Pos] last context token of each start
    y = tokens.view(B, T // K, K)[:, 1:, :MAX_N].reshape(-1, MAX_N)  # [Pos, 4]
    prev = torch.cat([ctx[:, None].expand(-1, grams.shape[0])[..., None], grams.expand(len(ctx), -1, -1)], -1)
    prob = table[prev[..., :-1], prev[..., 1:]].prod(-1)  # [Pos, M] P(x_{1:4} | c)
    total = torch.zeros(MAX_N, dtype=torch.float64)
    for n in range(1, MAX_N + 1):
        same = (grams[:, None, :n] == grams[None, :, :n]).all(-1).double()  # [M, M] same n-prefix
        a = (grams[None, :, :n] == y[:, None, :n]).all(-1).double()  # [Pos, M]
        p_prefix = prob @ same  # [Pos, M] P(x_{1:n}) of each gram's prefix
        g1 = a - p_prefix  # E_x2 h(x1, x2) - P(y_{1:n})
        zeta1 = (prob * g1**2).sum(-1) - (prob * g1).sum(-1) ** 2
        h = a[:, :, None] + a[:, None, :] - same  # [Pos, M, M]
        w = prob[:, :, None] * prob[:, None, :]
        zeta2 = (w * h**2).sum((-2, -1)) - (w * h).sum((-2, -1)) ** 2
        total[n - 1] = ((4 * (S - 2) * zeta1 + 2 * zeta2) / (S * (S - 1))).sum()
    return total


def test_calm_variance_falls_with_s_as_theory_says(toy):
    """var(S) of the summed estimate over 60 seeds against the exact U-statistic variance.

    Tolerance: the sample variance over R = 60 seeds is var * chi2_59 / 59, in [0.52, 1.67] with
    probability 99.8% (Wilson-Hilferty), hence [0.5, 1.7]; the observed ratio var(8)/var(2) is then
    within theory * [0.3, 3.3], and theory here is <= 0.25 (zeta_1 <= zeta_2 / 2), so S = 8 is
    clearly below S = 2 whenever both agree with theory."""
    table, _, _ = toy
    tokens = _true_tokens(table, B_TOY, 12, seed=5)
    big = tokens.repeat(REPS, 1)
    model = BigramCALM(table, 4)
    observed, theory = {}, {}
    for S in (2, 8):
        runs = torch.stack(
            [
                calm_chunk_estimate(
                    model, big, MAX_N, generator=torch.Generator().manual_seed(500 + r), num_samples=S
                )[0].sum(0)
                for r in range(60)
            ]
        )
        observed[S], theory[S] = runs.var(0), _u_statistic_variance(table.double(), big, 4, S)
        ratio = observed[S] / theory[S]
        assert ((0.5 <= ratio) & (ratio <= 1.7)).all(), (S, ratio)
    assert (theory[8] / theory[2] <= 0.25).all()
    assert (observed[8] < 0.5 * observed[2]).all(), observed[8] / observed[2]


def test_calm_s2_is_the_two_sample_estimator(toy):
    """num_samples=2 (the default) reproduces the two-sample estimate draw for draw."""
    table, _, _ = toy
    tokens = _true_tokens(table, B_TOY, 12, seed=5)
    for K in (2, 4):
        model = BigramCALM(table, K)
        default = estimate_brier(model, tokens, MAX_N, generator=torch.Generator().manual_seed(3))
        explicit = estimate_brier(
            model, tokens, MAX_N, generator=torch.Generator().manual_seed(3), num_samples=2
        )
        assert torch.equal(default[0], explicit[0]) and torch.equal(default[1], explicit[1])
    with pytest.raises(CalmError):
        estimate_brier(model, tokens, MAX_N, num_samples=1)


def test_inverse_cdf_sample():
    probs = torch.tensor([[0.2, 0.0, 0.8], [0.0, 1.0, 0.0]])
    u = torch.tensor([[0.0, 0.19, 0.21, 0.999], [0.0, 0.3, 0.6, 0.9999]])
    assert inverse_cdf_sample(probs, u).tolist() == [[0, 0, 2, 2], [1, 1, 1, 1]]


# ==================================================================================================
# Batched rollouts == a plain per-position loop (real tiny models, same random draws)
# ==================================================================================================


def _tiny_backbone() -> BackboneConfig:
    return BackboneConfig(n_layers=2, d_model=32, n_heads=2, ffn_size=64, max_seq_len=64)


def _reference_token(model, tokens, max_n, u, low_variance):
    """Straightforward per-position Brier-n: a separate forward for every context (no cache, no mask).
    Returns per-sequence (block) sums and counts [B, max_n] and the accuracy/collision totals [max_n]."""
    B, T = tokens.shape
    sums = torch.zeros(B, max_n, dtype=torch.float64)
    counts = torch.zeros(B, max_n, dtype=torch.long)
    acc_total = torch.zeros(max_n, dtype=torch.float64)  # to check that the test exercises both terms
    coll_total = torch.zeros(max_n, dtype=torch.float64)

    def dist(ctx):
        return torch.softmax(model(torch.tensor([ctx]))[0, -1].double(), -1)

    for b in range(B):
        y = tokens[b].tolist()
        tf_probs = [dist(y[: j + 1]) for j in range(T - 1)]
        tf_pairs = [inverse_cdf_sample(tf_probs[j], u[b, j, 0]).tolist() for j in range(T - 1)]
        for j in range(T - 1):
            ctx, agree, sq = y[: j + 1], [], []
            for r in range(max_n):
                if j + 1 + r > T - 1:
                    break
                q = dist(ctx)
                a, a2 = inverse_cdf_sample(q, u[b, j, r]).tolist()
                agree.append(float(a == a2))
                sq.append((q**2).sum().item())
                ctx = ctx + [a]
            for n in range(1, max_n + 1):
                if j + n > T - 1:
                    continue
                target = y[j + 1 : j + 1 + n]
                if low_variance:
                    acc = 2 * math.prod(tf_probs[j + k][target[k]].item() for k in range(n))
                    coll = math.prod(agree[: n - 1]) * sq[n - 1]
                else:
                    acc = sum(all(tf_pairs[j + k][s] == target[k] for k in range(n)) for s in range(2))
                    coll = math.prod(agree[:n])
                sums[b, n - 1] += acc - coll
                counts[b, n - 1] += 1
                acc_total[n - 1] += acc
                coll_total[n - 1] += coll
    return sums, counts, acc_total, coll_total


def _sample_from(model, first: torch.Tensor, T: int, seed: int) -> torch.Tensor:
    """True text drawn from the model itself (so that n-gram hits are common). first: [B, 1]."""
    g = torch.Generator().manual_seed(seed)
    tokens = first
    with torch.no_grad():
        for _ in range(T - 1):
            probs = torch.softmax(model(tokens)[:, -1], -1)
            tokens = torch.cat([tokens, torch.multinomial(probs, 1, generator=g)], 1)
    return tokens


@pytest.mark.parametrize("low_variance", [False, True])
def test_token_batched_rollout_matches_per_position_loop(low_variance):
    torch.manual_seed(0)
    V = 5
    model = TokenLM(_tiny_backbone(), vocab_size=V).eval()
    with torch.no_grad():  # sharper predictions so that samples agree often enough to matter
        model.lm_head.weight.mul_(60.0)
    B, T = 2, 10
    tokens = _sample_from(model, torch.arange(B)[:, None], T, seed=1)
    u = torch.rand(B, T - 1, MAX_N, 2, generator=torch.Generator().manual_seed(2))
    estimator = token_low_variance_estimate if low_variance else token_two_sample_estimate
    sums, counts = estimator(model, tokens, MAX_N, uniforms=u)
    ref_sums, ref_counts, acc, coll = _reference_token(model, tokens, MAX_N, u, low_variance)
    assert counts.tolist() == ref_counts.tolist() == [[T - n for n in range(1, MAX_N + 1)]] * B
    if low_variance:
        assert torch.allclose(sums, ref_sums, atol=1e-5)
    else:
        assert sums.tolist() == ref_sums.tolist()
    assert (acc > 0).all() and (coll > 0).all()  # 4-gram hits and 4-gram collisions both occur


class TinyGaussHead(GenerativeHead):
    """Test-only head (the real ones are tested elsewhere): a Gaussian around a linear map of h."""

    def __init__(self, hidden_size, latent_size, cfg, num_backbone_layers):
        super().__init__(hidden_size, latent_size, cfg, num_backbone_layers)
        self.mean = nn.Linear(hidden_size, latent_size)

    def loss(self, hidden, mu, log_sigma):
        return (self.mean(hidden) - mu).square().sum(-1)

    def sample(self, hidden, num_samples=1, generator=None):
        m = self.mean(hidden)[:, None].expand(-1, num_samples, -1)  # [P, S, l]
        noise = torch.randn(
            m.shape, generator=generator, device=m.device if generator is None else generator.device
        )
        return m + noise.to(m.device)


def _tiny_calm(K: int, V: int, monkeypatch) -> CALM:
    monkeypatch.setitem(HEADS, "tiny_gauss", TinyGaussHead)
    torch.manual_seed(0)
    ae = ChunkAutoencoder(
        AutoencoderConfig(vocab_size=V, chunk_size=K, latent_size=8, d_model=16, ffn_size=32)
    )
    with torch.no_grad():  # a random AE decodes everything to one id; spread its output
        ae.embedding.weight.normal_(0.0, 1.0)
    return CALM(_tiny_backbone(), HeadConfig(name="tiny_gauss"), ae).eval()


def _keyed_draw_fn(model, B, L, R, seed):
    """A deterministic chunk sampler keyed by (row, start, step, sample): decode(W h + noise[key])."""
    g = torch.Generator().manual_seed(seed)
    D, lat = model.backbone_cfg.d_model, model.latent_size
    W = torch.randn(D, lat, generator=g)
    noise = torch.randn(B, L, R, 2, lat, generator=g) * 0.3

    def keyed(h, b, j, r):  # h: [D] -> [2, K]
        return model.autoencoder.decode((h @ W)[None] + noise[b, j, r])

    def batched(h, r):  # h: [B, N, D] -> [B, N, 2, K]
        N = h.shape[1]
        return model.autoencoder.decode((h @ W)[:, :, None] + noise[:, :N, r])

    def true_text(first):  # first: [B, K] -> [B, L*K], drawn from the model with fresh noise
        tokens = first
        with torch.no_grad():
            for _ in range(L - 1):
                h = model.hidden_states(tokens)[:, -1]  # [B, D]
                z = h @ W + 0.3 * torch.randn(h.shape[0], lat, generator=g)
                tokens = torch.cat([tokens, model.autoencoder.decode(z)], 1)
        return tokens

    return keyed, batched, true_text


@pytest.mark.parametrize("K", [1, 3])
def test_calm_batched_rollout_matches_per_position_loop(K, monkeypatch):
    V, B, L = 6, 2, 5
    model = _tiny_calm(K, V, monkeypatch)
    T = L * K
    R = math.ceil(MAX_N / K)
    keyed, batched, true_text = _keyed_draw_fn(model, B, L, R, seed=4)
    tokens = true_text(torch.randint(0, V, (B, K), generator=torch.Generator().manual_seed(3)))
    assert tokens.shape == (B, T)

    recorded = {}

    def recording_draw(h, r):
        recorded[r] = h.clone()
        return batched(h, r)

    sums, counts = calm_rollout_estimate(model, tokens, MAX_N, draw=recording_draw)

    ref_sums = torch.zeros(B, MAX_N, dtype=torch.float64)  # per sequence (block)
    ref_counts = torch.zeros(B, MAX_N, dtype=torch.long)
    acc_total = torch.zeros(MAX_N)
    coll_total = torch.zeros(MAX_N)
    with torch.no_grad():
        for b in range(B):
            y = tokens[b]
            tf = [keyed(model.hidden_states(y[None, : (j + 1) * K])[0, -1], b, j, 0) for j in range(L - 1)]
            for j in range(L - 1):
                ctx, agree = y[: (j + 1) * K], []
                for r in range(R):
                    if j + 1 + r > L - 1:
                        break
                    h = model.hidden_states(ctx[None])[0, -1]  # a separate forward, no cache or mask
                    assert torch.allclose(recorded[r][b, j], h, atol=1e-5), (r, b, j)
                    pair = keyed(h, b, j, r)
                    agree += (pair[0] == pair[1]).tolist()
                    ctx = torch.cat([ctx, pair[0]])
                for n in range(1, MAX_N + 1):
                    start = (j + 1) * K
                    if start + n > T:
                        continue
                    target = y[start : start + n]
                    acc = sum(
                        bool((torch.cat([tf[j + c][s] for c in range(math.ceil(n / K))])[:n] == target).all())
                        for s in range(2)
                    )
                    ref_sums[b, n - 1] += acc - float(all(agree[:n]))
                    ref_counts[b, n - 1] += 1
                    acc_total[n - 1] += acc
                    coll_total[n - 1] += float(all(agree[:n]))
    assert counts.tolist() == ref_counts.tolist()
    assert sums.tolist() == ref_sums.tolist()
    assert (acc_total > 0).all() and (coll_total > 0).all()  # both terms are exercised up to n = 4


@pytest.mark.parametrize("K", [1, 3])
def test_calm_s_branch_rollout_matches_per_position_loop(K, monkeypatch):
    """S = 3 > 2 with K < max_n: S branches per start, each continued with its own sample, against a
    plain loop (a separate forward per branch context, no cache or mask) with the same keyed draws."""
    V, B, L, S = 6, 2, 5, 3
    model = _tiny_calm(K, V, monkeypatch)
    T, R = L * K, math.ceil(MAX_N / K)
    g = torch.Generator().manual_seed(5)
    D, lat = model.backbone_cfg.d_model, model.latent_size
    W = torch.randn(D, lat, generator=g)
    noise = torch.randn(B, (L - 1) * S, R, S, lat, generator=g) * 0.3  # key: (row, branch row, step, sample)
    tokens = torch.randint(0, V, (B, K), generator=g)
    with torch.no_grad():  # true text drawn from the model (same W, fresh noise): n-gram hits occur
        while tokens.shape[1] < T:
            z = model.hidden_states(tokens)[:, -1] @ W + 0.3 * torch.randn(B, lat, generator=g)
            tokens = torch.cat([tokens, model.autoencoder.decode(z)], 1)

    def keyed(h, b, row, r):  # h: [D] -> [S, K]
        return model.autoencoder.decode((h @ W)[None] + noise[b, row, r])

    recorded = {}

    def batched(h, r):  # step 0: rows = starts; step r > 0: rows = branches j*S + s
        recorded[r] = h.clone()
        N = h.shape[1]
        return model.autoencoder.decode((h @ W)[:, :, None] + noise[:, :N, r])  # [B, N, S, K]

    sums, counts = calm_rollout_estimate(model, tokens, MAX_N, draw=batched, num_samples=S)

    ref_sums = torch.zeros(B, MAX_N, dtype=torch.float64)
    ref_counts = torch.zeros(B, MAX_N, dtype=torch.long)
    acc_total, coll_total = torch.zeros(MAX_N), torch.zeros(MAX_N)
    with torch.no_grad():
        for b in range(B):
            y = tokens[b]
            tf = [keyed(model.hidden_states(y[None, : (j + 1) * K])[0, -1], b, j, 0) for j in range(L - 1)]
            for j in range(L - 1):
                paths = [tf[j][s].tolist() for s in range(S)]  # branch s starts with teacher sample s
                for r in range(1, R):
                    if j + 1 + r > L - 1:
                        break
                    for s in range(S):
                        ctx = torch.cat([y[: (j + 1) * K], torch.tensor(paths[s])])
                        h = model.hidden_states(ctx[None])[0, -1]
                        assert torch.allclose(recorded[r][b, j * S + s], h, atol=1e-5), (r, b, j, s)
                        paths[s] += keyed(h, b, j * S + s, r)[0].tolist()  # sample 0 of the branch's draw
                for n in range(1, MAX_N + 1):
                    start = (j + 1) * K
                    if start + n > T:
                        continue
                    target = y[start : start + n].tolist()
                    along = [
                        torch.cat([tf[j + c][s] for c in range(math.ceil(n / K))])[:n].tolist()
                        for s in range(S)
                    ]
                    acc = 2 / S * sum(along[s] == target for s in range(S))
                    pairs = [(s, t) for s in range(S) for t in range(s + 1, S)]
                    coll = sum(paths[s][:n] == paths[t][:n] for s, t in pairs) / len(pairs)
                    ref_sums[b, n - 1] += acc - coll
                    ref_counts[b, n - 1] += 1
                    acc_total[n - 1] += acc
                    coll_total[n - 1] += coll
    assert counts.tolist() == ref_counts.tolist()
    assert torch.allclose(sums, ref_sums, atol=1e-12)
    assert (acc_total > 0).all() and (coll_total > 0).all()  # both terms are exercised up to n = 4


@pytest.mark.parametrize("K", [2, 4])
def test_estimate_brier_on_real_calm_and_token_lm(K, monkeypatch):
    """Smoke test of the default sampling paths (model.sample_chunks, torch.rand) on real models."""
    V = 7
    calm = _tiny_calm(K, V, monkeypatch)
    tokens = torch.randint(0, V, (2, 4 * K))
    sums, counts = estimate_brier(calm, tokens, MAX_N, generator=torch.Generator().manual_seed(0))
    assert sums.shape == counts.shape == (2, MAX_N)
    assert counts[:, 0].tolist() == [3, 3]
    assert not any(p.grad is not None for p in calm.parameters())
    lm = TokenLM(_tiny_backbone(), vocab_size=V).eval()
    metric = BrierLM(MAX_N)
    for estimator in ("two_sample", "low_variance"):
        metric.update(*estimate_brier(lm, tokens, MAX_N, estimator=estimator))
    out = metric.compute()
    assert torch.isfinite(torch.stack(list(out.values()))).all()
