"""Checkpoint writes that are atomic: a kill mid-write never leaves a truncated ``last.ckpt``.

A kill does leave ``.<name>.ckpt.<random>.tmp`` behind; nothing reads such a file (resume and
``calm eval`` open ``last.ckpt``), and the next save into the folder deletes it. Only rank 0 saves,
one checkpoint at a time, so no live write is ever removed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO

from calm_lightning.utils.io import atomic_torch_save, remove_temp_files


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        remove_temp_files(path.parent, "*.ckpt")
        atomic_torch_save(checkpoint, path)
