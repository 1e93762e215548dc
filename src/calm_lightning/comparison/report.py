"""`calm compare`, part 3: the report: markdown tables, figures (with 95% error bars) and JSON."""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from calm_lightning.comparison.runs import RunRecord
from calm_lightning.comparison.scoring import SweepPoint
from calm_lightning.utils.io import atomic_open

BRIER_COLUMNS = 4  # Brier-1..4 in the table (BrierLM's terms); "—" where a run evaluated fewer

def _fmt(value: float | int | None, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return format(value, spec)


def _minutes(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds / 60:.1f} min"


def _with_se(scores: dict[str, float], key: str, spec: str) -> str:
    """``0.0432 ± 0.0021`` from the shared-block scores (BrierLM: ``5.72 [5.10, 6.31]``); "—" if absent."""
    if key not in scores:
        return "—"
    if f"{key}_se" in scores:
        return f"{_fmt(scores[key], spec)} ± {_fmt(scores[f'{key}_se'], spec)}"
    if f"{key}_lo" in scores:
        return f"{_fmt(scores[key], spec)} [{_fmt(scores[f'{key}_lo'], spec)}, {_fmt(scores.get(f'{key}_hi'), spec)}]"
    return _fmt(scores[key], spec)


def _score(r: RunRecord, key: str, spec: str) -> str:
    """The shared-block score with its uncertainty, else the last value logged in training."""
    return _with_se(r.scores, key, spec) if r.scores else _fmt(r.last(key), spec)


def runs_table(runs: Sequence[RunRecord]) -> str:
    header = [
        "run",
        "model",
        "K",
        "steps",
        "BrierLM",
        *(f"Brier-{n}" for n in range(1, BRIER_COLUMNS + 1)),
        "head params",
        "evals/vector",
        "train time",
        "train tokens/s",
        "train FLOPs",
        "gen tokens/s",
    ]
    rows = []
    for r in runs:
        cells = [
            r.label,
            r.model_name,
            str(r.chunk_size) if r.kind == "calm" else "—",
            f"{r.step:,}" if not r.budget_note else f"{r.step:,} of {r.max_steps:,} (cut short: not comparable)",
            _score(r, "val/brierlm", ".2f"),
            *(_score(r, f"val/brier{n}", ".4f") for n in range(1, BRIER_COLUMNS + 1)),
            _fmt(r.head_params, ","),
            _fmt(r.evals_per_sample, "d"),
            _minutes(r.train_time_s),
            _fmt(r.train_tokens_per_s, ",.0f"),
            _fmt(r.train_flops, ".3g"),
            _fmt(r.gen_tokens_per_s, ",.1f"),
        ]
        rows.append(cells)
    return _markdown_table(header, rows)


def floors_table(floors) -> str:
    """Brier-n of the unigram/bigram floors (``scoring.FloorRecord``) with their standard errors."""
    header = ["floor", "BrierLM", *(f"Brier-{n}" for n in range(1, BRIER_COLUMNS + 1))]
    rows = [
        [f.label, _with_se(f.scores, "val/brierlm", ".2f"),
         *(_with_se(f.scores, f"val/brier{n}", ".4f") for n in range(1, BRIER_COLUMNS + 1))]
        for f in floors
    ]
    return _markdown_table(header, rows)


def paired_table(rows) -> str:
    """``scoring.PairedRow``s: A - B per Brier-n, ``+0.0123 ± 0.0021 *`` where significant at 95%."""
    width = max((len(r.diffs) for r in rows), default=0)
    header = ["A", "B", *(f"Δ Brier-{n} (A - B)" for n in range(1, width + 1))]
    body = []
    for r in rows:
        cells = [f"{d:+.4f} ± {se:.4f}{' *' if sig else ''}" for d, se, sig in r.diffs]
        body.append([r.a, r.b, *cells, *["—"] * (width - len(cells))])
    return _markdown_table(header, body)


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def sweep_table(points: Sequence[SweepPoint]) -> str:
    header = [
        "run",
        "head",
        "sampler",
        "steps",
        "evals/vector",
        "BrierLM",
        *(f"Brier-{n}" for n in range(1, BRIER_COLUMNS + 1)),
    ]
    rows = []
    for p in points:
        cells = [
            p.label,
            p.head,
            p.solver,
            str(p.steps),
            str(p.evals_per_sample),
            _fmt(p.brierlm, ".2f"),
            *(_fmt(p.metrics.get(f"val/brier{n}"), ".4f") for n in range(1, BRIER_COLUMNS + 1)),
        ]
        rows.append(cells)
    return _markdown_table(header, rows)


def _figure(title: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    fig.suptitle(title)
    return fig, axes


def _save_png(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    with atomic_open(path, "wb") as f:
        f.write(buf.getvalue())


PANELS = (("val/brierlm", "BrierLM"), ("val/brier1", "Brier-1"))


def _finish(axes, xlabel: str) -> None:
    for ax, (_, name) in zip(axes, PANELS):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")


def _band(ax, r: RunRecord, tag: str, xscale: float = 1.0) -> None:
    """The 95% interval of a logged curve (``<tag>_lo`` / ``_hi``), where the run logged one."""
    lo, hi = dict(r.curves.get(f"{tag}_lo", [])), dict(r.curves.get(f"{tag}_hi", []))
    steps = sorted(set(lo) & set(hi))
    if steps:
        ax.fill_between([s * xscale for s in steps], [lo[s] for s in steps], [hi[s] for s in steps], alpha=0.2)


def plot_brierlm_vs_step(runs: Sequence[RunRecord], path: Path) -> None:
    fig, axes = _figure("BrierLM vs training step (paper Fig. 8; bands: 95% intervals)")
    for r in runs:
        for ax, (tag, _) in zip(axes, PANELS):
            curve = r.curves.get(tag, [])
            if curve:
                ax.plot([s for s, _ in curve], [v for _, v in curve], marker="o", label=r.label)
                _band(ax, r, tag)
    _finish(axes, "training step")
    _save_png(fig, path)


def plot_brierlm_vs_sampling_steps(points: Sequence[SweepPoint], path: Path) -> None:
    fig, axes = _figure("BrierLM vs sampling steps (paper Fig. 9)")
    lines: dict[tuple[str, str, str], list[SweepPoint]] = {}
    for p in points:
        lines.setdefault((p.label, p.head, p.solver), []).append(p)
    for (label, head, solver), pts in lines.items():
        pts = sorted(pts, key=lambda p: p.steps)
        for ax, (tag, _) in zip(axes, PANELS):
            xs, ys = [p.steps for p in pts], [p.metrics.get(tag, float("nan")) for p in pts]
            if len(pts) == 1:  # a head with nothing to sweep (energy: one step), whatever its name
                ax.scatter(xs, ys, marker="*", s=160, zorder=3, label=f"{label} ({head}, {solver})")
            else:
                ax.plot(xs, ys, marker="o", label=f"{label} ({head}, {solver})")
    for ax in axes:
        ax.set_xscale("log", base=2)
    _finish(axes, "sampling steps per vector (midpoint: 2 evaluations per step)")
    _save_png(fig, path)


def plot_brierlm_vs_flops(runs: Sequence[RunRecord], path: Path) -> None:
    fig, axes = _figure("BrierLM vs training FLOPs (paper Fig. 4)")
    for r in runs:
        name = f"{r.label} (K={r.chunk_size})" if r.kind == "calm" else f"{r.label} (tokens)"
        per_step = r.tokens_per_step * r.train_flops_per_token
        for ax, (tag, _) in zip(axes, PANELS):
            curve = [(s, v) for s, v in r.curves.get(tag, []) if s > 0]
            if curve:
                ax.plot([s * per_step for s, _ in curve], [v for _, v in curve], marker="o", label=name)
                _band(ax, r, tag, per_step)
    for ax in axes:
        ax.set_xscale("log")
    _finish(axes, "training FLOPs")
    _save_png(fig, path)


def plot_brier_vs_ce(corr, path: Path) -> None:
    """Token baseline: BrierLM and Brier-1 against validation cross-entropy (paper Fig. 3)."""
    fig, axes = _figure(f"Token baseline: Brier vs cross-entropy ({corr.points} validations, {corr.runs} run(s))")
    for ax, ys, name, r in zip(axes, (corr.brierlm, corr.brier1), ("BrierLM", "Brier-1"),
                               (corr.r_brierlm, corr.r_brier1)):
        ax.scatter(corr.ce, ys, label=f"Pearson r = {r:.3f}")
        ax.set_xlabel("validation cross-entropy (nats/token)")
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    _save_png(fig, path)


def to_json(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):  # per-block tensors stay out of the JSON
        return {f.name: to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name != "blocks"}
    if isinstance(obj, dict):
        return {k: to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj

