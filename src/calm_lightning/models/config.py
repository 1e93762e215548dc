"""Plain dataclasses describing model shapes and head hyper-parameters.

They carry no omegaconf or Lightning dependency so the model package stays plain PyTorch; the
experiment schema (`calm_lightning.config.schema`) nests them, and omegaconf validates them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
class EnergyHeadConfig:
    """Energy-score head (CALM.md section 2)."""

    noise_size: int = 64  # dimension of the uniform noise eps ~ U[-0.5, 0.5]
    num_blocks: int = 0  # residual blocks; 0 = max(1, backbone layers // 4)
    num_target_samples: int = 100  # M: posterior samples per position in the energy loss
    alpha: float = 1.0  # exponent of the distance in the energy score, strictly proper in (0, 2)
    shared_target_noise: bool = True  # one N(0, I) bank of M per batch, sign-flipped per position; False = i.i.d.
    ffn_bias: bool = False  # biases in each block's gated FFN (reference: true)
    init: str = "xavier"  # xavier (uniform) | normal: N(0, 0.02) for every Linear (reference); last Linear zero either way


@dataclass
class FlowHeadConfig:
    """Flow-matching head (CALM.md section 3)."""

    num_blocks: int = 0  # adaLN residual blocks; 0 = max(1, backbone layers // 4)
    solver: str = "midpoint"  # euler | midpoint
    num_steps: int = 4  # solver steps from t=0 to t=1
    time_scale: float = 1000.0  # t in [0, 1] is multiplied by this before the sinusoidal timestep embedding
    discrete_time: bool = False  # the net sees floor(t * time_scale), as the reference code (training and sampling)


@dataclass
class DiffusionHeadConfig:
    """Diffusion head with a cosine schedule and epsilon prediction (CALM.md section 3)."""

    num_blocks: int = 0  # adaLN residual blocks; 0 = max(1, backbone layers // 4)
    train_timesteps: int = 1000  # discrete timesteps of the cosine schedule
    num_steps: int = 100  # respaced sampling steps
    deterministic: bool = False  # DDIM-style sampling instead of ancestral
    learn_sigma: bool = False  # also predict the variance interpolation
    cosine_offset: float = 0.008  # s of the cosine schedule, abar(u) ~ cos^2((u + s)/(1 + s) * pi/2)
    max_beta: float = 0.999  # upper clip of each beta_t (the cosine schedule's last beta would be 1)


@dataclass
class HeadConfig:
    """Generative head: which one (registry name) and each head's own section."""

    name: str = "energy"  # energy | flow | diffusion
    num_samples: int = 8  # N: head samples per position in training
    width: int = 0  # hidden width of the head; 0 = backbone d_model
    norm_eps: float = 1e-5  # eps of the head's LayerNorms (energy and adaLN nets; reference: 1e-6)
    energy: EnergyHeadConfig = field(default_factory=EnergyHeadConfig)
    flow: FlowHeadConfig = field(default_factory=FlowHeadConfig)
    diffusion: DiffusionHeadConfig = field(default_factory=DiffusionHeadConfig)
