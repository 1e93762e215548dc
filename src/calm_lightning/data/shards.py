"""Token shards: one flat array of token ids per split on disk, read back as a memory map.

Layout of a shard folder: ``train.bin`` and ``val.bin`` (every document's tokens followed by the EOS
id, native byte order, uint16 when the vocabulary fits, else uint32) and ``meta.json``. The write
order is the commit protocol: the old ``meta.json`` is removed first, each ``.bin`` is written to a
temporary file and renamed, and ``meta.json`` comes last. A reader trusts a ``.bin`` only if a valid
``meta.json`` lists it with the matching size, so a crash at any point leaves either a complete
folder or one without ``meta.json`` that the next preparation rebuilds.

Integrity: ``meta.json`` records each shard's size, SHA-256 (computed while writing, so free) and
modification time. Opening the data (`verify_shards`) always checks the sizes (a truncated shard),
and checks the SHA-256 of every shard up to ``HASH_ALWAYS_BYTES`` (a bit flip; ~0.5 s for 128 MiB
on a slow CPU) and of a larger shard whenever its modification time differs from the recorded one
(it was written to since). A large shard whose bytes rot without a write is therefore only caught by
``calm prepare``, which checks every hash (``level="full"``): re-hashing GBs on every start would
cost more than it is worth. Folders of the previous format (no hashes) are rebuilt once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from calm_lightning.data.corpus import Document
from calm_lightning.errors import CalmError
from calm_lightning.utils.io import atomic_open, atomic_write_json, remove_temp_files, sha256_file

META_NAME = "meta.json"
SHARD_FORMAT = 2  # bumped when the layout or the meaning of a field changes (2: sha256 and mtime per split)
# Shards up to this size are hashed every time the data is opened; larger ones see `verify_shards`.
HASH_ALWAYS_BYTES = 128 << 20
SPLITS = ("train", "val")
# Characters handed to one encode_batch call: big enough to keep the tokenizer's threads busy,
# small enough for the progress bar to move and memory to stay flat.
BATCH_CHARS = 1 << 20


def shard_dtype(vocab: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def _batches(docs: Sequence[Document], batch_chars: int) -> Iterator[list[Document]]:
    batch: list[Document] = []
    size = 0
    for doc in docs:
        batch.append(doc)
        size += len(doc.text)
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def encode_documents(
    tok: Tokenizer, docs: Sequence[Document], eos_id: int, dtype: np.dtype, batch_chars: int = BATCH_CHARS
) -> Iterator[tuple[np.ndarray, int]]:
    """Yield (ids of a batch of documents, each followed by ``eos_id``; characters covered)."""
    specials = [t.content for t in tok.get_added_tokens_decoder().values() if t.special]
    # The offsets that encode_batch also computes are not needed here.
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    previous = tok.encode_special_tokens
    try:
        for batch in _batches(docs, batch_chars):
            texts = [d.text for d in batch]
            # Corpus text that happens to spell "<|eos|>" must stay text, not become a control
            # token; the switch doubles encoding time, so only batches that need it pay for it.
            tok.encode_special_tokens = any(s in text for text in texts for s in specials)
            encodings = encode(texts, add_special_tokens=False)
            lengths = [len(e.ids) + 1 for e in encodings]
            ids = np.empty(sum(lengths), dtype=dtype)
            start = 0
            for enc, n in zip(encodings, lengths):
                ids[start : start + n - 1] = enc.ids
                ids[start + n - 1] = eos_id
                start += n
            yield ids, sum(len(t) for t in texts)
    finally:
        tok.encode_special_tokens = previous


def write_shards(
    out_dir: str | Path,
    splits: dict[str, Sequence[Document]],
    tok: Tokenizer,
    *,
    eos_id: int,
    vocab: int,
    info: dict[str, Any],
    quiet: bool = False,
) -> dict[str, Any]:
    """Tokenize each split into ``<split>.bin`` and commit with ``meta.json``; returns the meta.

    ``info`` (fingerprints, special ids, ...) is stored in the meta as given.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (out_dir / META_NAME).unlink()
    remove_temp_files(out_dir)  # left by a killed writer
    dtype = shard_dtype(vocab)
    total_chars = sum(len(d.text) for docs in splits.values() for d in docs)
    split_meta: dict[str, dict[str, int | str]] = {}
    with _progress(quiet, total_chars) as advance:
        for split, docs in splits.items():
            n_tokens = 0
            digest = hashlib.sha256()
            path = out_dir / f"{split}.bin"
            with atomic_open(path, "wb") as f:
                for ids, chars in encode_documents(tok, docs, eos_id, dtype):
                    data = ids.tobytes()
                    f.write(data)
                    digest.update(data)
                    n_tokens += len(ids)
                    advance(split, chars)
            split_meta[split] = {
                "file": path.name,
                "tokens": n_tokens,
                "documents": len(docs),
                "text_bytes": sum(len(d.text.encode("utf-8")) for d in docs),
                "sha256": digest.hexdigest(),
                "mtime_ns": os.stat(path).st_mtime_ns,
            }
    text_tokens = sum(int(m["tokens"]) - int(m["documents"]) for m in split_meta.values())
    text_bytes = sum(int(m["text_bytes"]) for m in split_meta.values())
    meta = {
        **info,
        "format": SHARD_FORMAT,
        "dtype": dtype.name,
        "vocab_size": vocab,
        "splits": split_meta,
        # EOS separators are not text, so they are left out of the compression figure.
        "bytes_per_token": round(text_bytes / max(text_tokens, 1), 4),
    }
    atomic_write_json(out_dir / META_NAME, meta)
    return meta


