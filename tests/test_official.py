"""Importing the reference's released checkpoints: synthetic HF folders with the reference's key names.

The expected behaviour is written here independently of the converter: the reference state dicts are
built from the reference's module names, and the reference forward passes are written out by hand
from its modeling files, so a wrong key mapping shows up as a numeric mismatch.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from calm_lightning.data.tokenizer import special_ids, vocab_size, with_special_tokens
from calm_lightning.errors import CalmError
from calm_lightning.official import convert_official
from calm_lightning.utils.safetensors import save_file

V, D_AE, F_AE, LAT, K = 300, 32, 48, 8, 4
D, F_LM, H, LAYERS, BLOCKS, NOISE = 32, 64, 4, 2, 2, 16
BOS_ID, EOS_ID, PAD_ID = 256, 257, 299
AE_RC = dict(architectures=["Autoencoder"], vocab_size=V, hidden_size=D_AE, intermediate_size=F_AE, latent_size=LAT,
             patch_size=K, num_encoder_layers=2, num_decoder_layers=2, rms_norm_eps=1e-6, hidden_act="silu",
             mlp_bias=False, ae_dropout=0.15, kl_clamp=0.5, kl_weight=1e-3, bos_token_id=BOS_ID,
             eos_token_id=EOS_ID, pad_token_id=PAD_ID, torch_dtype="float32")
CALM_RC = dict(architectures=["EnergyTransformer"], ae_path="/elsewhere", vocab_size=V, hidden_size=D,
               intermediate_size=F_LM, num_hidden_layers=LAYERS, num_attention_heads=H, num_key_value_heads=H,
               latent_size=LAT, patch_size=K, num_mlp_layers=BLOCKS, num_samples=8, beta=1.0, noise_size=NOISE,
               hidden_act="silu", max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0,
               rope_scaling=None, attention_bias=False, attention_dropout=0.0, mlp_bias=False,
               pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)


# ------------------------------------------------------------------ synthetic reference checkpoints
def _rand(g):
    return lambda *shape: torch.randn(*shape, generator=g) * 0.2


def ref_ae_state(seed: int = 0) -> dict[str, torch.Tensor]:
    r, sd = _rand(torch.Generator().manual_seed(seed)), {}
    sd["encoder.embed_tokens.weight"] = r(V, D_AE)
    for side in ("encoder.encoder_layers", "decoder.decoder_layers"):
        for i in range(2):
            sd[f"{side}.{i}.mlp.gate_proj.weight"] = r(F_AE, D_AE)
            sd[f"{side}.{i}.mlp.up_proj.weight"] = r(F_AE, D_AE)
            sd[f"{side}.{i}.mlp.down_proj.weight"] = r(D_AE, F_AE)
            sd[f"{side}.{i}.layernorm.weight"] = 1 + r(D_AE)
    sd["encoder.hidden_to_latent.weight"], sd["encoder.hidden_to_latent.bias"] = r(2 * LAT, D_AE), r(2 * LAT)
    sd["encoder.squeeze_layer.weight"], sd["encoder.squeeze_layer.bias"] = r(D_AE, K * D_AE), r(D_AE)
    sd["encoder.norm.weight"] = 1 + r(D_AE)
    sd["decoder.lm_head_weight"] = sd["encoder.embed_tokens.weight"]  # tied: one Parameter
    sd["decoder.latent_to_hidden.weight"], sd["decoder.latent_to_hidden.bias"] = r(D_AE, LAT), r(D_AE)
    sd["decoder.expand_layer.weight"], sd["decoder.expand_layer.bias"] = r(K * D_AE, D_AE), r(K * D_AE)
    sd["decoder.norm.weight"] = 1 + r(D_AE)
    return sd


def ref_calm_state(ae: dict, kv: int = H, seed: int = 1) -> dict[str, torch.Tensor]:
    r, sd, hd = _rand(torch.Generator().manual_seed(seed)), {}, D // H
    sd["transformer.embed_tokens.weight"] = r(V, D)
    for i in range(LAYERS):
        p = f"transformer.layers.{i}"
        sd[f"{p}.self_attn.q_proj.weight"], sd[f"{p}.self_attn.o_proj.weight"] = r(D, D), r(D, D)
        sd[f"{p}.self_attn.k_proj.weight"], sd[f"{p}.self_attn.v_proj.weight"] = r(kv * hd, D), r(kv * hd, D)
        sd[f"{p}.mlp.gate_proj.weight"], sd[f"{p}.mlp.up_proj.weight"] = r(F_LM, D), r(F_LM, D)
        sd[f"{p}.mlp.down_proj.weight"] = r(D, F_LM)
        sd[f"{p}.input_layernorm.weight"], sd[f"{p}.post_attention_layernorm.weight"] = 1 + r(D), 1 + r(D)
    sd["transformer.norm.weight"] = 1 + r(D)

    def lin(name, n_out, n_in):
        sd[f"mlp_generator.{name}.weight"], sd[f"mlp_generator.{name}.bias"] = r(n_out, n_in), r(n_out)

    def ln(name, n):
        sd[f"mlp_generator.{name}.weight"], sd[f"mlp_generator.{name}.bias"] = 1 + r(n), r(n)

    lin("noise_embd", D, NOISE), lin("hidden_embd", D, D), ln("norm_hidden", D), ln("norm_noise", D)
    for j in range(BLOCKS):
        ln(f"mlp_blocks.{j}.in_ln", D)
        lin(f"mlp_blocks.{j}.linears.0", D, 2 * D), lin(f"mlp_blocks.{j}.linears.2", D, D)
        lin(f"mlp_blocks.{j}.linears.4", 2 * D, D), lin(f"mlp_blocks.{j}.down_proj", D, D)
    ln("final_layer.in_ln", D), lin("final_layer.linears.0", D, D), lin("final_layer.linears.2", LAT, D)
    for key in [k for k in sd if k.startswith("mlp_generator.")]:  # the head is registered twice
        sd["generative_head." + key[len("mlp_generator."):]] = sd[key]
    sd["embed_proj.0.weight"], sd["embed_proj.0.bias"] = r(2 * D, K * D), r(2 * D)
    sd["embed_proj.2.weight"], sd["embed_proj.2.bias"] = r(D, 2 * D), r(D)
    sd["embed_proj.3.weight"], sd["embed_proj.3.bias"] = 1 + r(D), r(D)
    sd.update({f"ae_model.{k}": t for k, t in ae.items()})
    return sd


def llama_like_tokenizer() -> Tokenizer:
    """256 byte symbols, then Llama-3's special layout in miniature (reserved tokens), then [PAD]: 300 ids."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(38)]
    tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>", *reserved[:4], "<|start_header_id|>",
                            "<|end_header_id|>", reserved[4], "<|eot_id|>", *reserved[5:]])
    tok.add_special_tokens(["[PAD]"])  # what the reference's training scripts append
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", BOS_ID)]),
    ])
    return tok


