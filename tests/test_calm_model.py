"""CALM: shapes, loss, gradient flow (the frozen autoencoder gets none), eval-mode AE, cache == full."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from calm_lightning.models.autoencoder import ChunkAutoencoder
from calm_lightning.models.calm import CALM, CALMOutput
from calm_lightning.models.config import AutoencoderConfig, BackboneConfig, HeadConfig
from calm_lightning.models.heads import HEADS
from calm_lightning.models.heads.base import GenerativeHead

V, K, LATENT, D = 40, 4, 8, 32


class StubHead(GenerativeHead):
    """A Gaussian with learned mean and fixed unit scale: enough to exercise CALM's wiring."""

    def __init__(self, hidden_size, latent_size, cfg, num_backbone_layers):
        super().__init__(hidden_size, latent_size, cfg, num_backbone_layers)
        self.net = nn.Linear(hidden_size, latent_size)

    def loss(self, hidden, mu, log_sigma):
        return (self.net(hidden).float() - mu).square().sum(-1)  # [P]

    def sample(self, hidden, num_samples=1, generator=None):
        mean = self.net(hidden).float()[:, None]  # [P, 1, l]
        noise = torch.randn(
            (hidden.shape[0], num_samples, self.latent_size), generator=generator, device=hidden.device
        )
        return mean + noise  # [P, S, l]


def head_names() -> list[str]:
    # the stub always; the real energy head once it is registered
    return ["stub"] + (["energy"] if "energy" in HEADS else [])


@pytest.fixture(params=head_names())
def calm(request, monkeypatch) -> CALM:
    monkeypatch.setitem(HEADS, "stub", StubHead)  # removed again after the test
    torch.manual_seed(0)
    ae_cfg = AutoencoderConfig(
        vocab_size=V, chunk_size=K, latent_size=LATENT, d_model=16, ffn_size=32, mask_token_id=V - 1
    )
    backbone_cfg = BackboneConfig(n_layers=2, d_model=D, n_heads=4, ffn_size=64, max_seq_len=32)
    head_cfg = HeadConfig(name=request.param, num_samples=2)
    head_cfg.energy.num_target_samples = 4
    return CALM(backbone_cfg, head_cfg, ChunkAutoencoder(ae_cfg))


def test_attributes_and_hidden_shapes(calm):
    assert calm.chunk_size == K and calm.latent_size == LATENT
    assert calm.embed.weight.shape == (V, D)
    assert calm.embed.weight is not calm.autoencoder.embedding.weight
    tokens = torch.randint(0, V, (3, 6 * K))
    assert calm.hidden_states(tokens).shape == (3, 6, D)
    with pytest.raises(ValueError):
        calm.hidden_states(torch.randint(0, V, (3, 6 * K + 1)))


def test_loss_is_a_finite_scalar(calm):
    tokens = torch.randint(0, V, (3, 5 * K))
    out = calm.loss(tokens)
    assert isinstance(out, CALMOutput)
    assert out.loss.shape == () and torch.isfinite(out.loss)
    assert out.per_position.shape == (3, 4)
    torch.testing.assert_close(out.loss, out.per_position.mean())
    with pytest.raises(ValueError):
        calm.loss(torch.randint(0, V, (3, K)))


def test_stub_loss_targets_are_next_chunk_posteriors(monkeypatch):
    monkeypatch.setitem(HEADS, "stub", StubHead)
    torch.manual_seed(0)
    ae = ChunkAutoencoder(AutoencoderConfig(vocab_size=V, chunk_size=K, latent_size=LATENT, d_model=16))
    model = CALM(BackboneConfig(n_layers=1, d_model=D, n_heads=4, ffn_size=64), HeadConfig(name="stub"), ae)
    tokens = torch.randint(0, V, (2, 4 * K))
    h = model.hidden_states(tokens)  # [B, L, D]
    mu, _ = ae.encode(tokens.view(2, 4, K))  # [B, L, l]
    want = (model.head.net(h[:, :-1]) - mu[:, 1:]).square().sum(-1)  # h_j predicts chunk j+1
    torch.testing.assert_close(model.loss(tokens).per_position, want)


