"""AdamW with decoupled parameter groups and the warmup/constant/cosine schedules of CALM.md §1-2."""

from __future__ import annotations

import math

import torch
from torch import nn

from calm_lightning.config.schema import OptimConfig


def parameter_groups(model: nn.Module, weight_decay: float, decay_all: bool) -> list[dict]:
    """Weight decay on matrices of linear layers only, unless ``decay_all``.

    Norm gains, biases and embedding tables are excluded by default (the usual GPT/Llama practice):
    decaying an embedding pulls rare tokens' rows to zero. Chosen by layer type, not by ``p.ndim``:
    FSDP (``use_orig_params``) hands the optimiser flattened 1-D views of every parameter.
    """
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if decay_all or id(p) in linear_weights:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def lr_lambda(cfg: OptimConfig, max_steps: int):
    """Multiplier of the base lr at a given optimizer step."""
    warmup = cfg.warmup_steps if cfg.schedule != "constant" else 0

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "cosine":
            progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
            return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return fn


def build_optimizer(model: nn.Module, cfg: OptimConfig, max_steps: int) -> dict:
    """The ``configure_optimizers`` return value: AdamW plus a per-step LambdaLR."""
    opt = torch.optim.AdamW(
        parameter_groups(model, cfg.weight_decay, cfg.decay_norms_and_embeddings),
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, max_steps))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
