"""The Python API: load a trained run and use it without the CLI.

    import calm_lightning
    lm = calm_lightning.load("runs/calm_energy")          # a run, a version folder or a .ckpt
    lm.generate(["ROMEO."], temperature=0.5)              # -> ["...continuation..."]
    lm.brier(["To be, or not to be, that is the question."])  # Brier-n with standard errors
    ae = calm_lightning.load_autoencoder("artifacts/autoencoder.pt")
    mu, sigma = ae.encode(["The king is dead."])[0]      # [L, l] each, one row per K-token chunk
    ae.decode(mu)                                          # -> "The king is dead." (up to chunk padding)

Everything here goes through the same code as the commands (`checkpoints.load_language_model`,
`sampling.text`, `metrics.estimate_brier` + `BrierLM`), so numbers agree with `calm eval`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from calm_lightning.errors import CalmError


@dataclass
class LanguageModel:
    """A loaded CALM or token-baseline checkpoint (``load``)."""

    loaded: Any  # checkpoints.LoadedModel

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def kind(self) -> str:
        return self.loaded.kind

    def generate(
        self,
        prompts: list[str] | str,
        *,
        temperature: float = 1.0,
        max_new_tokens: int = 64,
        sampler: str = "batch",
        num_candidates: int = 200,
        max_draws: int = 4096,
        seed: int = 0,
    ) -> list[str]:
        """Continue each prompt (one batch); returns the new text per prompt."""
        from calm_lightning.sampling.generate import GenerationConfig
        from calm_lightning.sampling.text import sample_text

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, sampler=sampler,
                               num_candidates=num_candidates, max_draws=max_draws)
        return sample_text(self.loaded, prompts, cfg, seed=seed).continuations

    def brier(
        self, texts: list[str] | str, *, max_n: int = 4, num_samples: int = 16, block_size: int = 0, seed: int = 0
    ) -> dict[str, float]:
        """Brier-1..max_n and BrierLM of the texts, with standard errors and 95% intervals.

        Each text (followed by end-of-text) is one evaluation block, cut to whole chunks and to the
        model's context (``block_size`` tokens at most; 0 = the context); texts shorter than two
        chunks are skipped. Returns the `BrierLM` metric's dict (``brier1``, ``brier1_se``, ...).
        """
        from calm_lightning.metrics.brier import BrierLM
        from calm_lightning.metrics.estimators import estimate_brier

        texts = [texts] if isinstance(texts, str) else list(texts)
        K = max(self.loaded.chunk_size, 1)
        limit = block_size or self.model.backbone.cfg.max_seq_len * K
        limit -= limit % K
        metric = BrierLM(max_n=max_n)
        gen = torch.Generator(device=self.loaded.device).manual_seed(seed)
        scored = 0
        with torch.no_grad():
            for text in texts:
                ids = self.tokenizer.encode(text, add_special_tokens=False).ids + [self.loaded.eos_id]
                ids = ids[: min(len(ids) - len(ids) % K, limit)]
                if len(ids) < 2 * K:
                    continue
                tokens = torch.tensor([ids], device=self.loaded.device)
                metric.update(*estimate_brier(self.model, tokens, max_n=max_n, generator=gen, num_samples=num_samples))
                scored += 1
        if not scored:
            raise CalmError(f"no text is at least two chunks ({2 * K} tokens) long; nothing to score")
        return {k: float(v) for k, v in metric.compute().items()}


def load(reference: str | Path, device: str = "auto") -> LanguageModel:
    """A CALM or token-baseline run: ``runs/<name>`` (latest version), ``runs/<name>/version_<n>``, a
    ``.ckpt`` or an export folder (`calm export`, `calm import-official`). The checkpoint carries its
    tokenizer, so it loads on a machine without the data."""
    from calm_lightning.checkpoints import load_language_model

    return LanguageModel(load_language_model(reference, device))


@dataclass
class Autoencoder:
    """A loaded chunk autoencoder (``load_autoencoder``): text <-> latents, one per K tokens."""

    model: Any  # models.ChunkAutoencoder, eval mode
    tokenizer: Any
    eos_id: int

    @property
    def chunk_size(self) -> int:
        return self.model.chunk_size

    def chunk_ids(self, text: str) -> torch.Tensor:
        """The text's token ids as chunks [L, K], padded with end-of-text to whole chunks (>= 1 chunk)."""
        K = self.chunk_size
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        ids += [self.eos_id] * (-len(ids) % K or (K if not ids else 0))
        return torch.tensor(ids, dtype=torch.long).view(-1, K)  # [L, K]

    def encode_chunks(
        self, chunks: torch.Tensor, *, batch_size: int = 4096, progress: Callable[[int], None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior of token chunks [L, K] -> (mu, sigma), each [L, l] float32 on the CPU, in batches
        of ``batch_size`` chunks (``progress(n)`` after each with the chunks done)."""
        device = next(self.model.parameters()).device
        mus, sigmas = [], []
        with torch.no_grad():
            for start in range(0, chunks.shape[0], batch_size):
                mu, log_sigma = self.model.encode(chunks[start : start + batch_size].to(device))
                mus.append(mu.float().cpu())
                sigmas.append(log_sigma.float().exp().cpu())
                if progress is not None:
                    progress(min(start + batch_size, chunks.shape[0]))
        if not mus:
            empty = torch.zeros(0, self.model.latent_size)
            return empty, empty.clone()
        return torch.cat(mus), torch.cat(sigmas)

    def encode(self, texts: list[str] | str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Posterior (mu, sigma), each [L, l], per text; the text is padded with end-of-text to whole chunks."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        return [self.encode_chunks(self.chunk_ids(text)) for text in texts]

    def decode_ids(self, latents: torch.Tensor, *, batch_size: int = 4096) -> list[int]:
        """Latents [L, l] -> token ids [L * K] (argmax of every chunk), decoded in batches."""
        device = next(self.model.parameters()).device
        out: list[int] = []
        with torch.no_grad():
            for start in range(0, latents.shape[0], batch_size):
                out += self.model.decode(latents[start : start + batch_size].to(device)).flatten().tolist()
        return out

    def decode(self, latents: torch.Tensor) -> str:
        """Latents [L, l] -> text (argmax tokens of every chunk, end-of-text padding dropped)."""
        ids = self.decode_ids(latents)
        while ids and ids[-1] == self.eos_id:
            ids.pop()
        return self.tokenizer.decode(ids)


def load_autoencoder(reference: str | Path, device: str = "cpu") -> Autoencoder:
    """An autoencoder and its tokenizer: the export `make train-ae` writes (``artifacts/autoencoder.pt``
    with its ``.json``), an export folder (an autoencoder's, or a CALM export's own autoencoder) or an
    autoencoder run (``runs/ae``, a version folder or a ``.ckpt``)."""
    from calm_lightning.artifacts import load_autoencoder as load_export
    from calm_lightning.data.tokenizer import load_tokenizer, special_ids
    from calm_lightning.export import is_export, load_autoencoder_folder

    path = Path(reference)
    if is_export(path):
        model, tokenizer = load_autoencoder_folder(path)
        if tokenizer is None:
            raise CalmError(f"{path}: the export has no tokenizer.json")
        return Autoencoder(model.to(device).eval(), tokenizer, special_ids(tokenizer).eos)
    if path.suffix != ".pt":
        from calm_lightning.checkpoints import read_checkpoint

        ckpt = read_checkpoint(path)
        if ckpt.kind != "autoencoder":
            raise CalmError(f"{ckpt.path} is a {ckpt.kind} checkpoint, not an autoencoder")
        tokenizer = ckpt.tokenizer()
        return Autoencoder(ckpt.build_module().model.to(device).eval(), tokenizer, special_ids(tokenizer).eos)
    model, meta = load_export(path)
    tok_path = Path(meta.get("tokenizer_path", ""))
    if not tok_path.is_file():
        raise CalmError(f"{path}: its tokenizer {tok_path} is missing; re-run make train-ae or prepare the data")
    tokenizer = load_tokenizer(tok_path)
    return Autoencoder(model.to(device).eval(), tokenizer, special_ids(tokenizer).eos)
