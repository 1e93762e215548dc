"""`calm compare`: trained CALM and token-baseline runs side by side (CALM.md sections 3 and 4).

For each run directory (``runs/<name>`` = its latest version, or ``runs/<name>/version_<n>``) it reads
the TensorBoard scalars (``val/brierlm`` and ``val/brier1..n`` by step, ``train/tokens_per_s``), the
resolved ``config.yaml`` and ``checkpoints/last.ckpt``, and writes to ``out``:

* ``comparison.md``: one row per run: BrierLM and Brier-1..4 of the last validation, head parameters,
  sampling network evaluations per vector (``GenerativeHead.evals_per_sample``), training wall time and
  tokens/s, training FLOPs (``flops.training_flops_per_token`` x tokens seen) and generation tokens/s
  (a short, bounded ``sampling.generate`` at T = 1); plus the sampling-steps sweep, if any.
* ``comparison.json``: the same numbers.
* ``brierlm_vs_step.png``: BrierLM (and Brier-1) against training step for every run (paper Fig. 8).
* ``brierlm_vs_sampling_steps.png`` (when a flow or diffusion run is given): each such checkpoint
  re-evaluated at every number of sampling steps (flow: Euler and midpoint; diffusion: its own
  sampler) through ``evaluate.evaluate`` with the head's sampling overrides; an energy run is one point
  at one step (paper Fig. 9).
* ``brierlm_vs_flops.png`` (when the runs differ in K or include the token baseline): BrierLM against
  training FLOPs (paper Fig. 4).

At CPU scale BrierLM is often 0 (the geometric mean is 0 as soon as one Brier-n is <= 0), so every
figure has a second panel with Brier-1.
"""

from __future__ import annotations

import dataclasses
import io
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from calm_lightning.errors import CalmError
from calm_lightning.utils.io import atomic_open, atomic_write_json, atomic_write_text

_VERSION = re.compile(r"^version_(\d+)$")
BRIER_COLUMNS = 4  # Brier-1..4 in the table (BrierLM's terms); "—" where a run evaluated fewer
DEFAULT_FLOW_STEPS = (1, 2, 4, 8, 16)
DEFAULT_DIFFUSION_STEPS = (10, 25, 50, 100)

Curve = list[tuple[int, float]]  # (step, value), increasing steps


@dataclass
class RunRecord:
    """What `calm compare` knows about one run."""

    label: str  # logging.name (+ /version_n when two runs share a name)
    run_dir: Path
    checkpoint: Path
    kind: str  # calm | ar
    head: str | None  # energy | flow | diffusion; None for the token baseline
    chunk_size: int  # K (1 for the token baseline)
    step: int  # optimizer steps of the last checkpoint
    max_steps: int  # the run's configured trainer.max_steps
    tokens_per_step: int  # batch x block x accumulation x devices
    train_flops_per_token: float  # flops.training_flops_per_token at data.block_size
    budget_note: str = ""  # non-empty when the run did not train its configured steps (not comparable)
    curves: dict[str, Curve] = field(default_factory=dict)  # val/brierlm, val/brier1..n
    train_tokens_per_s: float | None = None  # mean of train/tokens_per_s (validation excluded)
    train_time_s: float | None = None  # wall time between the first and last logged event, per session
    head_params: int | None = None
    evals_per_sample: int | None = None  # head network evaluations per generated vector
    gen_tokens_per_s: float | None = None

    def last(self, tag: str) -> float | None:
        curve = self.curves.get(tag)
        return curve[-1][1] if curve else None

    @property
    def train_flops(self) -> float:
        return self.step * self.tokens_per_step * self.train_flops_per_token

    @property
    def model_name(self) -> str:
        return f"CALM-{self.head}" if self.kind == "calm" else "token baseline"


@dataclass
class SweepPoint:
    """BrierLM of one checkpoint evaluated with one sampler setting."""

    label: str
    head: str
    solver: str  # euler | midpoint (flow), ancestral | ddim (diffusion), one-step (energy)
    steps: int  # solver steps (flow, diffusion) or 1 (energy)
    evals_per_sample: int  # network evaluations per vector
    metrics: dict[str, float]

    @property
    def brierlm(self) -> float:
        return self.metrics.get("val/brierlm", float("nan"))


@dataclass
class ComparisonResult:
    out: Path
    markdown: str
    files: list[Path]
    runs: list[RunRecord]
    sweep: list[SweepPoint]


# ------------------------------------------------------------------------------------ reading runs
def resolve_run_dir(path: str | Path) -> Path:
    """A version folder holding config.yaml: the path itself, or the latest version_<n> under it."""
    p = Path(path)
    if not p.exists():
        raise CalmError(f"run directory not found: {p}")
    if p.is_dir() and (p / "config.yaml").is_file():
        return p
    if p.is_dir():
        versions = sorted(
            (int(m.group(1)), child)
            for child in p.iterdir()
            if (m := _VERSION.match(child.name)) and (child / "config.yaml").is_file()
        )
        if versions:
            return versions[-1][1]
    raise CalmError(
        f"{p}: not a calm-lightning run (no config.yaml); pass runs/<name> or runs/<name>/version_<n>"
    )


