"""FLOPs calculator on tiny models of every kind and head (analytic counts vs. real modules and torch's
FlopCounterMode), and the MFU logging of ``TokensPerSecond``."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import calm_lightning.flops
from calm_lightning.callbacks import throughput
from calm_lightning.callbacks.throughput import TokensPerSecond
from calm_lightning.flops import (
    autoencoder_flops,
    calm_flops,
    head_param_split,
    model_flops,
    token_lm_flops,
    training_flops_per_token,
)
from calm_lightning.models.autoencoder import ChunkAutoencoder
from calm_lightning.models.calm import CALM
from calm_lightning.models.config import AutoencoderConfig, BackboneConfig, HeadConfig
from calm_lightning.models.heads import build_head
from calm_lightning.models.token_lm import TokenLM
from calm_lightning.utils.hardware import compute_dtype, peak_flops_of, resolve_peak_flops

V, K, LATENT, D = 50, 4, 8, 128
T = 128  # tokens per sequence: L = 32 chunks


def backbone_cfg() -> BackboneConfig:
    return BackboneConfig(n_layers=2, d_model=D, n_heads=4, ffn_size=256, max_seq_len=T)


def ae_cfg() -> AutoencoderConfig:
    return AutoencoderConfig(
        vocab_size=V,
        chunk_size=K,
        latent_size=LATENT,
        d_model=16,
        ffn_size=24,
        num_token_blocks=2,
        num_chunk_blocks=1,
        mask_token_id=V - 1,
    )


def head_cfgs() -> dict[str, HeadConfig]:
    cfgs = {
        "energy": HeadConfig(name="energy", num_samples=3),
        "energy_width48": HeadConfig(name="energy", num_samples=2, width=48),
        "flow": HeadConfig(name="flow", num_samples=2),
        "diffusion_learn_sigma": HeadConfig(name="diffusion", num_samples=2),
        "energy_aux_tokens": HeadConfig(name="energy", num_samples=3, aux_token_weight=0.5),
    }
    cfgs["energy_aux_tokens"].energy.num_target_samples = 4
    cfgs["energy"].energy.num_target_samples = 4
    cfgs["energy_width48"].energy.num_target_samples = 4
    cfgs["flow"].flow.num_steps = 2
    cfgs["diffusion_learn_sigma"].diffusion.learn_sigma = True
    cfgs["diffusion_learn_sigma"].diffusion.num_steps = 3
    return cfgs


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def counted_flops(fn) -> int:
    """Matmul FLOPs torch's counter sees (norms, biases and elementwise ops are not counted). The math
    attention backend decomposes attention into counted bmm's (the fused CPU kernel is not counted)."""
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        fn()
    return counter.get_total_flops()


