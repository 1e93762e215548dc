"""Temperature sampling speed: vectorised batch sampler vs a per-context Counter loop, plus the exact sampler.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_temperature.py``. Prints a table and appends
one record to ``benchmarks/results/temperature.json``. Wall-clock figures depend on the machine and
on its load; the speed-up of one implementation over the other is the number to compare.

The naive reference below is the reference code's algorithm (a Python loop and a ``Counter`` per
context, T = 1/n only); it lives here, not in the package.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from collections import Counter
from pathlib import Path

import torch
from records import append_record, record_header

from calm_lightning.sampling.exact import exact_temperature_sample, expected_exact_draws
from calm_lightning.sampling.temperature import (
    batch_temperature_probs,
    batch_temperature_sample,
    inverse_temperature,
)

RESULTS = Path(__file__).resolve().parent / "results" / "temperature.json"


def naive_batch_sample(candidates: torch.Tensor, temperature: float, rng: random.Random) -> torch.Tensor:
    """Per-context Counter loop: weights binom(count, m), m = n, n-1, ... until some count >= m."""
    n = round(1.0 / temperature)
    chosen = []
    for row in candidates.tolist():  # one context at a time
        counts = Counter(map(tuple, row))
        for m in range(n, 0, -1):
            eligible = [(chunk, math.comb(c, m)) for chunk, c in counts.items() if c >= m]
            if eligible:
                break
        chunks, weights = zip(*eligible)
        chosen.append(rng.choices(chunks, weights=weights, k=1)[0])
    return torch.tensor(chosen, dtype=candidates.dtype)


def naive_batch_probs(candidates: torch.Tensor, temperature: float) -> list[dict[tuple, float]]:
    """The naive algorithm's output distribution per context (for the agreement check)."""
    n = round(1.0 / temperature)
    out = []
    for row in candidates.tolist():
        counts = Counter(map(tuple, row))
        m = min(n, max(counts.values()))
        weights = {chunk: math.comb(c, m) for chunk, c in counts.items() if c >= m}
        total = sum(weights.values())
        out.append({chunk: w / total for chunk, w in weights.items()})
    return out


