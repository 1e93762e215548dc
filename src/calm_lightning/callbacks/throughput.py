"""Training throughput measured between optimizer steps: ``train/tokens_per_s`` and, given the model's
training FLOPs per token (``calm_lightning.flops``), ``train/flops_per_s`` and ``train/mfu``.

MFU (model FLOPs utilisation, PaLM appendix B) = achieved model FLOP/s / (peak FLOP/s x devices), with
model FLOPs = 3 x forward, attention included, activation recomputation not counted. The peak is
Lightning's `get_available_flops` for the run's precision (`utils.hardware.resolve_peak_flops`).

Why not Lightning's `ThroughputMonitor`: it calls `torch.cuda.synchronize()` after every training
batch (stalling the GPU's queue on every step, where this callback only reads the clock), names its
metrics `train|device/items_per_sec` where the kit's curves, `calm compare` and the README use
`train/tokens_per_s`, and keeps no run totals, which the run summary reports.
"""

from __future__ import annotations

import time

import lightning as L

from calm_lightning.utils.hardware import resolve_peak_flops


class TokensPerSecond(L.Callback):
    """Tokens per second over a sliding window of training batches (validation time excluded).

    flops_per_token: training FLOPs per token of the model (``flops.training_flops_per_token``); 0 = do
        not log ``train/flops_per_s`` and ``train/mfu``.
    peak_flops: peak FLOP/s of one device (``trainer.peak_flops``); 0 = look the GPU up at fit start
        in the trainer's precision (``utils.hardware.resolve_peak_flops``); no ``train/mfu`` on CPU or an
        unknown GPU.
    """

    def __init__(self, window: int = 10, flops_per_token: float = 0.0, peak_flops: float = 0.0):
        self.window = window
        self.flops_per_token = flops_per_token
        self.configured_peak_flops = peak_flops
        self.peak_flops = peak_flops  # per device, resolved in on_fit_start
        self._world_size = 1
        self._tokens = 0
        self._elapsed = 0.0
        self._start: float | None = None
        self.total_tokens = 0
        self.total_train_time = 0.0

    def on_fit_start(self, trainer, pl_module) -> None:
        precision = str(getattr(trainer, "precision", "32-true"))
        self.peak_flops = resolve_peak_flops(self.configured_peak_flops, pl_module.device, precision)
        self._world_size = trainer.world_size

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._start is None:
            return
        dt = time.perf_counter() - self._start
        n = batch.numel() * trainer.world_size  # tokens of all devices (each measures its own time)
        self._tokens += n
        self._elapsed += dt
        self.total_tokens += n
        self.total_train_time += dt
        if (batch_idx + 1) % self.window == 0:
            tokens_per_s = self._tokens / max(self._elapsed, 1e-9)
            metrics = {"train/tokens_per_s": tokens_per_s}
            if self.flops_per_token > 0:
                metrics["train/flops_per_s"] = tokens_per_s * self.flops_per_token
                if self.peak_flops > 0:
                    metrics["train/mfu"] = self.mfu(tokens_per_s)
            for key, value in metrics.items():
                pl_module.log(key, value, rank_zero_only=True)
            self._tokens, self._elapsed = 0, 0.0

    def mfu(self, tokens_per_s: float) -> float:
        """tokens/s (all devices) x FLOPs/token / (peak x devices); 0.0 when either is unknown."""
        if self.flops_per_token <= 0 or self.peak_flops <= 0:
            return 0.0
        return tokens_per_s * self.flops_per_token / (self.peak_flops * self._world_size)

    @property
    def mean_tokens_per_s(self) -> float:
        return self.total_tokens / max(self.total_train_time, 1e-9)

    @property
    def mean_mfu(self) -> float:
        """MFU over the whole run (0.0 when FLOPs per token or the peak are unknown)."""
        return self.mfu(self.mean_tokens_per_s)
