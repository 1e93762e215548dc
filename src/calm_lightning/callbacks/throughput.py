"""Training throughput (tokens/s) measured between optimizer steps, logged as ``train/tokens_per_s``."""

from __future__ import annotations

import time

import lightning as L


class TokensPerSecond(L.Callback):
    """Tokens per second over a sliding window of training batches (validation time excluded)."""

    def __init__(self, window: int = 10):
        self.window = window
        self._tokens = 0
        self._elapsed = 0.0
        self._start: float | None = None
        self.total_tokens = 0
        self.total_train_time = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._start is None:
            return
        dt = time.perf_counter() - self._start
        n = batch.numel() * trainer.world_size
        self._tokens += n
        self._elapsed += dt
        self.total_tokens += n
        self.total_train_time += dt
        if (batch_idx + 1) % self.window == 0:
            pl_module.log("train/tokens_per_s", self._tokens / max(self._elapsed, 1e-9), rank_zero_only=True)
            self._tokens, self._elapsed = 0, 0.0

    @property
    def mean_tokens_per_s(self) -> float:
        return self.total_tokens / max(self.total_train_time, 1e-9)
