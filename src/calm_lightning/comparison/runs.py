"""`calm compare`, part 1: finding runs and reading what they logged (config, TensorBoard, checkpoint).

A run is ``runs/<name>`` (its latest version) or ``runs/<name>/version_<n>``; `load_run` gathers its
config, scalar curves, checkpoint facts (head size, FLOPs, budget) and generation speed.
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from calm_lightning.errors import CalmError

_VERSION = re.compile(r"^version_(\d+)$")
# Curves kept per run: BrierLM and Brier-n with their intervals, and the baseline's cross-entropy.
_CURVE_TAGS = re.compile(r"val/(brierlm|brier\d+)(_se|_lo|_hi)?|val/ce")

Curve = list[tuple[int, float]]  # (step, value), increasing steps

@dataclass
class RunRecord:
    """What `calm compare` knows about one run."""

    label: str  # logging.name (+ /version_n when two runs share a name)
    run_dir: Path
    checkpoint: Path
    kind: str  # calm | ar
    head: str | None  # registry name of the head (energy, flow, diffusion...); None for the token baseline
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
    # Scored again by `calm compare` on the shared evaluation blocks (comparison.scoring):
    scores: dict[str, float] = field(default_factory=dict)  # val/brier{n}(_se/_lo/_hi), val/brierlm(...)
    blocks: Any = field(default=None, repr=False)  # (sums [G, n], counts [G, n]); not in the JSON
    eval_key: tuple = ()  # what identifies its blocks: (eval set, block size, blocks, tokenizer)
    unit: int = 1  # positions scored: every token (1) or chunk-aligned starts (K)

    def last(self, tag: str) -> float | None:
        curve = self.curves.get(tag)
        return curve[-1][1] if curve else None

    @property
    def train_flops(self) -> float:
        return self.step * self.tokens_per_step * self.train_flops_per_token

    @property
    def model_name(self) -> str:
        return f"CALM-{self.head}" if self.kind == "calm" else "token baseline"



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
    from calm_lightning.checkpoints import load_language_model
    from calm_lightning.flops import training_flops_per_token

    run_dir = resolve_run_dir(path)
    exp = comparable_config(run_dir)
    kind = exp.model.kind
    curves, train_time = read_scalars(run_dir)
    loaded = load_language_model(run_dir, device)
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
            tag: c for tag, c in curves.items() if _CURVE_TAGS.fullmatch(tag)
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

