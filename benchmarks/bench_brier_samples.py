"""How many head samples S per position CALM's Brier-n estimator should draw: variance per second.

Run: ``.venv/bin/python benchmarks/bench_brier_samples.py`` (``--quick``: toy sizes, nothing written
unless ``--out``). A random-weight CALM with K = 4 (default experiment sizes: d=256, 4 layers,
vocabulary 2048, energy head with its output layer randomised so that samples differ, AE embedding
spread so that decodes differ) scores one evaluation batch of 16 x 256 tokens drawn from the model
itself (so n-gram hits occur) with ``calm_chunk_estimate(num_samples=S)`` for S in 2, 4, 8, 16, 32.

Per S it reports, for Brier-1 and Brier-2 (per position p, over ``--seeds`` sampling seeds):
- ``sampling_var``: mean over positions of the variance of the per-position U-statistic given the
  text (the part S reduces; theory: (4(S-2) zeta_1 + 2 zeta_2) / (S(S-1)));
- ``data_var``: variance over positions of the exact-ish per-position Brier (mean over seeds, less
  sampling_var / seeds): the part no S can reduce;
- ``s_per_position``: min and median wall time of the whole estimate (forward + S samples + decode
  + scoring) over ``--repeats`` runs, divided by the positions scored;
- ``var_per_second``: (sampling_var + data_var) * s_per_position (median), i.e. the variance of the
  mean after one second of evaluation if positions were independent (lower is better), and the same
  for the sampling part alone.
Appends a record to ``results/brier_samples.json``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from records import append_record, record_header
from shared import backbone_config

from calm_lightning.metrics.estimators import calm_chunk_estimate
from calm_lightning.metrics.functional import sample_accuracy, sample_collision
from calm_lightning.models.autoencoder import ChunkAutoencoder
from calm_lightning.models.calm import CALM
from calm_lightning.models.config import AutoencoderConfig, HeadConfig

RESULTS = Path(__file__).resolve().parent / "results" / "brier_samples.json"
FULL = dict(d_model=256, n_layers=4, n_heads=4, ffn_size=688, vocab=2048, batch=16, block=256, ae_d=256)
QUICK = dict(d_model=32, n_layers=1, n_heads=2, ffn_size=64, vocab=64, batch=2, block=32, ae_d=16)
K = 4
MAX_N = 2  # Brier-1 and Brier-2 are measured


def build(s: dict, head: str) -> CALM:
    torch.manual_seed(0)
    ae = ChunkAutoencoder(
        AutoencoderConfig(
            vocab_size=s["vocab"], chunk_size=K, latent_size=32 * K, d_model=s["ae_d"], ffn_size=2 * s["ae_d"]
        )
    )
    model = CALM(backbone_config(s, max_seq_len=s["block"] // K), HeadConfig(name=head), ae).eval()
    with torch.no_grad():
        ae.embedding.weight.normal_(0.0, 1.0)  # a random AE decodes everything to one id; spread it
        for p in model.head.parameters():  # zero-init output layers would make every sample identical
            if p.ndim == 2 and p.abs().sum() == 0:
                p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    return model


@torch.no_grad()
def model_text(model: CALM, s: dict) -> torch.Tensor:
    """True text drawn chunk by chunk from the model itself (hits and collisions both occur)."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(4, s["vocab"], (s["batch"], K), generator=g)
    while tokens.shape[1] < s["block"]:
        h = model.hidden_states(tokens)[:, -1]  # [B, D]
        tokens = torch.cat([tokens, model.sample_chunks(h, 1, generator=g)[:, 0].long()], 1)
    return tokens


@torch.no_grad()
def per_position_scores(model: CALM, tokens: torch.Tensor, S: int, seeds: int) -> torch.Tensor:
    """[seeds, P, MAX_N] per-position U-statistics (the estimator's maths, positions kept apart)."""
    B, T = tokens.shape
    L = T // K
    hidden = model.hidden_states(tokens)[:, : L - 1].reshape(B * (L - 1), -1)  # [P, D]
    targets = tokens[:, K:].reshape(B * (L - 1), K)  # [P, K]
    out = []
    for seed in range(seeds):
        samples = model.sample_chunks(hidden, S, generator=torch.Generator().manual_seed(100 + seed)).long()
        accuracy, collision = sample_accuracy(samples, targets, MAX_N), sample_collision(samples, MAX_N)
        out.append(accuracy - collision)
    return torch.stack(out)


def time_estimate(model: CALM, tokens: torch.Tensor, S: int, repeats: int) -> list[float]:
    times = []
    for rep in range(repeats + 1):  # rep 0 warms up
        t = time.perf_counter()
        calm_chunk_estimate(model, tokens, MAX_N, generator=torch.Generator().manual_seed(rep), num_samples=S)
        if rep:
            times.append(time.perf_counter() - t)
    return times


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--samples", default="2,4,8,16,32")
    p.add_argument("--head", default="energy")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    s = QUICK if args.quick else FULL
    model = build(s, args.head)
    tokens = model_text(model, s)
    positions = tokens.shape[0] * (tokens.shape[1] // K - 1)
    rows = []
    for S in [int(x) for x in args.samples.split(",")]:
        scores = per_position_scores(model, tokens, S, args.seeds)  # [R, P, n]
        sampling_var = scores.var(dim=0).mean(dim=0)  # [n]
        data_var = (scores.mean(dim=0).var(dim=0) - sampling_var / args.seeds).clamp_min(0.0)
        times = time_estimate(model, tokens, S, args.repeats)
        per_pos = statistics.median(times) / positions
        row = {
            "S": S,
            "brier": [round(float(b), 5) for b in scores.mean(dim=(0, 1))],
            "sampling_var": [float(v) for v in sampling_var],
            "data_var": [float(v) for v in data_var],
            "s_per_position_min": min(times) / positions,
            "s_per_position_median": per_pos,
            "var_per_second": [float(v) for v in (sampling_var + data_var) * per_pos],
            "sampling_var_per_second": [float(v) for v in sampling_var * per_pos],
        }
        rows.append(row)
        print(
            f"S={S:3d}  Brier-1,2 {row['brier']}  sampling var {[f'{v:.4g}' for v in row['sampling_var']]}"
            f"  data var {[f'{v:.4g}' for v in row['data_var']]}"
            f"  {row['s_per_position_min'] * 1e6:.0f}/{per_pos * 1e6:.0f} us/position (min/median)"
            f"  var*s {[f'{v:.3g}' for v in row['var_per_second']]}"
            f"  sampling var*s {[f'{v:.3g}' for v in row['sampling_var_per_second']]}",
            flush=True,
        )
    result = {
        **record_header("brier_samples"),
        "quick": args.quick,
        "sizes": s,
        "head": args.head,
        "chunk_size": K,
        "positions": positions,
        "seeds": args.seeds,
        "repeats": args.repeats,
        "cases": rows,
    }
    append_record(args.out if args.out is not None else (None if args.quick else RESULTS), result)
    return result


if __name__ == "__main__":
    main()
