"""Autoencoder side products: reconstruction examples as text and the robustness curve as a figure."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from calm_lightning.lit.sharding import full_model_on_rank_zero


def _tensorboard(trainer: L.Trainer):
    logger = trainer.logger
    return getattr(logger, "experiment", None) if logger is not None else None


class ReconstructionExamples(L.Callback):
    """Logs a markdown table of original vs decoded chunks (z = mu) after each validation.

    Wrong tokens are struck through in the decoded text so errors are visible at a glance.
    """

    def __init__(self, tokenizer, num_examples: int = 8):
        self.tokenizer = tokenizer
        self.num_examples = num_examples
        self._batch: torch.Tensor | None = None

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0:
            self._batch = batch[: self.num_examples].detach()

    def _piece(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False).replace("|", "\\|").replace("\n", "⏎")

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        # Every rank enters (a sharded model is gathered collectively); rank zero decodes and logs.
        if trainer.logger is None or self._batch is None or trainer.sanity_checking:
            return
        with full_model_on_rank_zero(trainer, pl_module) as model:
            if model is not None and _tensorboard(trainer) is not None:
                self._log_examples(trainer, model)

    def _log_examples(self, trainer, model) -> None:
        K = model.chunk_size
        rows = ["| original | decoded (z = mu) | token errors |", "|---|---|---|"]
        with torch.no_grad():
            chunks = self._batch[:, : 8 * K].reshape(-1, K)  # first 8 chunks of each example
            mu, _ = model.encode(chunks)
            decoded = model.decode(mu).reshape(self._batch.shape[0], -1)
        original = self._batch[:, : decoded.shape[1]]
        for orig, dec in zip(original.tolist(), decoded.tolist()):
            parts = [self._piece([d]) if d == o else f"~~{self._piece([d])}~~" for o, d in zip(orig, dec)]
            errors = sum(o != d for o, d in zip(orig, dec))
            rows.append(f"| {self._piece(orig)} | {''.join(parts)} | {errors}/{len(orig)} |")
        _tensorboard(trainer).add_text("reconstruction/examples", "\n".join(rows), global_step=trainer.global_step)


class RobustnessCurve(L.Callback):
    """Token accuracy against the sigma of Gaussian noise added to mu, as a TensorBoard figure."""

    @rank_zero_only
    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        tb = _tensorboard(trainer)
        results = getattr(pl_module, "last_val", {})
        if tb is None or not results or trainer.sanity_checking:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        sigmas = [0.0] + list(pl_module.noise_sigmas)
        keys = ["mu"] + [f"noise{s:g}".replace(".", "p") for s in pl_module.noise_sigmas]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for kind, style in (("token", "o-"), ("chunk", "s--")):
            acc = [100 * results.get(f"val/{kind}_acc_{k}", float("nan")) for k in keys]
            ax.plot(sigmas, acc, style, label=f"{kind} accuracy")
        ax.set_xlabel("sigma of noise added to mu")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"Autoencoder robustness, step {trainer.global_step}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tb.add_figure("reconstruction/robustness", fig, global_step=trainer.global_step)
        plt.close(fig)
