"""Latent files of `calm encode` / `calm decode`: the posterior (mu, sigma) of every K-token chunk.

* ``.safetensors``: tensors ``mu`` [L, l], ``sigma`` [L, l] (float32), ``tokens`` [L, K] (the encoded
  ids) and ``offsets`` [n + 1] (int64: text i is chunks ``offsets[i]:offsets[i+1]``), and metadata
  (``chunk_size``, ``latent_size``, ``source``).
* ``.npy``: one float32 array [L, 2, l] (``[:, 0]`` mu, ``[:, 1]`` sigma); it keeps no text boundaries,
  so `calm decode` reads it as one text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from calm_lightning.errors import CalmError

SUFFIXES = (".safetensors", ".npy")


@dataclass
class Latents:
    mu: torch.Tensor  # [L, l]
    sigma: torch.Tensor  # [L, l]
    offsets: torch.Tensor  # [n + 1] chunk offsets of the n texts
    tokens: torch.Tensor | None = None  # [L, K] ids that were encoded, when known
    meta: dict[str, str] | None = None

    def texts(self) -> list[tuple[int, int]]:
        o = self.offsets.tolist()
        return list(zip(o[:-1], o[1:], strict=True))


def check_suffix(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise CalmError(f"{path}: latents are written as .safetensors or .npy, not {path.suffix or 'no suffix'!r}")
    return path


def save_latents(path: str | Path, latents: Latents) -> Path:
    from calm_lightning.utils.io import atomic_open

    path = check_suffix(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        import numpy as np

        with atomic_open(path, "wb") as f:
            np.save(f, torch.stack([latents.mu, latents.sigma], dim=1).float().numpy())
        return path
    from calm_lightning.utils.safetensors import save_file

    tensors = {"mu": latents.mu.float(), "sigma": latents.sigma.float(), "offsets": latents.offsets.long()}
    if latents.tokens is not None:
        tensors["tokens"] = latents.tokens.long()
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=latents.meta or {})
    return path


def load_latents(path: str | Path) -> Latents:
    path = check_suffix(path)
    if not path.is_file():
        raise CalmError(f"latents file not found: {path}")
    if path.suffix == ".npy":
        import numpy as np

        try:
            array = torch.from_numpy(np.load(path, allow_pickle=False))
        except (OSError, ValueError) as e:
            raise CalmError(f"{path}: unreadable .npy ({e})") from None
        if array.ndim == 2:  # mu only [L, l]
            array = torch.stack([array, torch.zeros_like(array)], dim=1)
        if array.ndim != 3 or array.shape[1] != 2:
            raise CalmError(f"{path}: expected an array [L, 2, l] (mu, sigma) or [L, l] (mu), got {list(array.shape)}")
        array = array.float()
        return Latents(array[:, 0], array[:, 1], torch.tensor([0, array.shape[0]]))
    from calm_lightning.utils.safetensors import load_file, read_metadata

    tensors = load_file(path)
    if "mu" not in tensors:
        raise CalmError(f"{path}: no 'mu' tensor (is it a calm encode file?)")
    mu = tensors["mu"].float()
    sigma = tensors.get("sigma", torch.zeros_like(mu)).float()
    offsets = tensors.get("offsets", torch.tensor([0, mu.shape[0]])).long()
    return Latents(mu, sigma, offsets, tensors.get("tokens"), read_metadata(path))
