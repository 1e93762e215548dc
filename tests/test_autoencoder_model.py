"""ChunkAutoencoder: shapes, the clipped-KL objective, training-only regularisers, tied weights, overfit."""

from __future__ import annotations

import math

import pytest
import torch

from calm_lightning.models.autoencoder import (
    LOG_SIGMA_MAX,
    LOG_SIGMA_MIN,
    AutoencoderOutput,
    ChunkAutoencoder,
    active_dims,
    clipped_kl,
    gaussian_kl_per_dim,
)
from calm_lightning.models.config import AutoencoderConfig

V = 64


def tiny_cfg(**overrides) -> AutoencoderConfig:
    base = dict(vocab_size=V, chunk_size=4, latent_size=16, d_model=32, ffn_size=64, mask_token_id=V - 1)
    base.update(overrides)
    return AutoencoderConfig(**base)


@pytest.mark.parametrize("K", [1, 2, 4, 8])
def test_shapes(K):
    torch.manual_seed(0)
    ae = ChunkAutoencoder(tiny_cfg(chunk_size=K, latent_size=4 * K))
    assert ae.chunk_size == K and ae.latent_size == 4 * K
    tokens = torch.randint(0, V, (5, K))
    out = ae(tokens)
    assert isinstance(out, AutoencoderOutput)
    assert out.logits is None  # fused_ce (the default) never builds them
    assert ChunkAutoencoder(tiny_cfg(chunk_size=K, latent_size=4 * K, fused_ce=False))(tokens).logits.shape == (5, K, V)
    assert out.mu.shape == out.log_sigma.shape == out.z.shape == (5, 4 * K)
    assert out.kl_per_dim.shape == (4 * K,)
    for scalar in (out.loss, out.ce, out.kl):
        assert scalar.shape == () and torch.isfinite(scalar)
    # encode / decode accept arbitrary leading dims
    mu, log_sigma = ae.encode(torch.randint(0, V, (2, 3, K)))
    assert mu.shape == log_sigma.shape == (2, 3, 4 * K)
    assert ae.decode_logits(mu).shape == (2, 3, K, V)
    assert ae.decode(mu).shape == (2, 3, K) and ae.decode(mu).dtype == torch.long
    with pytest.raises(ValueError):
        ae.encode(torch.randint(0, V, (2, K + 1)))


def test_kl_clip_matches_hand_computation():
    mu = torch.tensor([[0.0, 1.0, 2.0], [0.0, -1.0, 0.0]])
    log_sigma = torch.tensor([[0.0, 0.0, math.log(0.5)], [math.log(2.0), 0.0, 0.0]])
    # KL_i = 0.5 (mu^2 + sigma^2 - 1) - log sigma, per example
    row0 = [0.0, 0.5, 0.5 * (4 + 0.25 - 1) + math.log(2.0)]
    row1 = [0.5 * (4 - 1) - math.log(2.0), 0.5, 0.0]
    expected = torch.tensor([row0, row1])
    kl = gaussian_kl_per_dim(mu, log_sigma)
    torch.testing.assert_close(kl, expected)
    # chunk (reference code): floor each chunk's KL_i, sum over dims, average over chunks.
    per_chunk = [sum(max(0.5, v) for v in row) for row in (row0, row1)]
    torch.testing.assert_close(clipped_kl(kl, 0.5, "chunk"), torch.tensor(sum(per_chunk) / 2))
    assert clipped_kl(kl, 0.5) == clipped_kl(kl, 0.5, "chunk")  # the default
    # batch (Kingma et al.): batch mean first, then the floor.
    per_dim = expected.mean(0)
    assert per_dim[0] < 0.5 < per_dim[2]
    want = sum(max(0.5, v) for v in per_dim.tolist())
    torch.testing.assert_close(clipped_kl(kl, 0.5, "batch"), torch.tensor(want))
    assert not torch.isclose(clipped_kl(kl, 0.5, "chunk"), clipped_kl(kl, 0.5, "batch"))
    # active dims in the same two senses, at a floor of 0.3: per chunk 2 and 2 dims above it
    # (mean 2); batch means (0.40, 0.5, 1.16): all 3 above it.
    assert float(active_dims(kl, 0.3, "chunk")) == 2.0
    assert float(active_dims(kl, 0.3, "batch")) == 3.0
    with pytest.raises(ValueError):
        clipped_kl(kl, 0.5, "token")


