"""Parity of ``calm_lightning.official.convert_official`` against the reference code itself.

Not part of the test suite: it needs the reference repository and ``transformers==4.43.0``, which the
kit does not depend on. In a scratch environment outside the project:

    python3 -m venv /tmp/refenv && /tmp/refenv/bin/pip install torch==2.13.0 transformers==4.43.0
    git -C /path/to/calm-mirror worktree add /tmp/calm-ref HEAD      # or: git archive HEAD | tar -x
    PYTHONPATH=src OMP_NUM_THREADS=1 /tmp/refenv/bin/python benchmarks/parity_official.py \
        --reference-repo /tmp/calm-ref

It builds the reference Autoencoder and EnergyTransformer with small seeded fp32 configs, perturbs
every weight (so zero-initialised layers matter too), saves them with ``save_pretrained`` (the AE as
``model.safetensors`` written by the real safetensors library, the CALM as ``pytorch_model.bin``, the
only format HF can save it in), converts them, and compares on the same random inputs: AE latents,
decoded logits and argmax tokens, backbone hidden states, and the energy head's output for the same
uniform draw (the reference's ``torch.rand`` is patched at run time to return it). Two CALMs: plain
multi-head attention and grouped key/value heads. It prints, per quantity, max |kit - ref| and that
divided by max |ref| ("rel"), and appends the table to ``benchmarks/results/parity_official.md``.
Exit status 1 if any rel exceeds ``--tolerance`` or an argmax token differs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
import tempfile
from pathlib import Path

import torch

from calm_lightning.official import convert_official
from calm_lightning.utils.safetensors import load_file, save_file

RESULTS = Path(__file__).resolve().parent / "results" / "parity_official.md"
BOS_ID, EOS_ID = 256, 257
AE_SIZES = dict(hidden_size=64, intermediate_size=160, latent_size=16, patch_size=4,
                num_encoder_layers=2, num_decoder_layers=2)
CALM_SIZES = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4,
                  num_mlp_layers=2, noise_size=16, max_position_embeddings=128)


def tiny_tokenizer(path: Path) -> int:
    """256 byte symbols + Llama-3-style specials + [PAD]; returns the vocabulary size (300)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"] + [f"<|reserved_special_token_{i}|>" for i in range(41)])
    tok.add_special_tokens(["[PAD]"])
    tok.save(str(path))
    return tok.get_vocab_size(with_added_tokens=True)


@torch.no_grad()
def perturb(module: torch.nn.Module, gen: torch.Generator, skip: str = "") -> None:
    for name, p in module.named_parameters():
        if not (skip and name.startswith(skip)):
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


@contextlib.contextmanager
def fixed_rand(u: torch.Tensor):
    """torch.rand returns ``u`` (shape checked) while active: the reference head's noise draw."""
    real = torch.rand

    def fake(*shape, **kwargs):
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
        assert tuple(shape) == tuple(u.shape), (shape, u.shape)
        return u.to(kwargs.get("dtype") or u.dtype)

    torch.rand = fake
    try:
        yield
    finally:
        torch.rand = real


def diff(kit: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    kit, ref = kit.double(), ref.double()
    assert kit.shape == ref.shape, (kit.shape, ref.shape)
    err = (kit - ref).abs().max().item()
    return err, err / max(ref.abs().max().item(), 1e-30)


def safetensors_cross_check(tmp: Path) -> str:
    """Our writer -> the real library's reader, and the real writer -> our reader, on every dtype."""
    from safetensors.torch import load_file as st_load
    from safetensors.torch import save_file as st_save

    g = torch.Generator().manual_seed(0)
    ts = {"f32": torch.randn(3, 4, generator=g), "bf16": torch.randn(5, generator=g).bfloat16(),
          "f16": torch.randn(2, 2, generator=g).half(), "i64": torch.arange(7), "i8": torch.tensor([-3, 4], dtype=torch.int8),
          "u8": torch.tensor([9], dtype=torch.uint8), "bool": torch.tensor([True, False]), "scalar": torch.tensor(2.5),
          "empty": torch.zeros(0, 3), "f64": torch.randn(2, generator=g, dtype=torch.float64)}
    save_file(ts, tmp / "ours.safetensors", metadata={"format": "pt"})
    st_save(ts, str(tmp / "theirs.safetensors"), metadata={"format": "pt"})
    for a, b in ((st_load(str(tmp / "ours.safetensors")), ts), (load_file(tmp / "theirs.safetensors"), ts)):
        assert set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in b)
    same = (tmp / "ours.safetensors").read_bytes() == (tmp / "theirs.safetensors").read_bytes()
    return "pass (byte-identical files)" if same else "pass (files differ in layout, tensors equal)"


