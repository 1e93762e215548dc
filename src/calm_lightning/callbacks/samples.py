"""`TemperatureSamples`: text continuations of fixed prompts at several temperatures after validation.

One markdown table per logging step in TensorBoard text (``samples/text``) and the same rows as a
rich table in a panel on the console; generated on rank zero only (under FSDP all ranks first gather the
full weights for it: `lit.sharding`); seeded, so the same checkpoint gives the same
samples; bounded in time. A sampling setting the model cannot honour (e.g. prompts longer than its
context) leaves a note instead of samples; it never stops training.
"""

from __future__ import annotations

import time

import lightning as L
import torch

from calm_lightning.config.schema import SamplingConfig
from calm_lightning.errors import CalmError
from calm_lightning.lit.sharding import full_model_on_rank_zero
from calm_lightning.sampling.generate import GenerationConfig, generate


class TemperatureSamples(L.Callback):
    def __init__(self, tokenizer, cfg: SamplingConfig, seed: int, eos_id: int, console: bool = True):
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.seed = seed
        self.eos_id = eos_id
        self.console = console
        self._validations = 0

    def _escape(self, text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ⏎ ")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Runs on every rank (the same decisions everywhere): a sharded model is gathered collectively.
        if trainer.sanity_checking or not self.cfg.prompts or not self.cfg.temperatures:
            return
        self._validations += 1
        if (self._validations - 1) % max(1, self.cfg.every_n_validations):
            return
        with full_model_on_rank_zero(trainer, pl_module) as model:
            if model is not None:
                self._sample(trainer, pl_module, model)

    def _sample(self, trainer: L.Trainer, pl_module: L.LightningModule, model: torch.nn.Module) -> None:
        was_training = model.training
        model.eval()
        prompts = [self.tokenizer.encode(p).ids for p in self.cfg.prompts]
        samples: list[tuple[float, str, str]] = []  # (T, prompt, continuation)
        start = time.perf_counter()
        skipped = 0
        error = ""
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            # A diverged step: the next training step's loss check stops the run with its step; sampling
            # would only fail inside torch.multinomial.
            error = "the model has non-finite weights"
        try:
            for temperature in self.cfg.temperatures if not error else ():
                if time.perf_counter() - start > self.cfg.time_budget_s:
                    skipped += 1
                    continue
                gen = torch.Generator(device=pl_module.device).manual_seed(self.seed)
                gcfg = GenerationConfig(max_new_tokens=self.cfg.max_new_tokens, temperature=temperature,
                                        sampler=self.cfg.sampler, num_candidates=self.cfg.num_candidates,
                                        max_draws=self.cfg.max_draws, eos_id=self.eos_id)
                try:
                    out = generate(model, prompts, gcfg, fill_id=self.eos_id, generator=gen)
                except CalmError as e:  # e.g. prompts longer than the context: a note, not a failed run
                    error = str(e)
                    break
                for text, ids in zip(self.cfg.prompts, out.tokens):
                    samples.append((temperature, text, self.tokenizer.decode(ids)))
        finally:
            model.train(was_training)
        note = f"{skipped} temperature(s) skipped: time budget of {self.cfg.time_budget_s:g}s spent" if skipped else ""
        note = f"no samples: {error}" if error else note
        logger = trainer.logger
        if logger is not None and hasattr(logger, "experiment"):
            logger.experiment.add_text("samples/text", self.markdown(samples, note), global_step=trainer.global_step)
        if self.console:
            from calm_lightning.ui import console

            console.print(self.panel(samples, note, trainer.global_step))

    def markdown(self, samples: list[tuple[float, str, str]], note: str = "") -> str:
        """The TensorBoard text: a markdown table, one row per (temperature, prompt)."""
        rows = ["| T | prompt | continuation |", "|---|---|---|"]
        rows += [f"| {t:g} | {self._escape(p)} | {self._escape(c)} |" for t, p, c in samples]
        if note:
            rows.append(f"\n_{note}_")
        return "\n".join(rows)

    @staticmethod
    def panel(samples: list[tuple[float, str, str]], note: str, step: int):
        """The console view: a rich table in a panel (text shown literally, never as markup)."""
        from rich import box
        from rich.panel import Panel
        from rich.table import Table
        from rich.text import Text

        table = Table(header_style="bold", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, caption=note or None)
        table.add_column("T", justify="right", style="cyan", no_wrap=True)
        table.add_column("prompt", style="bold", overflow="fold")
        table.add_column("continuation", overflow="fold")
        for t, p, c in samples:
            table.add_row(f"{t:g}", Text(p), Text(c.replace("\n", " ⏎ ")))
        return Panel(table, title=f"samples at step {step}", expand=False)
