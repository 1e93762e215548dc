"""Training-step throughput of the autoencoder, CALM-energy (K=4) and the token baseline.

Models are built at the default experiment sizes (experiments/ae.yaml, calm_energy.yaml,
ar_baseline.yaml) with random weights and timed for forward + backward + AdamW step on random
tokens, in fp32 and, where asked, under bf16 autocast. Reports tokens/s, model FLOP/s (flops.py) and
the share of a CALM step spent in the head (network + loss) and in the energy loss alone.

MFU is the model's FLOP/s (flops.py) over the matmul peak measured here for the same precision (a CPU
has no datasheet peak). ``calm_vs_ar`` splits the CALM / baseline tokens/s ratio into its two factors:
the FLOPs-per-token ratio (fixed by the model sizes) times the ratio of their MFUs (the
implementation), and states the MFU CALM would need for a 3x ratio at the baseline's measured MFU.
Appends one record to ``benchmarks/results/train.json``. Never run it beside other CPU work:
figures are wall-clock.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from records import append_record, cpu_model
from shared import matmul_flops

from calm_lightning.config.loader import load_config
from calm_lightning.flops import training_flops_per_token
from calm_lightning.models.autoencoder import ChunkAutoencoder
from calm_lightning.models.calm import CALM
from calm_lightning.models.heads.energy_loss import energy_score_loss
from calm_lightning.models.token_lm import TokenLM

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results" / "train.json"


def build(kind: str, vocab: int):
    exp = load_config(ROOT / "experiments" / {"autoencoder": "ae.yaml", "calm": "calm_energy.yaml",
                                              "ar": "ar_baseline.yaml"}[kind]).model
    from omegaconf import OmegaConf

    exp = OmegaConf.to_object(exp)
    ae_cfg = exp.autoencoder
    ae_cfg.vocab_size, ae_cfg.mask_token_id = vocab, 3
    if kind == "autoencoder":
        return ChunkAutoencoder(ae_cfg)
    if kind == "ar":
        return TokenLM(exp.backbone, vocab)
    return CALM(exp.backbone, exp.head, ChunkAutoencoder(ae_cfg))


def step_fn(kind: str, model, tokens: torch.Tensor):
    if kind == "autoencoder":
        return lambda: model(tokens.reshape(-1, model.chunk_size)).loss
    if kind == "ar":
        return lambda: model.loss(tokens)
    return lambda: model.loss(tokens).loss


def time_steps(kind, model, tokens, bf16: bool, repeats: int, compiled: bool = False) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss_fn = step_fn(kind, model, tokens)
    if compiled:
        loss_fn = torch.compile(loss_fn)
    times = []
    for i in range(repeats + 2 if compiled else repeats + 1):
        t = time.perf_counter()
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= (2 if compiled else 1):  # warm-up: allocators, oneDNN kernels, compilation
            times.append(time.perf_counter() - t)
    return times


def energy_loss_share(model: CALM, tokens: torch.Tensor, repeats: int) -> dict:
    """Time of the head loss (forward+backward) alone vs the whole step, same inputs."""
    B = tokens.shape[0]
    with torch.no_grad():
        h = model.hidden_states(tokens)[:, :-1].reshape(-1, model.backbone.cfg.d_model)
        mu, log_sigma = model.autoencoder.encode(tokens[:, model.chunk_size:].reshape(B, -1, model.chunk_size))
    mu, log_sigma = mu.reshape(h.shape[0], -1), log_sigma.reshape(h.shape[0], -1)
    times, energy = [], []
    for _ in range(repeats):
        hh = h.clone().requires_grad_(True)
        t = time.perf_counter()
        model.head.loss(hh, mu, log_sigma).mean().backward()
        times.append(time.perf_counter() - t)
        # the energy score alone (posterior sampling + distances), on head samples of the same shape
        x = torch.randn(h.shape[0], model.head_cfg.num_samples, mu.shape[-1], requires_grad=True)
        t = time.perf_counter()
        energy_score_loss(x, mu, log_sigma.exp(), model.head_cfg.energy.num_target_samples,
                          model.head_cfg.energy.alpha).mean().backward()
        energy.append(time.perf_counter() - t)
    x = torch.randn(h.shape[0], model.head_cfg.num_samples, mu.shape[-1], requires_grad=True)
    energy_saved = saved_bytes(lambda: energy_score_loss(
        x, mu, log_sigma.exp(), model.head_cfg.energy.num_target_samples, model.head_cfg.energy.alpha).mean())
    P, N, M, lat = h.shape[0], model.head_cfg.num_samples, model.head_cfg.energy.num_target_samples, mu.shape[-1]
    return {"head_loss_s_min": min(times), "head_loss_s_median": statistics.median(times),
            "energy_loss_s_min": min(energy), "energy_loss_s_median": statistics.median(energy),
            "energy_loss_saved_mib": energy_saved / 2**20,
            "step_saved_mib": saved_bytes(lambda: model.loss(tokens).loss) / 2**20,
            # what a naive [P, N, M, l] difference tensor would take, for comparison
            "naive_pairwise_intermediate_mib": P * N * M * lat * 4 / 2**20}


def matmul_peak(dtype: torch.dtype, n: int, repeats: int) -> dict:
    """Square n x n matmul GFLOP/s in ``dtype`` on the CPU (best and median of ``repeats``)."""
    best, median = matmul_flops(n, repeats, dtype, torch.device("cpu"))
    return {"n": n, "gflops_best": best / 1e9, "gflops_median": median / 1e9}


def calm_vs_ar(cases: list[dict], target: float = 3.0) -> dict:
    """The fp32 eager CALM / baseline tokens/s ratio = FLOPs-per-token ratio x MFU ratio."""
    calm, ar = ({c["model"]: c for c in cases if c["precision"] == "32-true" and not c["compiled"]}[k]
                for k in ("calm", "ar"))
    flops_ratio = ar["model_flops_per_token"] / calm["model_flops_per_token"]
    return {
        "tokens_per_s_ratio": calm["tokens_per_s"] / ar["tokens_per_s"],
        "flops_per_token_ratio": flops_ratio,
        "mfu_ratio": calm["mfu"] / ar["mfu"],
        "mfu_calm": calm["mfu"],
        "mfu_ar": ar["mfu"],
        f"mfu_calm_needed_for_{target:g}x": target / flops_ratio * ar["mfu"],
    }


def saved_bytes(forward) -> int:
    """Bytes of the tensors autograd keeps for the backward of ``forward()`` (the activation memory a
    training step holds at its peak; CPU torch has no allocator statistics). Views of one storage count once."""
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(storages.values())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--bf16", action="store_true", help="also time bf16 autocast")
    p.add_argument("--compile", action="store_true", help="also time torch.compile-d steps (fp32, and bf16 with --bf16)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    record = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
              "cpu": cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads(), "cases": []}
    peaks = {"32-true": matmul_peak(torch.float32, 2048, args.repeats + 2)}
    if args.bf16:
        peaks["bf16-mixed"] = matmul_peak(torch.bfloat16, 1024, args.repeats + 2)
    record["matmul_peak"] = peaks
    print(json.dumps({"matmul_peak": peaks}), flush=True)
    for kind in ("autoencoder", "calm", "ar"):
        model = build(kind, args.vocab)
        exp = load_config(ROOT / "experiments" / {"autoencoder": "ae.yaml", "calm": "calm_energy.yaml",
                                                  "ar": "ar_baseline.yaml"}[kind])
        tokens = torch.randint(4, args.vocab, (exp.data.batch_size, exp.data.block_size))
        flops = training_flops_per_token(model, seq_len=exp.data.block_size)
        variants = ([(False, False)] + [(True, False)] * args.bf16 + [(False, True)] * args.compile
                    + [(True, True)] * (args.bf16 and args.compile))
        for bf16, compiled in variants:
            times = time_steps(kind, model, tokens, bf16, args.repeats, compiled)
            med = statistics.median(times)
            case = {"model": kind, "precision": "bf16-mixed" if bf16 else "32-true", "compiled": compiled,
                    "tokens_per_step": tokens.numel(),
                    "step_s_min": min(times), "step_s_median": med, "tokens_per_s": tokens.numel() / med,
                    "model_flops_per_token": flops,
                    "model_gflops_per_s": flops * tokens.numel() / med / 1e9}
            case["mfu"] = case["model_gflops_per_s"] / peaks[case["precision"]]["gflops_best"]
            if kind == "calm" and not bf16 and not compiled:
                case.update(energy_loss_share(model, tokens, args.repeats))
                case["head_loss_share"] = case["head_loss_s_median"] / med
                case["energy_loss_share"] = case["energy_loss_s_median"] / med
            record["cases"].append(case)
            print(json.dumps(case), flush=True)
    record["calm_vs_ar"] = calm_vs_ar(record["cases"])
    print(json.dumps({"calm_vs_ar": record["calm_vs_ar"]}), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    append_record(args.out, record)
    return record


if __name__ == "__main__":
    main()
