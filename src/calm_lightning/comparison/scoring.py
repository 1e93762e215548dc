"""`calm compare`, part 2: scoring every run on the same evaluation blocks.

Each checkpoint is evaluated again (``evaluate.evaluate``, the whole validation split unless
limited), keeping its per-block Brier sums, so that differences between runs are tested by paired
differences per block (`metrics.paired`), and so are the unigram/bigram floors on the same positions.
Also: the sampling-steps sweep each head offers (flow, diffusion), and BrierLM against cross-entropy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from calm_lightning.comparison.runs import RunRecord, _read_config


@dataclass
class SweepPoint:
    """BrierLM of one checkpoint evaluated with one sampler setting (``GenerativeHead.sampling_sweep``)."""

    label: str
    head: str
    solver: str  # the setting's label: euler | midpoint (flow), ancestral | ddim (diffusion), one-step (energy)
    steps: int  # sampling steps (1 for a one-step head)
    evals_per_sample: int  # network evaluations per vector
    metrics: dict[str, float]

    @property
    def brierlm(self) -> float:
        return self.metrics.get("val/brierlm", float("nan"))


def sampling_sweep(
    runs: Sequence[RunRecord],
    steps: Mapping[str, Sequence[int]] | None = None,
    limit_batches: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[SweepPoint]:
    """BrierLM of every CALM checkpoint at each sampler setting its head offers (``sampling_sweep``:
    flow and diffusion sweep their steps, a one-step head such as energy runs once).

    ``steps``: head name -> the steps to sweep (a head's ``default_sweep_steps`` otherwise). Nothing to
    do (empty list) unless some run's head offers more than one setting.
    """
    from calm_lightning.evaluation import evaluate
    from calm_lightning.models.heads import HEADS

    steps = steps or {}
    plans = [
        (run, HEADS[run.head].sampling_sweep(_read_config(run.run_dir).model.head, steps.get(run.head)))
        for run in runs
        if run.head is not None
    ]
    if not any(len(settings) > 1 for _, settings in plans):
        return []
    points: list[SweepPoint] = []
    for run, settings in plans:
        for s in settings:
            if progress is not None:
                progress(f"evaluating {run.label}: {run.head} {s.solver}, {s.steps} step(s)")
            result = evaluate(run.checkpoint, list(s.overrides), limit_batches=limit_batches)
            points.append(SweepPoint(run.label, run.head, s.solver, s.steps, s.evals_per_sample, result["metrics"]))
    return points


@dataclass
class FloorRecord:
    """A unigram or bigram floor scored on one set of blocks and positions."""

    name: str  # unigram | bigram
    unit: int  # 1 = every token, K = chunk-aligned starts
    eval_key: tuple
    scores: dict[str, float]
    blocks: object  # (sums [G, n], counts [G, n])

    @property
    def label(self) -> str:
        where = "every token" if self.unit == 1 else f"chunk starts, K={self.unit}"
        return f"{self.name} floor ({where})"


def score_runs(
    runs: Sequence[RunRecord], limit_batches: int = 0, progress: Callable[[str], None] | None = None
) -> list[FloorRecord]:
    """Evaluate every run on its evaluation blocks (whole validation split unless ``limit_batches``),
    keeping per-block sums (``run.scores``, ``run.blocks``, ``run.eval_key``); returns the floors,
    one per distinct (blocks, positions)."""
    from calm_lightning.evaluation import evaluate

    floors: dict[tuple, list[FloorRecord]] = {}
    for run in runs:
        if progress is not None:
            progress(f"scoring {run.label} on the shared evaluation blocks")
        result = evaluate(run.checkpoint, [], limit_batches=limit_batches, floors=True, keep_blocks=True)
        run.scores = {k: v for k, v in result["metrics"].items() if k.startswith("val/brier")}
        run.blocks = result["blocks"]
        run.eval_key = (result["block_digest"],)
        run.unit = run.chunk_size if run.kind == "calm" else 1
        key = (run.eval_key, run.unit)
        if key not in floors:
            floors[key] = [
                FloorRecord(name, run.unit, run.eval_key, metrics, result["floor_blocks"][name])
                for name, metrics in result["floors"].items()
            ]
    return [f for group in floors.values() for f in group]


@dataclass
class PairedRow:
    """Run A minus run (or floor) B on the same blocks: per n, (diff, se, significant)."""

    a: str
    b: str
    diffs: list[tuple[float, float, bool]]


def paired_rows(runs: Sequence[RunRecord], floors: Sequence[FloorRecord], max_n: int = 2) -> list[PairedRow]:
    """Every pair of runs scored on the same blocks, and every run against the bigram floor of its own
    positions: paired Brier-1..max_n differences with their CR1 standard errors (95%, two-sided)."""
    from calm_lightning.metrics.paired import paired_difference

    def row(a_label, a_blocks, b_label, b_blocks) -> PairedRow:
        d = paired_difference(*a_blocks, *b_blocks)
        n = min(max_n, d.diff.numel())
        return PairedRow(
            a_label, b_label, [(float(d.diff[i]), float(d.se[i]), bool(d.significant[i])) for i in range(n)]
        )

    rows = []
    for i, a in enumerate(runs):
        for b in runs[i + 1 :]:
            if a.blocks is not None and b.blocks is not None and a.eval_key == b.eval_key:
                rows.append(row(a.label, a.blocks, b.label, b.blocks))
    for a in runs:
        for f in floors:
            if f.name == "bigram" and f.unit == a.unit and f.eval_key == a.eval_key and a.blocks is not None:
                rows.append(row(a.label, a.blocks, f.label, f.blocks))
    return rows


@dataclass
class Correlation:
    """Pearson r between the token baseline's validation cross-entropy and BrierLM / Brier-1 over
    every (run, validation step) where both were logged (the paper's Fig. 3 reports -0.966)."""

    points: int
    runs: int
    r_brierlm: float
    r_brier1: float
    ce: list[float]
    brierlm: list[float]
    brier1: list[float]


def brier_ce_correlation(runs: Sequence[RunRecord]) -> Correlation | None:
    import torch

    from calm_lightning.metrics.paired import pearson

    ce, blm, b1, used = [], [], [], 0
    for r in runs:
        if r.kind != "ar":
            continue
        by_step = {tag: dict(r.curves.get(tag, [])) for tag in ("val/ce", "val/brierlm", "val/brier1")}
        steps = sorted(set(by_step["val/ce"]) & set(by_step["val/brierlm"]) & set(by_step["val/brier1"]))
        used += bool(steps)
        for s in steps:
            ce.append(by_step["val/ce"][s])
            blm.append(by_step["val/brierlm"][s])
            b1.append(by_step["val/brier1"][s])
    if not ce:
        return None
    x = torch.tensor(ce)
    return Correlation(len(ce), used, pearson(x, torch.tensor(blm)), pearson(x, torch.tensor(b1)), ce, blm, b1)