class ZipfChunks:
    """Per context: a Zipf(1.1) distribution over `outcomes` random K-token chunks (a draw_fn)."""

    def __init__(self, contexts: int, outcomes: int, k: int, vocab: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        ranks = torch.arange(1, outcomes + 1, dtype=torch.float64)
        zipf = (1.0 / ranks**1.1).expand(contexts, -1)
        shuffle = torch.rand(contexts, outcomes, generator=gen).argsort(-1)  # a different order per context
        self.probs = (zipf / zipf.sum(-1, keepdim=True)).gather(-1, shuffle)  # [C, X]
        self.outcomes = torch.randint(0, vocab, (contexts, outcomes, k), generator=gen)  # [C, X, K]
        self.generator = torch.Generator().manual_seed(seed + 1)

    def __call__(self, context_index: torch.Tensor, num: int) -> torch.Tensor:
        which = torch.multinomial(self.probs[context_index], num, replacement=True, generator=self.generator)
        return self.outcomes[context_index.unsqueeze(-1).expand_as(which), which]  # [C', num, K]


def timed(fn, repeats: int) -> dict[str, float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"min_ms": 1e3 * min(times), "median_ms": 1e3 * statistics.median(times), "repeats": repeats}


def check_agreement(candidates: torch.Tensor, temperature: float) -> float:
    """Largest difference between the vectorised and naive output probabilities."""
    probs, _ = batch_temperature_probs(candidates, temperature)
    worst = 0.0
    for c, reference in enumerate(naive_batch_probs(candidates, temperature)):
        ours: dict[tuple, float] = {}
        for chunk, p in zip(map(tuple, candidates[c].tolist()), probs[c].tolist()):
            ours[chunk] = ours.get(chunk, 0.0) + p
        for chunk in set(ours) | set(reference):
            worst = max(worst, abs(ours.get(chunk, 0.0) - reference.get(chunk, 0.0)))
    return worst


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, default=16)
    parser.add_argument("--candidates", type=int, default=200)
    parser.add_argument("--chunk-size", type=int, default=4)
    parser.add_argument("--outcomes", type=int, default=50)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--temperature", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--exact-contexts", type=int, default=16)
    parser.add_argument("--scaling", type=int, nargs="*", default=[64, 256, 1024], help="more context counts")
    parser.add_argument("--note", default="", help="free text stored with the record (e.g. machine load)")
    args = parser.parse_args(argv)
    if inverse_temperature(args.temperature)[2] != 0:
        parser.error("the naive reference supports T = 1/n only")

    draw = ZipfChunks(args.contexts, args.outcomes, args.chunk_size, args.vocab, seed=0)
    candidates = draw(torch.arange(args.contexts), args.candidates)  # [C, N, K]
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    agreement = check_agreement(candidates, args.temperature)
    naive = timed(lambda: naive_batch_sample(candidates, args.temperature, rng), args.repeats)
    vectorised = timed(
        lambda: batch_temperature_sample(candidates, args.temperature, generator=gen), args.repeats
    )
    # The floor under any sort-based grouping here: one sort of the C x N packed chunk keys, and
    # the cost of one trivial op of that size (what every further tensor op adds at least).
    keys = candidates[..., 0].contiguous()  # [C, N] int64, the size of the packed keys
    floor = {
        "sort_keys": timed(lambda: keys.sort(-1), args.repeats),
        "one_elementwise_op": timed(lambda: keys + 1, args.repeats),
        "budget_for_20x_ms": naive["min_ms"] / 20,
    }
    batch = {
        "temperature": args.temperature,
        "contexts": args.contexts,
        "candidates": args.candidates,
        "chunk_size": args.chunk_size,
        "outcomes_per_context": args.outcomes,
        "naive_counter": naive,
        "vectorised": vectorised,
        "speedup_min": naive["min_ms"] / vectorised["min_ms"],
        "speedup_median": naive["median_ms"] / vectorised["median_ms"],
        "max_prob_difference": agreement,
        "floor": floor,
    }
    print(
        f"batch T={args.temperature} C={args.contexts} N={args.candidates} K={args.chunk_size}: "
        f"naive min {naive['min_ms']:.3f} ms / median {naive['median_ms']:.3f} ms, "
        f"vectorised min {vectorised['min_ms']:.3f} ms / median {vectorised['median_ms']:.3f} ms, "
        f"speed-up {batch['speedup_min']:.1f}x (min) {batch['speedup_median']:.1f}x (median); "
        f"max |p_vec - p_naive| = {agreement:.1e}; floor: one sort of the keys "
        f"{floor['sort_keys']['min_ms']:.3f} ms, one elementwise op {floor['one_elementwise_op']['min_ms']:.3f} ms, "
        f"20x budget {floor['budget_for_20x_ms']:.3f} ms"
    )

    scaling = []
    for contexts in args.scaling:  # the fixed per-op cost of the vectorised path amortises with C
        more = ZipfChunks(contexts, args.outcomes, args.chunk_size, args.vocab, seed=2)
        cands = more(torch.arange(contexts), args.candidates)
        reps = max(7, args.repeats // 2)
        row = {
            "contexts": contexts,
            "naive_counter": timed(lambda c=cands: naive_batch_sample(c, args.temperature, rng), reps),
            "vectorised": timed(
                lambda c=cands: batch_temperature_sample(c, args.temperature, generator=gen), reps
            ),
        }
        row["speedup_min"] = row["naive_counter"]["min_ms"] / row["vectorised"]["min_ms"]
        row["speedup_median"] = row["naive_counter"]["median_ms"] / row["vectorised"]["median_ms"]
        scaling.append(row)
        print(
            f"batch T={args.temperature} C={contexts} N={args.candidates}: naive min "
            f"{row['naive_counter']['min_ms']:.3f} ms, vectorised min {row['vectorised']['min_ms']:.3f} ms, "
            f"speed-up {row['speedup_min']:.1f}x (min) {row['speedup_median']:.1f}x (median)"
        )

    exact = []
    exact_draw = ZipfChunks(args.exact_contexts, args.outcomes, args.chunk_size, args.vocab, seed=1)
    for temperature in (0.5, 1 / 3):
        gen = torch.Generator().manual_seed(1)
        runs: list = []

        def run(temperature=temperature, gen=gen, runs=runs):
            runs.append(
                exact_temperature_sample(exact_draw, args.exact_contexts, temperature, generator=gen)[1]
            )

        timing = timed(run, args.repeats)  # stats below average over every run (warm-up included)
        record = {
            "temperature": temperature,
            "contexts": args.exact_contexts,
            **timing,
            "mean_draws": statistics.fmean(float(st.draws.double().mean()) for st in runs),
            "expected_draws": float(expected_exact_draws(exact_draw.probs, temperature).mean()),
            "mean_draws_made": statistics.fmean(st.draws_made for st in runs),
            "mean_rounds": statistics.fmean(st.rounds for st in runs),
            "fallbacks": sum(st.num_fallbacks for st in runs),
        }
        exact.append(record)
        print(
            f"exact T={temperature:.3f} C={args.exact_contexts}: min {timing['min_ms']:.3f} ms / median "
            f"{timing['median_ms']:.3f} ms, draws/context {record['mean_draws']:.1f} (expected "
            f"{record['expected_draws']:.1f}), draws made {record['mean_draws_made']:.0f}, "
            f"rounds {record['mean_rounds']:.1f}, fallbacks {record['fallbacks']}"
        )

    result = {
        **record_header("temperature"),
        "note": args.note,
        "batch": batch,
        "batch_scaling": scaling,
        "exact": exact,
    }
    append_record(RESULTS, result)
    return result


if __name__ == "__main__":
    main()
