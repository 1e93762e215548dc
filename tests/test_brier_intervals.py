"""BrierLM uncertainty: the cluster-robust (CR1) variance against its definition, additivity of the
states, the reported BrierLM interval at the <= 0 boundary, and interval coverage on a toy with
known Brier-n whose evaluation blocks are internally correlated (a naive i.i.d. standard error must
under-cover there, which shows that the coverage check can fail)."""

from __future__ import annotations

import math

import pytest
import torch

from brier_reference import sample_brier_terms
from calm_lightning.metrics import BrierLM
from calm_lightning.metrics.functional import brier_intervals, normal_quantile

MAX_N = 4
Z95 = normal_quantile(0.95)


def _blocks(seed: int, G: int = 30, max_n: int = MAX_N):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(5, 40, (G, 1), generator=g).expand(G, max_n) - torch.arange(
        max_n
    )  # shorter for larger n
    sums = (torch.rand(G, max_n, generator=g, dtype=torch.float64) * 0.6 + 0.1) * counts
    return sums, counts


def test_cluster_variance_matches_definition():
    sums, counts = _blocks(0)
    metric = BrierLM(MAX_N)
    metric.update(sums[:11], counts[:11])  # in two updates: states are additive
    metric.update(sums[11:], counts[11:])
    out = metric.compute()
    G = sums.shape[0]
    n = counts.double()
    m = sums.sum(0) / n.sum(0)
    resid = sums - m * n  # [G, max_n]
    cov = G / (G - 1) * resid.T @ resid / (n.sum(0)[:, None] * n.sum(0)[None, :])
    for i in range(MAX_N):
        assert out[f"brier{i + 1}"].item() == pytest.approx(m[i].item(), rel=1e-12)
        assert out[f"brier{i + 1}_se"].item() == pytest.approx(cov[i, i].sqrt().item(), rel=1e-9)
        assert out[f"brier{i + 1}_lo"].item() == pytest.approx(
            (m[i] - Z95 * cov[i, i].sqrt()).item(), rel=1e-9
        )
        assert out[f"brier{i + 1}_hi"].item() == pytest.approx(
            (m[i] + Z95 * cov[i, i].sqrt()).item(), rel=1e-9
        )
    # BrierLM: delta method on log(100 * geometric mean)
    grad = 1 / (MAX_N * m)
    half = Z95 * (grad @ cov @ grad).sqrt()
    geo = 100 * m.log().mean().exp()
    assert out["brierlm"].item() == pytest.approx(geo.item(), rel=1e-12)
    assert out["brierlm_lo"].item() == pytest.approx((geo * (-half).exp()).item(), rel=1e-9)
    assert out["brierlm_hi"].item() == pytest.approx((geo * half.exp()).item(), rel=1e-9)


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric BrierLM was called before")
def test_merged_metrics_equal_one_metric():
    """What the distributed sync does (sum every state) gives the same intervals as one process."""
    sums, counts = _blocks(1)
    a, b, one = BrierLM(MAX_N), BrierLM(MAX_N), BrierLM(MAX_N)
    a.update(sums[::2], counts[::2])
    b.update(sums[1::2], counts[1::2])
    one.update(sums, counts)
    merged = BrierLM(MAX_N)
    merged.merge_state(a)
    merged.merge_state(b)
    want = one.compute()
    for k, v in merged.compute().items():
        assert v.item() == pytest.approx(want[k].item(), rel=1e-10), k


def test_confidence_changes_the_width():
    sums, counts = _blocks(2)
    wide, narrow = BrierLM(MAX_N, confidence=0.99), BrierLM(MAX_N, confidence=0.5)
    for m in (wide, narrow):
        m.update(sums, counts)
    w, n = wide.compute(), narrow.compute()
    ratio = (w["brier1_hi"] - w["brier1_lo"]) / (n["brier1_hi"] - n["brier1_lo"])
    assert ratio.item() == pytest.approx(normal_quantile(0.99) / normal_quantile(0.5), rel=1e-9)
    with pytest.raises(ValueError):
        BrierLM(MAX_N, confidence=1.0)


