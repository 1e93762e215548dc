"""`calm compare`: trained CALM and token-baseline runs side by side (CALM.md sections 3 and 4).

Split by job: `runs` finds the runs and reads what they logged, `scoring` evaluates every run on the
same blocks (intervals, paired significance, unigram/bigram floors, the sampling-steps sweep, BrierLM
against cross-entropy), `report` writes the tables, figures and JSON. `compare` does all three and
writes to ``out``:

* ``comparison.md``: one row per run: BrierLM and Brier-1..4 scored on the shared evaluation blocks
  (the whole validation split unless ``limit_batches``) with standard errors, head parameters,
  sampling network evaluations per vector, training wall time and tokens/s, training FLOPs and
  generation tokens/s at T = 1; the unigram/bigram floors on the same positions; paired
  differences between runs (and against the bigram floor) with their significance; the
  sampling-steps sweep; the token baseline's BrierLM / cross-entropy correlation.
* ``comparison.json``: the same numbers.
* ``brierlm_vs_step.png`` (paper Fig. 8), ``brierlm_vs_sampling_steps.png`` (Fig. 9, when a run's
  head sweeps its sampling steps: flow, diffusion), ``brierlm_vs_flops.png`` (Fig. 4, when K differs
  or a baseline is included), ``brier_vs_ce.png`` (Fig. 3, baseline runs with cross-entropy curves); curves carry 95% bands.

At CPU scale BrierLM is often 0 (the geometric mean is 0 as soon as one Brier-n is <= 0), so every
figure has a second panel with Brier-1.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from calm_lightning.comparison.report import (
    floors_table,
    paired_table,
    plot_brier_vs_ce,
    plot_brierlm_vs_flops,
    plot_brierlm_vs_sampling_steps,
    plot_brierlm_vs_step,
    runs_table,
    sweep_table,
    to_json,
)
from calm_lightning.comparison.runs import RunRecord, comparable_config, load_run, resolve_run_dir
from calm_lightning.comparison.scoring import (
    SweepPoint,
    brier_ce_correlation,
    paired_rows,
    sampling_sweep,
    score_runs,
)
from calm_lightning.errors import CalmError
from calm_lightning.models.heads import HEADS
from calm_lightning.utils.io import atomic_write_json, atomic_write_text

__all__ = ["ComparisonResult", "RunRecord", "compare"]


@dataclass
class ComparisonResult:
    out: Path
    markdown: str
    files: list[Path]
    runs: list[RunRecord]
    sweep: list[SweepPoint]


def compare(
    run_dirs: Sequence[str | Path],
    out: str | Path = "runs/compare",
    *,
    sweep_steps: Mapping[str, Sequence[int]] | None = None,
    limit_batches: int = 0,
    gen_tokens: int = 32,
    device: str = "auto",
    progress: Callable[[str], None] | None = None,
) -> ComparisonResult:
    """Read the runs, score them on shared blocks, run the sampling sweep if needed, write the report.

    ``sweep_steps``: head name -> the sampling steps to sweep (each head's ``default_sweep_steps``
    otherwise).
    """
    if not run_dirs:
        raise CalmError("no run directories given")
    sweep_steps = dict(sweep_steps or {})
    unknown = sorted(set(sweep_steps) - set(HEADS))
    if unknown:
        raise CalmError(f"no head named {unknown[0]!r} to sweep; registered heads: {', '.join(sorted(HEADS))}")
    resolved = [resolve_run_dir(p) for p in run_dirs]
    for p in resolved:  # every run checked before any slow work
        comparable_config(p)
    runs = []
    for p in resolved:
        if progress is not None:
            progress(f"reading {p}")
        runs.append(load_run(p, gen_tokens=gen_tokens, device=device))
    names = [r.label for r in runs]
    for r in runs:
        if names.count(r.label) > 1:
            r.label = f"{r.label}/{r.run_dir.name}"
    floors = score_runs(runs, limit_batches, progress)
    pairs = paired_rows(runs, floors)
    corr = brier_ce_correlation(runs)
    sweep = sampling_sweep(runs, sweep_steps, limit_batches, progress)

    out = Path(out)
    files = [out / "brierlm_vs_step.png"]
    plot_brierlm_vs_step(runs, files[-1])
    if sweep:
        files.append(out / "brierlm_vs_sampling_steps.png")
        plot_brierlm_vs_sampling_steps(sweep, files[-1])
    if len({r.chunk_size for r in runs}) > 1 or any(r.kind == "ar" for r in runs):
        files.append(out / "brierlm_vs_flops.png")
        plot_brierlm_vs_flops(runs, files[-1])
    if corr is not None and corr.points >= 3:
        files.append(out / "brier_vs_ce.png")
        plot_brier_vs_ce(corr, files[-1])

    scope = f"the first {limit_batches} validation batches" if limit_batches else "the whole validation split"
    cut = [r for r in runs if r.budget_note]
    parts = [
        "# Run comparison",
        "",
        f"BrierLM and Brier-n: every run scored again on the same evaluation blocks ({scope}), "
        "± one cluster-robust standard error (each validation sequence a cluster; BrierLM with its 95% "
        "interval; higher is better; BrierLM is 0 when any Brier-n <= 0). evals/vector: head network "
        "evaluations per generated vector. train time: wall clock of the logged sessions (validation "
        "included); train tokens/s: training steps only. train FLOPs: training FLOPs/token "
        "(calm_lightning.flops) x tokens seen. gen tokens/s: generation at T = 1 from an empty prompt, "
        f"{gen_tokens} tokens x 4 documents.",
        "",
        runs_table(runs),
    ]
    if cut:
        parts += ["", "**Not comparable**: " + "; ".join(f"{r.label} {r.budget_note}" for r in cut) + "."]
    if floors:
        parts += [
            "",
            "## Floors",
            "",
            "Exact Brier-n of unigram and bigram models counted on the training split, on the same "
            "blocks and positions as the runs (CALM: chunk-aligned starts; the baseline: every token).",
            "",
            floors_table(floors),
        ]
    if pairs:
        parts += [
            "",
            "## Paired differences",
            "",
            "Run A minus run B on the same blocks, ± the standard error of the paired difference (per-block "
            "influences, cluster-robust); `*`: significant at 95% (two-sided, no multiple-comparison "
            f"correction over the {len(pairs)} rows). Runs against the bigram floor of their own positions.",
            "",
            paired_table(pairs),
        ]
    if corr is not None:
        parts += [
            "",
            "## BrierLM against cross-entropy (token baseline)",
            "",
            f"Over {corr.points} validations of {corr.runs} run(s): Pearson r(CE, BrierLM) = "
            f"{corr.r_brierlm:.3f}, r(CE, Brier-1) = {corr.r_brier1:.3f} (the paper, Fig. 3: -0.966 "
            "across models). Validation in training uses the runs' trainer.limit_val_batches.",
        ]
    if sweep:
        batches = f"{limit_batches} validation batches" if limit_batches else "the whole validation split"
        parts += [
            "",
            "## Sampling steps",
            "",
            f"Each checkpoint re-evaluated (`calm eval`, {batches}) with the head's sampling settings.",
            "",
            sweep_table(sweep),
        ]
    parts += ["", "## Figures", ""] + [f"![{f.stem}]({f.name})" for f in files]
    markdown = "\n".join(parts) + "\n"
    atomic_write_text(out / "comparison.md", markdown)
    atomic_write_json(
        out / "comparison.json",
        {
            "runs": [{**to_json(r), "train_flops": r.train_flops} for r in runs],
            "floors": to_json(floors),
            "paired": to_json(pairs),
            "brier_ce_correlation": to_json(corr),
            "sweep": to_json(sweep),
        },
    )
    files = [out / "comparison.md", out / "comparison.json", *files]
    return ComparisonResult(out, markdown, files, runs, sweep)