def test_gradients_reach_everything_but_the_autoencoder(calm):
    calm.train()
    tokens = torch.randint(0, V, (2, 4 * K))
    # One SGD step first: a head whose output layer is zero-initialised (the energy head) passes no
    # gradient upstream until that layer has moved.
    opt = torch.optim.SGD(calm.trainable_parameters(), lr=0.1)
    calm.loss(tokens).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    calm.loss(tokens).loss.backward()
    for name in ("embed", "compress", "backbone", "head"):
        grads = [p.grad for p in getattr(calm, name).parameters()]
        assert all(g is not None for g in grads), name
        assert sum(g.abs().sum() for g in grads) > 0, name
    assert all(not p.requires_grad and p.grad is None for p in calm.autoencoder.parameters())
    trainable = set(map(id, calm.trainable_parameters()))
    assert not trainable & set(map(id, calm.autoencoder.parameters()))
    # a self-contained checkpoint: the autoencoder's weights are in the state dict
    assert any(k.startswith("autoencoder.") for k in calm.state_dict())


def test_autoencoder_stays_in_eval_mode(calm):
    calm.train()
    assert calm.training and calm.backbone.training
    assert not any(m.training for m in calm.autoencoder.modules())
    calm.eval()
    calm.train(True)
    assert not calm.autoencoder.training


def test_hidden_states_with_cache_chunk_by_chunk_equal_full(calm):
    calm.eval()
    tokens = torch.randint(0, V, (2, 5 * K))
    full = calm.hidden_states(tokens)
    cache = calm.new_cache()
    steps = [calm.hidden_states(tokens[:, j * K : (j + 1) * K], kv_cache=cache) for j in range(5)]
    assert cache.length == 5
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    # and in uneven blocks of chunks
    cache = calm.new_cache()
    first = calm.hidden_states(tokens[:, : 2 * K], kv_cache=cache)
    rest = calm.hidden_states(tokens[:, 2 * K :], kv_cache=cache)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, atol=1e-5, rtol=1e-5)