def test_chunk_clip_gradient_reaches_exactly_the_chunks_above_the_floor():
    # A dimension gets a KL gradient in the chunks where its KL exceeds the floor, even when its
    # batch mean is below it (the batch form gives no gradient there).
    mu = torch.tensor([[2.0], [0.0], [0.0], [0.0]], requires_grad=True)  # KL 2, 0, 0, 0: mean 0.5
    log_sigma = torch.zeros(4, 1)
    clipped_kl(gaussian_kl_per_dim(mu, log_sigma), 0.6, "chunk").backward()
    assert mu.grad[0, 0] == pytest.approx(2.0 / 4) and bool((mu.grad[1:] == 0).all())
    mu.grad = None
    clipped_kl(gaussian_kl_per_dim(mu, log_sigma), 0.6, "batch").backward()
    assert bool((mu.grad == 0).all())


def _ce(ae, out, tokens):
    """The reconstruction CE recomputed from the full logits (z_in = z: eval mode or no latent dropout)."""
    logits = out.logits if out.logits is not None else ae.decode_logits(out.z)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, V), tokens.reshape(-1)) * ae.chunk_size


@pytest.mark.parametrize("fused_ce", [True, False])
def test_forward_loss_is_ce_plus_beta_clipped_kl(fused_ce):
    torch.manual_seed(0)
    cfg = tiny_cfg(beta=0.25, kl_clip=0.3, fused_ce=fused_ce)
    ae = ChunkAutoencoder(cfg).eval()
    tokens = torch.randint(0, V - 1, (8, 4))
    out = ae(tokens)
    ce = _ce(ae, out, tokens)
    kl = gaussian_kl_per_dim(out.mu, out.log_sigma)  # [B, l]
    kl_per_dim = kl.mean(0)
    torch.testing.assert_close(out.ce, ce)
    torch.testing.assert_close(out.kl_per_dim, kl_per_dim)
    torch.testing.assert_close(out.kl, kl_per_dim.sum())
    torch.testing.assert_close(out.loss, ce + 0.25 * kl.clamp_min(0.3).sum(-1).mean())
    torch.testing.assert_close(out.active_dims, (kl > 0.3).float().sum(-1).mean())
    cfg.kl_clip_reduction = "batch"
    torch.manual_seed(1)
    out = ae(tokens)
    kl = gaussian_kl_per_dim(out.mu, out.log_sigma)
    ce = _ce(ae, out, tokens)
    torch.testing.assert_close(out.loss, ce + 0.25 * kl.mean(0).clamp_min(0.3).sum())
    torch.testing.assert_close(out.active_dims, (kl.mean(0) > 0.3).float().sum())
    # z is a reparameterised posterior sample
    mu, log_sigma = ae.encode(tokens)
    torch.testing.assert_close(out.mu, mu)
    assert not torch.allclose(out.z, mu)


def test_log_sigma_is_clamped():
    ae = ChunkAutoencoder(tiny_cfg())
    with torch.no_grad():
        ae.to_posterior.bias[ae.latent_size :] = 100.0
    _, log_sigma = ae.encode(torch.randint(0, V, (3, 4)))
    assert (log_sigma == LOG_SIGMA_MAX).all()
    with torch.no_grad():
        ae.to_posterior.bias[ae.latent_size :] = -100.0
    _, log_sigma = ae.encode(torch.randint(0, V, (3, 4)))
    assert (log_sigma == LOG_SIGMA_MIN).all()


def _capture_input(module: torch.nn.Module) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    return seen


