"""Train CALM with the real `train()` under DDP or FSDP and record, per rank, what synchronisation must
make equal.

Run by tests/test_distributed.py in a subprocess (a distributed run inside pytest would make Lightning's
launcher re-run pytest itself): ``python ddp_probe.py OUT_DIR CONFIG key=value ...``. Lightning re-launches
this same command for rank 1. Each rank writes OUT_DIR/rank<r>.json with, per validation: its own
Brier sums/counts and validation losses before synchronisation, and the values logged after it; at
the end: a fingerprint of the weights it holds (under FSDP: its shards).

With ``trainer.strategy=fsdp`` the probe lifts the CPU refusals of Lightning and torch (both allow
FSDP on accelerators only, by policy: the sharding, gathering and state-dict code is the same) so
that the kit's FSDP integration runs on two CPU processes over gloo: `lift_cpu_fsdp_refusals`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch

from calm_lightning.config.loader import load_config
from calm_lightning.training import train


class SyncProbe(L.Callback):
    def __init__(self, out: Path):
        self.out = out
        self.records: list[dict] = []
        self.local_losses: list[float] = []

    def setup(self, trainer, pl_module, stage):
        # A fresh energy head's output layer is zero, so its two samples always agree and every rank's
        # Brier sums come out the same; varied samples make the ranks' states differ (seeded: same on both).
        out_proj = pl_module.model.head.out_proj.weight
        with torch.no_grad():
            out_proj.copy_(0.3 * torch.randn(out_proj.shape, generator=torch.Generator().manual_seed(0)))
        validation_loss = pl_module.validation_loss

        def recording(tokens):  # keeps this rank's validation losses before Lightning reduces them
            loss, shared = validation_loss(tokens)
            self.local_losses.append(float(loss))
            return loss, shared

        pl_module.validation_loss = recording

    def on_validation_epoch_end(self, trainer, pl_module):
        # callbacks run before the module's hook, so the metric still holds this rank's own states
        self.local = {"sums": pl_module.brier.sums.tolist(), "counts": pl_module.brier.counts.tolist(),
                      "losses": self.local_losses}
        self.local_losses = []

    def on_validation_end(self, trainer, pl_module):
        logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.records.append({"step": trainer.global_step, "local": self.local, "logged": logged})

    def on_train_end(self, trainer, pl_module):
        params = [p.detach().double().flatten() for p in pl_module.model.parameters() if p.requires_grad]
        flat = torch.cat(params)
        result = {"rank": trainer.global_rank, "world_size": trainer.world_size, "global_step": trainer.global_step,
                  "weights_sum": float(flat.sum()), "weights_abs_sum": float(flat.abs().sum()),
                  "weights_head": flat[:16].tolist(), "local_numel": flat.numel(), "validations": self.records}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def lift_cpu_fsdp_refusals() -> None:
    """Three test-only patches, each replacing a CPU refusal by what a GPU run does:

    - Lightning rejects ``FSDPStrategy`` without a CUDA accelerator (checked by exact type, so a
      subclass passes; ``train.build_strategy`` picks this one up from the module);
    - torch's FSDP asks for ``device_id`` on an accelerator: CPU is given explicitly;
    - Lightning gathers full state dicts with ``offload_to_cpu=True``, which on a CPU-resident model
      clones freed storage (segfault): gathered without the offload, as a GPU run ends up on CPU anyway.
    """
    import lightning.pytorch.strategies as strategies
    import lightning.pytorch.strategies.fsdp as lightning_fsdp
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    class CPUFSDPStrategy(strategies.FSDPStrategy):
        pass

    strategies.FSDPStrategy = CPUFSDPStrategy
    fsdp_init = FSDP.__init__

    def init(self, *args, device_id=None, **kwargs):
        fsdp_init(self, *args, device_id=torch.device("cpu") if device_id is None else device_id, **kwargs)

    FSDP.__init__ = init

    def full_state_dict_context(module, world_size, rank0_only=True):
        return FSDP.state_dict_type(
            module,
            StateDictType.FULL_STATE_DICT,
            FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
            FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
        )

    lightning_fsdp._get_full_state_dict_context = full_state_dict_context


def main() -> None:
    out, config, overrides = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    out.mkdir(parents=True, exist_ok=True)
    if "trainer.strategy=fsdp" in overrides:
        lift_cpu_fsdp_refusals()
    train(load_config(config, overrides), quiet=True, callbacks=[SyncProbe(out)])


if __name__ == "__main__":
    main()