def test_flops_module_imports_no_lightning():
    """flops.py imports only the standard library, torch and calm_lightning.models (plain PyTorch)."""
    tree = ast.parse(Path(calm_lightning.flops.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert {m.split(".")[0] for m in imported} <= {"__future__", "dataclasses", "torch", "calm_lightning"}
    assert all(m.startswith("calm_lightning.models") for m in imported if m.startswith("calm_lightning"))


@pytest.mark.parametrize("name", list(head_cfgs()))
def test_head_params_match_modules(name):
    cfg = head_cfgs()[name]
    head = build_head(D, LATENT, cfg, num_backbone_layers=8)
    once, per_eval = head_param_split(D, LATENT, cfg, 8)
    assert numel(head) == once + per_eval
    # the condition branch runs once per position
    net = head if cfg.name == "energy" else head.net
    if cfg.name == "energy":  # plus each block's condition half of its fuse input Linear
        w = net.width
        assert once == numel(net.cond_proj) + numel(net.cond_norm) + len(net.blocks) * w * w
    else:
        assert once == numel(net.cond_proj)


@pytest.mark.parametrize("tie", [False, True])
def test_token_lm_params_and_flops(tie):
    torch.manual_seed(0)
    model = TokenLM(backbone_cfg(), V, tie_embeddings=tie)
    est = token_lm_flops(backbone_cfg(), V, tie_embeddings=tie)
    assert numel(model) == est.params.total
    assert est.params.non_embedding == numel(model.backbone)
    assert est.training.total == 3 * est.inference.total
    # the LM head costs 2 d V per token whether tied or not
    assert est.inference.dense == 2 * (numel(model.backbone) + D * V)
    assert est.inference.attention == 4 * 2 * T * D
    tokens = torch.randint(0, V, (2, T + 1))
    with torch.no_grad():  # the chunked loss makes its gradient GEMMs in forward when grad is on
        fwd = counted_flops(lambda: model.loss(tokens)) / (2 * T)
    norms = sum(p.numel() for n, p in model.backbone.named_parameters() if "norm" in n)
    assert fwd == est.inference.total - 2 * norms  # the counter skips norms; exact otherwise


def test_autoencoder_params_and_flops():
    torch.manual_seed(0)
    model = ChunkAutoencoder(ae_cfg())
    est = autoencoder_flops(ae_cfg())
    assert numel(model) == est.params.total
    assert numel(model.embedding) == est.params.ae_embedding
    chunks = torch.randint(0, V, (6, K))
    with torch.no_grad():
        fwd = counted_flops(lambda: model.decode_logits(model.encode(chunks)[0])) / (6 * K)
    assert fwd == pytest.approx(est.inference.total, rel=0.02)  # norms and biases not counted
    assert est.training.total == 3 * est.inference.total


@pytest.mark.parametrize("name", list(head_cfgs()))
def test_calm_params_and_flops_agree_with_counter(name):
    torch.manual_seed(0)
    head_cfg = head_cfgs()[name]
    model = CALM(backbone_cfg(), head_cfg, ChunkAutoencoder(ae_cfg()))
    est = calm_flops(backbone_cfg(), head_cfg, ae_cfg(), context=T // K)
    p = est.params
    assert numel(model) == p.total
    assert sum(t.numel() for t in model.trainable_parameters()) == p.excluding_autoencoder

    tokens = torch.randint(0, V, (2, T))
    train = counted_flops(lambda: model.loss(tokens).objective(model.aux_weight).backward()) / tokens.numel()
    # the head, the auxiliary token head and the AE targets run on L - 1 of the L positions
    head_and_targets = est.training.dense - 3 * 2 * (p.backbone + p.compression) / K
    expected = est.training.total - head_and_targets / (T // K)
    # The counter also skips norms and biases and, in the backward, the input gradient of the first layer
    # fed by noise, x_t or t (no grad needed there); the convention's 3 x forward counts them: ~2% at
    # this toy width, <0.1% at the paper's.
    assert train == pytest.approx(expected, rel=0.025)
    with torch.no_grad():
        h = model.hidden_states(tokens).flatten(0, 1)  # [B*L, D]
        infer = counted_flops(lambda: (model.hidden_states(tokens), model.sample_chunks(h, 1)))
    assert infer / tokens.numel() == pytest.approx(est.inference.total, rel=0.01)


def test_model_flops_dispatch_and_context():
    torch.manual_seed(0)
    calm = CALM(backbone_cfg(), head_cfgs()["energy"], ChunkAutoencoder(ae_cfg()))
    ar = TokenLM(backbone_cfg(), V)
    # seq_len in tokens: CALM attends over seq_len / K steps, the token model over seq_len tokens
    assert model_flops(calm, seq_len=4 * T) == calm_flops(
        backbone_cfg(), head_cfgs()["energy"], ae_cfg(), context=T
    )
    assert model_flops(ar, seq_len=T) == token_lm_flops(backbone_cfg(), V, context=T)
    assert model_flops(calm.autoencoder) == autoencoder_flops(ae_cfg())
    compiled = SimpleNamespace(_orig_mod=ar)  # what torch.compile's wrapper exposes
    assert training_flops_per_token(compiled, T) == token_lm_flops(backbone_cfg(), V, T).training.total
    with pytest.raises(TypeError):
        model_flops(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------ MFU
@pytest.mark.parametrize(
    "name, dtype, peak",
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4e12),  # Lightning's table
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12),
        ("NVIDIA A100-SXM4-80GB", torch.float32, 19.5e12),  # fp32 runs get the fp32 peak, not bf16's
        ("NVIDIA H200", torch.bfloat16, 989e12),  # not parsed by Lightning: the dense correction
        ("NVIDIA H200 NVL", torch.bfloat16, 835e12),
        ("NVIDIA Imaginary 9000", torch.bfloat16, 0.0),  # unknown: no MFU rather than a guess
    ],
)
def test_gpu_peaks_come_from_lightning_with_dense_corrections(monkeypatch, name, dtype, peak):
    import lightning.fabric.accelerators.cuda as lcuda

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(lcuda, "_is_ampere_or_later", lambda device=None: False)  # no TF32 on this fake GPU
    assert peak_flops_of(torch.device("cuda", 0), dtype) == pytest.approx(peak)


def test_peak_flops_resolution():
    assert resolve_peak_flops(5e12, torch.device("cpu")) == 5e12
    assert resolve_peak_flops(0.0, torch.device("cpu")) == 0.0  # no MFU on CPU
    assert compute_dtype("bf16-mixed") is torch.bfloat16 and compute_dtype("32-true") is torch.float32
    assert compute_dtype("16-mixed") is torch.float16


class RecordingModule:
    device = torch.device("cpu")

    def __init__(self):
        self.logged: dict[str, float] = {}

    def log(self, key, value, **kwargs):
        self.logged[key] = value


def run_window(cb: TokensPerSecond, monkeypatch, seconds: float, batch: torch.Tensor, world_size: int):
    clock = iter([100.0, 100.0 + seconds])
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: next(clock))
    trainer, module = SimpleNamespace(world_size=world_size), RecordingModule()
    cb.on_fit_start(trainer, module)
    cb.on_train_batch_start(trainer, module, batch, 0)
    cb.on_train_batch_end(trainer, module, None, batch, 0)
    return module.logged


def test_mfu_logged_with_flops_and_peak(monkeypatch):
    cb = TokensPerSecond(window=1, flops_per_token=1e9, peak_flops=1e12)
    logged = run_window(
        cb, monkeypatch, seconds=0.5, batch=torch.zeros(4, 64, dtype=torch.long), world_size=2
    )
    tokens_per_s = 4 * 64 * 2 / 0.5  # both devices' tokens
    assert logged["train/tokens_per_s"] == pytest.approx(tokens_per_s)
    assert logged["train/flops_per_s"] == pytest.approx(tokens_per_s * 1e9)
    assert logged["train/mfu"] == pytest.approx(tokens_per_s * 1e9 / (1e12 * 2))
    assert cb.mean_mfu == pytest.approx(logged["train/mfu"])


def test_no_mfu_without_peak_on_cpu(monkeypatch):
    cb = TokensPerSecond(window=1, flops_per_token=1e9)  # peak 0: look up, none on CPU
    logged = run_window(cb, monkeypatch, seconds=1.0, batch=torch.zeros(2, 8, dtype=torch.long), world_size=1)
    assert set(logged) == {"train/tokens_per_s", "train/flops_per_s"}
    cb = TokensPerSecond(window=1)
    logged = run_window(cb, monkeypatch, seconds=1.0, batch=torch.zeros(2, 8, dtype=torch.long), world_size=1)
    assert set(logged) == {"train/tokens_per_s"} and cb.mean_mfu == 0.0
