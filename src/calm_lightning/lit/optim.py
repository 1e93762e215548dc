"""AdamW with decoupled parameter groups and the warmup/constant/cosine schedules of CALM.md §1-2."""

from __future__ import annotations

import math

import torch
from torch import nn

from calm_lightning.config.schema import OptimConfig
from calm_lightning.models.layers import RMSNorm

WEIGHT_DECAY_GROUPS = ("reference", "linear", "all")


def parameter_groups(model: nn.Module, weight_decay: float, groups: str = "reference") -> list[dict]:
    """AdamW parameter groups by which parameters get weight decay.

    ``"reference"`` (the reference code's HF Trainer grouping, used by the paper): everything except
    biases and the gains of norm layers (RMSNorm, LayerNorm), so embedding tables are decayed too.
    ``"linear"``: matrices of linear layers only (the GPT/Llama habit; decaying an embedding pulls rare
    tokens' rows to zero). ``"all"``: every parameter. Chosen by layer type, not by ``p.ndim``: FSDP
    (``use_orig_params``) hands the optimiser flattened 1-D views of every parameter.
    """
    if groups not in WEIGHT_DECAY_GROUPS:
        raise ValueError(f"weight-decay groups must be one of {WEIGHT_DECAY_GROUPS}, got {groups!r}")
    if groups == "linear":
        decayed = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    else:
        exempt: set[int] = set()
        if groups == "reference":
            for m in model.modules():
                bias = getattr(m, "bias", None)
                if isinstance(bias, nn.Parameter):
                    exempt.add(id(bias))
                if isinstance(m, (nn.LayerNorm, RMSNorm)) and m.weight is not None:
                    exempt.add(id(m.weight))
        decayed = {id(p) for p in model.parameters()} - exempt
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if id(p) in decayed else no_decay).append(p)
    out = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        out.append({"params": no_decay, "weight_decay": 0.0})
    return out


def lr_lambda(cfg: OptimConfig, max_steps: int):
    """Multiplier of the base lr at a given optimizer step: linear warm-up over ``warmup_steps``, then
    constant (``constant``, the paper's recipe; ``constant_with_warmup`` is the same, kept for old
    configs) or cosine decay to ``min_lr_ratio``. The reference code's HF "constant" scheduler drops the
    warm-up: ``optim.warmup_steps=0`` reproduces it."""
    warmup = cfg.warmup_steps

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
        parameter_groups(model, cfg.weight_decay, cfg.weight_decay_groups),
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, max_steps))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