def read_meta(out_dir: str | Path) -> dict[str, Any] | None:
    """The committed meta, or None when there is none (never written, crashed, or another format)."""
    path = Path(out_dir) / META_NAME
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != SHARD_FORMAT:
        return None
    return meta


def verify_shards(out_dir: str | Path, meta: dict[str, Any], level: str = "auto") -> dict[str, Path]:
    """Paths of the split shards after checking them against the meta; CalmError naming a bad one.

    ``level``: "size" checks sizes only (right after writing), "auto" also the SHA-256 of small or
    since-modified shards (see the module docstring), "full" of every shard, and then records the
    current modification times so that a copied cache is not re-hashed on every start.
    """
    out_dir = Path(out_dir)
    itemsize = np.dtype(meta["dtype"]).itemsize
    paths = {}
    touched = False
    for split, m in meta["splits"].items():
        path = out_dir / m["file"]
        expected = int(m["tokens"]) * itemsize
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            raise CalmError(
                f"{path}: shard missing although {out_dir / META_NAME} lists it; "
                f"delete {out_dir} and prepare again"
            ) from None
        if stat.st_size != expected:
            raise CalmError(
                f"{path}: shard has {stat.st_size} bytes, {META_NAME} says {expected} "
                f"(truncated or modified); delete {out_dir} and prepare again"
            )
        modified = stat.st_mtime_ns != m.get("mtime_ns")
        if level == "full" or (level == "auto" and (stat.st_size <= HASH_ALWAYS_BYTES or modified)):
            if sha256_file(path) != m["sha256"]:
                raise CalmError(
                    f"{path}: shard checksum differs from {META_NAME} (corrupt or modified); "
                    f"delete {out_dir} and prepare again"
                )
            if level == "full" and modified:
                m["mtime_ns"], touched = stat.st_mtime_ns, True
        paths[split] = path
    if touched:
        atomic_write_json(out_dir / META_NAME, meta)
    return paths


def open_shard(path: str | Path, dtype: str | np.dtype, n_tokens: int) -> np.memmap:
    """Read-only memory map of a shard holding ``n_tokens`` ids."""
    return np.memmap(path, dtype=np.dtype(dtype), mode="r", shape=(n_tokens,))


@contextlib.contextmanager
def _progress(quiet: bool, total: int) -> Iterator[Any]:
    if quiet:
        yield lambda split, chars: None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (
        TextColumn("tokenizing {task.fields[split]}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task("tokenize", total=total, split="")
        yield lambda split, chars: progress.update(task, advance=chars, split=split)
