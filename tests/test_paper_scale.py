"""The paper-scale configs (experiments/paper/) against the paper: parameter counts (CALM.md section 2) and
Table 1's FLOPs (CALM.md section 4). Every model is built on the meta device only (no memory, no compute).

Vocabulary: the Llama-3 tokenizer's 128,256 ids. (With the user's tokenizer.json the kit adds <|bos|>,
<|pad|> and <|mask|>, giving 128,259 rows: 3 d or 6 d parameters more, under 0.01%.)
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from calm_lightning.config.loader import load_config, to_object
from calm_lightning.config.schema import ExperimentConfig
from calm_lightning.flops import calm_flops, token_lm_flops
from calm_lightning.models.autoencoder import ChunkAutoencoder
from calm_lightning.models.calm import CALM
from calm_lightning.models.config import AutoencoderConfig
from calm_lightning.models.token_lm import TokenLM
from calm_lightning.training import accumulation

PAPER = Path(__file__).resolve().parents[1] / "experiments" / "paper"
LLAMA3_VOCAB = 128_256
TRAIN_TOKENS = 5e11  # 250k steps x 2M tokens
PARAMS_RTOL = 0.01
FLOPS_RTOL = 0.05

# name: (params, inference FLOPs per token, training FLOPs in total), paper Table 1 / CALM.md section 4
TRANSFORMERS = {
    "transformer_s": (281e6, 4.4e8, 6.6e20),
    "transformer_m": (465e6, 7.9e8, 11.9e20),
    "transformer_l": (849e6, 15.0e8, 22.5e20),
}
# params exclude the autoencoder
CALMS = {
    "calm_m": (371e6, 2.9e8, 3.7e20),
    "calm_l": (735e6, 4.6e8, 7.7e20),
    "calm_xl": (1.82e9, 9.4e8, 19.5e20),
}


@functools.cache
def experiment(name: str) -> ExperimentConfig:
    """The resolved config of experiments/paper/<name>.yaml (cached: treat as read-only)."""
    return to_object(load_config(PAPER / f"{name}.yaml"))


def paper_autoencoder_cfg() -> AutoencoderConfig:
    """The autoencoder of ae.yaml with the Llama-3 vocabulary (set from the tokenizer at run time)."""
    return dataclasses.replace(experiment("ae").model.autoencoder, vocab_size=LLAMA3_VOCAB)


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_token_lm(exp: ExperimentConfig) -> TokenLM:
    with torch.device("meta"):
        return TokenLM(exp.model.backbone, LLAMA3_VOCAB, tie_embeddings=exp.model.tie_embeddings)


def build_calm(exp: ExperimentConfig) -> CALM:
    with torch.device("meta"):
        return CALM(exp.model.backbone, exp.model.head, ChunkAutoencoder(paper_autoencoder_cfg()))


def calm_estimate(exp: ExperimentConfig):
    return calm_flops(exp.model.backbone, exp.model.head, paper_autoencoder_cfg())


def test_paper_recipes():
    """2M-token batches of 2048 positions, 250k steps, the optimiser of CALM.md section 2, on one GPU."""
    for name in [*TRANSFORMERS, *CALMS]:
        exp = experiment(name)
        o, t, d = exp.optim, exp.trainer, exp.data
        assert o.tokens_per_step == 2**21 and accumulation(exp) * d.batch_size * d.block_size == 2**21, name
        eight_gpus = dataclasses.replace(exp, trainer=dataclasses.replace(t, devices="8"))
        assert accumulation(eight_gpus) == accumulation(exp) // 8, name
        positions = d.block_size // (exp.model.autoencoder.chunk_size if exp.model.kind == "calm" else 1)
        assert positions == exp.model.backbone.max_seq_len == 2048, name
        assert (o.lr, tuple(o.betas), o.weight_decay, o.grad_clip) == (3e-4, (0.9, 0.95), 0.1, 1.0)
        assert o.weight_decay_groups == "reference"
        assert (o.schedule, o.warmup_steps, t.max_steps, t.precision) == (
            "constant",
            2000,
            250_000,
            "bf16-mixed",
        )
    ae = experiment("ae")
    assert accumulation(ae) * ae.data.batch_size * ae.data.block_size == 2**19  # 512K
    assert ae.trainer.max_steps == 30_000


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_transformer_params_match_paper(name):
    exp = experiment(name)
    model = build_token_lm(exp)
    est = token_lm_flops(exp.model.backbone, LLAMA3_VOCAB, tie_embeddings=exp.model.tie_embeddings)
    assert numel(model) == est.params.total
    assert numel(model.backbone) == est.params.backbone
    assert est.params.total == pytest.approx(TRANSFORMERS[name][0], rel=PARAMS_RTOL)


@pytest.mark.parametrize("name", CALMS)
def test_calm_params_match_paper(name):
    exp = experiment(name)
    model = build_calm(exp)
    p = calm_estimate(exp).params
    assert numel(model) == p.total
    parts = {
        "embed": p.embedding,
        "backbone": p.backbone,
        "compress": p.compression,
        "head": p.head,
        "autoencoder": p.autoencoder,
    }
    assert {k: numel(getattr(model, k)) for k in parts} == parts
    assert sum(t.numel() for t in model.trainable_parameters()) == p.excluding_autoencoder
    assert p.autoencoder == pytest.approx(75e6, rel=0.02)  # "~75M, almost all in the embedding"
    assert p.excluding_autoencoder == pytest.approx(CALMS[name][0], rel=PARAMS_RTOL)


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_transformer_flops_reproduce_table1(name):
    exp = experiment(name)
    est = token_lm_flops(exp.model.backbone, LLAMA3_VOCAB)
    _, inference, training = TRANSFORMERS[name]
    assert est.inference.total == pytest.approx(inference, rel=FLOPS_RTOL)
    assert est.training_total(TRAIN_TOKENS) == pytest.approx(training, rel=FLOPS_RTOL)


@pytest.mark.parametrize("name", CALMS)
def test_calm_inference_flops_reproduce_table1(name):
    est = calm_estimate(experiment(name))
    assert est.inference.total == pytest.approx(CALMS[name][1], rel=FLOPS_RTOL)


def test_calm_training_flops_vs_table1():
    """The kit's energy head shares each block's condition half of its fuse Linear across samples, so
    it does fewer FLOPs than the paper counted: M -5.4%, L -3.4%, XL +1.5% (flops.py's docstring shows
    why no convention fits all three; the issue asks 5% of inference only). Pinned so a change is noticed."""
    ratio = {
        name: calm_estimate(experiment(name)).training_total(TRAIN_TOKENS) / paper[2]
        for name, paper in CALMS.items()
    }
    assert ratio["calm_m"] == pytest.approx(0.946, abs=0.005)
    assert ratio["calm_l"] == pytest.approx(0.966, abs=0.005)
    assert ratio["calm_xl"] == pytest.approx(1.015, abs=0.005)


def counted_flops(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def test_flop_counter_agrees_on_transformer_s():
    """torch's FlopCounterMode on the meta-device model: forward = inference per token at full
    context (under no_grad), forward + backward = training (the counter skips norms, so agreement is
    to ~1e-4). Forward and backward are counted together for training: the chunked LM-head loss
    (fused_ce) makes its gradient GEMMs in forward."""
    exp = experiment("transformer_s")
    model, T = build_token_lm(exp), exp.data.block_size
    est = token_lm_flops(exp.model.backbone, LLAMA3_VOCAB, context=T)
    tokens = torch.zeros(1, T + 1, dtype=torch.long, device="meta")
    loss = None

    def forward():
        nonlocal loss
        loss = model.loss(tokens)

    with torch.no_grad():
        assert counted_flops(forward) / T == pytest.approx(est.inference.total, rel=1e-3)

    def train_step():
        forward()
        loss.backward()

    assert counted_flops(train_step) / T == pytest.approx(est.training.total, rel=1e-3)


def test_flop_counter_agrees_on_calm_m():
    """CALM-M on the meta device. Training: backbone and N head samples forward + backward, AE encoder
    forward (the energy-score distances, ~0.02%, are left out: their autocast guard rejects meta
    tensors). Inference: the backbone over 2048 steps, then one head sample and one AE decode per step."""
    exp = experiment("calm_m")
    model, T, K = build_calm(exp), exp.data.block_size, exp.model.autoencoder.chunk_size
    est = calm_estimate(exp)
    tokens = torch.zeros(1, T, dtype=torch.long, device="meta")

    def train_step():
        h = model.hidden_states(tokens)[0]  # [L, D]
        with torch.no_grad():
            model.autoencoder.encode(tokens.view(-1, K))
        model.head._samples(h, exp.model.head.num_samples, None).sum().backward()

    def generate():
        with torch.no_grad():
            model.sample_chunks(model.hidden_states(tokens)[0], num_samples=1)

    assert counted_flops(train_step) / T == pytest.approx(est.training.total, rel=2e-3)
    assert counted_flops(generate) / T == pytest.approx(est.inference.total, rel=2e-3)