def test_sample_chunks_shape(calm):
    calm.eval()
    hidden = calm.hidden_states(torch.randint(0, V, (3, 2 * K))).reshape(6, D)
    gen = torch.Generator().manual_seed(0)
    chunks = calm.sample_chunks(hidden, num_samples=5, generator=gen)
    assert chunks.shape == (6, 5, K) and chunks.dtype == torch.long
    assert chunks.min() >= 0 and chunks.max() < V
    again = calm.sample_chunks(hidden, num_samples=5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(chunks, again)


def test_bf16_autocast_loss_and_backward(calm):
    calm.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = calm.loss(torch.randint(0, V, (2, 3 * K)))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert calm.embed.weight.grad is not None


def test_reference_architecture_switches():
    """experiments/reference_arch.yaml's keys give the reference code's layers: biases, LayerNorm eps
    1e-6, N(0, 0.02) init (no scaled residual init, no xavier head), integer flow time."""
    import math
    from pathlib import Path

    from calm_lightning.config.loader import load_config, to_object
    from calm_lightning.models.heads import build_head

    yaml = Path(__file__).resolve().parents[1] / "experiments" / "reference_arch.yaml"
    exp = to_object(load_config(yaml, ["model.autoencoder.vocab_size=64"]))
    ae_cfg = exp.model.autoencoder
    ae = ChunkAutoencoder(ae_cfg)
    assert all(m.bias is not None for m in (ae.enc_compress, ae.dec_in, ae.dec_expand))
    assert ChunkAutoencoder(AutoencoderConfig(vocab_size=64)).enc_compress.bias is None  # kit default
    torch.manual_seed(0)
    model = CALM(exp.model.backbone, exp.model.head, ae)
    first, _, second, norm = model.compress
    assert first.bias is not None and second.bias is not None and norm.eps == 1e-6
    head = model.head
    assert all(m.eps == 1e-6 for m in head.modules() if isinstance(m, nn.LayerNorm))
    assert all(blk.ffn.w1.bias is not None and blk.ffn.w2.bias is not None for blk in head.blocks)
    # N(0, 0.02): a 256 x 256 block matrix has std 0.02 (xavier-uniform: sqrt(2 / (256 + 256)) = 0.0625)
    assert head.blocks[0].fuse[2].weight.std().item() == pytest.approx(0.02, rel=0.05)
    n = exp.model.backbone.n_layers
    assert model.backbone.blocks[0].ffn.w2.weight.std().item() == pytest.approx(0.02, rel=0.05)
    default = CALM(BackboneConfig(), HeadConfig(), ChunkAutoencoder(AutoencoderConfig(vocab_size=64)))
    assert default.backbone.blocks[0].ffn.w2.weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * n), rel=0.05)
    assert default.head.blocks[0].fuse[2].weight.std().item() == pytest.approx(math.sqrt(2 / 512), rel=0.05)
    # integer flow time: the velocity is constant within one 1/1000 bin of t, and changes across bins
    flow_cfg = exp.model.head
    flow_cfg.name = "flow"
    flow = build_head(D, LATENT, flow_cfg, 4)
    for p in flow.parameters():
        nn.init.normal_(p, std=0.3)
    x, cond = torch.randn(1, LATENT), flow.net.embed_condition(torch.randn(1, D))
    v = [flow.velocity(x, torch.tensor([t]), cond) for t in (0.5001, 0.5009, 0.5011)]
    torch.testing.assert_close(v[0], v[1])
    assert not torch.allclose(v[1], v[2])


def _aux_calm(weight: float) -> CALM:
    torch.manual_seed(0)
    ae_cfg = AutoencoderConfig(
        vocab_size=V, chunk_size=K, latent_size=LATENT, d_model=16, ffn_size=32, mask_token_id=V - 1
    )
    backbone_cfg = BackboneConfig(n_layers=2, d_model=D, n_heads=4, ffn_size=64, max_seq_len=32)
    head_cfg = HeadConfig(name="energy", num_samples=2, aux_token_weight=weight)
    head_cfg.energy.num_target_samples = 4
    return CALM(backbone_cfg, head_cfg, ChunkAutoencoder(ae_cfg))


def test_aux_token_head_is_absent_by_default():
    """The paper's method: no auxiliary parameters, no aux term, the objective is the head loss itself."""
    model = _aux_calm(0.0)
    assert not hasattr(model, "aux_expand") and not hasattr(model, "aux_out")
    out = model.loss(torch.randint(0, V, (2, 5 * K)))
    assert out.aux_ce is None and out.objective(model.aux_weight) is out.loss


def test_aux_token_loss_is_next_chunk_cross_entropy():
    """aux_ce = mean CE of chunk j+1's K tokens from h_j (explicit logits), objective = head + w * aux,
    and its gradient reaches the backbone, not the head; evaluation (no_grad) skips it."""
    model = _aux_calm(0.5)
    B, L = 3, 5
    tokens = torch.randint(0, V, (B, L * K))
    out = model.loss(tokens)
    h = model.hidden_states(tokens)[:, :-1]  # [B, L-1, D]: h_0..h_{L-2}
    logits = model.aux_out(model.aux_expand(h).view(B, L - 1, K, D))  # [B, L-1, K, V]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, V), tokens[:, K:].reshape(-1))
    torch.testing.assert_close(out.aux_ce, expected)
    torch.testing.assert_close(out.objective(0.5), out.loss + 0.5 * expected)
    model.zero_grad()
    out.aux_ce.backward()
    assert model.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.head.parameters())
    assert model.embed.weight.grad.abs().sum() > 0
    with torch.no_grad():
        assert model.loss(tokens).aux_ce is None
