"""Full weights of a possibly sharded model, for work outside the training loop (samples, exports).

Under FSDP every rank holds only shards of the weights, and each wrapped block gathers its weights
with collectives when it runs, so rank zero cannot run the model alone (a rank-zero-only forward
fails on the sharded root weights or waits forever for the other ranks). Callbacks and exports get
the model through `full_model_on_rank_zero` instead of ``pl_module.model``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import lightning as L
import torch
from torch import nn

PREFIX = "model."  # the LightningModules keep their network in ``self.model``


def is_sharded(trainer: L.Trainer) -> bool:
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(trainer.strategy, FSDPStrategy)


@contextmanager
def full_model_on_rank_zero(trainer: L.Trainer, pl_module: L.LightningModule) -> Iterator[nn.Module | None]:
    """Yields the network with its full weights on global rank zero and None on the other ranks.

    Call it on every rank. Unsharded: ``pl_module.model`` itself. Sharded (FSDP): every rank takes part
    in gathering the full state dict, and rank zero loads it into a plain replica from
    ``pl_module.build_model()`` on its device (one extra copy of the weights while the context lasts).
    """
    if not is_sharded(trainer):
        yield pl_module.model if trainer.is_global_zero else None
        return
    state = trainer.strategy.lightning_module_state_dict()  # collective: full on rank zero, empty elsewhere
    if not trainer.is_global_zero:
        yield None
        return
    with torch.random.fork_rng(devices=[]):  # its random init must not shift rank zero's training RNG
        replica = pl_module.build_model()
    replica.load_state_dict({k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)})
    yield replica.to(pl_module.device).eval()
