"""The exported autoencoder: the artefact `make train-ae` writes and `make train-lm` reads.

Layout: ``autoencoder.pt`` (config, weights, tokenizer fingerprint, K, l) and ``autoencoder.json``
(the same metadata plus the SHA-256 of the .pt). Both are written in full to temporary siblings and
fsynced first; then the .pt is renamed into place and the .json right after it. A kill before the
first rename leaves the previous export intact (plus temporary files the next export removes); only
a kill between the two renames, microseconds apart, leaves a .pt that its .json does not describe,
which the checksum then refuses rather than loading. Every load verifies the checksum, so a
truncated or bit-flipped .pt is never used.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from pathlib import Path
from typing import Any

import torch

from calm_lightning.errors import CalmError
from calm_lightning.models.autoencoder import ChunkAutoencoder
from calm_lightning.models.config import AutoencoderConfig
from calm_lightning.utils.io import atomic_open, remove_temp_files, sha256_file

FORMAT = "calm-autoencoder/1"


def _meta_path(path: Path) -> Path:
    return path.with_suffix(".json")


def export_autoencoder(
    model: ChunkAutoencoder,
    path: str | Path,
    *,
    tokenizer_fingerprint: str,
    tokenizer_path: str,
    metrics: dict[str, float],
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
    meta_path = _meta_path(path)
    for leftover in (path, meta_path):  # temporary files of an export that was killed
        remove_temp_files(leftover.parent, glob.escape(leftover.name))
    with atomic_open(meta_path, "w") as meta_file:
        with atomic_open(path, "wb") as weights_file:
            torch.save({**meta, "state_dict": state}, weights_file)
            weights_file.flush()
            meta_file.write(
                json.dumps({**meta, "sha256": sha256_file(weights_file.name)}, indent=2, sort_keys=True)
                + "\n"
            )
            meta_file.flush()
            os.fsync(meta_file.fileno())
        # the .pt is in place here; the .json follows at once
    return path


def read_autoencoder_meta(path: str | Path) -> dict[str, Any]:
    """Metadata of an export, verified against the weights file's checksum."""
    path = Path(path)
    meta_path = _meta_path(path)
    if not path.is_file() or not meta_path.is_file():
        raise CalmError(f"autoencoder export not found at {path}: run `make train-ae` first")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise CalmError(
            f"{meta_path}: unreadable autoencoder metadata ({e}); re-run `make train-ae`"
        ) from None
    if meta.get("format") != FORMAT:
        raise CalmError(
            f"{meta_path}: not a calm-lightning autoencoder export (format {meta.get('format')!r})"
        )
    if sha256_file(path) != meta.get("sha256"):
        raise CalmError(
            f"{path}: checksum mismatch, the export is corrupt or truncated; re-run `make train-ae`"
        )
    return meta


def load_autoencoder(
    path: str | Path,
    *,
    expect_chunk_size: int | None = None,
    expect_latent_size: int | None = None,
    expect_tokenizer: str | None = None,
) -> tuple[ChunkAutoencoder, dict[str, Any]]:
    """Load an export, refusing a K, l or tokenizer that disagrees with what the caller expects. An
    export folder (`export.py`: an autoencoder's, a CALM's or an imported official one) works too."""
    from calm_lightning.export import is_export

    if is_export(path):
        meta = _folder_meta(path)
    else:
        meta = read_autoencoder_meta(path)
    if expect_chunk_size is not None and meta["chunk_size"] != expect_chunk_size:
        raise CalmError(
            f"{path}: autoencoder chunk size K={meta['chunk_size']} but the config has "
            f"model.autoencoder.chunk_size={expect_chunk_size}"
        )
    if expect_latent_size is not None and meta["latent_size"] != expect_latent_size:
        raise CalmError(
            f"{path}: autoencoder latent size l={meta['latent_size']} but the config has "
            f"model.autoencoder.latent_size={expect_latent_size}"
        )
    if expect_tokenizer is not None and meta["tokenizer_fingerprint"] != expect_tokenizer:
        raise CalmError(
            f"{path}: autoencoder was trained with tokenizer {meta['tokenizer_fingerprint'][:12]} "
            f"but the data uses tokenizer {expect_tokenizer[:12]}; retrain it with `make train-ae`"
        )
    if is_export(path):
        from calm_lightning.export import load_autoencoder_folder

        return load_autoencoder_folder(path, verify=False)[0], meta  # _folder_meta verified it
    blob = torch.load(path, map_location="cpu", weights_only=False)
    model = ChunkAutoencoder(AutoencoderConfig(**meta["config"]))
    model.load_state_dict(blob["state_dict"])
    model.eval()
    return model, meta


def _folder_meta(path: str | Path) -> dict[str, Any]:
    """The .pt export's metadata keys, read from an export folder's config.json (checksums verified)."""
    from calm_lightning.export import read_export_meta

    folder = Path(path)
    meta = read_export_meta(folder)
    if meta["kind"] == "calm":
        top, meta = meta, read_export_meta(folder / "autoencoder")
        fingerprint = top["hparams"].get("tokenizer_fingerprint", "")
    else:
        fingerprint = meta["hparams"].get("tokenizer_fingerprint", "")
    if meta["kind"] != "autoencoder":
        raise CalmError(f"{folder}: a {meta['kind']} export holds no autoencoder")
    cfg = meta["hparams"]["autoencoder_config"]
    return {"format": FORMAT, "config": cfg, "chunk_size": cfg["chunk_size"], "latent_size": cfg["latent_size"],
            "vocab_size": cfg["vocab_size"], "tokenizer_fingerprint": fingerprint,
            "tokenizer_path": str(folder / "tokenizer.json"), "metrics": {}}
