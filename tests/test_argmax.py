"""The bf16-screened vocabulary argmax returns the fp32 argmax's tokens (models/argmax.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from calm_lightning.models import argmax as argmax_module
from calm_lightning.models.argmax import error_coefficient, projection_argmax, resolve_screen
from calm_lightning.models.autoencoder import ChunkAutoencoder
from calm_lightning.models.config import AutoencoderConfig


def near_ties(rows: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows h_r = 3 sqrt(d) q_r for orthonormal q_r (r < rows <= d / 2), each with its own pair of
    vocabulary vectors scoring alpha and alpha + delta_r exactly: |delta_r| / alpha log-uniform in
    [1e-6, 1e-1], random sign. Each vector also has a large component in the span orthogonal to every
    h (different per vector): it adds nothing to any exact score but ~3% of alpha to the bf16
    rounding error, so bf16 often ranks the pair strictly wrong; fp32 resolves it. Every other score is
    0. Returns h [R, d], weight [2R + 16, d], delta [R]."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    q = q.T  # rows orthonormal
    h = 3 * d**0.5 * q[:rows]
    unit = q[:rows] / (3 * d**0.5)  # <h_r, unit_s> = [r == s]
    rest = q[rows:]  # [d - R, d] orthogonal to every h

    def orthogonal(n: int) -> torch.Tensor:  # [n, d] unit vectors in span(rest)
        v = torch.randn(n, rest.shape[0], generator=g, dtype=torch.float64) @ rest
        return v / v.norm(dim=-1, keepdim=True)

    alpha, beta = 1.0, 3.0
    delta = 10 ** (torch.rand(rows, generator=g, dtype=torch.float64) * 5 - 6) * alpha
    delta = delta * torch.where(torch.rand(rows, generator=g) < 0.5, -1.0, 1.0).double()
    first = alpha * unit + beta * orthogonal(rows)
    second = (alpha + delta.unsqueeze(-1)) * unit + beta * orthogonal(rows)
    others = 0.01 * orthogonal(16)
    weight = torch.cat([torch.stack([first, second], 1).flatten(0, 1), others])
    return h.float(), weight.float(), delta.float()


def many_near_ties(seeds: range, rows: int = 128, d: int = 256):
    """near_ties for several seeds, as (h, weight) pairs."""
    return [near_ties(rows, d, seed)[:2] for seed in seeds]


def test_screen_gives_the_fp32_tokens_on_adversarial_near_ties():
    strict_total = rechecked = 0
    for h, weight in many_near_ties(range(25)):
        fp32 = F.linear(h, weight).argmax(-1)
        top = F.linear(h.bfloat16(), weight.bfloat16()).float().topk(2, dim=-1)
        # bf16 confidently wrong (not a tie)
        strict_total += int(((top.indices[:, 0] != fp32) & (top.values[:, 0] > top.values[:, 1])).sum())
        stats = {}
        assert torch.equal(projection_argmax(h, weight, "bf16", stats), fp32)
        rechecked += stats["rechecked"]
    assert strict_total > 100, "bf16 alone must be strictly wrong on many rows, else the test has no power"
    assert rechecked >= strict_total


def test_screen_keeps_the_bf16_token_only_where_the_bound_proves_it(monkeypatch):
    """With the error bound removed (c = 0) the screen trusts bf16's strict near-wins and returns wrong
    tokens: the bound is what makes it exact (seen failing)."""
    monkeypatch.setattr(argmax_module, "error_coefficient", lambda d: 0.0)
    wrong = sum(int((projection_argmax(h, w, "bf16") != F.linear(h, w).argmax(-1)).sum())
                for h, w in many_near_ties(range(25, 30)))
    assert wrong > 0


def test_error_coefficient_bounds_the_bf16_and_fp32_errors():
    g = torch.Generator().manual_seed(2)
    for d in (16, 256, 1024):
        h = torch.randn(64, d, generator=g) * torch.rand(64, 1, generator=g) * 10
        w = torch.randn(512, d, generator=g) * torch.rand(512, 1, generator=g)
        exact = h.double() @ w.double().T
        scale = h.norm(dim=-1, keepdim=True).double() * w.norm(dim=-1).double()
        err_bf16 = ((F.linear(h.bfloat16(), w.bfloat16()).double() - exact).abs() / scale).max()
        err_fp32 = ((F.linear(h, w).double() - exact).abs() / scale).max()
        c = error_coefficient(d)
        assert err_bf16 <= c and err_fp32 <= c
        assert err_bf16 > c / 40, "the bound should be within a small factor of the worst error seen"


def test_exact_ties_nan_rows_and_random_inputs():
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(300, 64, generator=g)
    weight[7] = weight[3]  # duplicate rows: fp32 argmax takes the first index
    h = torch.randn(500, 64, generator=g)
    h[:50] = weight[3] * 2  # rows whose best is the tie 3 / 7
    h[60, 5] = float("nan")
    fp32 = F.linear(h, weight).argmax(-1)
    screened = projection_argmax(h, weight, "bf16")
    assert torch.equal(screened[torch.arange(500) != 60], fp32[torch.arange(500) != 60])
    assert (screened[:50] == 3).all()
    many = torch.randn(2, 5000, 3, 64, generator=g)  # leading dims kept, > one row tile
    assert torch.equal(projection_argmax(many, weight, "bf16"), F.linear(many, weight).argmax(-1))


def test_screen_modes_and_autocast():
    assert resolve_screen("fp32", torch.device("cpu")) == "fp32"
    assert resolve_screen("auto", torch.device("cuda")) == "fp32"
    with pytest.raises(ValueError):
        resolve_screen("fp16", torch.device("cpu"))
    h, weight, _ = near_ties(32, 64, seed=4)
    assert torch.equal(projection_argmax(h, weight, "fp32"), F.linear(h, weight).argmax(-1))
    with torch.autocast("cpu", torch.bfloat16):  # autocast's own low-precision projection, as before
        assert torch.equal(projection_argmax(h, weight, "bf16"), F.linear(h, weight).argmax(-1))


def test_autoencoder_decode_uses_the_screen_and_keeps_its_tokens():
    cfg = AutoencoderConfig(vocab_size=512, latent_size=16, d_model=64, ffn_size=96, token_mask_prob=0.0)
    torch.manual_seed(5)
    fp32_ae = ChunkAutoencoder(cfg).eval()
    screened_ae = ChunkAutoencoder(AutoencoderConfig(**{**cfg.__dict__, "argmax_screen": "bf16"})).eval()
    screened_ae.load_state_dict(fp32_ae.state_dict())
    fp32_ae.cfg.argmax_screen = "fp32"
    z = torch.randn(40, 50, 16)
    stats = {}
    with torch.no_grad():
        tokens = screened_ae.decode(z, stats)
        assert torch.equal(tokens, fp32_ae.decode(z)) and torch.equal(tokens, fp32_ae.decode_logits(z).argmax(-1))
    assert stats["rows"] == 40 * 50 * 4


def test_screen_gives_up_after_a_losing_probe(monkeypatch):
    """Near-flat logits: the probe tile needs fp32 almost everywhere, so every later row goes to fp32
    directly (counted as re-checked: all 2488 after the 512-row probe), with the same tokens."""
    g = torch.Generator().manual_seed(6)
    weight = torch.randn(4096, 64, generator=g) * 0.02
    h = torch.randn(3000, 64, generator=g)
    stats = {}
    assert torch.equal(projection_argmax(h, weight, "bf16", stats), F.linear(h, weight).argmax(-1))
    assert 3000 - argmax_module._PROBE_ROWS < stats["rechecked"] < 3000
    monkeypatch.setattr(argmax_module, "_MAX_RECHECK", 1.0)  # never give up: only the unsure rows
    stats = {}
    projection_argmax(h, weight.clone(), "bf16", stats)  # a new tensor: no backoff from the lost probe
    assert stats["rechecked"] < 3000 - argmax_module._PROBE_ROWS


def test_losing_probes_back_off_across_calls_and_a_winning_one_resets():
    """After f losing probes in a row on one weight the next 2^f calls skip the screen (every row in
    fp32: re-checked == rows), a winning probe resets f; the tokens are the fp32 argmax throughout.
    Flat rows: h random against a small random weight; wide rows: h along one vocabulary vector."""
    g = torch.Generator().manual_seed(8)
    weight = torch.randn(2048, 64, generator=g) * 0.02
    flat = torch.randn(600, 64, generator=g)
    wide = 50 * weight[torch.randint(0, 2048, (600,), generator=g)]

    def screened(h) -> bool:  # one call; True where the screen ran (some rows kept their bf16 token)
        stats = {}
        assert torch.equal(projection_argmax(h, weight, "bf16", stats), F.linear(h, weight).argmax(-1))
        return stats["rechecked"] < stats["rows"]

    assert screened(flat)  # a losing probe still keeps its few safe rows
    ran = [screened(flat) for _ in range(2 + 1 + 4 + 1)]
    assert ran == [False, False, True, False, False, False, False, True]  # skip 2, probe, skip 4, probe
    assert [screened(flat) for _ in range(8)] == [False] * 8  # skip 8 after the third loss
    while not screened(wide):  # the skips run out, then the wide rows' probe wins
        pass
    assert screened(wide) and screened(flat)  # a win: f = 0, so the next loss skips only 2
    assert [screened(flat) for _ in range(3)] == [False, False, True]


def test_cached_bf16_weight_follows_in_place_updates_and_new_tensors():
    g = torch.Generator().manual_seed(7)
    weight = torch.nn.Parameter(torch.randn(300, 32, generator=g))
    h = torch.randn(200, 32, generator=g)
    assert torch.equal(projection_argmax(h, weight, "bf16"), F.linear(h, weight).argmax(-1))
    with torch.no_grad():
        weight.mul_(-1)  # same object, new version: the cached copy must not be reused
    assert torch.equal(projection_argmax(h, weight, "bf16"), F.linear(h, weight).argmax(-1))
    other = torch.randn(300, 32, generator=g)  # another tensor of the same shape
    assert torch.equal(projection_argmax(h, other, "bf16"), F.linear(h, other).argmax(-1))
    few = h[:3]  # below _MIN_ROWS: plain fp32
    assert torch.equal(projection_argmax(few, other, "bf16"), F.linear(few, other).argmax(-1))
