"""Atomic file writes and integrity checks.

A write goes to a temporary sibling ``.<name>.<random>.tmp``, is fsynced, then renamed over the
target, so a reader sees either the old file or the complete new one, never a partial write, even if
the process is killed mid-write. A kill does leave the temporary file behind; its name never matches
a real artefact (readers look for ``last.ckpt``, ``train.bin``, ...), and the next writer of the
same folder removes it with `remove_temp_files`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

TEMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; rename it over ``path`` on success only.

    The yielded file's ``name`` is the temporary path, so the caller can read back what it wrote.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_temp_files(folder: str | os.PathLike, name: str = "*") -> list[Path]:
    """Delete the temporary files a killed `atomic_open` left for ``name`` (a glob) in ``folder``.

    Only for a folder no other live process is writing to (one run, one cache entry, one export).
    """
    removed = []
    for tmp in Path(folder).glob(f".{name}.*{TEMP_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed.append(tmp)
    return removed


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def torch_file_problem(path: str | os.PathLike) -> str | None:
    """What is wrong with a ``torch.save`` file (a zip archive), or None if it is intact.

    ``torch.load`` checks neither the archive's CRC-32s nor, with ``mmap=True``, that the tensor
    data is all there: a truncated or bit-flipped checkpoint can load with wrong weights. Checking
    every member's CRC-32 reads the file once (GB/s, well under a second for our checkpoints).
    """
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except Exception as e:  # noqa: BLE001 - whatever a damaged archive raises, it is damaged
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"not a complete archive: {first}"
    return f"CRC mismatch in {bad}" if bad is not None else None
