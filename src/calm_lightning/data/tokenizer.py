"""Byte-level BPE tokenizers: train one on the train split, or load the user's ``tokenizer.json``.

Our special tokens are ``<|bos|>``, ``<|eos|>``, ``<|pad|>`` and ``<|mask|>``. A trained tokenizer
has them at ids 0-3. A user tokenizer that lacks ``<|eos|>`` reuses its own end-of-text token if it
has one of ``EOS_FALLBACKS`` (so the model's EOS is the one that tokenizer was built around); every
other missing special is appended as a new added token, which grows the vocabulary.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from calm_lightning.data.corpus import Document
from calm_lightning.errors import CalmError
from calm_lightning.utils.io import atomic_write_text, remove_temp_files, sha256_file

BOS, EOS, PAD, MASK = "<|bos|>", "<|eos|>", "<|pad|>", "<|mask|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, MASK)
EOS_FALLBACKS = ("</s>", "<|end_of_text|>", "<|endoftext|>")
# Bumped when the training recipe changes, so cached tokenizers from the old recipe are not reused.
TOKENIZER_RECIPE = "bytelevel-bpe-v1"
# Beside a cached tokenizer.json: its SHA-256 in `sha256sum` format, so `sha256sum -c` checks it too.
CHECKSUM_NAME = "tokenizer.sha256"


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids of the special tokens."""

    bos: int
    eos: int
    pad: int
    mask: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def train_tokenizer(docs: Sequence[Document], vocab_size: int, min_frequency: int) -> Tokenizer:
    """A byte-level BPE trained on ``docs`` (the train split), specials first, exact round trip."""
    tok = Tokenizer(models.BPE())
    # No normaliser and no prefix space: decode(encode(text)) must give back the text byte for byte.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 byte symbols, seen or not, so any later text can be encoded.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((d.text for d in docs), trainer=trainer, length=len(docs))
    return tok


def save_tokenizer(tok: Tokenizer, path: str | Path) -> Path:
    """Write ``tokenizer.json`` atomically; returns the path."""
    path = Path(path)
    atomic_write_text(path, tok.to_str(pretty=True))
    return path


def save_cached_tokenizer(tok: Tokenizer, path: str | Path) -> str:
    """`save_tokenizer` into the data cache, then its checksum file beside it (`load_cached_tokenizer`).
    Returns the file's sha256, which is the tokenizer's fingerprint."""
    path = Path(path)
    remove_temp_files(path.parent)  # of a writer killed before
    path = save_tokenizer(tok, path)
    digest = sha256_file(path)
    _write_checksum(path, digest)
    return digest


def load_cached_tokenizer(path: str | Path) -> tuple[Tokenizer, str]:
    """Load a tokenizer of the data cache after checking it against ``tokenizer.sha256``; returns it
    with the file's sha256 (its fingerprint, so the caller need not hash the file again).

    A tokenizer that still parses after a bit flip would give other token ids (and a new fingerprint,
    so new shards) without complaint; the checksum written beside it catches that. A missing checksum
    file (a cache from before checksums, or a kill between the two atomic writes, when the json is
    complete) is written from the file as it is.
    """
    path = Path(path)
    digest = sha256_file(path)
    checksum = path.with_name(CHECKSUM_NAME)
    try:
        recorded = checksum.read_text(encoding="utf-8").split()
    except FileNotFoundError:
        recorded = None
    if recorded is not None and recorded[:1] != [digest]:
        raise CalmError(
            f"{path}: checksum differs from {checksum.name}, the cached tokenizer is corrupt; "
            f"delete {path.parent} and prepare again"
        )
    try:
        tok = load_tokenizer(path)
    except CalmError as e:
        raise CalmError(f"{e}; delete {path.parent} and prepare again") from None
    if recorded is None:
        _write_checksum(path, digest)
    return tok, digest


def _write_checksum(path: Path, digest: str) -> None:
    atomic_write_text(path.with_name(CHECKSUM_NAME), f"{digest}  {path.name}\n")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a ``tokenizer.json``; CalmError naming the file if it is missing or unreadable."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CalmError(f"tokenizer not found: {path}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for any parse failure
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CalmError(f"{path}: not a valid tokenizer.json ({first})") from None


def tokenizer_fingerprint(path: str | Path) -> str:
    """sha256 of the tokenizer.json bytes."""
    return sha256_file(path)


def special_ids(tok: Tokenizer) -> SpecialTokens:
    """Ids of our specials (with the EOS fallbacks); CalmError if one is missing."""
    eos = _eos_token(tok)
    ids = {}
    for field, token in (("bos", BOS), ("eos", eos), ("pad", PAD), ("mask", MASK)):
        i = tok.token_to_id(token) if token is not None else None
        if i is None:
            raise CalmError(
                f"tokenizer has no {token or EOS} token (add the specials with with_special_tokens)"
            )
        ids[field] = i
    return SpecialTokens(**ids)


def with_special_tokens(tok: Tokenizer) -> tuple[Tokenizer, bool]:
    """Add whatever specials ``tok`` lacks (see the module docstring); returns (tok, changed)."""
    missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
    if EOS in missing and _eos_token(tok) is not None:
        missing.remove(EOS)
    if missing:
        tok.add_special_tokens(missing)
    return tok, bool(missing)


def vocab_size(tok: Tokenizer) -> int:
    """Rows an embedding needs: one past the largest id (added tokens included)."""
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


def tokenizer_key(train_fingerprint: str, vocab: int, min_frequency: int) -> str:
    """Names the cache folder of a trained tokenizer: what it was trained on and how."""
    spec = json.dumps([TOKENIZER_RECIPE, train_fingerprint, vocab, min_frequency])
    return hashlib.sha256(spec.encode()).hexdigest()


def _eos_token(tok: Tokenizer) -> str | None:
    for token in (EOS, *EOS_FALLBACKS):
        if tok.token_to_id(token) is not None:
            return token
    return None
