"""`calm eval`: validation metrics of a checkpoint on a (possibly different) corpus.

CALM and baseline checkpoints report BrierLM and Brier-1..n plus their loss; autoencoder checkpoints
report token and chunk accuracies (z = mu, posterior sample, added noise). Brier-n come with their
cluster-robust standard error and 95% interval (``val/brier{n}_se``, ``_lo``, ``_hi``) and BrierLM
with its interval (``val/brierlm_lo``, ``_hi``); `display_metrics` folds them into one line each.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf

from calm_lightning.callbacks.budget import GUARD_STATE_KEY, budget_status
from calm_lightning.config.loader import load_config_from_dict
from calm_lightning.errors import CalmError
from calm_lightning.lit.autoencoder_module import AutoencoderLitModule
from calm_lightning.lit.lm_modules import CALMLitModule, TokenLMLitModule
from calm_lightning.utils.hardware import resolve_precision
from calm_lightning.utils.io import torch_file_problem

MODULES = {"autoencoder": AutoencoderLitModule, "calm": CALMLitModule, "ar": TokenLMLitModule}
# Sampling-only head settings change no weights (the head is rebuilt from the overridden config).
HEAD_SAMPLING_KEYS = (
    "model.head.flow.num_steps",
    "model.head.flow.solver",
    "model.head.diffusion.num_steps",
    "model.head.diffusion.deterministic",
)
EVAL_OVERRIDE_PREFIXES = (
    "data.",
    "tokenizer.",
    "eval.",
    "trainer.precision",
    "trainer.threads",
    "trainer.seed",
    "trainer.limit_val_batches",
    "trainer.accelerator",
    "trainer.devices",
    *(f"{k}=" for k in HEAD_SAMPLING_KEYS),
)


def resolve_checkpoint(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise CalmError(f"checkpoint not found: {path}")
    return path


def load_checkpoint(ckpt: Path) -> dict[str, Any]:
    """A checkpoint (memory-mapped) with its hyperparameters, after checking every CRC-32 of the file
    (torch.load alone would accept a truncated or bit-flipped checkpoint and use wrong weights)."""
    problem = torch_file_problem(ckpt)
    if problem is not None:
        raise CalmError(
            f"{ckpt}: corrupt or truncated checkpoint ({problem}); use another checkpoint of the run"
        )
    try:
        blob = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
        blob["hyper_parameters"]  # every Lightning checkpoint has it: KeyError (below) otherwise
        return blob
    except Exception as e:  # noqa: BLE001 - every unreadable checkpoint is the same user-facing problem
        raise CalmError(f"{ckpt}: not a readable calm-lightning checkpoint ({type(e).__name__})") from None


def load_checkpoint_config(ckpt: Path) -> dict[str, Any]:
    """The hyperparameters stored in a checked checkpoint (`load_checkpoint`)."""
    return load_checkpoint(ckpt)["hyper_parameters"]


def evaluate(checkpoint: str | Path, overrides: list[str] = (), *, limit_batches: int = 0) -> dict[str, Any]:
    from calm_lightning.train import build_datamodule

    ckpt = resolve_checkpoint(checkpoint)
    blob = load_checkpoint(ckpt)
    hparams = blob["hyper_parameters"]
    if "config" not in hparams:
        raise CalmError(f"{ckpt}: checkpoint has no stored config; was it written by calm-lightning?")
    for o in overrides:
        if not o.startswith(EVAL_OVERRIDE_PREFIXES):
            raise CalmError(
                f"{o.split('=')[0]}: only data.*, tokenizer.*, eval.*, trainer device/precision keys "
                f"and the head's sampling settings ({', '.join(HEAD_SAMPLING_KEYS)}) can be overridden "
                "at evaluation"
            )
    cfg = load_config_from_dict(hparams["config"], overrides)
    exp = OmegaConf.to_object(cfg)
    kind = exp.model.kind
    K = hparams.get("autoencoder_config", {}).get("chunk_size", exp.model.autoencoder.chunk_size)
    dm = build_datamodule(exp, K)
    stored_fp = hparams.get("tokenizer_fingerprint")
    if stored_fp and stored_fp != dm.tokenizer_fingerprint:
        raise CalmError(
            f"{ckpt}: trained with tokenizer {stored_fp[:12]} but the data uses "
            f"{dm.tokenizer_fingerprint[:12]}; pass the training tokenizer (tokenizer.path=...)"
        )
    module = MODULES[kind].load_from_checkpoint(ckpt, map_location="cpu", config=OmegaConf.to_container(cfg))
    limit = limit_batches or exp.trainer.limit_val_batches or None
    trainer = L.Trainer(
        accelerator=exp.trainer.accelerator,
        devices=1,
        precision=resolve_precision(exp.trainer.precision, exp.trainer.accelerator),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=limit,
    )
    L.seed_everything(exp.trainer.seed, verbose=False)
    metrics = trainer.validate(module, datamodule=dm, verbose=False)[0]
    step = int(blob.get("global_step", 0))
    guard = blob.get("callbacks", {}).get(GUARD_STATE_KEY)
    result = {
        "checkpoint": str(ckpt),
        "kind": kind,
        "step": step,
        "budget": budget_status(step, exp.trainer.max_steps, guard),
        "metrics": {k: float(v) for k, v in sorted(metrics.items())},
    }
    if kind == "calm":
        result["brier_num_samples"] = exp.eval.num_samples  # S head samples per position
    return result


_BRIER_PART = re.compile(r"(.*/brier(?:\d+|lm))_(se|lo|hi)$")


def display_metrics(metrics: dict[str, float]) -> dict[str, Any]:
    """Metrics for the console: each Brier-n as ``0.0432 ± 0.0021  [0.0391, 0.0473]`` and BrierLM as
    ``5.72  [5.10, 6.31]`` (their _se/_lo/_hi entries folded in); every other metric unchanged."""

    def num(v: float | None, fmt: str) -> str:
        return "n/a" if v is None or not math.isfinite(v) else format(v, fmt)

    folded = {m.group(1) for k in metrics if (m := _BRIER_PART.match(k))}
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if _BRIER_PART.match(k):
            continue
        if k not in folded:
            out[k] = v
            continue
        fmt = ".2f" if k.endswith("brierlm") else ".4f"
        shown = num(v, fmt)
        if f"{k}_se" in metrics:
            shown += f" ± {num(metrics[f'{k}_se'], fmt)}"
        if f"{k}_lo" in metrics:
            shown += f"  [{num(metrics[f'{k}_lo'], fmt)}, {num(metrics.get(f'{k}_hi'), fmt)}]"
        out[k] = shown
    return out