def test_token_masking_rate_and_eval_off():
    torch.manual_seed(1)
    p = 0.15
    ae = ChunkAutoencoder(tiny_cfg(token_mask_prob=p, latent_dropout=0.0))  # z_in = z: the CE can be recomputed
    seen = _capture_input(ae.embedding)
    tokens = torch.randint(0, V - 1, (4096, 4))  # never the mask id itself
    n = tokens.numel()

    ae.train()
    out = ae(tokens)
    frac = (seen[-1] == V - 1).float().mean().item()
    assert abs(frac - p) < 3 * math.sqrt(p * (1 - p) / n)
    # labels stay the originals: the CE is computed against the unmasked tokens
    torch.testing.assert_close(out.ce, _ce(ae, out, tokens))

    ae.eval()
    ae(tokens)
    assert torch.equal(seen[-1], tokens)
    ae.encode(tokens)  # encode never masks, whatever the mode
    assert torch.equal(seen[-1], tokens)
    ae.train()
    ae.encode(tokens)
    assert torch.equal(seen[-1], tokens)


def test_mask_token_id_required():
    ae = ChunkAutoencoder(tiny_cfg(mask_token_id=None))
    with pytest.raises(ValueError, match="mask_token_id"):
        ae(torch.randint(0, V, (2, 4)))
    ae.cfg.mask_token_id = V  # out of range
    with pytest.raises(ValueError, match="outside"):
        ae(torch.randint(0, V, (2, 4)))
    ae.cfg.mask_token_id = 3  # may be set after construction
    ae(torch.randint(0, V, (2, 4)))


def test_latent_dropout_rate_and_eval_off():
    torch.manual_seed(2)
    p = 0.15
    ae = ChunkAutoencoder(tiny_cfg(latent_dropout=p, token_mask_prob=0.0))
    seen = _capture_input(ae.dec_in)
    tokens = torch.randint(0, V, (2048, 4))

    ae.train()
    out = ae(tokens)
    z_in = seen[-1]
    n = z_in.numel()
    frac = (z_in == 0).float().mean().item()
    assert abs(frac - p) < 3 * math.sqrt(p * (1 - p) / n)
    kept = z_in != 0
    torch.testing.assert_close(z_in[kept], out.z[kept] / (1 - p))  # inverted dropout

    ae.eval()
    out = ae(tokens)
    assert (seen[-1] != 0).all()
    torch.testing.assert_close(seen[-1], out.z)


def test_embedding_is_tied_and_gets_gradient_from_both_sides():
    ae = ChunkAutoencoder(tiny_cfg())
    params = dict(ae.named_parameters())
    assert sum(p is ae.embedding.weight for p in params.values()) == 1  # one Parameter, no copy
    tokens = torch.randint(0, V, (4, 4))

    # decoder side alone: logits through the embedding matrix
    z = torch.randn(4, ae.latent_size)
    ae.decode_logits(z).square().sum().backward()
    grad_dec = ae.embedding.weight.grad.clone()
    assert grad_dec.abs().sum() > 0 and (grad_dec != 0).all(dim=1).all()  # every row used as output

    # encoder side alone: only the looked-up rows get gradient
    ae.zero_grad(set_to_none=True)
    mu, _ = ae.encode(tokens)
    mu.square().sum().backward()
    grad_enc = ae.embedding.weight.grad
    used = torch.zeros(V, dtype=torch.bool)
    used[tokens.unique()] = True
    assert (grad_enc[used] != 0).any(dim=1).all()
    assert (grad_enc[~used] == 0).all()

    # with the decoder weights modified through the embedding, logits change accordingly
    with torch.no_grad():
        ae.embedding.weight[5].zero_()
    assert (ae.decode_logits(z)[..., 5] == 0).all()


def test_works_under_cpu_bf16_autocast():
    ae = ChunkAutoencoder(tiny_cfg())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ae(torch.randint(0, V, (6, 4)))
    assert torch.isfinite(out.loss) and out.ce.dtype == torch.float32
    out.loss.backward()
    assert ae.embedding.weight.grad is not None


def test_tiny_autoencoder_overfits_a_batch():
    torch.manual_seed(0)
    ae = ChunkAutoencoder(tiny_cfg())  # V=64, K=4, d=32, l=16, default masking/dropout/beta/clip
    tokens = torch.randint(0, V - 1, (64, 4))
    opt = torch.optim.Adam(ae.parameters(), lr=3e-3)
    ae.train()
    for _ in range(400):
        out = ae(tokens)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    ae.eval()
    with torch.no_grad():
        mu, _ = ae.encode(tokens)
        acc = (ae.decode(mu) == tokens).float().mean().item()
    assert acc == 1.0
