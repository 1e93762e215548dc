"""GPU benchmark: the paper's CALM-M and Transformer-M for a few bf16 training steps, then generation.

Run on a CUDA machine: ``python benchmarks/gpu.py`` (exits 0 with "skipped" where no CUDA device
exists; ``--device cpu --tiny`` is a smoke run of the same code path on toy sizes). Models are built
from ``experiments/paper/{ae,calm_m,transformer_m}.yaml`` with the Llama-3 vocabulary (128,256 ids)
and random weights: speed depends on sizes only. Per model it times forward + backward + grad clip +
fused AdamW under bf16 autocast (what ``precision: bf16-mixed`` runs) on the paper's micro-batch
(4 sequences of 8192 tokens for CALM, 2048 for the Transformer), eager and, with ``--compile``,
``torch.compile``-d. Reports tokens/s and MFU = model FLOP/s (``calm_lightning.flops``, training per
token, attention included) over the bf16 matmul peak measured in the same run, and over the vendor
peak where the GPU is known. Then generation tokens/s at batch 1 and 16, T = 1 and T = 0.5. Writes
a JSON record to ``--out`` (default benchmarks/results/gpu.json, appended; with ``--tiny`` only when
``--out`` is given, like the other benchmarks' smoke runs) and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from records import append_record
from shared import matmul_flops, sync

from calm_lightning.config.loader import load_config, to_object
from calm_lightning.flops import model_flops
from calm_lightning.models.autoencoder import ChunkAutoencoder
from calm_lightning.models.calm import CALM
from calm_lightning.models.token_lm import TokenLM
from calm_lightning.sampling.generate import GenerationConfig, generate
from calm_lightning.utils.hardware import peak_flops_of

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "experiments" / "paper"
RESULTS = Path(__file__).resolve().parent / "results" / "gpu.json"
LLAMA3_VOCAB = 128_256
# --tiny: the same code on toy sizes (CPU smoke test of this script)
TINY = dict(n_layers=2, d_model=64, n_heads=4, ffn_size=128)
TINY_AE = dict(d_model=32, ffn_size=64, latent_size=16)


def matmul_peak(device: torch.device, n: int, repeats: int) -> dict:
    """bf16 n x n x n matmul FLOP/s (the MFU reference): from the min and median time of ``repeats`` products."""
    best, median = matmul_flops(n, repeats, torch.bfloat16, device)
    return {"n": n, "tflops_best": best / 1e12, "tflops_median": median / 1e12}


def build(kind: str, tiny: bool, vocab: int):
    """(model, block_size, micro_batch) for kind in {calm, transformer}, from the paper YAMLs."""
    ae_cfg = to_object(load_config(PAPER / "ae.yaml")).model.autoencoder
    exp = to_object(load_config(PAPER / ("calm_m.yaml" if kind == "calm" else "transformer_m.yaml")))
    backbone = exp.model.backbone
    if tiny:
        backbone = dataclasses.replace(backbone, **TINY, max_seq_len=64)
        ae_cfg = dataclasses.replace(ae_cfg, **TINY_AE)
    ae_cfg = dataclasses.replace(ae_cfg, vocab_size=vocab, mask_token_id=vocab - 1)
    block = backbone.max_seq_len * (ae_cfg.chunk_size if kind == "calm" else 1)
    if kind == "calm":
        return CALM(backbone, exp.model.head, ChunkAutoencoder(ae_cfg)), block, exp.data.batch_size
    return TokenLM(backbone, vocab), block, exp.data.batch_size


def loss_fn(model):
    return (lambda t: model.loss(t).loss) if isinstance(model, CALM) else model.loss


def time_training(model, tokens, device, steps: int, compile_: bool, bf16: bool = True) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda")
    fn = loss_fn(model)
    if compile_:
        fn = torch.compile(fn)
    times = []
    start = time.perf_counter()
    for i in range(steps + 2):  # two warm-up steps (allocator, autotuning, compilation)
        sync(device)
        t = time.perf_counter()
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            loss = fn(tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t)
        else:
            first = time.perf_counter() - start
    del opt
    return {
        "step_s_min": min(times),
        "step_s_median": statistics.median(times),
        "warmup_s": first,
        "loss": loss.item(),
    }


def time_generation(model, vocab: int, batch: int, temperature: float, new_tokens: int, device, repeats: int):
    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(4, vocab - 1, (batch, 32), generator=g).tolist()
    cfg = GenerationConfig(
        max_new_tokens=new_tokens, temperature=temperature, sampler="batch", num_candidates=200
    )
    seconds = []
    for rep in range(repeats + 1):
        gen = torch.Generator(device=device).manual_seed(rep)
        sync(device)
        t = time.perf_counter()
        with torch.autocast(device.type, torch.bfloat16):
            out = generate(model, prompts, cfg, fill_id=0, generator=gen)
        sync(device)
        if rep:
            seconds.append(time.perf_counter() - t)
    n = sum(len(t) for t in out.tokens)
    return {
        "batch": batch,
        "temperature": temperature,
        "new_tokens": n,
        "tokens_per_s_best": n / min(seconds),
        "tokens_per_s_median": n / statistics.median(seconds),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="toy sizes: a smoke run of this script (any device)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per case (after 2 warm-ups)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile-d training steps")
    p.add_argument("--fp32", action="store_true", help="also time eager fp32 steps (TF32 matmuls)")
    p.add_argument("--models", default="calm,transformer")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--gen-repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help=f"results file (default {RESULTS}; --tiny: none)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu.py: skipped (no CUDA device)")
        return 0
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    vocab = 512 if args.tiny else LLAMA3_VOCAB
    peak = matmul_peak(device, 256 if args.tiny else 8192, 10)
    vendor_peak = peak_flops_of(device, torch.bfloat16) if device.type == "cuda" else 0.0
    print(
        f"{name}: bf16 matmul {peak['tflops_best']:.0f} TFLOP/s best, {peak['tflops_median']:.0f} median; "
        f"vendor peak {vendor_peak / 1e12:.0f}",
        flush=True,
    )
    record = {
        "benchmark": "gpu",
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": name,
        "torch": torch.__version__,
        "tiny": args.tiny,
        "matmul_bf16": peak,
        "vendor_peak_tflops": vendor_peak / 1e12,
        "training": [],
        "generation": [],
    }
    for kind in args.models.split(","):
        model, block, micro = build(kind, args.tiny, vocab)
        model = model.to(device)
        flops = model_flops(model, seq_len=block)
        tokens = torch.randint(4, vocab - 1, (micro, block), device=device)
        variants = [(False, True)] + [(False, False)] * args.fp32 + [(True, True)] * args.compile
        for compile_, bf16 in variants:  # eager bf16, [eager fp32 (TF32 matmuls)], [compiled bf16]
            try:
                row = time_training(model, tokens, device, args.steps, compile_, bf16)
            except Exception as e:  # a failed compile is a result to report, not a crash
                print(f"{kind} compile={compile_}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                record["training"].append({"model": kind, "compile": compile_, "error": str(e)[:300]})
                continue
            tps = tokens.numel() / row["step_s_median"]
            row.update(
                model=kind,
                compile=compile_,
                precision="bf16-mixed" if bf16 else "32-true (TF32)",
                tokens_per_step=tokens.numel(),
                tokens_per_s=tps,
                params_trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
                train_flops_per_token=flops.training.total,
                mfu_measured_peak=flops.training.total * tps / (peak["tflops_best"] * 1e12),
                mfu_vendor_peak=flops.training.total * tps / vendor_peak if vendor_peak else None,
                peak_mem_gib=torch.cuda.max_memory_allocated(device) / 2**30
                if device.type == "cuda"
                else None,
            )
            record["training"].append(row)
            print(
                f"{kind:11s} compile={compile_!s:5s} {'bf16' if bf16 else 'fp32'} {tps:10,.0f} tok/s  step {row['step_s_median'] * 1e3:7.1f} ms  "
                f"MFU {row['mfu_measured_peak']:.1%} of measured peak  warm-up {row['warmup_s']:.0f} s  "
                f"mem {row['peak_mem_gib'] or 0:.1f} GiB",
                flush=True,
            )
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
        model.eval()
        for batch in (1, 16):
            for temperature in (1.0, 0.5):
                try:
                    row = time_generation(
                        model,
                        vocab,
                        batch,
                        temperature,
                        16 if args.tiny else args.new_tokens,
                        device,
                        args.gen_repeats,
                    )
                except Exception as e:  # report and go on: the other cases still tell something
                    print(
                        f"{kind} generate B={batch} T={temperature}: failed: {type(e).__name__}: {str(e)[:300]}"
                    )
                    continue
                row.update(model=kind, inference_flops_per_token=flops.inference.total)
                record["generation"].append(row)
                print(
                    f"{kind:11s} generate B={batch:<2d} T={temperature:<3g} {row['tokens_per_s_best']:9,.0f} tok/s "
                    f"best, {row['tokens_per_s_median']:9,.0f} median",
                    flush=True,
                )
        del model, tokens
        if device.type == "cuda":
            torch.cuda.empty_cache()
    append_record(args.out if args.out is not None else (None if args.tiny else RESULTS), record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
