"""Chunked output projection + cross-entropy (models/fused_ce.py): the unfused loss, gradients and argmax."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from calm_lightning.models.autoencoder import ChunkAutoencoder
from calm_lightning.models.config import AutoencoderConfig
from calm_lightning.models.fused_ce import default_chunk_rows, linear_cross_entropy


def _problem(n=37, d=16, V=53, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=dtype)
    w = torch.randn(V, d, generator=g, dtype=dtype)
    t = torch.randint(0, V, (n,), generator=g)
    return h, w, t


def _reference(h, w, t):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    logits = F.linear(h, w)
    loss = F.cross_entropy(logits.float() if logits.dtype != torch.float64 else logits, t, reduction="sum")
    (loss * 0.37).backward()  # an upstream gradient other than 1
    return loss.detach(), h.grad, w.grad, logits.argmax(-1)


@pytest.mark.parametrize("chunk_rows", [1, 5, 16, 37, 100])
def test_equals_unfused_loss_gradients_and_argmax(chunk_rows):
    h, w, t = _problem()
    ref_loss, ref_gh, ref_gw, ref_pred = _reference(h, w, t)
    h = h.clone().requires_grad_()
    w = w.clone().requires_grad_()
    loss, pred = linear_cross_entropy(h, w, t, chunk_rows=chunk_rows, with_pred=True)
    (loss * 0.37).backward()
    # float64 throughout: agreement to rounding, not to a loose tolerance
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(h.grad, ref_gh, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w.grad, ref_gw, rtol=1e-12, atol=1e-12)
    assert torch.equal(pred, ref_pred)


def test_toy_values_by_hand():
    # two rows, two words: logits [[0, ln 3], [0, 0]], targets [1, 0]
    h = torch.tensor([[1.0], [0.0]], requires_grad=True)
    w = torch.tensor([[0.0], [torch.log(torch.tensor(3.0))]], requires_grad=True)
    loss, pred = linear_cross_entropy(h, w, torch.tensor([1, 0]), chunk_rows=1, with_pred=True)
    # -log(3/4) - log(1/2)
    assert loss.item() == pytest.approx(-torch.log(torch.tensor(0.75)).item() + torch.log(torch.tensor(2.0)).item())
    assert pred.tolist() == [1, 0]
    loss.backward()
    # d/dh_0 = sum_v (p_v - y_v) w_v = (1/4)(0) + (3/4 - 1) ln 3 ; row 1: (1/2 - 1) * 0 + (1/2) ln 3
    ln3 = torch.log(torch.tensor(3.0)).item()
    assert h.grad[:, 0].tolist() == pytest.approx([-0.25 * ln3, 0.5 * ln3])
    # d/dw_v = sum_i (p_iv - y_iv) h_i: only row 0 has h != 0
    assert w.grad[:, 0].tolist() == pytest.approx([0.25, -0.25])


def test_no_grad_and_frozen_inputs():
    h, w, t = _problem(dtype=torch.float32)
    with torch.no_grad():
        loss, pred = linear_cross_entropy(h.requires_grad_(), w, t, chunk_rows=8)
    assert not loss.requires_grad and pred.numel() == 0
    ref = F.cross_entropy(F.linear(h.detach(), w), t, reduction="sum")
    torch.testing.assert_close(loss, ref)
    # gradient only for the states (the output matrix frozen)
    h2 = h.detach().clone().requires_grad_()
    linear_cross_entropy(h2, w, t, chunk_rows=8)[0].backward()
    h3 = h.detach().clone().requires_grad_()
    F.cross_entropy(F.linear(h3, w), t, reduction="sum").backward()
    torch.testing.assert_close(h2.grad, h3.grad)


def test_bf16_autocast_matches_the_autocast_unfused_path():
    h, w, t = _problem(n=300, d=64, V=500, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, ref_gh, ref_gw, _ = _reference(h, w, t)
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss, _ = linear_cross_entropy(hh, ww, t, chunk_rows=64)
    (loss * 0.37).backward()
    assert hh.grad.dtype == torch.float32 and ww.grad.dtype == torch.float32
    # both compute bf16 logits; the softmax in fp32: the loss agrees to fp32 summation order
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-3)
    # gradients: bf16 rounding of (softmax - onehot) before the matmuls (each ~2^-8 relative)
    torch.testing.assert_close(hh.grad, ref_gh, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ww.grad, ref_gw, rtol=2e-2, atol=2e-2)


def test_bad_shapes_and_default_chunk():
    h, w, t = _problem(dtype=torch.float32)
    with pytest.raises(ValueError, match="expected h"):
        linear_cross_entropy(h[None], w, t)
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(h, w, t[:-1])
    with pytest.raises(ValueError, match="chunk_rows"):
        linear_cross_entropy(h, w, t, chunk_rows=0)
    assert default_chunk_rows(8192) == 256 and default_chunk_rows(10**9) == 16


def test_autoencoder_fused_and_unfused_train_identically():
    """Same seed, same draws (masking, z, dropout): the same loss and the same gradient on every parameter."""
    cfg = dict(vocab_size=97, chunk_size=4, latent_size=16, d_model=32, ffn_size=48, mask_token_id=96)
    tokens = torch.randint(0, 96, (50, 4), generator=torch.Generator().manual_seed(3))
    grads, losses = [], []
    for fused in (True, False):
        torch.manual_seed(0)
        ae = ChunkAutoencoder(AutoencoderConfig(**cfg, fused_ce=fused)).train()
        torch.manual_seed(1)
        out = ae(tokens)
        out.loss.backward()
        losses.append(out.ce.detach())
        grads.append({n: p.grad for n, p in ae.named_parameters()})
    torch.testing.assert_close(losses[0], losses[1])
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_token_lm_loss_equals_the_full_logits_cross_entropy():
    """TokenLM.loss (chunked LM head + CE) against F.cross_entropy of its forward's logits: value and gradients."""
    from calm_lightning.models.config import BackboneConfig
    from calm_lightning.models.token_lm import TokenLM

    torch.manual_seed(0)
    model = TokenLM(BackboneConfig(n_layers=2, d_model=32, n_heads=2, ffn_size=48, max_seq_len=64), vocab_size=300)
    tokens = torch.randint(0, 300, (3, 40))
    model.loss(tokens).backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    ref.backward()
    model.fused_ce = False  # the switch gives the full-logits expression itself
    torch.testing.assert_close(model.loss(tokens), ref, rtol=0, atol=0)
    torch.testing.assert_close(model.loss(tokens).detach(), ref.detach())
    for name, p in model.named_parameters():
        torch.testing.assert_close(fused[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
