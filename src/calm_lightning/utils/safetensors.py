"""Reader and writer of the safetensors file format, written here so the package is no dependency.

Layout of a file (all integers little-endian):
    [8 bytes] N, the header's length in bytes (unsigned 64-bit)
    [N bytes] UTF-8 JSON object: {name: {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]},
              ..., "__metadata__": {str: str}} (metadata optional), padded with spaces so that the
              data that follows starts at a multiple of 8 bytes
    [rest]    the tensors' raw little-endian bytes, C order; offsets are relative to the start of this
              buffer and the tensors tile it exactly (no gaps, no overlaps, nothing left over).
The writer orders tensors by dtype (``_WRITE_ORDER``: element size never grows along it) then name, so
each one starts aligned to its element size; it is the reference implementation's order, so for the same
tensors and metadata the file is byte-identical to the one the safetensors package writes.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import torch

from calm_lightning.errors import CalmError
from calm_lightning.utils.io import atomic_open

METADATA_KEY = "__metadata__"
HEADER_ALIGN = 8
MAX_HEADER_BYTES = 100_000_000  # the reference implementation's limit: a larger header is corruption

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# Newer dtypes, where this torch has them.
for _code, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
                     ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _DTYPES[_code] = getattr(torch, _attr)
_CODES = {dtype: code for code, dtype in _DTYPES.items()}
_WRITE_ORDER = ("U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16",
                "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL")


def _check_host() -> None:
    if sys.byteorder != "little":
        raise CalmError("safetensors files are little-endian; this reader/writer supports little-endian hosts only")


def _raw_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's elements as bytes, C order: a contiguous copy if it is a view of shared storage."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)  # [numel]; 0-d and empty tensors too
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def save_file(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Write ``tensors`` (and string ``metadata``) to ``path`` atomically (temp sibling, fsync, rename).

    Tensors that share storage (ties, views) are each written in full.
    """
    _check_host()
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("safetensors metadata must map str to str")
    for name, t in tensors.items():
        if not isinstance(name, str) or name == METADATA_KEY:
            raise ValueError(f"invalid tensor name {name!r}")
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: not a tensor ({type(t).__name__})")
        if t.dtype not in _CODES:
            raise ValueError(f"{name}: dtype {t.dtype} has no safetensors code")
    order = sorted(tensors, key=lambda n: (_WRITE_ORDER.index(_CODES[tensors[n].dtype]), n))
    header: dict[str, object] = {}
    if metadata:
        header[METADATA_KEY] = dict(metadata)
    offset = 0
    for name in order:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % HEADER_ALIGN)
    with atomic_open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in order:
            f.write(_raw_bytes(tensors[name]))


def _read_header(f, path: Path, file_size: int) -> tuple[dict, int]:
    """Parse and check the header; returns (header without metadata, data length). CalmError if bad."""
    def bad(why: str) -> CalmError:
        return CalmError(f"{path}: not a valid safetensors file ({why})")

    prefix = f.read(8)
    if len(prefix) < 8:
        raise bad("shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", prefix)
    if n > MAX_HEADER_BYTES or 8 + n > file_size:
        raise bad(f"header length {n} exceeds the file's {file_size} bytes")
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    metadata = header.pop(METADATA_KEY, {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("__metadata__ must map str to str")
    data_len = file_size - 8 - n
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"entry {name!r} needs exactly dtype, shape, data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _DTYPES:
            raise bad(f"{name}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise bad(f"{name}: shape must be a list of non-negative ints, got {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise bad(f"{name}: data_offsets must be [begin, end]")
        numel = 1
        for s in shape:
            numel *= s
        begin, end = offsets
        if end - begin != numel * _DTYPES[dtype].itemsize:
            raise bad(f"{name}: data_offsets {offsets} do not hold shape {shape} of {dtype}")
        spans.append((begin, end, name))
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            raise bad(f"{name}: data_offsets start at {begin}, expected {pos} (gap or overlap)")
        pos = end
    if pos != data_len:
        raise bad(f"tensor data is {data_len} bytes, the header describes {pos} (truncated or trailing bytes)")
    header[METADATA_KEY] = metadata
    return header, data_len


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The file's ``__metadata__`` (empty if it has none), after checking the header."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            header, _ = _read_header(f, path, os.fstat(f.fileno()).st_size)
    except OSError as e:
        raise CalmError(f"{path}: cannot read ({e.strerror or e})") from None
    return dict(header[METADATA_KEY])


def load_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, on the CPU, each owning its memory.

    CalmError (one line naming the file) if the file is missing, truncated or its header is corrupt.
    """
    _check_host()
    path = Path(path)
    try:
        with open(path, "rb") as f:
            header, data_len = _read_header(f, path, os.fstat(f.fileno()).st_size)
            data = bytearray(data_len)
            if f.readinto(data) != data_len:
                raise CalmError(f"{path}: not a valid safetensors file (truncated while reading)")
    except OSError as e:
        raise CalmError(f"{path}: cannot read ({e.strerror or e})") from None
    header.pop(METADATA_KEY)
    out = {}
    for name, info in header.items():
        dtype, shape = _DTYPES[info["dtype"]], info["shape"]
        begin, end = info["data_offsets"]
        if begin == end:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        flat = torch.frombuffer(data, dtype=torch.uint8, count=end - begin, offset=begin)
        out[name] = flat.clone().view(dtype).reshape(shape)  # clone: aligned memory of its own
    return out
