"""Parameter counts and FLOPs per token of every model kind, from the configs alone (CALM.md section 4).

Nothing here builds a module: the counts follow the layer structure of ``models/`` analytically, and
``tests/test_flops.py`` checks them against real modules (on the meta device for the paper sizes).
Plain Python (+ the model config dataclasses); no lightning, no omegaconf.

Counting convention (the one that reproduces Table 1 of the paper; CALM.md section 4)
-------------------------------------------------------------------------------------
* A multiply-accumulate is 2 FLOPs: a layer with P parameters applied to one vector costs 2 P. Norm
  gains and biases are in P (negligible); activations, softmax, RoPE, losses, the energy-score
  distances (~0.02% of a CALM step) and embedding look-ups cost nothing. A projection onto the
  vocabulary costs 2 d V, whether or not it shares its matrix with an embedding.
* Attention (scores and weighted sum): 2 * context * d MACs per layer and position, i.e.
  ``4 * layers * context * d`` FLOPs per position, with the *full* context (not halved for causality),
  as in Kaplan et al. (2020) and PaLM's MFU. ``context`` counts backbone positions: tokens for the
  token Transformer, vector steps (chunks of K tokens) for CALM. The paper's figures use 2048 for both:
  its Transformers train on 2048-token sequences (the reference code's block size) and CALM on 2048
  vector steps = 8192 tokens. (Context 8192 for the Transformers would give 6.7/12.0/21.1e8.)
* Training = 3 x forward (backward = 2 x forward) of what gets gradients; activation recomputation is
  not counted (model FLOPs, so MFU and not HFU).
* Per token:
  - token Transformer, inference: 2 * (non-embedding params + d V) + 4 * layers * context * d;
    training: 3 x that.
  - CALM, one backbone step per chunk of K tokens; inference:
        [2 * (backbone + input compression + head) + 4 * layers * context * d] / K + AE decoder per token
    (one head sample; a head that needs several network evaluations per sample counts them),
    with the AE decoder counted by structure: its chunk-level layers once per chunk (/K) and its
    per-token layers and d V logits once per token. (CALM.md's shorthand "2 * AE-decoder params per
    token" counts the chunk-level layers K times: +4.6M FLOPs per token at the paper's AE, <2%.)
    Training: 3 * [2 * (backbone + compression + N * head) + 4 * layers * context * d] / K, N =
    ``head.num_samples`` (8) network evaluations of the head per position (energy: one per sample;
    flow/diffusion: one timestep per replica; each head declares its counts: ``GenerativeHead``), plus the frozen AE encoder's forward (the targets, no
    backward; 5.5M FLOPs per token at the paper's AE). What depends on h alone runs once per
    position, not per sample or solver step (``head_param_split``), as the implementation does: the
    heads' condition projection and, in the energy head, each block's condition half of its fuse
    Linear (w^2 per block; the reference code recomputes it for every sample).
  - autoencoder: encoder + decoder per token (same structural rule); training 3 x that.

Table 1 of the paper (V = 128,256, context 2048, 5e11 training tokens, the sizes of CALM.md section 2
and ``experiments/paper/``), paper (this module, deviation):

    model          params                  inference FLOPs/token     training FLOPs (total)
    Transformer-S  281M  (282.0M, +0.3%)   4.4e8  (4.42e8, +0.5%)    6.6e20  (6.64e20, +0.5%)
    Transformer-M  465M  (465.1M, +0.0%)   7.9e8  (8.02e8, +1.5%)   11.9e20 (12.03e20, +1.1%)
    Transformer-L  849M  (847.0M, -0.2%)  15.0e8 (15.01e8, +0.1%)   22.5e20 (22.52e20, +0.1%)
    CALM-M         371M  (371.7M, +0.2%)   2.9e8  (2.91e8, +0.2%)    3.7e20  (3.50e20, -5.4%)
    CALM-L         735M  (735.3M, +0.0%)   4.6e8  (4.56e8, -0.8%)    7.7e20  (7.44e20, -3.4%)
    CALM-XL       1.82B (1.830B, +0.5%)    9.4e8  (9.71e8, +3.3%)   19.5e20 (19.80e20, +1.5%)

CALM params exclude the autoencoder (75.8M, 65.7M of it the embedding); the Transformers' LM head is
untied (tied, Transformer-S would have 183M). Everything is within 5% but the CALM-M training total
(-5.4%): the kit's energy head does fewer FLOPs per sample than the paper counted. No single
convention fits the paper's three CALM training totals together with its parameter counts: solving
its inference and training figures for the head's per-sample share gives ~26M, ~54M and ~141M for
M/L/XL; the head that reproduces its parameter counts (4 blocks of ~6 d^2 plus in/out layers) runs
26.4M, 59.3M and 164.4M parameters per sample when everything is recomputed per sample (the
reference code; then CALM-M fits and XL is +8.6%), and 22.2M, 49.9M and 138.2M with the condition
half of each fuse Linear shared (this kit). We count what the kit computes, since MFU divides by it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from torch import nn

from calm_lightning.models.autoencoder import ChunkAutoencoder
from calm_lightning.models.calm import CALM
from calm_lightning.models.config import AutoencoderConfig, BackboneConfig, HeadConfig
from calm_lightning.models.heads import HEADS, GenerativeHead
from calm_lightning.models.token_lm import TokenLM

# FLOPs of a training step relative to the forward pass (backward = 2 x forward).
TRAIN_FORWARD_RATIO = 3


# ---------------------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class ParamCounts:
    """Parameters of a model by part. ``total`` equals ``sum(p.numel() for p in model.parameters())``
    (a tied LM head is one Parameter, so ``lm_head`` is 0 then)."""

    embedding: int = 0  # the model's own token embedding (V x D), a look-up
    lm_head: int = 0  # untied output matrix D x V of the token Transformer
    backbone: int = 0  # Transformer blocks + final norm
    compression: int = 0  # CALM's input MLP: K*D -> 2D -> D, LayerNorm
    head: int = 0  # CALM's generative head
    aux_head: int = 0  # CALM's optional auxiliary token head (D -> K*D -> V per token; training only)
    ae_embedding: int = 0  # the autoencoder's (tied) embedding V x d
    ae_encoder: int = 0  # the autoencoder's encoder without the embedding
    ae_decoder: int = 0  # the autoencoder's decoder without the (tied) output matrix

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))

    @property
    def autoencoder(self) -> int:
        return self.ae_embedding + self.ae_encoder + self.ae_decoder

    @property
    def excluding_autoencoder(self) -> int:
        """What the paper reports for CALM, and what CALM trains."""
        return self.total - self.autoencoder

    @property
    def non_embedding(self) -> int:
        """Everything but embedding tables and the LM head matrix (Kaplan's N)."""
        return self.total - self.embedding - self.lm_head - self.ae_embedding


def rmsnorm_params(d: int) -> int:
    return d


def layernorm_params(d: int) -> int:
    return 2 * d


def swiglu_params(d: int, hidden: int) -> int:
    """w1, w3: d -> hidden, w2: hidden -> d, no biases."""
    return 3 * d * hidden


def residual_swiglu_params(d: int, hidden: int) -> int:
    return rmsnorm_params(d) + swiglu_params(d, hidden)


def backbone_layer_params(cfg: BackboneConfig) -> int:
    """One pre-norm block: two RMSNorms, qkv (d -> 3d), proj (d -> d), SwiGLU; no biases."""
    d = cfg.d_model
    return 2 * rmsnorm_params(d) + 4 * d * d + swiglu_params(d, cfg.ffn_size)


def backbone_params(cfg: BackboneConfig) -> int:
    return cfg.n_layers * backbone_layer_params(cfg) + rmsnorm_params(cfg.d_model)


def compression_params(d_model: int, chunk_size: int) -> int:
    """CALM's input MLP: Linear(K*D -> 2D) -> SiLU -> Linear(2D -> D) -> LayerNorm, no linear biases."""
    D = d_model
    return chunk_size * D * 2 * D + 2 * D * D + layernorm_params(D)


def _head_class(cfg: HeadConfig) -> type[GenerativeHead]:
    if cfg.name not in HEADS:
        raise ValueError(f"no FLOPs formula for head {cfg.name!r}: it is not registered ({sorted(HEADS)})")
    return HEADS[cfg.name]


def head_param_split(
    hidden_size: int, latent_size: int, cfg: HeadConfig, num_backbone_layers: int
) -> tuple[int, int]:
    """Parameters of the generative head named by ``cfg.name`` (width ``cfg.width`` or D), split as
    (run once per position, run once per network evaluation): the head's ``param_split``.

    Every head projects the condition h once per position and repeats it over the samples and solver
    steps (``EnergyHead.condition``, ``AdaLNMLP.embed_condition``).
    """
    return _head_class(cfg).param_split(cfg, hidden_size, latent_size, num_backbone_layers)


def head_params(hidden_size: int, latent_size: int, cfg: HeadConfig, num_backbone_layers: int) -> int:
    """Parameters of the generative head named by ``cfg.name``."""
    return sum(head_param_split(hidden_size, latent_size, cfg, num_backbone_layers))


def head_evals_per_sample(cfg: HeadConfig) -> int:
    """Network evaluations per generated sample (``GenerativeHead.sample_evals``)."""
    return _head_class(cfg).sample_evals(cfg)


def head_evals_per_training_position(cfg: HeadConfig) -> int:
    """Network evaluations per training position (``GenerativeHead.train_evals``; N for every head here)."""
    return _head_class(cfg).train_evals(cfg)


@dataclass(frozen=True)
class _AutoencoderParts:
    """Autoencoder parameters split by how often they run: per token or per chunk."""

    enc_per_token: int  # per-token blocks
    enc_per_chunk: int  # Linear(K*d -> d), chunk blocks, norm, Linear(d -> 2l)
    dec_per_chunk: int  # Linear(l -> d), chunk blocks, Linear(d -> K*d)
    dec_per_token: int  # per-token blocks, norm (the d x V output matrix is the embedding)


def _autoencoder_parts(cfg: AutoencoderConfig) -> _AutoencoderParts:
    K, d, lat, f = cfg.chunk_size, cfg.d_model, cfg.latent_size, cfg.ffn_size
    token_blocks = cfg.num_token_blocks * residual_swiglu_params(d, f)
    chunk_blocks = cfg.num_chunk_blocks * residual_swiglu_params(d, f)
    return _AutoencoderParts(
        enc_per_token=token_blocks,
        enc_per_chunk=K * d * d + chunk_blocks + rmsnorm_params(d) + d * 2 * lat + 2 * lat,
        dec_per_chunk=lat * d + chunk_blocks + d * K * d,
        dec_per_token=token_blocks + rmsnorm_params(d),
    )


def autoencoder_params(cfg: AutoencoderConfig) -> ParamCounts:
    parts = _autoencoder_parts(cfg)
    return ParamCounts(
        ae_embedding=cfg.vocab_size * cfg.d_model,
        ae_encoder=parts.enc_per_token + parts.enc_per_chunk,
        ae_decoder=parts.dec_per_chunk + parts.dec_per_token,
    )


def token_lm_params(cfg: BackboneConfig, vocab_size: int, tie_embeddings: bool = False) -> ParamCounts:
    V, D = vocab_size, cfg.d_model
    return ParamCounts(embedding=V * D, lm_head=0 if tie_embeddings else D * V, backbone=backbone_params(cfg))


def aux_head_params(d_model: int, ae_cfg: AutoencoderConfig, head_cfg: HeadConfig) -> int:
    """The auxiliary token head's two matrices (K*D x D expansion, V x D output); 0 when it is off."""
    if head_cfg.aux_token_weight <= 0:
        return 0
    return ae_cfg.chunk_size * d_model * d_model + ae_cfg.vocab_size * d_model


def aux_head_macs_per_token(d_model: int, ae_cfg: AutoencoderConfig, head_cfg: HeadConfig) -> int:
    """Forward multiply-adds of the auxiliary token head per token: its K*D x D expansion once per chunk
    (D*D per token) and its V x D output matrix once per token; 0 when it is off."""
    if head_cfg.aux_token_weight <= 0:
        return 0
    return d_model * d_model + ae_cfg.vocab_size * d_model


def calm_params(backbone_cfg: BackboneConfig, head_cfg: HeadConfig, ae_cfg: AutoencoderConfig) -> ParamCounts:
    """CALM including its frozen autoencoder (``excluding_autoencoder`` is the paper's figure)."""
    D = backbone_cfg.d_model
    ae = autoencoder_params(ae_cfg)
    return ParamCounts(
        embedding=ae_cfg.vocab_size * D,
        backbone=backbone_params(backbone_cfg),
        compression=compression_params(D, ae_cfg.chunk_size),
        head=head_params(D, ae_cfg.latent_size, head_cfg, backbone_cfg.n_layers),
        aux_head=aux_head_params(D, ae_cfg, head_cfg),
        ae_embedding=ae.ae_embedding,
        ae_encoder=ae.ae_encoder,
        ae_decoder=ae.ae_decoder,
    )


# ---------------------------------------------------------------------------------------- FLOPs
@dataclass(frozen=True)
class FlopsPerToken:
    """FLOPs per token of one pass: ``dense`` (weight matmuls) + ``attention`` (scores and sums)."""

    dense: float
    attention: float

    @property
    def total(self) -> float:
        return self.dense + self.attention


@dataclass(frozen=True)
class ModelFlops:
    """FLOPs per token of a model kind. inference: per generated token (KV cache, full context);
    training: per training token (forward + backward)."""

    kind: str  # ar | calm | autoencoder
    params: ParamCounts
    inference: FlopsPerToken
    training: FlopsPerToken

    def training_total(self, tokens: float, attention: bool = True) -> float:
        """FLOPs of training on ``tokens`` tokens (the paper: 5e11 = 250k steps x 2M tokens)."""
        per_token = self.training.total if attention else self.training.dense
        return per_token * tokens


def attention_flops_per_position(cfg: BackboneConfig, context: int) -> float:
    """4 * layers * context * d: QK^T and AV over the full context (see the module docstring)."""
    return 4.0 * cfg.n_layers * context * cfg.d_model


def token_lm_flops(
    cfg: BackboneConfig, vocab_size: int, context: int | None = None, tie_embeddings: bool = False
) -> ModelFlops:
    """Token Transformer. ``context`` in tokens; default ``cfg.max_seq_len``."""
    context = cfg.max_seq_len if context is None else context
    params = token_lm_params(cfg, vocab_size, tie_embeddings)
    forward = FlopsPerToken(
        dense=2.0 * (params.backbone + cfg.d_model * vocab_size),
        attention=attention_flops_per_position(cfg, context),
    )
    r = TRAIN_FORWARD_RATIO
    return ModelFlops("ar", params, forward, FlopsPerToken(r * forward.dense, r * forward.attention))


def autoencoder_encode_flops(cfg: AutoencoderConfig) -> float:
    """Encoder forward per token (the embedding is a look-up)."""
    parts = _autoencoder_parts(cfg)
    return 2.0 * (parts.enc_per_token + parts.enc_per_chunk / cfg.chunk_size)


def autoencoder_decode_flops(cfg: AutoencoderConfig) -> float:
    """Decoder forward per token, including the d x V logits through the tied embedding."""
    parts = _autoencoder_parts(cfg)
    per_token = parts.dec_per_token + cfg.d_model * cfg.vocab_size
    return 2.0 * (per_token + parts.dec_per_chunk / cfg.chunk_size)


def autoencoder_flops(cfg: AutoencoderConfig) -> ModelFlops:
    """Autoencoder: inference = encode + decode per token; training = 3 x that."""
    forward = autoencoder_encode_flops(cfg) + autoencoder_decode_flops(cfg)
    return ModelFlops(
        "autoencoder",
        autoencoder_params(cfg),
        FlopsPerToken(forward, 0.0),
        FlopsPerToken(TRAIN_FORWARD_RATIO * forward, 0.0),
    )


def calm_flops(
    backbone_cfg: BackboneConfig, head_cfg: HeadConfig, ae_cfg: AutoencoderConfig, context: int | None = None
) -> ModelFlops:
    """CALM. ``context`` in vector steps (chunks); default ``backbone_cfg.max_seq_len``.

    Per token (module docstring): the backbone step, input compression, head and attention are
    shared by the K tokens of a chunk; inference adds the AE decoder, training the AE encoder's
    forward and N = ``head_cfg.num_samples`` head evaluations per position, and the auxiliary token
    head when it is on (its expansion once per chunk, its output matrix once per token).
    """
    context = backbone_cfg.max_seq_len if context is None else context
    K, D = ae_cfg.chunk_size, backbone_cfg.d_model
    params = calm_params(backbone_cfg, head_cfg, ae_cfg)
    head_once, head_eval = head_param_split(D, ae_cfg.latent_size, head_cfg, backbone_cfg.n_layers)
    sample_once, sample_eval = _head_class(head_cfg).sample_param_split(
        head_cfg, D, ae_cfg.latent_size, backbone_cfg.n_layers
    )
    step = params.backbone + params.compression  # run once per chunk
    attention = attention_flops_per_position(backbone_cfg, context) / K
    inference = FlopsPerToken(
        dense=2.0 * (step + sample_once + head_evals_per_sample(head_cfg) * sample_eval) / K
        + autoencoder_decode_flops(ae_cfg),
        attention=attention,
    )
    r = TRAIN_FORWARD_RATIO
    training = FlopsPerToken(
        dense=r * 2.0 * (step + head_once + head_evals_per_training_position(head_cfg) * head_eval) / K
        + r * 2.0 * aux_head_macs_per_token(D, ae_cfg, head_cfg)
        + autoencoder_encode_flops(ae_cfg),
        attention=r * attention,
    )
    return ModelFlops("calm", params, inference, training)


def model_flops(model: nn.Module, seq_len: int | None = None) -> ModelFlops:
    """FLOPs of a built ``TokenLM``, ``CALM`` or ``ChunkAutoencoder`` (a ``torch.compile`` wrapper is
    unwrapped). ``seq_len``: training sequence length in tokens (``data.block_size``), which sets the
    attention context (CALM: seq_len / K vector steps); default the backbone's ``max_seq_len``."""
    model = getattr(model, "_orig_mod", model)
    if isinstance(model, TokenLM):
        return token_lm_flops(model.cfg, model.vocab_size, seq_len, model.tie_embeddings)
    if isinstance(model, CALM):
        context = None if seq_len is None else seq_len // model.chunk_size
        return calm_flops(model.backbone_cfg, model.head_cfg, model.autoencoder.cfg, context)
    if isinstance(model, ChunkAutoencoder):
        return autoencoder_flops(model.cfg)
    raise TypeError(f"no FLOPs formula for {type(model).__name__}")


def training_flops_per_token(model: nn.Module, seq_len: int | None = None) -> float:
    """Training FLOPs per token (attention included) of a built model: what MFU divides by."""
    return model_flops(model, seq_len).training.total
