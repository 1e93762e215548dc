"""BrierLM evaluation speed: the kit's batched branch rollouts vs a straightforward per-position loop.

Run: ``.venv/bin/python benchmarks/bench_brier.py`` (``--quick``: toy sizes, nothing written unless
``--out``). Models use the default experiment sizes (d=256, 4 layers, vocabulary 2048) with random
weights, on one evaluation batch of 16 x 256 tokens, Brier-1..4:

- CALM with K = 2 (two chunks per n-gram, so one rollout step per start). A fresh energy head's
  output layer is zero, so its two samples always agree and no branch can stop early;
- the token baseline (three rollout steps per start), its output layer scaled up so that its
  predictions are sharp and the two samples usually agree;
- CALM with K = 1 and S = 2 and 16 head samples (`make compare-k`'s K=1 validation: S branches per
  start, three rollout steps), batched only.

The reference loop is what one writes first: one teacher-forced forward with a KV cache, then for
every start position a copy of the cache cut at that position, and the branch rolled out one unit at
a time, batched over the 16 sequences, stopping as soon as every sequence's two samples disagreed.
The draws (head samples + AE decodes) are work that any scheme must do; the benchmark times them
inside the batched CALM estimate, and loop time / draw time bounds the reachable speed-up.
Both compute the same two-sample estimator; the benchmark prints their estimates side by side as a
sanity check (they differ by sampling noise only). Appends a record to ``results/brier.json``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch
from records import append_record, record_header
from shared import backbone_config

from calm_lightning.metrics.estimators import calm_rollout_estimate, token_two_sample_estimate
from calm_lightning.models.autoencoder import ChunkAutoencoder
from calm_lightning.models.calm import CALM
from calm_lightning.models.config import AutoencoderConfig, HeadConfig
from calm_lightning.models.token_lm import TokenLM

RESULTS = Path(__file__).resolve().parent / "results" / "brier.json"
FULL = dict(d_model=256, n_layers=4, n_heads=4, ffn_size=688, vocab=2048, batch=16, block=256, ae_d=256)
QUICK = dict(d_model=32, n_layers=1, n_heads=2, ffn_size=64, vocab=64, batch=2, block=16, ae_d=16)
MAX_N = 4


def build(kind: str, s: dict, chunk_size: int = 2):
    torch.manual_seed(0)
    backbone = backbone_config(s, max_seq_len=s["block"])
    if kind == "token":
        model = TokenLM(backbone, s["vocab"])
        with torch.no_grad():
            model.lm_head.weight.mul_(40.0)  # sharp predictions: the two samples usually agree
        return model.eval(), 1
    ae = ChunkAutoencoder(
        AutoencoderConfig(
            vocab_size=s["vocab"],
            chunk_size=chunk_size,
            latent_size=32 * chunk_size,
            d_model=s["ae_d"],
            ffn_size=2 * s["ae_d"],
            mask_token_id=3,
        )
    )
    return CALM(backbone, HeadConfig(name="energy"), ae).eval(), chunk_size


def loop_estimate(model, tokens: torch.Tensor, unit: int, generator: torch.Generator):
    """Two-sample Brier-1..MAX_N sums and counts, one start position at a time (the reference)."""
    B, T = tokens.shape
    L, steps = T // unit, math.ceil(MAX_N / unit)
    is_calm = unit > 1 or isinstance(model, CALM)

    def forward(x, positions, cache):  # -> states [B, t, ...]
        if is_calm:
            return model.hidden_states(x, positions=positions, kv_cache=cache)
        return model(x, positions=positions, kv_cache=cache)

    def draw(state):  # state [B, ...] -> [B, 2, unit]
        if is_calm:
            return model.sample_chunks(state, 2, generator=generator).long()
        probs = torch.softmax(state.float(), dim=-1)
        return torch.multinomial(probs, 2, replacement=True, generator=generator)[:, :, None]

    cache = model.backbone.new_cache()
    states = forward(tokens, torch.arange(L), cache)  # [B, L, ...]
    teacher = torch.zeros(B, L - 1, 2, unit, dtype=torch.long)
    agree = torch.zeros(B, L - 1, steps * unit, dtype=torch.bool)
    for j in range(L - 1):
        branch = cache.clone().crop(j + 1)
        state = states[:, j]
        for r in range(min(steps, L - 1 - j)):
            pair = draw(state)  # [B, 2, unit]
            if r == 0:
                teacher[:, j] = pair
            same = pair[:, 0] == pair[:, 1]  # [B, unit]
            agree[:, j, r * unit : (r + 1) * unit] = same
            if not same.all(-1).any() or r + 1 == min(steps, L - 1 - j):
                break  # every branch has disagreed (collisions are 0 from here), or no step is left
            state = forward(pair[:, 0], torch.tensor([j + 1 + r]), branch)[:, -1]
    # n-gram terms: accuracy from the teacher-forced samples, collision from the agreement run
    targets = tokens[:, unit:].reshape(B, L - 1, unit)
    sums, counts = torch.zeros(MAX_N, dtype=torch.float64), torch.zeros(MAX_N, dtype=torch.long)
    collision_run = agree.long().cumprod(-1)  # [B, L-1, steps*unit]
    for s in range(2):
        hit = (teacher[:, :, s] == targets).reshape(B, -1)  # per target token
        for n in range(1, MAX_N + 1):
            for j in range(L - 1):
                if (j + 1) * unit + n > T:
                    continue
                sums[n - 1] += hit[:, j * unit : j * unit + n].all(-1).sum().item()
    for n in range(1, MAX_N + 1):
        for j in range(L - 1):
            if (j + 1) * unit + n > T:
                continue
            sums[n - 1] -= collision_run[:, j, n - 1].sum().item()
            counts[n - 1] += B
    return sums, counts


def batched_estimate(model, tokens, unit, generator):
    """Batch totals [MAX_N] of the batched estimators (which return one row per block)."""
    if isinstance(model, CALM):
        sums, counts = calm_rollout_estimate(model, tokens, MAX_N, generator=generator)
    else:
        sums, counts = token_two_sample_estimate(model, tokens, MAX_N, generator=generator)
    return sums.sum(0), counts.sum(0)


def calm_draw_seconds(model: CALM, tokens: torch.Tensor, generator: torch.Generator) -> float:
    """Seconds the batched CALM estimate spends drawing (head samples + AE decodes, two per start and
    step). Every implementation does this work, so loop time / draw time bounds the speed-up that
    any rollout scheme can reach over the loop."""
    spent = 0.0

    def draw(hidden, r):
        nonlocal spent
        t = time.perf_counter()
        B, N, D = hidden.shape
        chunks = model.sample_chunks(hidden.reshape(B * N, D), 2, generator=generator).view(B, N, 2, -1)
        spent += time.perf_counter() - t
        return chunks.long()

    with torch.no_grad():
        calm_rollout_estimate(model, tokens, MAX_N, draw=draw)
    return spent


def time_it(fn, repeats: int) -> tuple[list[float], tuple]:
    times, out = [], None
    for rep in range(repeats + 1):  # rep 0 warms up
        t = time.perf_counter()
        with torch.no_grad():
            out = fn(torch.Generator().manual_seed(rep))
        if rep:
            times.append(time.perf_counter() - t)
    return times, out


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    s = QUICK if args.quick else FULL
    repeats = 2 if args.quick else args.repeats
    tokens = torch.randint(
        4, s["vocab"], (s["batch"], s["block"]), generator=torch.Generator().manual_seed(1)
    )
    cases = []
    for kind in ("calm", "token"):
        model, unit = build(kind, s)
        batched_t, batched = time_it(lambda g, m=model, u=unit: batched_estimate(m, tokens, u, g), repeats)
        loop_t, loop = time_it(lambda g, m=model, u=unit: loop_estimate(m, tokens, u, g), repeats)
        brier = lambda sc: [round(float(a / b), 4) for a, b in zip(*sc)]  # noqa: E731
        row = {
            "model": "calm_k2" if kind == "calm" else "token_baseline",
            "tokens": tokens.numel(),
            "batched_s_min": min(batched_t),
            "batched_s_median": statistics.median(batched_t),
            "loop_s_min": min(loop_t),
            "loop_s_median": statistics.median(loop_t),
            "batched_tokens_per_s": tokens.numel() / statistics.median(batched_t),
            "loop_tokens_per_s": tokens.numel() / statistics.median(loop_t),
            "speedup_median": statistics.median(loop_t) / statistics.median(batched_t),
            "brier_batched": brier(batched),
            "brier_loop": brier(loop),
        }
        if kind == "calm":
            draw_t = [
                calm_draw_seconds(model, tokens, torch.Generator().manual_seed(r)) for r in range(repeats)
            ]
            row["draw_s_median"] = statistics.median(draw_t)
            row["draw_share_of_batched"] = row["draw_s_median"] / row["batched_s_median"]
            row["speedup_bound_from_draws"] = row["loop_s_median"] / row["draw_s_median"]
        cases.append(row)
        print(
            f"{row['model']:15s} batched {row['batched_s_median'] * 1e3:8.1f} ms  loop {row['loop_s_median'] * 1e3:8.1f} ms"
            f"  speed-up {row['speedup_median']:5.1f}x  Brier-1..4 {row['brier_batched']} vs {row['brier_loop']}"
            + (
                f"  draws {row['draw_s_median'] * 1e3:.1f} ms: speed-up <= {row['speedup_bound_from_draws']:.1f}x"
                if "draw_s_median" in row
                else ""
            ),
            flush=True,
        )
    # compare-k's K=1 validation: S = 16 branches per start rolled out 3 chunks (no loop reference:
    # the loop above is the two-sample form); `BranchKVCache` is what keeps its attention per branch
    model, _ = build("calm", s, chunk_size=1)
    for S in (2, 16):
        times, _ = time_it(
            lambda g, m=model, n=S: calm_rollout_estimate(m, tokens, MAX_N, generator=g, num_samples=n),
            repeats,
        )
        cases.append(
            {
                "model": f"calm_k1_s{S}",
                "tokens": tokens.numel(),
                "batched_s_min": min(times),
                "batched_s_median": statistics.median(times),
            }
        )
        print(
            f"calm_k1_s{S:<6d} batched {min(times) * 1e3:8.1f} / {statistics.median(times) * 1e3:.1f} ms (min/median)",
            flush=True,
        )
    result = {
        **record_header("brier"),
        "quick": args.quick,
        "sizes": s,
        "repeats": repeats,
        "cases": cases,
    }
    append_record(args.out if args.out is not None else (None if args.quick else RESULTS), result)
    return result


if __name__ == "__main__":
    main()
