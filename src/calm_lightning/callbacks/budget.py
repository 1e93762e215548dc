"""Step budgets with a wall-clock safety net, and a progress bar that counts steps.

Runs are budgeted in optimizer steps (``trainer.max_steps``); ``trainer.max_time_minutes`` is only a
guard against a run that is far slower than expected. Unlike Lightning's ``Timer`` (``max_time``),
whose elapsed time is stored in the checkpoint and restored on resume, ``TimeGuard`` counts the time
of the current process only: rerunning a guard-stopped command continues the run towards
``max_steps`` with a fresh allowance. Its record of the last session (stopped at step N of M, or
not) is saved in the checkpoint, where ``calm eval`` and ``calm compare`` read it.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar

GUARD_STATE_KEY = "TimeGuard"  # the callback's key in a checkpoint's "callbacks" dict


class TimeGuard(L.Callback):
    """Stop training once this process has trained for ``max_minutes`` (0 = never).

    The check runs after every training batch; all ranks take the same decision. ``stopped_at_step``
    is the step at which this session was stopped (None if it was not), saved with the checkpoint.
    """

    def __init__(self, max_minutes: float):
        self.max_seconds = 60.0 * max_minutes
        self.stopped_at_step: int | None = None
        self.max_steps: int | None = None
        self._start = 0.0

    @property
    def state_key(self) -> str:
        return GUARD_STATE_KEY

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.monotonic()
        self.stopped_at_step = None  # a new session: the last one's record no longer describes the run
        self.max_steps = trainer.max_steps

    def elapsed_seconds(self) -> float:
        return time.monotonic() - self._start

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.max_seconds <= 0 or trainer.should_stop:
            return
        over = trainer.strategy.reduce_boolean_decision(self.elapsed_seconds() >= self.max_seconds, all=False)
        if over and trainer.global_step < trainer.max_steps:
            trainer.should_stop = True
            self.stopped_at_step = trainer.global_step

    def state_dict(self) -> dict[str, Any]:
        return {"stopped_at_step": self.stopped_at_step, "max_steps": self.max_steps,
                "max_minutes": self.max_seconds / 60.0}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass  # the guard describes one session; a resumed session starts with a full allowance


def budget_status(step: int, max_steps: int, guard_state: dict[str, Any] | None) -> dict[str, Any]:
    """What a checkpoint says about its run's budget: {"step", "max_steps", "complete",
    "stopped_by_time_guard", "note"}. ``guard_state``: the checkpoint's ``TimeGuard`` entry, if any."""
    stopped = bool(guard_state and guard_state.get("stopped_at_step") is not None)
    complete = step >= max_steps
    if complete:
        note = ""
    elif stopped:
        note = f"stopped by the time guard at step {step:,} of {max_steps:,}"
    else:
        note = f"trained {step:,} of {max_steps:,} steps (interrupted or still running)"
    return {"step": step, "max_steps": max_steps, "complete": complete, "stopped_by_time_guard": stopped and not complete,
            "note": note}


class StepProgressBar(RichProgressBar):
    """Rich progress bar over optimizer steps ("Training 120/1500") instead of Lightning's per-epoch
    batches, which reads "Epoch 0/-2" in step-budgeted runs and restarts at every epoch."""

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps

    def _get_train_description(self, current_epoch: int) -> str:
        return "Training (steps)"

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.is_disabled:
            return
        if self.progress is not None and self.train_progress_bar_id is None:
            self.train_progress_bar_id = self._add_task(trainer.max_steps, self._get_train_description(0))
        self._update(self.train_progress_bar_id, trainer.global_step)
        self.refresh()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()
