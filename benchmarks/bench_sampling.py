"""Temperature sampling on a *trained* CALM: where the decode time goes and what each exact shortcut buys.

Run (after `make train-ae train-lm`, on a quiet machine):
``OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_sampling.py [--checkpoint runs/calm_energy]``.
Skips (exit 0) without a trained checkpoint. Appends one record to ``benchmarks/results/sampling.json``.

Contexts: the last chunk position of ``--contexts`` windows of the validation shard (real text), so
the next-chunk distributions are the model's own. For T = 1/2 and 1/3, ``--candidates`` N, min and
median over ``--repeats``:

- ``full_fp32``: every candidate fully decoded with the fp32 argmax (the reference code's work);
- ``full_screen``: full decode with the bf16-screened argmax (`models/argmax.py`; same tokens);
- ``lazy_screen``: the batch sampler decoding only the positions that tell candidates apart
  (`sampling/lazy.py`; same chunks for the same seed), with the screen;
- ``auto``: exact or batch per context by a pilot (`sampling/auto.py`), the batch side lazy;
- ``exact``: the exact sampler alone.

Also: the share of argmax rows the screen re-checks in fp32, the share of positions the lazy sampler
decodes, how many contexts ``auto`` sends to the exact sampler, and the exact sampler's draws made
per pilot-estimated expected draw (what ``auto.EXACT_OVERHEAD`` stands for).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from records import append_record, record_header
from shared import timed

RESULTS = Path(__file__).resolve().parent / "results" / "sampling.json"


def exact_overhead() -> list[dict]:
    """Draws the exact sampler makes per expected draw, on categorical toys (no model): 64 contexts,
    200 outcomes, the top one with probability ``top``, the rest uniform."""
    from calm_lightning.sampling.exact import exact_temperature_sample, expected_exact_draws

    rows = []
    for temperature in (0.5, 1 / 3, 0.4):
        for top in (0.9, 0.6, 0.4, 0.25, 0.15):
            probs = torch.full((200,), (1 - top) / 199, dtype=torch.float64)
            probs[0] = top
            g = torch.Generator().manual_seed(1)

            def draw(idx, num, probs=probs, g=g):
                return torch.multinomial(probs.expand(idx.numel(), -1), num, replacement=True, generator=g).unsqueeze(-1)

            _, stats = exact_temperature_sample(draw, 64, temperature, generator=torch.Generator().manual_seed(0))
            expected = float(expected_exact_draws(probs, temperature))
            rows.append({"T": round(temperature, 3), "top": top, "expected": round(expected, 1),
                         "made_per_context": round(stats.draws_made / 64, 1),
                         "made_per_expected": round(stats.draws_made / 64 / expected, 2)})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="runs/calm_energy")
    p.add_argument("--shard", default=None, help="validation token shard (default: the newest under .cache/calm)")
    p.add_argument("--contexts", type=int, default=16)
    p.add_argument("--candidates", type=int, default=200)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    from calm_lightning.checkpoints import load_language_model
    from calm_lightning.errors import CalmError
    from calm_lightning.sampling.auto import estimate_exact_draws
    from calm_lightning.sampling.lazy import lazy_candidates
    from calm_lightning.sampling.temperature import temperature_sample
    from calm_lightning.utils.hardware import cpu_has_fast_bf16

    overhead = exact_overhead()
    for row in overhead:
        print("exact overhead", row)
    try:
        loaded = load_language_model(args.checkpoint, device="cpu")
    except CalmError as e:
        print(f"bench_sampling: skipped ({e})")
        return 0
    model = loaded.model
    if loaded.kind != "calm":
        print("bench_sampling: skipped (not a CALM checkpoint)")
        return 0
    shards = sorted(Path(".cache/calm").glob("*/shards-*/val.bin"), key=lambda q: q.stat().st_mtime)
    shard = Path(args.shard) if args.shard else (shards[-1] if shards else None)
    if shard is None or not shard.exists():
        print("bench_sampling: skipped (no validation shard; run `make prepare`)")
        return 0
    K, C, N = model.chunk_size, args.contexts, args.candidates
    ids = torch.from_numpy(np.fromfile(shard, dtype=np.uint16).astype(np.int64))
    window = 32 * K
    starts = torch.linspace(0, ids.numel() - window - 1, C).long()
    windows = torch.stack([ids[s : s + window] for s in starts.tolist()])  # [C, 32 K]
    with torch.no_grad():
        hidden = model.hidden_states(windows)[:, -1]  # [C, D]
    ae = model.autoencoder

    def draw(idx, num):
        return model.sample_chunks(hidden.index_select(0, idx), num_samples=num)

    def lazy_draw(idx, num):
        return lazy_candidates(model, hidden.index_select(0, idx), num)

    record = record_header("sampling")
    record["exact_overhead"] = overhead
    record.update(checkpoint=str(loaded.checkpoint), step=loaded.step, contexts=C, candidates=N, K=K,
                  vocab=ae.cfg.vocab_size, cpu_native_bf16=cpu_has_fast_bf16())
    for temperature, label in ((0.5, "T=1/2"), (1 / 3, "T=1/3")):
        row = {}
        ae.cfg.argmax_screen = "fp32"
        row["full_fp32_ms"] = timed(lambda t=temperature: temperature_sample(draw, C, t, "batch", num_candidates=N), args.repeats)
        ae.cfg.argmax_screen = "auto"
        row["full_screen_ms"] = timed(lambda t=temperature: temperature_sample(draw, C, t, "batch", num_candidates=N), args.repeats)
        row["lazy_screen_ms"] = timed(lambda t=temperature: temperature_sample(
            draw, C, t, "batch", num_candidates=N, lazy_draw_fn=lazy_draw), args.repeats)
        row["auto_ms"] = timed(lambda t=temperature: temperature_sample(
            draw, C, t, "auto", num_candidates=N, lazy_draw_fn=lazy_draw), args.repeats)
        row["exact_ms"] = timed(lambda t=temperature: temperature_sample(draw, C, t, "exact", max_draws=4096), args.repeats)
        row = {k: [round(v * 1e3, 1) for v in val] for k, val in row.items()}
        # what the shortcuts did (one more call each)
        stats = {}
        with torch.no_grad():
            z = model.head.sample(hidden, num_samples=N)
            ae.decode(z, stats)
        row["screen_rechecked_share"] = round(stats["rechecked"] / max(1, stats["rows"]), 4)
        _, info = temperature_sample(draw, C, temperature, "batch", num_candidates=N, lazy_draw_fn=lazy_draw)
        row["lazy_positions_share"] = round(info.positions_decoded / (C * N * K), 4)
        row["mean_distinct_of_N"] = round(float(info.num_distinct.double().mean()), 1)
        _, info = temperature_sample(draw, C, temperature, "auto", num_candidates=N, lazy_draw_fn=lazy_draw)
        row["auto_exact_contexts"] = int(info.exact.sum())
        if info.exact_stats is not None:
            est = info.estimated_draws[info.exact]
            row["exact_draws_made_per_estimated_draw"] = round(info.exact_stats.draws_made / float(est.sum()), 2)
        big = draw(torch.arange(C), 400)  # a second, independent pool for the estimate's spread
        row["estimated_exact_draws_median"] = round(float(estimate_exact_draws(big, temperature).median()), 1)
        record[label] = row
        print(label, row, flush=True)
    append_record(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