def test_brierlm_interval_near_and_past_zero():
    sums, counts = _blocks(3)
    base = sums / counts  # per-block Brier-n in [0.1, 0.7]
    plain = brier_intervals(*_states(sums, counts))
    b3, se3 = plain["brier3"].item(), plain["brier3_se"].item()
    near, below = b3 - se3, b3 + se3  # leave term 3 one standard error above / below 0
    for shift in (near, below, 2.0):  # and far below 0
        s = (base - torch.tensor([0.0, 0.0, shift, 0.0], dtype=torch.float64)) * counts
        out = brier_intervals(*_states(s, counts))
        b3, lo3, hi3 = out["brier3"].item(), out["brier3_lo"].item(), out["brier3_hi"].item()
        lm, lo, hi = out["brierlm"].item(), out["brierlm_lo"].item(), out["brierlm_hi"].item()
        terms_hi = torch.stack([out[f"brier{n}_hi"] for n in range(1, 5)]).clamp_min(0.0)
        clipped = 100 * terms_hi.prod().item() ** 0.25
        if shift == near:  # positive, not clearly: the delta method on the log still applies
            assert 0 < b3 and lo3 < 0 < hi3
            assert 0 < lo < lm < hi
            assert hi > clipped  # wider than 'every term at its upper bound' (see the docstring)
        else:  # BrierLM = 0: [0, BrierLM with every term at its upper bound]
            assert b3 < 0 and lm == 0.0 and lo == 0.0
            assert hi == pytest.approx(clipped, rel=1e-9)
        if shift == below:  # not clearly negative: the upper bound stays positive
            assert lo3 < 0 < hi3 and hi > 0
        if shift == 2.0:  # clearly negative: BrierLM is 0 with confidence
            assert hi3 < 0 and hi == 0.0


def test_one_block_has_no_interval():
    metric = BrierLM(2)
    metric.update(torch.tensor([[3.0, 1.0]]), torch.tensor([[10, 9]]))
    out = metric.compute()
    assert out["brier1"].item() == pytest.approx(0.3)
    for k in ("brier1_se", "brier1_lo", "brierlm_lo", "brierlm_hi"):
        assert math.isnan(out[k].item()), k


def _states(sums, counts):
    n = counts.double()
    return sums.sum(0), counts.sum(0), (counts > 0).sum(0), sums.T @ sums, sums.T @ n, n.T @ n


# ==================================================================================================
# Coverage on a toy with known Brier-n
# ==================================================================================================
#
# Model: tokens i.i.d. from P, so P(x_{1:n}) = prod_k P(x_k) and sum_x P(x_{1:n})^2 = (sum P^2)^n.
# Truth: each block b has a hidden topic z_b (uniform over TOPICS); its tokens are i.i.d. from Q_z.
# Exact Brier-n = 2 E_z[(sum_y Q_z(y) P(y))^n] - (sum P^2)^n. Positions of one block share z_b, so
# they are correlated (the naive i.i.d. SE ignores it), and block sizes vary (ratio estimator).
# Each position is scored by the same U-statistic as CALM (`sample_brier_terms`) with S model samples.

P_MODEL = torch.tensor([0.6, 0.25, 0.1, 0.05], dtype=torch.float64)
TOPICS = torch.tensor(
    [[0.95, 0.02, 0.02, 0.01], [0.05, 0.05, 0.3, 0.6], [0.3, 0.6, 0.05, 0.05]], dtype=torch.float64
)
REPETITIONS, BLOCKS, MAX_POSITIONS, S_TOY = 1000, 60, 32, 4


def _exact_toy_brier() -> torch.Tensor:
    hit = TOPICS @ P_MODEL  # [topics] E_{y ~ Q_z} P(y)
    n = torch.arange(1, MAX_N + 1, dtype=torch.float64)
    return 2 * (hit[:, None] ** n).mean(0) - P_MODEL.square().sum() ** n  # [max_n]


