"""Side by side with the reference implementation: the same weights timed on both (issue 18's table).

Not part of the test suite, never vendored: it needs a checkout of the official code and a scratch
environment with ``transformers==4.43.0`` (see `benchmarks/parity_official.py` for building both):

    PYTHONPATH=src OMP_NUM_THREADS=2 /tmp/refenv/bin/python benchmarks/vs_reference.py \
        --reference-repo /tmp/calm-ref --threads 2

Run it on a quiet machine (nothing else on the cores). It builds the reference Autoencoder and
EnergyTransformer at the kit's small configuration (d=256, FFN 640, 4 layers, 4 heads, V=8192, K=4,
l=128, N=8, M=100; seeded random weights), converts them with `official.convert_official` (so both
sides compute the same function: `benchmarks/results/parity_official.md`) and times, fp32, min and
median over ``--repeats`` after warm-up:

- autoencoder forward + backward, 8 x 2048 tokens (both in training mode: masking, dropout, KL); again with
  both under bf16 autocast where the CPU has native bf16 (the kit's ``trainer.precision=auto`` there);
- CALM-energy training step (forward + backward), 8 x 512 tokens; the kit twice: its default
  shared target noise, and i.i.d. target noise as the reference draws it;
- BrierLM K=4 validation step (loss + two-sample Brier-1..4), 1 x 512 and 8 x 512: the reference's
  eval-mode forward (which scores inside ``forward``); the kit's CALM validation step (one backbone pass
  shared by the loss and `estimate_brier` with S = 2, the reference's estimator).

- temperature sampling, 16 contexts x 200 candidates at T = 1/2 and 1/3: the reference's
  ``temperature_sampling`` against the kit's batch sampler (same N, same rule) and its ``auto`` sampler
  (exact where a pilot predicts it cheaper: ``sampling/auto.py``); a check that both decoders give the
  same tokens for the same 3200 latents (the kit's bf16-screened argmax included);
- generation, batch 4 x 32-token prompts, +64 tokens at T = 0.5 (N = 200) and T = 1 (end-of-text
  disabled on both sides so both generate every token);
- flow and diffusion heads (reference ``FlowTransformer`` / ``DiffusionTransformer`` against kit CALMs
  with the same backbone, autoencoder and head sizes: one adaLN block of width 256, N = 8; their
  weights differ, the work does not): training step 8 x 512, and sampling 16 x 200 latents with 10
  midpoint steps (flow) and 100 ancestral steps (diffusion).

Ratio = reference time / kit time (> 1: the kit is faster). Each row also gives the matmul FLOPs of
one call on each side (torch's ``FlopCounterMode``: matmuls and attention, no elementwise work), each
side's share of the matmul peak measured in the same run (fp32, and bf16 for the bf16 rows), and the
ceiling ratio: reference time over the kit's FLOPs at 100% of that peak, i.e. the most the kit could
gain without doing less work. Where the ceiling is below 2 at equal configuration, a 2x target needs
less work, not a faster kernel. Results are appended to ``benchmarks/results/vs_reference.md``.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
from pathlib import Path

import shared
import torch
from records import cpu_model

from calm_lightning.official import convert_official
from calm_lightning.utils.hardware import cpu_has_fast_bf16

RESULTS = Path(__file__).resolve().parent / "results" / "vs_reference.md"
V, K, LATENT = 8192, 4, 128
AE_SIZES = dict(hidden_size=256, intermediate_size=640, latent_size=LATENT, patch_size=K,
                num_encoder_layers=2, num_decoder_layers=2)
CALM_SIZES = dict(hidden_size=256, intermediate_size=640, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, num_mlp_layers=1, noise_size=64, num_samples=8,
                  max_position_embeddings=2048)
BOS_ID, EOS_ID, PAD_ID = V - 3, V - 2, V - 1


def tokenizer_json(path: Path) -> None:
    """A byte-level tokenizer with exactly V ids, Llama-3-style specials at the end (ids only matter)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({f"w{i}": len(vocab) + i for i in range(V - 3 - 42 - len(vocab))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.add_special_tokens([f"<|reserved_special_token_{i}|>" for i in range(42)])
    tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>", "[PAD]"])
    assert tok.get_vocab_size(with_added_tokens=True) == V
    tok.save(str(path))


WARMUP = 2  # untimed calls before each timing (--warmup)


def timed(fn, repeats: int) -> tuple[float, float, float]:
    """(min s, median s, matmul FLOPs of one call): the FLOPs counted by torch's FlopCounterMode on one
    extra, untimed call (matmuls and attention only; elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    t_min, t_med = shared.timed(fn, repeats, WARMUP)
    with FlopCounterMode(display=False) as counter:
        fn()
    return t_min, t_med, float(counter.get_total_flops())


def build(ref_repo: Path, tmp: Path):
    sys.path.insert(0, str(ref_repo))
    from models.configuration_autoencoder import AutoencoderConfig as RefAEConfig
    from models.configuration_calm import CALMConfig
    from models.modeling_autoencoder import Autoencoder
    from models.modeling_energy import EnergyTransformer

    ids_cfg = dict(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, vocab_size=V)
    ae_dir, calm_dir = tmp / "ae", tmp / "calm"
    ae_dir.mkdir()
    tokenizer_json(ae_dir / "tokenizer.json")
    ref_ae = Autoencoder(RefAEConfig(**AE_SIZES, **ids_cfg))
    ref_ae.save_pretrained(ae_dir, safe_serialization=False)
    ref = EnergyTransformer(CALMConfig(ae_path=str(ae_dir), latent_size=LATENT, patch_size=K, **CALM_SIZES, **ids_cfg))
    with torch.no_grad():  # the head's output layer is zero at init: make its samples differ
        for p in ref.generative_head.parameters():
            p.add_(torch.randn(p.shape) * 0.02)
    ref.save_pretrained(calm_dir, safe_serialization=False)
    out = convert_official(ae_dir, calm_dir)
    return ref_ae, ref, out


def build_other_heads(ref_repo: Path, tmp: Path, calm, kit_ae):
    """Reference flow and diffusion CALMs and kit CALMs of the same sizes (random weights each)."""
    from models.configuration_calm import CALMConfig
    from models.modeling_diffusion import DiffusionTransformer
    from models.modeling_flow import FlowTransformer

    from calm_lightning.models.calm import CALM
    from calm_lightning.models.config import HeadConfig
    from calm_lightning.models.heads.diffusion import DiffusionHeadConfig
    from calm_lightning.models.heads.flow import FlowHeadConfig

    ids_cfg = dict(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, vocab_size=V)
    cfg = CALMConfig(ae_path=str(tmp / "ae"), latent_size=LATENT, patch_size=K, **CALM_SIZES, **ids_cfg)
    pairs = {}
    for name, ref_cls, head in (
        ("flow", FlowTransformer, HeadConfig(name="flow", num_samples=CALM_SIZES["num_samples"],
                                             flow=FlowHeadConfig(num_blocks=1, solver="midpoint", num_steps=10))),
        ("diffusion", DiffusionTransformer, HeadConfig(name="diffusion", num_samples=CALM_SIZES["num_samples"],
                                                       diffusion=DiffusionHeadConfig(num_blocks=1, num_steps=100))),
    ):
        kit = CALM(calm.backbone.cfg, head, kit_ae)
        ref = ref_cls(cfg)
        ref.num_samples = CALM_SIZES["num_samples"]  # its forward reads self.num_samples, which __init__ never sets
        pairs[name] = (ref, kit)
    return pairs


def sampling_rows(ref, calm, kit_ae, hidden, repeats: int) -> tuple[list, str]:
    """Temperature sampling rows and the decoders' token agreement on the same latents."""
    from calm_lightning.sampling.lazy import lazy_candidates
    from calm_lightning.sampling.temperature import temperature_sample

    rows = []
    with torch.no_grad():
        z = calm.head.sample(hidden, num_samples=200, generator=torch.Generator().manual_seed(2))  # [16, 200, l]
        ref_tokens = ref.ae_model.decoder(z).argmax(-1).reshape(16, 200, K)
        stats = {}
        kit_tokens = kit_ae.decode(z, stats)
    same = int((ref_tokens == kit_tokens).all(-1).sum())
    check = (f"decoded tokens for the same 3200 latents: {same} of 3200 chunks identical "
             f"(kit screen {kit_ae.cfg.argmax_screen}: {stats.get('rechecked', 0)} of {stats.get('rows', 0)} "
             "positions re-checked in fp32)")

    def draw(idx, num):
        return calm.sample_chunks(hidden.index_select(0, idx), num_samples=num)

    def lazy_draw(idx, num):  # what generation passes: candidates decoded on demand (sampling/lazy.py)
        return lazy_candidates(calm, hidden.index_select(0, idx), num)

    for temperature, label in ((0.5, "1/2"), (1 / 3, "1/3")):
        ref_t = timed(lambda t=temperature: ref.temperature_sampling(hidden, temperature=t, num_samples=200), repeats)
        for sampler in ("batch", "auto"):
            kit_t = timed(lambda t=temperature, s=sampler: temperature_sample(
                draw, 16, t, s, num_candidates=200, lazy_draw_fn=lazy_draw), repeats)
            rows.append((f"temperature sampling 16 x 200, T = {label} (kit: {sampler})", ref_t, kit_t))
    return rows, check


def generation_rows(ref, calm, repeats: int, g) -> list:
    from calm_lightning.sampling.generate import GenerationConfig, generate

    prompts = torch.randint(0, V - 3, (4, 32), generator=g)
    ref.eos_token_id = -1  # never stop early: both sides generate all 64 tokens
    rows = []
    for temperature, samplers in ((0.5, ("batch", "auto")), (1.0, ("batch",))):
        ref_t = timed(lambda t=temperature: ref.generate(prompts, max_length=32 + 64, temperature=t), repeats)
        for sampler in samplers:
            cfg = GenerationConfig(max_new_tokens=64, temperature=temperature, sampler=sampler, num_candidates=200)
            kit_t = timed(lambda c=cfg: generate(calm, prompts.tolist(), c, fill_id=EOS_ID), repeats)
            label = f"T = {temperature:g}" + (f" (kit: {sampler})" if temperature < 1 else "")
            rows.append((f"generation, batch 4, +64 tokens, {label}", ref_t, kit_t))
    return rows


def head_rows(pairs, lm_ids, hidden, repeats: int) -> list:
    rows = []
    repeated = hidden.unsqueeze(1).repeat(1, 200, 1)  # [16, 200, D], the reference's input
    for name, (ref, kit) in pairs.items():
        ref.train()
        kit.train()

        def ref_step(ref=ref):
            ref.zero_grad(set_to_none=True)
            ref(input_ids=lm_ids, labels=lm_ids).loss.backward()

        def kit_step(kit=kit):
            kit.zero_grad(set_to_none=True)
            kit.loss(lm_ids).loss.backward()

        rows.append((f"{name}-head train step, 8 x 512", timed(ref_step, repeats), timed(kit_step, repeats)))
        ref.eval()
        kit.eval()
        steps = "10 midpoint steps" if name == "flow" else "100 ancestral steps"

        def ref_sample(ref=ref, repeated=repeated):
            cuda = torch.Tensor.cuda  # the reference's diffusion sampler calls .cuda() on its noise: a CPU no-op here
            torch.Tensor.cuda = lambda self, *a, **k: self
            try:
                with torch.no_grad():
                    ref.generative_head.sample(repeated)
            finally:
                torch.Tensor.cuda = cuda

        def kit_sample(kit=kit):
            with torch.no_grad():
                kit.head.sample(hidden, num_samples=200)

        rows.append((f"{name} sampling 16 x 200 latents, {steps}", timed(ref_sample, repeats), timed(kit_sample, repeats)))
    return rows


def main() -> int:
    global WARMUP
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference-repo", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before each timing (default 2)")
    p.add_argument("--sections", default="ae,lm,brier,sampling,generation,heads",
                   help="comma-separated subset of ae,lm,brier,sampling,generation,heads (default: all)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    sections = set(args.sections.split(","))
    WARMUP = args.warmup
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    peaks = {"fp32": shared.matmul_flops(2048, 7, torch.float32, torch.device("cpu"))[0]}
    if cpu_has_fast_bf16():
        peaks["bf16"] = shared.matmul_flops(2048, 7, torch.bfloat16, torch.device("cpu"))[0]
    from calm_lightning.metrics.estimators import estimate_brier

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ref_ae, ref, out = build(args.reference_repo, Path(tmp))
        kit_ae = out.autoencoder.__class__(out.autoencoder_config)
        kit_ae.load_state_dict(out.autoencoder.state_dict())
        calm = out.calm
        pairs = build_other_heads(args.reference_repo, Path(tmp), calm, out.calm.autoencoder)
    g = torch.Generator().manual_seed(1)

    ae_ids = torch.randint(0, V - 3, (8, 2048), generator=g)
    ref_ae.train()
    kit_ae.train()

    def ref_ae_step():
        ref_ae.zero_grad(set_to_none=True)
        ref_ae(input_ids=ae_ids, labels=ae_ids).loss.backward()

    def kit_ae_step():
        kit_ae.zero_grad(set_to_none=True)
        kit_ae(ae_ids.view(-1, K)).loss.backward()

    if "ae" in sections:
        rows.append(("autoencoder fwd+bwd, 8 x 2048", timed(ref_ae_step, args.repeats), timed(kit_ae_step, args.repeats)))
        if cpu_has_fast_bf16():  # the kit's default precision here (trainer.precision=auto): both under bf16 autocast

            def bf16(step):
                def run():
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        step()
                return run

            rows.append(("autoencoder fwd+bwd, 8 x 2048, both bf16 autocast",
                         timed(bf16(ref_ae_step), args.repeats), timed(bf16(kit_ae_step), args.repeats)))

    lm_ids = torch.randint(0, V - 3, (8, 512), generator=g)
    ref.train()
    calm.train()

    def ref_lm_step():
        ref.zero_grad(set_to_none=True)
        ref(input_ids=lm_ids, labels=lm_ids).loss.backward()

    def kit_lm_step():
        calm.zero_grad(set_to_none=True)
        calm.loss(lm_ids).loss.backward()

    if "lm" in sections:
        ref_t = timed(ref_lm_step, args.repeats)
        rows.append(("CALM-energy train step, 8 x 512 (kit: shared target noise)", ref_t, timed(kit_lm_step, args.repeats)))
        calm.head.cfg.energy.shared_target_noise = False
        rows.append(("CALM-energy train step, 8 x 512 (kit: i.i.d. target noise)", ref_t, timed(kit_lm_step, args.repeats)))
        calm.head.cfg.energy.shared_target_noise = True

    ref.eval()
    calm.eval()
    for batch in (1, 8) if "brier" in sections else ():
        ids = lm_ids[:batch]

        def ref_val(ids=ids):
            with torch.no_grad():
                ref(input_ids=ids, labels=ids)

        def kit_val(ids=ids):
            with torch.no_grad():
                hidden = calm.hidden_states(ids)
                calm.loss(ids, hidden=hidden)
                estimate_brier(calm, ids, max_n=4, num_samples=2, hidden=hidden, generator=torch.Generator().manual_seed(0))

        rows.append((f"BrierLM K=4 validation step, {batch} x 512", timed(ref_val, args.repeats), timed(kit_val, args.repeats)))

    with torch.no_grad():
        hidden = calm.hidden_states(lm_ids[:1])[0, :16]  # [16, D] real backbone states as contexts
    check = ""
    if "sampling" in sections:
        more, check = sampling_rows(ref, calm, kit_ae, hidden, args.repeats)
        rows += more
    if "generation" in sections:
        rows += generation_rows(ref, calm, args.repeats, g)
    if "heads" in sections:
        rows += head_rows(pairs, lm_ids, hidden, args.repeats)

    import transformers

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## {stamp}: {cpu_model()}, {args.threads} thread(s), fp32, "
             f"torch {torch.__version__}, transformers {transformers.__version__}, min/median of {args.repeats}", "",
             "| path | reference ms (min / median) | kit ms (min / median) | ratio ref/kit (min) "
             "| matmul GFLOP ref / kit | % of matmul peak ref / kit | ceiling ratio |", "|---|---|---|---|---|---|---|"]
    for name, (rmin, rmed, rflop), (kmin, kmed, kflop) in rows:
        peak = peaks["bf16" if "bf16" in name else "fp32"]
        ceiling = rmin / (kflop / peak) if kflop else float("inf")
        lines.append(f"| {name} | {rmin * 1e3:.1f} / {rmed * 1e3:.1f} | {kmin * 1e3:.1f} / {kmed * 1e3:.1f} | {rmin / kmin:.2f} "
                     f"| {rflop / 1e9:.1f} / {kflop / 1e9:.1f} | {100 * rflop / rmin / peak:.0f} / {100 * kflop / kmin / peak:.0f} "
                     f"| {ceiling:.2f} |")
    peak_line = ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items())
    text = ("\n".join(lines) + "\n" + (f"\n{check}\n" if check else "")
            + f"\nmatmul peak ({args.threads} threads, best 2048^3 product): {peak_line}. Ceiling ratio = reference "
            "time / the kit's counted FLOPs at that peak: the ratio the kit would reach at 100% of the peak "
            "with the work it does now.\n")
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    header = "" if args.out.exists() else "# The kit against the reference implementation (benchmarks/vs_reference.py)\n\n"
    with args.out.open("a", encoding="utf-8") as f:
        f.write(header + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
