"""Evaluation of a checkpoint (`calm eval`, `calm compare`, the API): validation metrics of a
checkpoint on its validation split or another corpus. The metric maths lives in `metrics/`; this
module runs it over a checkpoint's data with the Trainer.

CALM and baseline checkpoints report BrierLM and Brier-1..n plus their loss; autoencoder checkpoints
report token and chunk accuracies (z = mu, posterior sample, added noise). Brier-n come with their
cluster-robust standard error and 95% interval (``val/brier{n}_se``, ``_lo``, ``_hi``) and BrierLM
with its interval (``val/brierlm_lo``, ``_hi``); `ui.display_metrics` folds them into one line each.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf

from calm_lightning.checkpoints import read_checkpoint
from calm_lightning.config.loader import load_config_from_dict
from calm_lightning.data.datamodule import TokenChunkDataModule
from calm_lightning.errors import CalmError
from calm_lightning.models.heads import sampling_override_keys
from calm_lightning.utils.hardware import resolve_precision

# Sampling-only head settings change no weights (the head is rebuilt from the overridden config);
# each head declares its own (``GenerativeHead.sampling_keys``).
HEAD_SAMPLING_KEYS = sampling_override_keys()
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


def evaluate(
    checkpoint: str | Path,
    overrides: list[str] = (),
    *,
    limit_batches: int = 0,
    floors: bool = False,
    keep_blocks: bool = False,
) -> dict[str, Any]:
    """Validation metrics of a checkpoint: the whole validation split (or ``eval.corpus`` in full),
    or its first ``limit_batches`` batches.

    ``floors``: also the exact Brier-n of unigram and bigram models counted on the training split,
    on the same positions and blocks (``result["floors"]``). ``keep_blocks``: the per-block Brier
    sums and counts of the run (and floors) as tensors [G, max_n] in ``result["blocks"]`` (and
    ``result["floor_blocks"]``), for paired comparisons; not JSON-serialisable.
    """
    import dataclasses

    checkpoint = read_checkpoint(checkpoint)
    ckpt, hparams = checkpoint.path, checkpoint.hparams
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
    K = checkpoint.chunk_size
    if exp.tokenizer.path is None and not any(o.startswith("tokenizer.") for o in overrides):
        # the tokenizer the checkpoint carries, rather than training one again from the corpus
        embedded = checkpoint.materialise_tokenizer(exp.data.cache_dir)
        if embedded is not None:
            exp.tokenizer.path = str(embedded)
    dm = TokenChunkDataModule.from_config(exp, K)
    stored_fp = hparams.get("tokenizer_fingerprint")
    if stored_fp and stored_fp != dm.tokenizer_fingerprint:
        raise CalmError(
            f"{ckpt}: trained with tokenizer {stored_fp[:12]} but the data uses "
            f"{dm.tokenizer_fingerprint[:12]}; pass the training tokenizer (tokenizer.path=...)"
        )
    if exp.eval.corpus:
        if kind == "autoencoder":
            raise CalmError("eval.corpus scores language models; evaluate an autoencoder on data.corpus instead")
        dm.use_eval_corpus(dataclasses.replace(exp.data, corpus=exp.eval.corpus))
    module = checkpoint.build_module(config=OmegaConf.to_container(cfg))
    if keep_blocks and kind != "autoencoder":
        module.block_records = []
    # The whole split unless asked otherwise: training's limit_val_batches was a cost choice for
    # curves, not a definition of the evaluation set.
    limit = limit_batches or None
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
    start = time.perf_counter()
    metrics = trainer.validate(module, datamodule=dm, verbose=False)[0]
    seconds = time.perf_counter() - start
    result: dict[str, Any] = {
        "checkpoint": str(ckpt),
        "kind": kind,
        "step": checkpoint.step,
        "budget": checkpoint.budget(),
        "metrics": {k: float(v) for k, v in sorted(metrics.items())},
        "eval_seconds": seconds,
        "eval_set": {
            "source": exp.eval.corpus or "validation split",
            "blocks": _num_blocks(dm, limit),
            "block_size": exp.data.block_size,
            **({"documents": dm.eval_corpus_docs} if exp.eval.corpus else {}),
        },
    }
    if kind == "calm":
        result["brier_num_samples"] = exp.eval.num_samples  # S head samples per position
    if keep_blocks and module.block_records is not None:
        result["blocks"] = _stack_blocks(module.block_records)
        result["block_digest"] = _block_digest(dm, limit)
    if floors and kind != "autoencoder":
        floor = score_floors(dm, unit=K if kind == "calm" else 1, max_n=exp.eval.brier_max_n, limit=limit)
        result["floors"] = {name: f["metrics"] for name, f in floor.items()}
        if keep_blocks:
            result["floor_blocks"] = {name: f["blocks"] for name, f in floor.items()}
    return result


def _num_blocks(dm, limit: int | None) -> int:
    n = len(dm.val_set) if dm.val_set is not None else 0
    if limit is None:
        return n
    batch = dm.data_cfg.val_batch_size or dm.data_cfg.batch_size
    return min(n, limit * batch)


def _block_digest(dm, limit: int | None) -> str:
    """sha256 of the evaluated blocks' tokens: runs with equal digests were scored on the same blocks."""
    import hashlib

    h = hashlib.sha256()
    for i, batch in enumerate(dm.val_dataloader()):
        if limit is not None and i >= limit:
            break
        h.update(str(tuple(batch.shape)).encode())
        h.update(batch.numpy().astype("int64").tobytes())
    return h.hexdigest()


def _stack_blocks(records: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([s for s, _ in records]), torch.cat([c for _, c in records])


def score_floors(dm, *, unit: int, max_n: int, limit: int | None = None) -> dict[str, dict[str, Any]]:
    """Exact Brier-n of the unigram and bigram floors (`metrics.floors`), fitted on the training split
    and scored on ``dm``'s validation blocks at the estimators' positions (``unit``: 1 = every token,
    K = chunk-aligned starts). Returns {name: {"metrics": {"val/brier1": ...}, "blocks": (sums, counts)}}."""
    import numpy as np

    from calm_lightning.data.shards import open_shard
    from calm_lightning.metrics.brier import BrierLM
    from calm_lightning.metrics.floors import FLOOR_MODELS, CountModel, floor_brier

    meta = dm.meta
    train = open_shard(dm.prepared.train_path, meta["dtype"], meta["splits"]["train"]["tokens"])
    model = CountModel.fit(torch.from_numpy(np.asarray(train).astype(np.int64)), dm.vocab_size, max_n)
    metrics = {name: BrierLM(max_n=max_n) for name in FLOOR_MODELS}
    records: dict[str, list] = {name: [] for name in FLOOR_MODELS}
    for i, batch in enumerate(dm.val_dataloader()):  # one pass over the blocks for both models
        if limit is not None and i >= limit:
            break
        for name in FLOOR_MODELS:
            sums, counts = floor_brier(model, batch, max_n, unit, name)
            metrics[name].update(sums, counts)
            records[name].append((sums, counts))
    return {
        name: {
            "metrics": {f"val/{k}": float(v) for k, v in sorted(metrics[name].compute().items())},
            "blocks": _stack_blocks(records[name]),
        }
        for name in FLOOR_MODELS
    }
