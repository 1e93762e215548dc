"""Import the reference code's released checkpoints (Hugging Face folders) into the kit's models.

An autoencoder folder and a CALM-energy folder each hold ``config.json`` (the reference's field names)
and the weights (``model.safetensors`` or ``pytorch_model.bin``, possibly sharded with an index file)
under the reference's state-dict names. ``convert_official`` maps the config fields onto the kit's
``AutoencoderConfig``/``BackboneConfig``/``HeadConfig`` with every reference-architecture switch set
(docs/DEVIATIONS.md, experiments/reference_arch.yaml), maps the weights onto the kit's parameter names
(separate q/k/v projections -> the fused ``qkv``; grouped key/value heads repeated, which is exact),
and loads them strictly: every reference tensor is used and every kit parameter filled, or CalmError.
The tokenizer (Llama-3 plus an appended ``[PAD]``) is mapped by ``official_tokenizer``.

Plain PyTorch + json: nothing here imports Lightning or omegaconf.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer

from calm_lightning.data.tokenizer import SpecialTokens
from calm_lightning.errors import CalmError
from calm_lightning.models.autoencoder import ChunkAutoencoder
from calm_lightning.models.calm import CALM
from calm_lightning.models.config import AutoencoderConfig, BackboneConfig, EnergyHeadConfig, HeadConfig
from calm_lightning.official_tokenizer import official_tokenizer
from calm_lightning.utils.io import torch_file_problem
from calm_lightning.utils.safetensors import load_file

# The reference config classes' defaults (configuration_autoencoder.py / configuration_calm.py): what
# HF from_pretrained uses for a field that config.json lacks.
AE_DEFAULTS = {
    "vocab_size": 32000, "hidden_size": 512, "intermediate_size": 1280, "latent_size": 128, "patch_size": 4,
    "num_encoder_layers": 2, "num_decoder_layers": 2, "rms_norm_eps": 1e-6, "hidden_act": "silu",
    "mlp_bias": False, "ae_dropout": 0.15, "kl_clamp": 0.5, "kl_weight": 1e-3,
    "pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2,
}
CALM_DEFAULTS = {
    "model_type": "energy", "vocab_size": 32000, "hidden_size": 768, "intermediate_size": 2048,
    "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": None, "latent_size": 128,
    "patch_size": 4, "num_mlp_layers": 4, "num_samples": 8, "beta": 1.0, "noise_size": 64,
    "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
    "head_dim": None, "pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2,
}
# Hard-coded in the reference code rather than configurable.
REFERENCE_LAYERNORM_EPS = 1e-6  # energy head and the CALM input compression
REFERENCE_TARGET_SAMPLES = 100  # M in the reference energy_score
REFERENCE_MASK_ID = 0  # Autoencoder.forward multiplies masked ids by 0


@dataclass
class OfficialModels:
    """What ``convert_official`` returns: kit models with the reference weights, and their configs.

    ``model_config`` holds plain dicts for the experiment schema's ``model`` section (``kind``,
    ``autoencoder``, ``backbone``, ``head``; the last two None without a CALM). ``reference_config``
    holds the reference config.json fields that were used (after the reference's defaults).
    """

    autoencoder: ChunkAutoencoder
    autoencoder_config: AutoencoderConfig
    calm: CALM | None
    backbone_config: BackboneConfig | None
    head_config: HeadConfig | None
    tokenizer: Tokenizer
    special_ids: SpecialTokens
    tokenizer_renames: dict[str, str]  # old token -> kit name, same id (vocabulary unchanged; official_tokenizer)
    reference_config: dict[str, dict | None]  # {"autoencoder": {...}, "calm": {...} or None}
    files: list[str] = field(default_factory=list)  # the weight files read
    model_config: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- files
def read_config(folder: Path, defaults: dict) -> dict:
    """config.json of a reference folder with the reference defaults filled in (only known fields)."""
    path = folder / "config.json"
    if not path.is_file():
        raise CalmError(f"{folder}: no config.json (expected a Hugging Face checkpoint folder)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CalmError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CalmError(f"{path}: not a JSON object")
    cfg = {k: raw.get(k, v) for k, v in defaults.items()}
    cfg["architectures"] = raw.get("architectures")
    cfg["torch_dtype"] = raw.get("torch_dtype")
    return cfg


def _load_one(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(path)
    problem = torch_file_problem(path)
    if problem:
        raise CalmError(f"{path}: {problem}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CalmError(f"{path}: cannot load ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CalmError(f"{path}: not a state dict of tensors")
    return sd


def read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The folder's tensors by reference name and the files they came from (safetensors first)."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return _load_one(folder / name), [name]
        index = folder / f"{name}.index.json"
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise CalmError(f"{index}: not a valid weight index ({e})") from None
            out: dict[str, torch.Tensor] = {}
            for f in files:
                out.update(_load_one(folder / f))
            return out, files
    raise CalmError(f"{folder}: no weights (expected model.safetensors or pytorch_model.bin)")


# --------------------------------------------------------------------------------------------- configs
def _require(ok: bool, where: Path, msg: str) -> None:
    if not ok:
        raise CalmError(f"{where / 'config.json'}: {msg}")


def autoencoder_config(rc: dict, where: Path) -> AutoencoderConfig:
    """Kit config of a reference autoencoder config (every reference switch set)."""
    _require(rc["architectures"] in (None, ["Autoencoder"]), where, f"architectures {rc['architectures']} is not the reference Autoencoder")
    _require(rc["hidden_act"] == "silu", where, f"hidden_act={rc['hidden_act']!r} is not supported (only silu)")
    _require(not rc["mlp_bias"], where, "mlp_bias=true is not supported (the kit's SwiGLU blocks have no biases)")
    n_enc, n_dec = rc["num_encoder_layers"], rc["num_decoder_layers"]
    _require(n_enc == n_dec and n_enc >= 2 and n_enc % 2 == 0, where,
             f"num_encoder_layers={n_enc}, num_decoder_layers={n_dec}: the kit needs one equal, even count")
    return AutoencoderConfig(
        vocab_size=rc["vocab_size"], chunk_size=rc["patch_size"], latent_size=rc["latent_size"],
        d_model=rc["hidden_size"], ffn_size=rc["intermediate_size"],
        num_token_blocks=n_enc // 2, num_chunk_blocks=n_enc // 2,  # the reference's two stages
        beta=rc["kl_weight"], kl_clip=rc["kl_clamp"], kl_clip_reduction="chunk",
        latent_dropout=rc["ae_dropout"], token_mask_prob=rc["ae_dropout"], mask_token_id=REFERENCE_MASK_ID,
        norm_eps=rc["rms_norm_eps"], linear_bias=True, log_sigma_clamp=False,
    )


def calm_configs(rc: dict, ae: AutoencoderConfig, where: Path) -> tuple[BackboneConfig, HeadConfig]:
    """Kit backbone and head configs of a reference CALM-energy config."""
    arch = rc["architectures"]
    _require(arch in (None, ["EnergyTransformer"]) and rc["model_type"] in ("energy", "", None), where,
             f"architectures={arch}, model_type={rc['model_type']!r}: only the energy head converts")
    for key, want in (("hidden_act", "silu"), ("rope_scaling", None), ("attention_bias", False),
                      ("mlp_bias", False), ("attention_dropout", 0.0)):
        _require(rc[key] == want, where, f"{key}={rc[key]!r} is not supported (the kit's backbone has {want!r})")
    D, H = rc["hidden_size"], rc["num_attention_heads"]
    kv = rc["num_key_value_heads"] or H
    _require(D % H == 0 and H % kv == 0, where, f"hidden_size={D}, num_attention_heads={H}, num_key_value_heads={kv} do not divide")
    _require(rc["head_dim"] in (None, D // H), where, f"head_dim={rc['head_dim']} is not hidden_size/num_attention_heads")
    for key, mine in (("vocab_size", ae.vocab_size), ("patch_size", ae.chunk_size), ("latent_size", ae.latent_size)):
        _require(rc[key] == mine, where, f"{key}={rc[key]} differs from the autoencoder's {mine}")
    _require(rc["num_mlp_layers"] >= 1, where, f"num_mlp_layers={rc['num_mlp_layers']} must be >= 1")
    backbone = BackboneConfig(
        n_layers=rc["num_hidden_layers"], d_model=D, n_heads=H, ffn_size=rc["intermediate_size"],
        rope_theta=float(rc["rope_theta"]), max_seq_len=rc["max_position_embeddings"], norm_eps=rc["rms_norm_eps"],
        scaled_residual_init=False, compress_bias=True, compress_norm_eps=REFERENCE_LAYERNORM_EPS,
    )
    head = HeadConfig(
        name="energy", num_samples=rc["num_samples"], width=0, norm_eps=REFERENCE_LAYERNORM_EPS,
        energy=EnergyHeadConfig(
            noise_size=rc["noise_size"], num_blocks=rc["num_mlp_layers"], num_target_samples=REFERENCE_TARGET_SAMPLES,
            alpha=float(rc["beta"]), ffn_bias=True, init="normal",
        ),
    )
    return backbone, head


# --------------------------------------------------------------------------------------------- weights
class _Weights:
    """Reference tensors by name; ``take`` checks a shape and records the key as used."""

    def __init__(self, tensors: dict[str, torch.Tensor], source: Path):
        self.tensors, self.source, self.used = tensors, source, set()

    def has(self, key: str) -> bool:
        return key in self.tensors

    def take(self, key: str, *shape: int) -> torch.Tensor:
        if key not in self.tensors:
            raise CalmError(f"{self.source}: missing key {key}")
        t = self.tensors[key]
        if tuple(t.shape) != shape:
            raise CalmError(f"{self.source}: {key} has shape {list(t.shape)}, expected {list(shape)}")
        self.used.add(key)
        return t

    def same_as(self, key: str, ref: torch.Tensor, what: str) -> None:
        """An optional duplicate (a tie, an alias): used if present, and must equal ``ref``."""
        if key in self.tensors:
            t = self.take(key, *ref.shape)
            if not torch.equal(t.to(ref.dtype), ref):
                raise CalmError(f"{self.source}: {key} differs from {what} (expected the same tensor)")

    def check_all_used(self) -> None:
        left = sorted(set(self.tensors) - self.used)
        if left:
            more = f" (and {len(left) - 1} more)" if len(left) > 1 else ""
            raise CalmError(f"{self.source}: unexpected key {left[0]}{more}")


def _linear(w: _Weights, out: dict, kit: str, ref: str, n_out: int, n_in: int, bias: bool = True) -> None:
    out[f"{kit}.weight"] = w.take(f"{ref}.weight", n_out, n_in)
    if bias:
        out[f"{kit}.bias"] = w.take(f"{ref}.bias", n_out)


def _norm(w: _Weights, out: dict, kit: str, ref: str, d: int, bias: bool = False) -> None:
    out[f"{kit}.weight"] = w.take(f"{ref}.weight", d)
    if bias:
        out[f"{kit}.bias"] = w.take(f"{ref}.bias", d)


def _swiglu(w: _Weights, out: dict, kit: str, ref: str, d: int, f: int) -> None:
    """Llama MLP (gate, up, down) -> the kit's SwiGLU (w1, w3, w2)."""
    _linear(w, out, f"{kit}.w1", f"{ref}.gate_proj", f, d, bias=False)
    _linear(w, out, f"{kit}.w3", f"{ref}.up_proj", f, d, bias=False)
    _linear(w, out, f"{kit}.w2", f"{ref}.down_proj", d, f, bias=False)


def autoencoder_state(w: _Weights, cfg: AutoencoderConfig, prefix: str = "") -> dict[str, torch.Tensor]:
    """Kit ``ChunkAutoencoder`` state dict from the reference Autoencoder's tensors (under ``prefix``)."""
    V, d, f, latent, K = cfg.vocab_size, cfg.d_model, cfg.ffn_size, cfg.latent_size, cfg.chunk_size
    n, enc, dec = cfg.num_token_blocks, f"{prefix}encoder", f"{prefix}decoder"
    out: dict[str, torch.Tensor] = {}
    embed, tied = f"{enc}.embed_tokens.weight", f"{dec}.lm_head_weight"  # the same Parameter when saved
    out["embedding.weight"] = w.take(embed if w.has(embed) or not w.has(tied) else tied, V, d)
    w.same_as(tied, out["embedding.weight"], embed)
    # Each side has two stages of n layers: per token then per chunk (encoder), per chunk then per token (decoder).
    stages = (("enc_token_blocks", f"{enc}.encoder_layers", 0), ("enc_chunk_blocks", f"{enc}.encoder_layers", n),
              ("dec_chunk_blocks", f"{dec}.decoder_layers", 0), ("dec_token_blocks", f"{dec}.decoder_layers", n))
    for kit, ref, first in stages:
        for i in range(n):
            _norm(w, out, f"{kit}.{i}.norm", f"{ref}.{first + i}.layernorm", d)
            _swiglu(w, out, f"{kit}.{i}.ffn", f"{ref}.{first + i}.mlp", d, f)
    _linear(w, out, "enc_compress", f"{enc}.squeeze_layer", d, K * d)
    _norm(w, out, "enc_norm", f"{enc}.norm", d)
    _linear(w, out, "to_posterior", f"{enc}.hidden_to_latent", 2 * latent, d)
    _linear(w, out, "dec_in", f"{dec}.latent_to_hidden", d, latent)
    _linear(w, out, "dec_expand", f"{dec}.expand_layer", K * d, d)
    _norm(w, out, "dec_norm", f"{dec}.norm", d)
    return out


def _rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def calm_state(w: _Weights, rc: dict, bb: BackboneConfig, head: HeadConfig, K: int, latent: int) -> dict[str, torch.Tensor]:
    """Kit ``CALM`` state dict (without ``autoencoder.``) from the reference EnergyTransformer's tensors."""
    V, D, H, F = rc["vocab_size"], bb.d_model, bb.n_heads, bb.ffn_size
    hd = D // H
    kv = rc["num_key_value_heads"] or H
    out: dict[str, torch.Tensor] = {}
    out["embed.weight"] = w.take("transformer.embed_tokens.weight", V, D)
    _linear(w, out, "compress.0", "embed_proj.0", 2 * D, K * D)
    _linear(w, out, "compress.2", "embed_proj.2", D, 2 * D)
    _norm(w, out, "compress.3", "embed_proj.3", D, bias=True)
    for i in range(bb.n_layers):
        kit, ref = f"backbone.blocks.{i}", f"transformer.layers.{i}"
        q = w.take(f"{ref}.self_attn.q_proj.weight", H * hd, D)
        # grouped kv heads: query head j reads kv head j // (H / kv), so repeating each kv head is exact
        k, v = (w.take(f"{ref}.self_attn.{n}_proj.weight", kv * hd, D).view(kv, hd, D)
                .repeat_interleave(H // kv, dim=0).reshape(H * hd, D) for n in ("k", "v"))
        out[f"{kit}.attn.qkv.weight"] = torch.cat([q, k, v], dim=0)  # [3D, D], the kit's fused layout
        _linear(w, out, f"{kit}.attn.proj", f"{ref}.self_attn.o_proj", D, H * hd, bias=False)
        _norm(w, out, f"{kit}.attn_norm", f"{ref}.input_layernorm", D)
        _norm(w, out, f"{kit}.ffn_norm", f"{ref}.post_attention_layernorm", D)
        _swiglu(w, out, f"{kit}.ffn", f"{ref}.mlp", D, F)
        inv = f"{ref}.self_attn.rotary_emb.inv_freq"  # persisted by older transformers versions only
        if w.has(inv) and not torch.allclose(w.take(inv, hd // 2).float(), _rope_inv_freq(hd, bb.rope_theta)):
            raise CalmError(f"{w.source}: {inv} does not match rope_theta={bb.rope_theta}")
    _norm(w, out, "backbone.norm", "transformer.norm", D)
    # The reference registers its head twice (mlp_generator and generative_head: one module).
    p = "mlp_generator" if any(key.startswith("mlp_generator.") for key in w.tensors) else "generative_head"
    W, e = D, head.energy
    _linear(w, out, "head.noise_proj", f"{p}.noise_embd", W, e.noise_size)
    _norm(w, out, "head.noise_norm", f"{p}.norm_noise", W, bias=True)
    _linear(w, out, "head.cond_proj", f"{p}.hidden_embd", W, D)
    _norm(w, out, "head.cond_norm", f"{p}.norm_hidden", W, bias=True)
    for j in range(e.num_blocks):
        kit, ref = f"head.blocks.{j}", f"{p}.mlp_blocks.{j}"
        _norm(w, out, f"{kit}.norm", f"{ref}.in_ln", W, bias=True)
        _linear(w, out, f"{kit}.fuse.0", f"{ref}.linears.0", W, 2 * W)
        _linear(w, out, f"{kit}.fuse.2", f"{ref}.linears.2", W, W)
        gate_up_w, gate_up_b = w.take(f"{ref}.linears.4.weight", 2 * W, W), w.take(f"{ref}.linears.4.bias", 2 * W)
        out[f"{kit}.ffn.w1.weight"], out[f"{kit}.ffn.w3.weight"] = gate_up_w[:W], gate_up_w[W:]  # gate, up
        out[f"{kit}.ffn.w1.bias"], out[f"{kit}.ffn.w3.bias"] = gate_up_b[:W], gate_up_b[W:]
        _linear(w, out, f"{kit}.ffn.w2", f"{ref}.down_proj", W, W)
    _norm(w, out, "head.out_norm", f"{p}.final_layer.in_ln", W, bias=True)
    _linear(w, out, "head.out_hidden", f"{p}.final_layer.linears.0", W, W)
    _linear(w, out, "head.out_proj", f"{p}.final_layer.linears.2", latent, W)
    alias = "generative_head" if p == "mlp_generator" else "mlp_generator"
    for key in [k for k in w.tensors if k.startswith(f"{p}.")]:
        w.same_as(f"{alias}.{key[len(p) + 1:]}", w.tensors[key], key)
    return out


def _load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Copy ``state`` into ``model``: the same keys and shapes as the model's own state dict, or CalmError."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:  # a converter bug rather than a bad file, but say which parameter
        raise CalmError(f"{source}: no reference weight for kit parameter {missing[0]}" if missing
                        else f"{source}: kit has no parameter {extra[0]}")
    for key, t in state.items():
        if t.shape != own[key].shape:
            raise CalmError(f"{source}: {key} has shape {list(t.shape)}, the kit expects {list(own[key].shape)}")
    model.load_state_dict({k: t.to(own[k].dtype) for k, t in state.items()}, strict=True)


# ---------------------------------------------------------------------------------------------- entry
def convert_official(
    ae_dir: str | Path, calm_dir: str | Path | None = None, *, tokenizer: str | Path | Tokenizer | None = None
) -> OfficialModels:
    """Build the kit's autoencoder (and CALM) from the reference's released folders.

    ``tokenizer``: a tokenizer.json path or a Tokenizer; default the ``tokenizer.json`` of ``calm_dir``,
    else of ``ae_dir``. Models come back in float32 and eval mode. CalmError (one line) on any problem.
    """
    ae_dir = Path(ae_dir).expanduser()
    ae_rc = read_config(ae_dir, AE_DEFAULTS)
    ae_cfg = autoencoder_config(ae_rc, ae_dir)
    tensors, files = read_weights(ae_dir)
    w = _Weights(tensors, ae_dir)
    ae_state = autoencoder_state(w, ae_cfg)
    w.check_all_used()
    autoencoder = ChunkAutoencoder(ae_cfg)
    _load_strict(autoencoder, ae_state, ae_dir)
    autoencoder.eval()

    calm = backbone = head = calm_rc = None
    if calm_dir is not None:
        calm_dir = Path(calm_dir).expanduser()
        calm_rc = read_config(calm_dir, CALM_DEFAULTS)
        backbone, head = calm_configs(calm_rc, ae_cfg, calm_dir)
        tensors, calm_files = read_weights(calm_dir)
        files += [str(Path(calm_dir.name) / f) for f in calm_files]
        w = _Weights(tensors, calm_dir)
        state = calm_state(w, calm_rc, backbone, head, ae_cfg.chunk_size, ae_cfg.latent_size)
        if any(k.startswith("ae_model.") for k in tensors):  # the frozen AE it was trained with
            for key, t in autoencoder_state(w, ae_cfg, prefix="ae_model.").items():
                if not torch.equal(t, ae_state[key].to(t.dtype)):
                    raise CalmError(f"{calm_dir}: its ae_model weights ({key}) differ from {ae_dir}: not the autoencoder it was trained with")
        w.check_all_used()
        calm = CALM(backbone, head, ChunkAutoencoder(ae_cfg))
        _load_strict(calm, {**{f"autoencoder.{k}": t for k, t in ae_state.items()}, **state}, calm_dir)
        calm.eval()
        autoencoder = calm.autoencoder  # one autoencoder object, the one CALM reads

    if tokenizer is None:
        found = [d / "tokenizer.json" for d in (calm_dir, ae_dir) if d is not None and (d / "tokenizer.json").is_file()]
        if not found:
            raise CalmError(f"no tokenizer.json in {calm_dir or ae_dir}; pass the Llama-3 tokenizer's tokenizer.json")
        tokenizer = found[0]
    tok, specials, renames = official_tokenizer(tokenizer, ae_cfg.vocab_size, ae_rc)

    return OfficialModels(
        autoencoder=autoencoder, autoencoder_config=ae_cfg, calm=calm, backbone_config=backbone, head_config=head,
        tokenizer=tok, special_ids=specials, tokenizer_renames=renames,
        reference_config={"autoencoder": ae_rc, "calm": calm_rc}, files=files,
        model_config={
            "kind": "calm" if calm is not None else "autoencoder",
            "autoencoder": asdict(ae_cfg),
            "backbone": asdict(backbone) if backbone is not None else None,
            "head": asdict(head) if head is not None else None,
        },
    )
