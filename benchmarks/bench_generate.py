"""Generation speed: CALM (K=4, energy head) vs the token baseline with the same backbone.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_generate.py`` (``--quick`` for a tiny smoke
run that writes nothing unless ``--out`` is given). Random weights: speed does not depend on training,
only on sizes (d=256, 4 layers, vocabulary 4096, prompt of 32 tokens, 64 new tokens by default). For
each model, batch size (1, 16) and temperature (1, 0.5; CALM at 0.5 uses the batch sampler with
N=200 candidates, the paper's setting) it times ``generate`` after one warm-up and reports new tokens
per second as the min and median over the repetitions (min = the least disturbed run). Appends one
record to ``benchmarks/results/generate.json``. Wall-clock figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from records import append_record, record_header
from shared import backbone_config
from torch import nn

from calm_lightning.models.autoencoder import ChunkAutoencoder
from calm_lightning.models.calm import CALM
from calm_lightning.models.config import AutoencoderConfig, HeadConfig
from calm_lightning.models.token_lm import TokenLM
from calm_lightning.sampling.generate import GenerationConfig, generate

RESULTS = Path(__file__).resolve().parent / "results" / "generate.json"
FULL = dict(
    d_model=256,
    n_layers=4,
    n_heads=4,
    ffn_size=688,
    vocab=4096,
    latent=128,
    ae_d=256,
    ae_ffn=640,
    prompt_tokens=32,
    new_tokens=64,
    batches=(1, 16),
    num_candidates=200,
)
QUICK = dict(
    d_model=32,
    n_layers=1,
    n_heads=2,
    ffn_size=64,
    vocab=300,
    latent=8,
    ae_d=16,
    ae_ffn=32,
    prompt_tokens=8,
    new_tokens=8,
    batches=(1, 4),
    num_candidates=16,
)


def build_models(s: dict, K: int, device: torch.device) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    backbone = backbone_config(s, max_seq_len=s["prompt_tokens"] + s["new_tokens"])
    ae = ChunkAutoencoder(
        AutoencoderConfig(
            vocab_size=s["vocab"],
            chunk_size=K,
            latent_size=s["latent"],
            d_model=s["ae_d"],
            ffn_size=s["ae_ffn"],
            mask_token_id=3,
        )
    )
    calm = CALM(backbone, HeadConfig(name="energy"), ae)
    # The head's output layer starts at zero (all samples equal): random weights give varied chunks,
    # so the batch sampler sees realistic numbers of distinct candidates.
    nn.init.normal_(calm.head.out_proj.weight, std=0.5)
    baseline = TokenLM(backbone, s["vocab"])
    return {"calm": calm.to(device).eval(), "baseline": baseline.to(device).eval()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_case(model, prompts, cfg: GenerationConfig, repeats: int, device: torch.device) -> dict:
    seconds, fallbacks, chunks = [], 0, 0
    for rep in range(repeats + 1):  # rep 0 warms up
        gen = torch.Generator(device=device).manual_seed(rep)
        sync(device)
        start = time.perf_counter()
        out = generate(model, prompts, cfg, fill_id=0, generator=gen)
        sync(device)
        if rep:
            seconds.append(time.perf_counter() - start)
        fallbacks += sum(st.get("fallbacks", 0) for st in out.stats)
        chunks += len(prompts) * len(out.stats)
    new_tokens = sum(len(t) for t in out.tokens)
    rates = [new_tokens / s for s in seconds]
    return {
        "new_tokens": new_tokens,
        "steps": out.steps,
        "tokens_per_s_max": max(rates),  # from the fastest (min-time) run
        "tokens_per_s_median": statistics.median(rates),
        "min_s": min(seconds),
        "median_s": statistics.median(seconds),
        "sampler_fallback_fraction": fallbacks / chunks if chunks else 0.0,
    }


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes and 2 repetitions: a smoke run")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions per case (after one warm-up)")
    p.add_argument("--chunk-size", type=int, default=4, help="K of CALM")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 = torch default")
    p.add_argument("--out", type=Path, default=None, help=f"results file (default {RESULTS}; --quick: none)")
    p.add_argument("--note", default="", help="free text stored with the record")
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    repeats = 2 if args.quick else max(5, args.repeats)
    device = torch.device(args.device)
    K = args.chunk_size
    models = build_models(sizes, K, device)
    g = torch.Generator().manual_seed(1)
    cases = []
    for batch in sizes["batches"]:
        prompts = torch.randint(4, sizes["vocab"], (batch, sizes["prompt_tokens"]), generator=g).tolist()
        for temperature in (1.0, 0.5):
            for name, model in models.items():
                cfg = GenerationConfig(
                    max_new_tokens=sizes["new_tokens"],
                    temperature=temperature,
                    sampler="batch",
                    num_candidates=sizes["num_candidates"],
                )
                row = {
                    "model": name,
                    "batch": batch,
                    "temperature": temperature,
                    **(
                        {"sampler": "batch", "num_candidates": cfg.num_candidates}
                        if name == "calm" and temperature < 1
                        else {}
                    ),
                    **time_case(model, prompts, cfg, repeats, device),
                }
                cases.append(row)
                print(
                    f"{name:8s} B={batch:<3d} T={temperature:<4g} {row['tokens_per_s_max']:9.1f} tok/s (best) "
                    f"{row['tokens_per_s_median']:9.1f} tok/s (median) over {repeats} runs, "
                    f"{row['steps']} steps",
                    flush=True,
                )
    result = {
        **record_header("generate"),
        "device": str(device),
        "quick": args.quick,
        "chunk_size": K,
        "sizes": {k: list(v) if isinstance(v, tuple) else v for k, v in sizes.items()},
        "repeats": repeats,
        "note": args.note,
        "cases": cases,
    }
    append_record(args.out if args.out is not None else (None if args.quick else RESULTS), result)
    return result


if __name__ == "__main__":
    main()