def _draw(probs: torch.Tensor, num: int, g: torch.Generator) -> torch.Tensor:
    """num categorical draws per row of probs [..., V] by inverse CDF -> [..., num]."""
    cdf = probs.cumsum(-1).contiguous()
    u = torch.rand(*probs.shape[:-1], num, generator=g, dtype=torch.float64)
    return torch.searchsorted(cdf, u, right=True).clamp_max(probs.shape[-1] - 1)


def _toy_scores(g: torch.Generator):
    """Per-position Brier-n estimates [R, G, M, max_n] and validity [R, G, M] for all repetitions."""
    R, G, M = REPETITIONS, BLOCKS, MAX_POSITIONS
    z = torch.randint(0, len(TOPICS), (R, G), generator=g)
    y = _draw(TOPICS[z], M * MAX_N, g).view(R, G, M, MAX_N)  # topic z_b for every token of block b
    x = _draw(P_MODEL, R * G * M * S_TOY * MAX_N, g).view(R, G, M, S_TOY, MAX_N)
    accuracy, collision = sample_brier_terms(x, y, MAX_N)
    sizes = torch.randint(M // 4, M + 1, (R, G, 1), generator=g)  # block sizes vary
    valid = torch.arange(M)[None, None, :] < sizes  # [R, G, M]
    return (accuracy - collision) * valid[..., None], valid


@pytest.fixture(scope="module")
def toy_runs():
    scores, valid = _toy_scores(torch.Generator().manual_seed(0))
    exact = _exact_toy_brier()
    assert (exact > 0.02).all()  # every term clearly positive: BrierLM's delta method applies
    results = []
    for r in range(REPETITIONS):
        metric = BrierLM(MAX_N)
        counts = valid[r].sum(-1, keepdim=True).expand(-1, MAX_N)  # [G, max_n]
        metric.update(scores[r].sum(1), counts)  # per-block sums [G, max_n]
        results.append(metric.compute())
    return scores, valid, exact, results


def test_brier1_interval_covers_the_truth_95_percent(toy_runs):
    scores, valid, exact, results = toy_runs
    hits = torch.tensor([float(o["brier1_lo"] <= exact[0] <= o["brier1_hi"]) for o in results])
    coverage = hits.mean().item()
    assert 0.93 <= coverage <= 0.97, coverage
    # every n, looser (Brier-n for n > 1 are rarer events, the normal approximation is rougher)
    for n in range(2, MAX_N + 1):
        cov_n = sum(float(o[f"brier{n}_lo"] <= exact[n - 1] <= o[f"brier{n}_hi"]) for o in results) / len(
            results
        )
        assert 0.91 <= cov_n <= 0.98, (n, cov_n)
    # the point estimate is unbiased: its mean over repetitions is within 4 standard errors of the truth
    means = torch.stack([o["brier1"] for o in results])
    assert abs(means.mean() - exact[0]) <= 4 * means.std() / math.sqrt(len(results))


def test_naive_iid_interval_under_covers(toy_runs):
    """The same intervals with positions treated as independent: the check above would fail them."""
    scores, valid, exact, _ = toy_runs
    x = scores[..., 0]  # [R, G, M] Brier-1 per position
    N = valid.sum(dim=(1, 2)).double()  # [R]
    mean = x.sum(dim=(1, 2)) / N
    sq = ((x - mean[:, None, None]) ** 2 * valid).sum(dim=(1, 2))
    se = (sq / (N - 1) / N).sqrt()
    coverage = ((mean - Z95 * se <= exact[0]) & (exact[0] <= mean + Z95 * se)).double().mean().item()
    assert coverage < 0.80, coverage  # about 0.5: the positions of a block are strongly correlated


def test_brierlm_interval_covers_roughly(toy_runs):
    _, _, exact, results = toy_runs
    truth = 100 * exact.log().mean().exp()
    coverage = sum(float(o["brierlm_lo"] <= truth <= o["brierlm_hi"]) for o in results) / len(results)
    assert 0.91 <= coverage <= 0.98, coverage