def run(ref_repo: Path, seed: int, batch: int, chunks: int) -> tuple[list[tuple[str, float, float]], dict]:
    sys.path.insert(0, str(ref_repo))
    from models.configuration_autoencoder import AutoencoderConfig as RefAEConfig
    from models.configuration_calm import CALMConfig
    from models.modeling_autoencoder import Autoencoder
    from models.modeling_energy import EnergyTransformer

    rows: list[tuple[str, float, float]] = []
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ae_dirs = {fmt: tmp / f"autoencoder_{fmt}" for fmt in ("safetensors", "bin")}
        for d in ae_dirs.values():
            d.mkdir()
            V = tiny_tokenizer(d / "tokenizer.json")
        ids_cfg = dict(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=V - 1, vocab_size=V)
        ref_ae = Autoencoder(RefAEConfig(**AE_SIZES, **ids_cfg)).eval()
        perturb(ref_ae, gen)
        for fmt, d in ae_dirs.items():
            ref_ae.save_pretrained(d, safe_serialization=fmt == "safetensors")
        # What the reference itself does with each file: from_pretrained unties decoder.lm_head_weight,
        # and the safetensors file has no copy of it (HF drops the alias), so it is left random there.
        notes = {}
        for fmt, d in ae_dirs.items():
            back = Autoencoder.from_pretrained(d)
            notes[fmt] = torch.equal(back.decoder.lm_head_weight, back.encoder.embed_tokens.weight)
        K = AE_SIZES["patch_size"]
        ids = torch.randint(0, V, (batch, chunks * K), generator=gen)
        with torch.no_grad():
            mean, log_std = ref_ae.encoder(input_ids=ids).chunk(2, dim=-1)  # [B, L, l] each
            ref_logits = ref_ae.decoder(latent_states=mean)  # [B, L*K, V]
            for fmt, d in ae_dirs.items():
                ae = convert_official(d).autoencoder
                mu, log_sigma = ae.encode(ids.view(batch, chunks, K))
                rows += [(f"AE mu ({fmt})", *diff(mu, mean)), (f"AE log sigma ({fmt})", *diff(log_sigma, log_std)),
                         (f"AE sigma ({fmt})", *diff(log_sigma.exp(), log_std.exp()))]
                logits = ae.decode_logits(mean).reshape(batch, chunks * K, V)
                rows.append((f"AE decoded logits ({fmt})", *diff(logits, ref_logits)))
                bad = (logits.argmax(-1) != ref_logits.argmax(-1)).sum().item()
                rows.append((f"AE argmax tokens ({fmt}; {bad} of {ids.numel()} differ)", float(bad), float(bad)))
        for kv in (CALM_SIZES["num_attention_heads"], 2):
            calm_dir = tmp / f"calm_kv{kv}"
            # the reference's scripts save with --save_safetensors False: the CALM reads the .bin AE
            cfg = CALMConfig(ae_path=str(ae_dirs["bin"]), latent_size=AE_SIZES["latent_size"], patch_size=K,
                             num_key_value_heads=kv, **CALM_SIZES, **ids_cfg)
            ref = EnergyTransformer(cfg).eval()
            perturb(ref, gen, skip="ae_model.")  # the AE stays the one saved above
            ref.save_pretrained(calm_dir, safe_serialization=False)
            out = convert_official(ae_dirs["bin"], calm_dir)
            ae, calm = out.autoencoder, out.calm
            tag = f"kv={kv}"
            with torch.no_grad():
                emb = ref.embed_proj(ref.transformer.embed_tokens(ids).reshape(batch, chunks, -1))
                ref_h = ref.transformer(inputs_embeds=emb)[0]  # [B, L, D]
                h = calm.hidden_states(ids)
                rows.append((f"CALM hidden states ({tag})", *diff(h, ref_h)))
                u = torch.rand(batch, chunks, CALM_SIZES["noise_size"], generator=gen)
                with fixed_rand(u):
                    ref_z = ref.generative_head.sample(ref_h)
                rows.append((f"energy head, same h and noise ({tag})", *diff(calm.head(ref_h, u - 0.5), ref_z)))
                z = calm.head(h, u - 0.5)
                rows.append((f"energy head end to end ({tag})", *diff(z, ref_z)))
                ref_tok = ref.ae_model.decoder(latent_states=ref_z).argmax(-1)
                bad = (ae.decode(z).reshape(batch, -1) != ref_tok).sum().item()
                rows.append((f"decoded head samples ({tag}; {bad} of {ref_tok.numel()} tokens differ)", float(bad), float(bad)))
        rows.append(("safetensors cross-check: " + safetensors_cross_check(tmp), 0.0, 0.0))
    import transformers

    meta = {"reference_reload_tied": notes, "seed": seed, "batch": batch, "chunks": chunks, "vocab": V, "autoencoder": AE_SIZES,
            "calm": CALM_SIZES, "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads()}
    return rows, meta


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference-repo", type=Path, required=True, help="a checkout of the reference repository")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--chunks", type=int, default=16, help="L: chunks (vector steps) per sequence")
    ap.add_argument("--tolerance", type=float, default=1e-5, help="largest acceptable rel difference")
    ap.add_argument("--no-record", action="store_true", help="do not append to the results file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows, meta = run(args.reference_repo.resolve(), args.seed, args.batch, args.chunks)
    ok = True
    lines = ["| quantity | max abs diff | rel (max abs / max abs ref) |", "|---|---|---|"]
    for name, err, rel in rows:
        if "tokens" in name or "cross-check" in name:
            lines.append(f"| {name} | - | - |")
            ok &= err == 0
        else:
            lines.append(f"| {name} | {err:.2e} | {rel:.2e} |")
            ok &= rel <= args.tolerance
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    block = "\n".join([f"## {stamp}: {'PASS' if ok else 'FAIL'} (tolerance rel <= {args.tolerance:g}, fp32, CPU)", "",
                       f"torch {meta['torch']}, transformers {meta['transformers']}, {meta['threads']} thread(s); "
                       f"config: `{json.dumps({k: meta[k] for k in ('seed', 'batch', 'chunks', 'vocab', 'autoencoder', 'calm')})}`",
                       "", *lines, "",
                       "Reference `Autoencoder.from_pretrained` keeps decoder.lm_head_weight equal to the embedding: "
                       + ", ".join(f"{k}: {v}" for k, v in meta["reference_reload_tied"].items()) + "", ""])
    print(block)
    if not args.no_record:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        if not RESULTS.exists():
            RESULTS.write_text("# Parity of the official-checkpoint import with the reference code\n\n"
                               "Written by `benchmarks/parity_official.py` (see its docstring for how to run it).\n\n")
        with RESULTS.open("a") as f:
            f.write(block + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
