"""`HParamsSummary`: the run's resolved config in TensorBoard's HParams tab, next to the metrics to compare.

Lightning writes hparams to TensorBoard only together with metric values (``hp_metric``), which we turn
off so that no fake point lands on a real chart. This callback writes the HParams plugin's summaries
directly: every config key (flattened to ``model/head/name`` ...) as a hyper-parameter, and the
validation metric tags (``val/brierlm``, ``val/brier1..n``, the loss) as the metrics TensorBoard reads
from the run's own scalars. Runs trained with different heads, K or budgets then line up in one table.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_only


def flatten_hparams(config: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """Nested config -> {"a/b/c": value}; values TensorBoard cannot hold (None, lists) become text."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_hparams(value, f"{name}/"))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def hparam_metrics(pl_module: L.LightningModule) -> list[str]:
    """The validation tags the HParams table shows for this kind of module."""
    loss_name = getattr(pl_module, "loss_name", None)
    if loss_name is None:  # autoencoder
        return ["val/loss", "val/ce", "val/kl", "val/active_dims"]
    max_n = pl_module.cfg.eval.brier_max_n
    return ["val/brierlm", *(f"val/brier{n}" for n in range(1, max_n + 1)), f"val/{loss_name}"]


class HParamsSummary(L.Callback):
    """Writes the HParams summaries once per fit (again on resume, which TensorBoard tolerates)."""

    def __init__(self, config: dict[str, Any]):
        self.config = config

    @rank_zero_only
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        writer = getattr(trainer.logger, "experiment", None)
        if writer is None or not hasattr(writer, "_get_file_writer"):  # not a TensorBoard logger
            return
        from torch.utils.tensorboard.summary import hparams

        metrics = dict.fromkeys(hparam_metrics(pl_module), 0.0)  # only the tags are used, not the values
        file_writer = writer._get_file_writer()
        for summary in hparams(flatten_hparams(self.config), metrics):
            file_writer.add_summary(summary)