def _read_config(run_dir: Path):
    from omegaconf import OmegaConf

    from calm_lightning.config.loader import load_config_from_dict

    path = run_dir / "config.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise CalmError(f"{path}: unreadable run config ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise CalmError(f"{path}: not a calm-lightning run config")
    try:
        return OmegaConf.to_object(load_config_from_dict(data))
    except CalmError as e:
        raise CalmError(f"{path}: {e}") from None


def comparable_config(run_dir: Path):
    """The run's config, if it is a CALM or token-baseline run (CalmError otherwise)."""
    exp = _read_config(run_dir)
    if exp.model.kind not in ("calm", "ar"):
        raise CalmError(
            f"{run_dir} is an {exp.model.kind} run; `calm compare` compares CALM and token-baseline runs"
        )
    return exp


def read_scalars(run_dir: Path) -> tuple[dict[str, Curve], float | None]:
    """All scalar curves of a run (later event files win for a step logged twice, as after a resume)
    and the training wall time: per event file (one per session), last minus first event time."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    by_tag: dict[str, dict[int, float]] = {}
    wall_time, seen = 0.0, False
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path), size_guidance={SCALARS: 0})
        acc.Reload()
        walls: list[float] = []
        for tag in acc.Tags().get("scalars", []):
            for event in acc.Scalars(tag):
                by_tag.setdefault(tag, {})[event.step] = event.value
                walls.append(event.wall_time)
        if walls:
            wall_time += max(walls) - min(walls)
            seen = True
    return {tag: sorted(points.items()) for tag, points in by_tag.items()}, (wall_time if seen else None)


def generation_tokens_per_s(loaded, max_new_tokens: int, batch_size: int = 4, seed: int = 0) -> float:
    """Tokens/s of ``sampling.generate`` at T = 1 (one head sample per vector), ``batch_size`` documents
    from an empty prompt, no early stop, after a one-step warm-up; bounded by the model's context."""
    from calm_lightning.sampling.generate import GenerationConfig, generate

    model, K = loaded.model, loaded.chunk_size
    n = min(max_new_tokens, (model.backbone.cfg.max_seq_len - 1) * K)
    if n < 1:
        return float("nan")
    gcfg = GenerationConfig(max_new_tokens=n, temperature=1.0)  # eos_id None: every row makes n tokens
    gen = torch.Generator(device=loaded.device).manual_seed(seed)
    generate(model, [[]], dataclasses.replace(gcfg, max_new_tokens=K), fill_id=loaded.eos_id, generator=gen)
    _sync(loaded.device)
    start = time.perf_counter()
    out = generate(model, [[] for _ in range(batch_size)], gcfg, fill_id=loaded.eos_id, generator=gen)
    _sync(loaded.device)
    return sum(len(t) for t in out.tokens) / max(time.perf_counter() - start, 1e-9)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_run(path: str | Path, *, gen_tokens: int = 32, device: str = "auto") -> RunRecord:
    """Read one run: logs, config, checkpoint (head size, FLOPs) and, if gen_tokens > 0, generation speed."""
    from calm_lightning.flops import training_flops_per_token
    from calm_lightning.sample import load_for_sampling

    run_dir = resolve_run_dir(path)
    exp = comparable_config(run_dir)
    kind = exp.model.kind
    curves, train_time = read_scalars(run_dir)
    loaded = load_for_sampling(run_dir, device)
    model = loaded.model
    t = exp.trainer
    world = t.num_nodes * (int(t.devices) if t.devices.isdigit() else 1)
    rate = curves.get("train/tokens_per_s", [])
    record = RunRecord(
        label=exp.logging.name,
        run_dir=run_dir,
        checkpoint=loaded.checkpoint,
        kind=kind,
        head=exp.model.head.name if kind == "calm" else None,
        chunk_size=loaded.chunk_size,
        step=loaded.step,
        max_steps=exp.trainer.max_steps,
        budget_note=loaded.budget.get("note", ""),
        tokens_per_step=exp.optim.tokens_per_step
        or exp.data.batch_size * exp.data.block_size * exp.optim.accumulate_grad_batches * world,
        train_flops_per_token=training_flops_per_token(model, seq_len=exp.data.block_size),
        curves={
            tag: c for tag, c in curves.items() if tag == "val/brierlm" or re.fullmatch(r"val/brier\d+", tag)
        },
        train_tokens_per_s=sum(v for _, v in rate) / len(rate) if rate else None,
        train_time_s=train_time,
    )
    if kind == "calm":
        record.head_params = sum(p.numel() for p in model.head.parameters())
        record.evals_per_sample = model.head.evals_per_sample
    if gen_tokens > 0:
        record.gen_tokens_per_s = generation_tokens_per_s(loaded, gen_tokens)
    return record