def write_folder(folder, config: dict, sd: dict, fmt: str = "bin", tokenizer: bool = True):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if fmt == "bin":
        torch.save(sd, folder / "pytorch_model.bin")
    else:  # HF drops aliases of one storage from safetensors files; keep the first name
        seen, out = set(), {}
        for k, t in sd.items():
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                out[k] = t
        save_file(out, folder / "model.safetensors", metadata={"format": "pt"})
    if tokenizer:
        llama_like_tokenizer().save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture()
def folders(tmp_path):
    ae = ref_ae_state()
    ae_dir = write_folder(tmp_path / "ae", AE_RC, ae)
    calm_dir = write_folder(tmp_path / "calm", CALM_RC, ref_calm_state(ae))
    return ae_dir, calm_dir, ae


# ------------------------------------------------------------------ the reference maths, by hand
def rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def llama_mlp(sd, p, x):
    return F.linear(F.silu(F.linear(x, sd[f"{p}.gate_proj.weight"])) * F.linear(x, sd[f"{p}.up_proj.weight"]),
                    sd[f"{p}.down_proj.weight"])


def lin(sd, p, x):
    return F.linear(x, sd[f"{p}.weight"], sd[f"{p}.bias"])


def ln(sd, p, x):
    return F.layer_norm(x, x.shape[-1:], sd[f"{p}.weight"], sd[f"{p}.bias"], 1e-6)


def ae_layer(sd, p, x):
    return x + llama_mlp(sd, f"{p}.mlp", rms(x, sd[f"{p}.layernorm.weight"]))


def ref_encode(sd, ids):  # [B, K] -> mu, log_sigma [B, l]
    h = ae_layer(sd, "encoder.encoder_layers.0", F.embedding(ids, sd["encoder.embed_tokens.weight"]))
    h = ae_layer(sd, "encoder.encoder_layers.1", lin(sd, "encoder.squeeze_layer", h.flatten(-2)))
    return lin(sd, "encoder.hidden_to_latent", rms(h, sd["encoder.norm.weight"])).chunk(2, -1)


def ref_decode_logits(sd, z):  # [B, l] -> [B, K, V]
    h = ae_layer(sd, "decoder.decoder_layers.0", lin(sd, "decoder.latent_to_hidden", z))
    h = ae_layer(sd, "decoder.decoder_layers.1", lin(sd, "decoder.expand_layer", h).unflatten(-1, (K, -1)))
    return F.linear(rms(h, sd["decoder.norm.weight"]), sd["encoder.embed_tokens.weight"])


def ref_hidden(sd, tokens, kv):  # [B, T] -> [B, L, D]: embed_proj + HF Llama, written out
    B, T = tokens.shape
    L, hd = T // K, D // H
    x = F.embedding(tokens, sd["transformer.embed_tokens.weight"]).view(B, L, K * D)
    x = ln(sd, "embed_proj.3", lin(sd, "embed_proj.2", F.silu(lin(sd, "embed_proj.0", x))))
    inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))
    ang = torch.arange(L).float()[:, None] * inv
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rope(t):
        t1, t2 = t.chunk(2, -1)
        return t * cos + torch.cat([-t2, t1], -1) * sin

    causal = torch.ones(L, L, dtype=torch.bool).tril()
    for i in range(LAYERS):
        p = f"transformer.layers.{i}"
        y = rms(x, sd[f"{p}.input_layernorm.weight"])
        q = F.linear(y, sd[f"{p}.self_attn.q_proj.weight"]).view(B, L, H, hd).transpose(1, 2)
        k, v = (F.linear(y, sd[f"{p}.self_attn.{n}_proj.weight"]).view(B, L, kv, hd).transpose(1, 2)
                .repeat_interleave(H // kv, dim=1) for n in ("k", "v"))
        att = (rope(q) @ rope(k).transpose(-1, -2) / math.sqrt(hd)).masked_fill(~causal, float("-inf"))
        x = x + F.linear((att.softmax(-1) @ v).transpose(1, 2).reshape(B, L, D), sd[f"{p}.self_attn.o_proj.weight"])
        x = x + llama_mlp(sd, f"{p}.mlp", rms(x, sd[f"{p}.post_attention_layernorm.weight"]))
    return rms(x, sd["transformer.norm.weight"])


def ref_head(sd, h, u):  # MLPGenerator.sample with its torch.rand draw u given
    p = "mlp_generator"
    e = ln(sd, f"{p}.norm_noise", lin(sd, f"{p}.noise_embd", u - 0.5))
    c = ln(sd, f"{p}.norm_hidden", lin(sd, f"{p}.hidden_embd", h))
    for j in range(BLOCKS):
        b = f"{p}.mlp_blocks.{j}"
        z = lin(sd, f"{b}.linears.0", torch.cat([ln(sd, f"{b}.in_ln", e), c], -1))
        gate, up = lin(sd, f"{b}.linears.4", F.silu(lin(sd, f"{b}.linears.2", F.silu(z)))).chunk(2, -1)
        e = e + lin(sd, f"{b}.down_proj", F.silu(gate) * up)
    f = f"{p}.final_layer"
    return lin(sd, f"{f}.linears.2", F.silu(lin(sd, f"{f}.linears.0", ln(sd, f"{f}.in_ln", e))))


# ------------------------------------------------------------------ tests
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_autoencoder_matches_the_reference_forward(tmp_path, fmt):
    sd = ref_ae_state()
    sd["encoder.hidden_to_latent.bias"][LAT] = -30.0  # a log sigma below the kit's default clamp
    out = convert_official(write_folder(tmp_path / "ae", AE_RC, sd, fmt))
    ae, cfg = out.autoencoder, out.autoencoder_config
    assert (cfg.linear_bias, cfg.log_sigma_clamp, cfg.mask_token_id, cfg.num_token_blocks) == (True, False, 0, 1)
    ids = torch.randint(0, V, (5, K), generator=torch.Generator().manual_seed(3))
    mu, log_sigma = ae.encode(ids)
    ref_mu, ref_ls = ref_encode(sd, ids)
    torch.testing.assert_close(mu, ref_mu, **TOL)
    torch.testing.assert_close(log_sigma, ref_ls, **TOL)  # unclamped, as the reference
    assert log_sigma[:, 0].max() < -10
    torch.testing.assert_close(ae.decode_logits(mu), ref_decode_logits(sd, mu), **TOL)
    assert ae.decode(mu).shape == (5, K)
    assert out.calm is None and out.model_config["kind"] == "autoencoder" and out.files == [
        "pytorch_model.bin" if fmt == "bin" else "model.safetensors"]


@pytest.mark.parametrize("kv", [H, 2])
def test_calm_matches_the_reference_forward(tmp_path, kv):
    ae = ref_ae_state()
    sd = ref_calm_state(ae, kv=kv)
    out = convert_official(write_folder(tmp_path / "ae", AE_RC, ae),
                           write_folder(tmp_path / "calm", {**CALM_RC, "num_key_value_heads": kv}, sd, "safetensors"))
    calm = out.calm
    tokens = torch.randint(0, V, (2, 6 * K), generator=torch.Generator().manual_seed(4))
    h = calm.hidden_states(tokens)
    torch.testing.assert_close(h, ref_hidden(sd, tokens, kv), **TOL)
    u = torch.rand(12, NOISE, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(calm.head(h.reshape(12, D), u - 0.5), ref_head(sd, h.reshape(12, D), u), **TOL)
    assert calm.autoencoder is out.autoencoder
    assert torch.equal(calm.autoencoder.embedding.weight, ae["encoder.embed_tokens.weight"])


def test_converted_configs_set_the_reference_switches(folders):
    ae_dir, calm_dir, _ = folders
    out = convert_official(ae_dir, calm_dir)
    bb, head = out.backbone_config, out.head_config
    assert (bb.compress_bias, bb.compress_norm_eps, bb.scaled_residual_init, bb.rope_theta) == (True, 1e-6, False, 1e4)
    assert (head.norm_eps, head.energy.ffn_bias, head.energy.init, head.energy.num_blocks) == (1e-6, True, "normal", BLOCKS)
    assert (head.energy.noise_size, head.energy.alpha, head.num_samples) == (NOISE, 1.0, 8)
    assert out.reference_config["calm"]["hidden_size"] == D and out.reference_config["autoencoder"]["kl_clamp"] == 0.5
    from calm_lightning.config.loader import load_config_from_dict, to_object

    model = {k: v for k, v in out.model_config.items() if v is not None}
    cfg = to_object(load_config_from_dict({"model": model, "data": {"block_size": 16 * K}}))
    assert cfg.model.autoencoder.log_sigma_clamp is False and cfg.model.backbone.n_layers == LAYERS


def test_converted_calm_trains_and_generates(folders):
    from calm_lightning.sampling.generate import GenerationConfig, generate

    out = convert_official(*folders[:2])
    calm = out.calm
    tokens = torch.randint(0, 256, (2, 4 * K), generator=torch.Generator().manual_seed(6))
    loss = calm.loss(tokens).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert calm.head.out_proj.weight.grad is not None and calm.autoencoder.embedding.weight.grad is None
    calm.eval()
    res = generate(calm, [[1, 2, 3], [4, 5, 6, 7, 8]], GenerationConfig(max_new_tokens=8, eos_id=out.special_ids.eos),
                   fill_id=out.special_ids.eos, generator=torch.Generator().manual_seed(0))
    assert len(res.tokens) == 2 and all(0 < len(t) <= 8 and all(0 <= i < V for i in t) for t in res.tokens)


def _one_line_error(match: str, *args):
    with pytest.raises(CalmError, match=match) as e:
        convert_official(*args)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("which", ["ae", "calm"])
def test_missing_wrong_shape_and_unexpected_keys(tmp_path, which):
    def case(name, edit):
        ae = ref_ae_state()
        sd = ref_calm_state(ae)
        edit(ae if which == "ae" else sd)
        dirs = (write_folder(tmp_path / name / "ae", AE_RC, ae), write_folder(tmp_path / name / "calm", CALM_RC, sd))
        return dirs if which == "calm" else dirs[:1]

    key = "encoder.squeeze_layer.bias" if which == "ae" else "transformer.layers.1.self_attn.k_proj.weight"
    _one_line_error(f"missing key {key}", *case("missing", lambda s: s.pop(key)))
    _one_line_error(rf"{key} has shape \[\d+(, \d+)?\], expected", *case("shape", lambda s: s.update({key: s[key][:-1]})))
    _one_line_error("unexpected key extra.weight", *case("extra", lambda s: s.update({"extra.weight": torch.ones(1)})))


def test_inconsistent_duplicates_are_refused(tmp_path):
    ae = ref_ae_state()
    ae_dir = write_folder(tmp_path / "ae", AE_RC, ae)
    bad_tie = {**ae, "decoder.lm_head_weight": ae["decoder.lm_head_weight"] + 1}
    _one_line_error("lm_head_weight differs", write_folder(tmp_path / "ae2", AE_RC, bad_tie))
    sd = ref_calm_state(ae)
    sd["generative_head.noise_embd.bias"] = sd["generative_head.noise_embd.bias"] + 1
    _one_line_error("generative_head.noise_embd.bias differs", ae_dir, write_folder(tmp_path / "c1", CALM_RC, sd))
    other = ref_calm_state(ref_ae_state(seed=9))  # trained on another autoencoder
    _one_line_error("ae_model weights .* differ", ae_dir, write_folder(tmp_path / "c2", CALM_RC, other))


@pytest.mark.parametrize("which,field,value,match", [
    ("ae", "hidden_act", "gelu", "hidden_act='gelu' is not supported"),
    ("ae", "num_encoder_layers", 3, "num_encoder_layers=3"),
    ("ae", "mlp_bias", True, "mlp_bias=true"),
    ("calm", "rope_scaling", {"type": "linear", "factor": 2.0}, "rope_scaling="),
    ("calm", "architectures", ["FlowTransformer"], "only the energy head"),
    ("calm", "vocab_size", V + 1, "vocab_size=301 differs"),
    ("calm", "num_key_value_heads", 3, "do not divide"),
])
def test_unsupported_config_values(folders, which, field, value, match):
    ae_dir, calm_dir, _ = folders
    folder = ae_dir if which == "ae" else calm_dir
    rc = {**(AE_RC if which == "ae" else CALM_RC), field: value}
    (folder / "config.json").write_text(json.dumps(rc))
    _one_line_error(match, ae_dir, calm_dir)


def test_damaged_or_absent_files(folders, tmp_path):
    ae_dir, calm_dir, _ = folders
    raw = (calm_dir / "pytorch_model.bin").read_bytes()
    (calm_dir / "pytorch_model.bin").write_bytes(raw[: len(raw) // 2])
    _one_line_error("pytorch_model.bin", ae_dir, calm_dir)
    (tmp_path / "empty").mkdir()
    _one_line_error("no config.json", tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps(AE_RC))
    _one_line_error("no weights", tmp_path / "empty")
    (ae_dir / "tokenizer.json").unlink()
    _one_line_error("no tokenizer.json", ae_dir)


def test_tokenizer_keeps_its_ids_and_takes_the_kit_names(folders):
    out = convert_official(folders[0])
    tok, ids = out.tokenizer, out.special_ids
    assert ids.as_dict() == {"bos": BOS_ID, "eos": EOS_ID, "pad": PAD_ID, "mask": BOS_ID + 2}
    assert out.tokenizer_renames == {"<|begin_of_text|>": "<|bos|>", "[PAD]": "<|pad|>",
                                     "<|reserved_special_token_0|>": "<|mask|>"}
    assert special_ids(tok) == ids and vocab_size(tok) == V
    assert with_special_tokens(tok)[1] is False  # nothing to append: the vocabulary does not grow
    original = llama_like_tokenizer()
    text = "Hello, world! ünï"
    assert tok.encode(text, add_special_tokens=False).ids == original.encode(text, add_special_tokens=False).ids
    assert tok.encode(text).ids == original.encode(text).ids  # the template still prepends id 256
    assert tok.encode(text).tokens[0] == "<|bos|>"  # ... under its new name
    assert tok.id_to_token(EOS_ID) == "<|end_of_text|>" and tok.id_to_token(262) == "<|start_header_id|>"
    assert tok.decode(tok.encode(text).ids) == text


def test_tokenizer_that_does_not_fit_is_refused(folders, tmp_path):
    ae_dir = folders[0]
    small = llama_like_tokenizer()
    small.add_special_tokens(["<|extra|>"])
    small.save(str(tmp_path / "t.json"))
    with pytest.raises(CalmError, match="301 token ids, but the checkpoint's embedding has 300"):
        convert_official(ae_dir, tokenizer=tmp_path / "t.json")
    (ae_dir / "config.json").write_text(json.dumps({**AE_RC, "pad_token_id": 5}))
    _one_line_error(r"pad token \(id 5", ae_dir)


def test_sharded_checkpoint_with_an_index(folders):
    ae_dir, calm_dir, _ = folders
    sd = torch.load(calm_dir / "pytorch_model.bin", weights_only=True)
    (calm_dir / "pytorch_model.bin").unlink()
    keys = sorted(sd)
    shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for name, part in shards.items():
        torch.save({k: sd[k] for k in part}, calm_dir / name)
    index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
    (calm_dir / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    out = convert_official(ae_dir, calm_dir)
    assert out.files[1:] == [f"calm/{name}" for name in shards]
    assert torch.equal(out.calm.embed.weight, sd["transformer.embed_tokens.weight"])


# ------------------------------------------------------------------ calm import-official, end to end
def test_import_official_exports_a_folder_that_loads_generates_and_fine_tunes(folders, tiny_corpus, tmp_path, capsys):
    import calm_lightning
    from calm_lightning.cli import main

    ae_dir, calm_dir, _ = folders
    out = tmp_path / "imported"
    assert main(["import-official", str(ae_dir), "--calm", str(calm_dir), "--out", str(out)]) == 0
    assert "<|begin_of_text|> -> <|bos|>" in capsys.readouterr().out
    lm = calm_lightning.load(out, device="cpu")
    reference = convert_official(ae_dir, calm_dir).calm
    tokens = torch.randint(0, 256, (2, 4 * K), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(lm.model.hidden_states(tokens), reference.hidden_states(tokens), rtol=0, atol=0)
    assert lm.model.embed.num_embeddings == V  # the vocabulary did not grow
    assert isinstance(lm.generate("ab", max_new_tokens=8, temperature=0.5, num_candidates=8)[0], str)

    # fine-tuning from the import: its experiment.yaml carries the model, the tokenizer and init_from
    rc = main(["train", str(out / "experiment.yaml"), f"data.corpus={tiny_corpus}",
               f"data.cache_dir={tmp_path / 'cache'}", "data.block_size=32", "data.batch_size=2",
               "data.val_fraction=0.2", "data.prepare_workers=1", "trainer.accelerator=cpu",
               "trainer.precision=32-true", "trainer.threads=1", "trainer.max_steps=1",
               "trainer.val_check_interval=1", "trainer.limit_val_batches=1", "trainer.checkpoint_every_n_steps=1",
               "eval.brier_max_n=2", "sampling.prompts=[]", "model.head.energy.num_target_samples=4",
               "model.head.num_samples=2", f"logging.runs_dir={tmp_path / 'runs'}", "logging.name=ft"])
    assert rc == 0
    tuned = calm_lightning.load(tmp_path / "runs" / "ft", device="cpu").model
    assert torch.equal(tuned.autoencoder.embedding.weight, reference.autoencoder.embedding.weight)  # frozen
    assert not torch.equal(tuned.head.out_proj.weight, reference.head.out_proj.weight)  # one step moved it


def test_load_and_sample_take_a_released_folder_directly(folders, tmp_path, monkeypatch, capsys):
    import calm_lightning
    from calm_lightning.cli import main

    ae_dir, calm_dir, _ = folders
    cfg = json.loads((calm_dir / "config.json").read_text())
    cfg["ae_path"] = "/where/it/was/trained/ae"  # as released: a path on the authors' machine (or a hub id)
    (calm_dir / "config.json").write_text(json.dumps(cfg))
    monkeypatch.chdir(tmp_path)  # the conversion is cached under ./.cache/calm/official/
    lm = calm_lightning.load(calm_dir, device="cpu")  # the sibling folder of that name is used
    reference = convert_official(ae_dir, calm_dir).calm
    tokens = torch.randint(0, 256, (1, 4 * K), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(lm.model.hidden_states(tokens), reference.hidden_states(tokens), rtol=0, atol=0)
    assert len(list((tmp_path / ".cache" / "calm" / "official").iterdir())) == 1
    assert main(["sample", str(calm_dir), "--prompt", "ab", "--max-new-tokens", "4", "--device", "cpu"]) == 0
    assert len(list((tmp_path / ".cache" / "calm" / "official").iterdir())) == 1  # converted once
    ae = calm_lightning.load_autoencoder(ae_dir)
    assert ae.model.latent_size == LAT
