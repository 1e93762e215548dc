"""Transformer backbone and TokenLM: causality, KV cache == full forward, branch masks, RoPE, overfit."""

from __future__ import annotations

import pytest
import torch

from calm_lightning.models.backbone import BranchKVCache, KVCache, Transformer, apply_rope, rope_cos_sin
from calm_lightning.models.config import BackboneConfig
from calm_lightning.models.token_lm import TokenLM

TOL = dict(atol=1e-5, rtol=1e-5)


def tiny_cfg(**overrides) -> BackboneConfig:
    base = dict(n_layers=2, d_model=32, n_heads=4, ffn_size=64, max_seq_len=64)
    base.update(overrides)
    return BackboneConfig(**base)


@pytest.fixture
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_cfg()).eval()


def test_shapes_and_config_checks(model):
    x = torch.randn(3, 7, 32)
    assert model(x).shape == (3, 7, 32)
    with pytest.raises(ValueError):
        Transformer(tiny_cfg(n_heads=5))
    with pytest.raises(ValueError):
        model(x, attn_mask=torch.ones(7, 7))  # not bool
    with pytest.raises(ValueError):
        model(x, positions=torch.arange(6))


def test_causality(model):
    x = torch.randn(2, 10, 32)
    y = model(x)
    x2 = x.clone()
    x2[:, 6:] = torch.randn(2, 4, 32)
    y2 = model(x2)
    torch.testing.assert_close(y2[:, :6], y[:, :6], atol=1e-6, rtol=0)
    assert not torch.allclose(y2[:, 6:], y[:, 6:])


def test_kv_cache_token_by_token_equals_full(model):
    x = torch.randn(2, 9, 32)
    full = model(x)
    cache = KVCache(model.n_layers)
    steps = [model(x[:, t : t + 1], kv_cache=cache) for t in range(9)]
    assert cache.length == 9
    assert cache.keys[0].shape == (2, 4, 9, 8)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **TOL)


@pytest.mark.parametrize("sizes", [[4, 5], [3, 1, 2, 3], [9]])
def test_kv_cache_blocks_equal_full(model, sizes):
    x = torch.randn(2, 9, 32)
    full = model(x)
    cache = model.new_cache()
    outs, start = [], 0
    for size in sizes:
        outs.append(model(x[:, start : start + size], kv_cache=cache))
        start += size
    torch.testing.assert_close(torch.cat(outs, dim=1), full, **TOL)


def test_branches_sharing_a_cached_prefix_equal_separate_forwards(model):
    """Two continuations of one prefix in a single call: branch mask + repeated positions."""
    prefix, a, b = torch.randn(1, 5, 32), torch.randn(1, 3, 32), torch.randn(1, 3, 32)
    want_a = model(torch.cat([prefix, a], dim=1))[:, 5:]
    want_b = model(torch.cat([prefix, b], dim=1))[:, 5:]

    cache = model.new_cache()
    model(prefix, kv_cache=cache)
    m = 3
    positions = torch.cat([torch.arange(5, 5 + m), torch.arange(5, 5 + m)])  # [2m]
    causal = torch.tril(torch.ones(m, m, dtype=torch.bool))
    own = torch.block_diag(causal, causal)  # [2m, 2m]: each branch sees only itself, causally
    mask = torch.cat([torch.ones(2 * m, 5, dtype=torch.bool), own], dim=1)  # [2m, 5 + 2m]
    out = model(torch.cat([a, b], dim=1), positions=positions, kv_cache=cache, attn_mask=mask)
    torch.testing.assert_close(out[:, :m], want_a, **TOL)
    torch.testing.assert_close(out[:, m:], want_b, **TOL)
    assert cache.length == 5 + 2 * m


@pytest.mark.parametrize("max_scores", [BranchKVCache.max_scores, 1])
def test_branch_cache_rollout_equals_separate_forwards(model, max_scores, monkeypatch):
    """Brier-style rollout: 2 branches from every start j of a cached prefix, 3 steps, rows ending
    from the back; each row must equal a plain forward over prefix[:j+1] + its own units
    (max_scores=1 splits every step into one row per chunk)."""
    monkeypatch.setattr(BranchKVCache, "max_scores", max_scores)
    B, L, br, steps = 2, 6, 2, 3
    prefix = torch.randn(B, L, 32)
    cache = model.new_cache()
    model(prefix, kv_cache=cache)
    branch = BranchKVCache(cache)
    units = {}  # (row, step) -> [B, 1, 32]
    for r in range(1, steps + 1):
        starts = torch.arange((L - 1 - r) * br) // br
        x = torch.randn(B, starts.shape[0], 32)
        branch.start_step(starts)
        out = model(x, positions=starts + r, kv_cache=branch)
        for row, j in enumerate(starts.tolist()):
            units[row, r] = x[:, row : row + 1]
            ctx = torch.cat([prefix[:, : j + 1]] + [units[row, s] for s in range(1, r + 1)], dim=1)
            torch.testing.assert_close(out[:, row], model(ctx)[:, -1], **TOL)
    assert cache.length == L  # the true sequence's cache is left as it was
    with pytest.raises(ValueError):
        model(x, kv_cache=branch)  # positions are required
    with pytest.raises(ValueError):
        branch.start_step(torch.zeros(1, dtype=torch.long))
        model(x, positions=starts + 4, kv_cache=branch)  # one start per row

