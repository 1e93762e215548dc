"""Plain dataclasses describing model shapes and head hyper-parameters.

They carry no omegaconf or Lightning dependency so the model package stays plain PyTorch; the
experiment schema (`calm_lightning.config.schema`) nests them, and omegaconf validates them. Each
head's own section is defined in its head file; ``HeadConfig`` is assembled from the registered heads.
"""

from __future__ import annotations

from dataclasses import dataclass

ARGMAX_SCREENS = ("auto", "bf16", "fp32")  # AutoencoderConfig.argmax_screen (models/argmax.py)


@dataclass
class AutoencoderConfig:
    """Context-free chunk autoencoder, CALM.md section 1."""

    vocab_size: int = 4096  # set from the tokenizer at run time
    chunk_size: int = 4  # K: tokens per chunk / per latent vector
    latent_size: int = 128  # l: latent dimensions (paper: 32 * K)
    d_model: int = 256  # d: width of the token states
    ffn_size: int = 640  # hidden width of each SwiGLU block
    num_token_blocks: int = 1  # residual blocks applied per token (encoder and decoder each)
    num_chunk_blocks: int = 1  # residual blocks applied to the compressed chunk state
    beta: float = 1e-3  # weight of the clipped KL term
    kl_clip: float = 0.5  # lambda: per-dimension KL floor ("free bits")
    kl_clip_reduction: str = "chunk"  # chunk: floor each chunk's KL_i (reference code) | batch: floor the batch-mean KL_i
    latent_dropout: float = 0.15  # dropout on the sampled z, training only
    token_mask_prob: float = 0.15  # input token masking rate, training only
    mask_token_id: int | None = None  # id used for masked inputs; None = the tokenizer's <mask>
    norm_eps: float = 1e-6
    linear_bias: bool = False  # biases in enc_compress, dec_in, dec_expand (reference code: true)
    log_sigma_clamp: bool = True  # clamp log sigma to [LOG_SIGMA_MIN, LOG_SIGMA_MAX] in encode (reference: false, unbounded)
    # greedy decoding's argmax: auto (bf16 screen where the CPU has native bf16) | bf16 | fp32 (reference);
    # every setting gives the fp32 argmax's tokens (models/argmax.py)
    argmax_screen: str = "auto"
    # reconstruction loss: true = output projection + cross-entropy in row chunks (models/fused_ce.py; same loss and
    # gradients, no [B, K, V] logits tensor; that part 1.4x faster in fp32, 3.9x in bf16); false = full logits (reference)
    fused_ce: bool = True


@dataclass
class BackboneConfig:
    """Llama-style decoder-only Transformer shared by CALM and the token baseline (CALM.md section 2)."""

    n_layers: int = 4
    d_model: int = 256
    n_heads: int = 4
    ffn_size: int = 688  # SwiGLU hidden width
    rope_theta: float = 10000.0
    max_seq_len: int = 512  # positions (vector steps for CALM, tokens for the baseline)
    norm_eps: float = 1e-6
    activation_checkpointing: bool = False
    # normal(0, 0.02 / sqrt(2 n_layers)) for the residual output projections (GPT-2); false = plain 0.02 (reference)
    scaled_residual_init: bool = True
    compress_bias: bool = False  # CALM: biases in the input compression MLP's two Linears (reference: true)
    compress_norm_eps: float = 1e-5  # CALM: eps of the compression MLP's LayerNorm (reference: 1e-6)


@dataclass
class CommonHeadConfig:
    """The settings every generative head shares. ``HeadConfig`` adds one section per registered head
    (``model.head.<name>.*``, the head's own ``config_class``): see ``calm_lightning.models.heads``."""

    name: str = "energy"  # registry name of the head (``calm_lightning.models.heads.HEADS``)
    num_samples: int = 8  # N: head samples per position in the training loss; evaluation draws eval.num_samples (S)
    width: int = 0  # hidden width of the head; 0 = backbone d_model
    norm_eps: float = 1e-5  # eps of the head's LayerNorms (energy and adaLN nets; reference: 1e-6)
    # beyond the paper: weight of an auxiliary next-chunk token cross-entropy on the backbone state h_j
    # (CALM.aux_loss; training signal only, sampling and evaluation never use it); 0 = the paper's method
    aux_token_weight: float = 0.0


def __getattr__(name: str):
    """``HeadConfig`` and the heads' own section classes (``EnergyHeadConfig``...), found in the head
    registry: they are defined next to their heads, and HeadConfig is built from them on first use."""
    from calm_lightning.models import heads

    if name == "HeadConfig":
        return heads.head_config_class()
    for cls in heads.HEADS.values():
        if cls.config_class is not None and cls.config_class.__name__ == name:
            return cls.config_class
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