# ------------------------------------------------------------------------------------ the sweep
def sampling_sweep(
    runs: Sequence[RunRecord],
    flow_steps: Sequence[int],
    diffusion_steps: Sequence[int],
    limit_batches: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[SweepPoint]:
    """BrierLM of every flow/diffusion checkpoint at each number of sampling steps; energy runs once.

    Nothing to do (empty list) unless a flow or diffusion run is among ``runs``.
    """
    from calm_lightning.evaluate import evaluate

    if not any(r.head in ("flow", "diffusion") for r in runs):
        return []
    points: list[SweepPoint] = []

    def run_eval(run: RunRecord, solver: str, steps: int, evals: int, overrides: list[str]) -> None:
        if progress is not None:
            progress(f"evaluating {run.label}: {run.head} {solver}, {steps} step(s)")
        result = evaluate(run.checkpoint, overrides, limit_batches=limit_batches)
        points.append(SweepPoint(run.label, run.head, solver, steps, evals, result["metrics"]))

    for run in runs:
        if run.head == "energy":
            run_eval(run, "one-step", 1, 1, [])
        elif run.head == "flow":
            for solver, evals_per_step in (("euler", 1), ("midpoint", 2)):
                for n in flow_steps:
                    run_eval(
                        run,
                        solver,
                        n,
                        n * evals_per_step,
                        [f"model.head.flow.solver={solver}", f"model.head.flow.num_steps={n}"],
                    )
        elif run.head == "diffusion":
            exp = _read_config(run.run_dir)
            solver = "ddim" if exp.model.head.diffusion.deterministic else "ancestral"
            for n in diffusion_steps:
                if n <= exp.model.head.diffusion.train_timesteps:
                    run_eval(run, solver, n, n, [f"model.head.diffusion.num_steps={n}"])
    return points


# ------------------------------------------------------------------------------------ output
def _fmt(value: float | int | None, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return format(value, spec)


def _minutes(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds / 60:.1f} min"


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
            _fmt(r.last("val/brierlm"), ".2f"),
            *(_fmt(r.last(f"val/brier{n}"), ".4f") for n in range(1, BRIER_COLUMNS + 1)),
            _fmt(r.head_params, ","),
            _fmt(r.evals_per_sample, "d"),
            _minutes(r.train_time_s),
            _fmt(r.train_tokens_per_s, ",.0f"),
            _fmt(r.train_flops, ".3g"),
            _fmt(r.gen_tokens_per_s, ",.1f"),
        ]
        rows.append(cells)
    return _markdown_table(header, rows)


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


def plot_brierlm_vs_step(runs: Sequence[RunRecord], path: Path) -> None:
    fig, axes = _figure("BrierLM vs training step (paper Fig. 8)")
    for r in runs:
        for ax, (tag, _) in zip(axes, PANELS):
            curve = r.curves.get(tag, [])
            if curve:
                ax.plot([s for s, _ in curve], [v for _, v in curve], marker="o", label=r.label)
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
            if head == "energy":
                ax.scatter(xs, ys, marker="*", s=160, zorder=3, label=f"{label} (energy, 1 step)")
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
    for ax in axes:
        ax.set_xscale("log")
    _finish(axes, "training FLOPs")
    _save_png(fig, path)


def _to_json(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {k: _to_json(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {k: _to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_json(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def compare(
    run_dirs: Sequence[str | Path],
    out: str | Path = "runs/compare",
    *,
    flow_steps: Sequence[int] = DEFAULT_FLOW_STEPS,
    diffusion_steps: Sequence[int] = DEFAULT_DIFFUSION_STEPS,
    limit_batches: int = 0,
    gen_tokens: int = 32,
    device: str = "auto",
    progress: Callable[[str], None] | None = None,
) -> ComparisonResult:
    """Read the runs, run the sampling-steps sweep if needed, write the table, JSON and figures."""
    if not run_dirs:
        raise CalmError("no run directories given")
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
    sweep = sampling_sweep(runs, flow_steps, diffusion_steps, limit_batches, progress)

    out = Path(out)
    files = [out / "brierlm_vs_step.png"]
    plot_brierlm_vs_step(runs, files[-1])
    if sweep:
        files.append(out / "brierlm_vs_sampling_steps.png")
        plot_brierlm_vs_sampling_steps(sweep, files[-1])
    if len({r.chunk_size for r in runs}) > 1 or any(r.kind == "ar" for r in runs):
        files.append(out / "brierlm_vs_flops.png")
        plot_brierlm_vs_flops(runs, files[-1])

    parts = [
        "# Run comparison",
        "",
        "BrierLM and Brier-n: last validation logged in training (higher is better; BrierLM is 0 when any "
        "Brier-n <= 0). evals/vector: head network evaluations per generated vector. train time: wall "
        "clock of the logged sessions (validation included); train tokens/s: training steps only. "
        "train FLOPs: training FLOPs/token (calm_lightning.flops) x tokens seen. gen tokens/s: "
        f"generation at T = 1 from an empty prompt, {gen_tokens} tokens x 4 documents.",
        "",
        runs_table(runs),
    ]
    if sweep:
        batches = (
            f"{limit_batches} validation batches" if limit_batches else "the runs' trainer.limit_val_batches"
        )
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
            "runs": [{**_to_json(r), "train_flops": r.train_flops} for r in runs],
            "sweep": _to_json(sweep),
        },
    )
    files = [out / "comparison.md", out / "comparison.json", *files]
    return ComparisonResult(out, markdown, files, runs, sweep)