def test_batched_positions_and_cache_select_crop(model):
    """Per-row positions [B, T]; branching a cached batch with select (repeated rows); crop."""
    prefix = torch.randn(2, 4, 32)
    cont = torch.randn(4, 2, 32)  # two continuations per prefix row
    cache = model.new_cache()
    model(prefix, kv_cache=cache)
    branched = cache.clone().select(torch.tensor([0, 0, 1, 1]))  # each row twice
    assert branched.batch_size == 4 and cache.batch_size == 2
    positions = torch.arange(4, 6).expand(4, 2)  # [B, T]
    out = model(cont, positions=positions, kv_cache=branched)
    for row in range(4):
        want = model(torch.cat([prefix[row // 2 : row // 2 + 1], cont[row : row + 1]], dim=1))[:, 4:]
        torch.testing.assert_close(out[row : row + 1], want, **TOL)

    # select gathers rows (repeats allowed); crop rolls back to the prefix
    picked = branched.clone().select(torch.tensor([3, 0]))
    assert picked.batch_size == 2 and picked.length == 6
    torch.testing.assert_close(picked.keys[1][0], branched.keys[1][3])
    branched.crop(4)
    assert branched.length == 4
    torch.testing.assert_close(branched.keys[0][::2], cache.keys[0])
    with pytest.raises(ValueError):
        branched.crop(5)


def test_rope_dot_products_depend_only_on_relative_position():
    torch.manual_seed(0)
    hd = 16
    q, k = torch.randn(1, 1, 1, hd), torch.randn(1, 1, 1, hd)

    def score(pq: int, pk: int) -> torch.Tensor:
        cq, sq = rope_cos_sin(torch.tensor([pq]), hd, 10000.0)
        ck, sk = rope_cos_sin(torch.tensor([pk]), hd, 10000.0)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    for offset in (0, 7, 300):
        torch.testing.assert_close(score(3 + offset, 1 + offset), score(3, 1), atol=1e-4, rtol=1e-4)
    assert not torch.isclose(score(3, 1), score(3, 2))
    # the rotation preserves norms
    c, s = rope_cos_sin(torch.tensor([123]), hd, 10000.0)
    torch.testing.assert_close(apply_rope(q, c, s).norm(), q.norm())


def test_model_is_invariant_to_shifting_all_positions(model):
    x = torch.randn(2, 6, 32)
    base = model(x)
    shifted = model(x, positions=torch.arange(6) + 1000)  # beyond max_seq_len: computed on the fly
    torch.testing.assert_close(shifted, base, atol=1e-4, rtol=1e-4)


def test_activation_checkpointing_matches_plain(monkeypatch):
    import calm_lightning.models.backbone as backbone

    calls = []

    def counting_checkpoint(*args, **kwargs):
        calls.append(1)
        return torch.utils.checkpoint.checkpoint(*args, **kwargs)

    monkeypatch.setattr(backbone, "checkpoint", counting_checkpoint)
    torch.manual_seed(0)
    plain = Transformer(tiny_cfg()).train()
    ckpt = Transformer(tiny_cfg(activation_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 5, 32)
    y1, y2 = plain(x), ckpt(x)
    torch.testing.assert_close(y2, y1)
    assert len(calls) == 2  # one per block
    y1.square().sum().backward()
    y2.square().sum().backward()
    for p1, p2 in zip(plain.parameters(), ckpt.parameters()):
        torch.testing.assert_close(p2.grad, p1.grad)


def test_init_scales_residual_projections():
    model = Transformer(tiny_cfg(n_layers=8, d_model=64, ffn_size=256))
    std = model.blocks[0].attn.proj.weight.std().item()
    assert abs(std - 0.02 / 4.0) < 1e-3  # 0.02 / sqrt(2 * 8)
    assert abs(model.blocks[0].attn.qkv.weight.std().item() - 0.02) < 2e-3


def test_bf16_autocast(model):
    x = torch.randn(2, 5, 32)
    cache = model.new_cache()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x, kv_cache=cache)
        y_step = model(torch.randn(2, 1, 32), kv_cache=cache)
    assert torch.isfinite(y).all() and torch.isfinite(y_step).all()
    torch.testing.assert_close(y.float(), model(x), atol=0.1, rtol=0.1)


def test_token_lm_shapes_tying_and_cache():
    torch.manual_seed(0)
    lm = TokenLM(tiny_cfg(), vocab_size=50).eval()
    tokens = torch.randint(0, 50, (2, 8))
    logits = lm(tokens)
    assert logits.shape == (2, 8, 50) and logits.dtype == torch.float32
    cache = lm.backbone.new_cache()
    steps = torch.cat([lm(tokens[:, t : t + 1], kv_cache=cache) for t in range(8)], dim=1)
    torch.testing.assert_close(steps, logits, **TOL)
    tied = TokenLM(tiny_cfg(), vocab_size=50, tie_embeddings=True)
    assert tied.lm_head.weight is tied.embed.weight
    assert len(list(tied.parameters())) == len(list(lm.parameters())) - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert tied(tokens).dtype == torch.float32


def test_token_lm_overfits_a_batch():
    torch.manual_seed(0)
    lm = TokenLM(tiny_cfg(), vocab_size=32).train()
    tokens = torch.randint(0, 32, (4, 16))
    opt = torch.optim.Adam(lm.parameters(), lr=3e-3)
    first = lm.loss(tokens)
    assert first.shape == () and abs(first.item() - torch.log(torch.tensor(32.0)).item()) < 0.3
    for _ in range(100):
        loss = lm.loss(tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert lm.loss(tokens).item() < 0.3 * first.item()
