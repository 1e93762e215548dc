"""The exported autoencoder: the artefact `make train-ae` writes and `make train-lm` reads.

Layout: ``autoencoder.pt`` (config, weights, tokenizer fingerprint, K, l) written atomically, then
``autoencoder.json`` (the same metadata plus the SHA-256 of the .pt) written last, so a reader that
finds a valid .json never reads a partial or corrupt .pt.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from calm_lightning.errors import CalmError
from calm_lightning.models.autoencoder import ChunkAutoencoder
from calm_lightning.models.config import AutoencoderConfig
from calm_lightning.utils.io import atomic_torch_save, atomic_write_json, sha256_file

FORMAT = "calm-autoencoder/1"


def _meta_path(path: Path) -> Path:
    return path.with_suffix(".json")


def export_autoencoder(
    model: ChunkAutoencoder, path: str | Path, *, tokenizer_fingerprint: str, tokenizer_path: str, metrics: dict[str, float]
) -> Path:
    path = Path(path)
    meta = {
        "format": FORMAT,
        "config": dataclasses.asdict(model.cfg),
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "tokenizer_path": str(tokenizer_path),
        "chunk_size": model.chunk_size,
        "latent_size": model.latent_size,
        "vocab_size": model.cfg.vocab_size,
        "metrics": metrics,
    }
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save({**meta, "state_dict": state}, path)
    atomic_write_json(_meta_path(path), {**meta, "sha256": sha256_file(path)})
    return path


def read_autoencoder_meta(path: str | Path) -> dict[str, Any]:
    """Metadata of an export, verified against the weights file's checksum."""
    path = Path(path)
    meta_path = _meta_path(path)
    if not path.is_file() or not meta_path.is_file():
        raise CalmError(f"autoencoder export not found at {path}: run `make train-ae` first")
    import json

    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise CalmError(f"{meta_path}: unreadable autoencoder metadata ({e}); re-run `make train-ae`") from None
    if meta.get("format") != FORMAT:
        raise CalmError(f"{meta_path}: not a calm-lightning autoencoder export (format {meta.get('format')!r})")
    if sha256_file(path) != meta.get("sha256"):
        raise CalmError(f"{path}: checksum mismatch, the export is corrupt or truncated; re-run `make train-ae`")
    return meta


def load_autoencoder(path: str | Path, *, expect_chunk_size: int | None = None, expect_latent_size: int | None = None,
                     expect_tokenizer: str | None = None) -> tuple[ChunkAutoencoder, dict[str, Any]]:
    """Load an export, refusing a K, l or tokenizer that disagrees with what the caller expects."""
    meta = read_autoencoder_meta(path)
    if expect_chunk_size is not None and meta["chunk_size"] != expect_chunk_size:
        raise CalmError(f"{path}: autoencoder chunk size K={meta['chunk_size']} but the config has "
                        f"model.autoencoder.chunk_size={expect_chunk_size}")
    if expect_latent_size is not None and meta["latent_size"] != expect_latent_size:
        raise CalmError(f"{path}: autoencoder latent size l={meta['latent_size']} but the config has "
                        f"model.autoencoder.latent_size={expect_latent_size}")
    if expect_tokenizer is not None and meta["tokenizer_fingerprint"] != expect_tokenizer:
        raise CalmError(f"{path}: autoencoder was trained with tokenizer {meta['tokenizer_fingerprint'][:12]} "
                        f"but the data uses tokenizer {expect_tokenizer[:12]}; retrain it with `make train-ae`")
    blob = torch.load(path, map_location="cpu", weights_only=False)
    model = ChunkAutoencoder(AutoencoderConfig(**meta["config"]))
    model.load_state_dict(blob["state_dict"])
    model.eval()
    return model, meta
