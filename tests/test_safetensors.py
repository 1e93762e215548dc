"""Our safetensors reader/writer: round trips, the byte layout, and refusal of damaged files."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from calm_lightning.errors import CalmError
from calm_lightning.utils.safetensors import load_file, read_metadata, save_file


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g)
    return {
        "f64": torch.randn(2, 3, generator=g, dtype=torch.float64),
        "f32": x,
        "f16": torch.randn(4, generator=g).half(),
        "bf16": torch.randn(2, 2, 2, generator=g).bfloat16(),
        "i64": torch.tensor([-(2**62), 0, 2**62 + 5]),
        "i32": torch.arange(-6, 6, dtype=torch.int32).view(3, 4),
        "i16": torch.tensor([-300, 7], dtype=torch.int16),
        "i8": torch.tensor([-128, 127, 0], dtype=torch.int8),
        "u8": torch.tensor([0, 200, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 4),
        "transposed_view": x.t(),  # shares x's storage, not contiguous
        "row_view": x[1],  # shares x's storage, an offset into it
    }


def test_round_trip_every_dtype(tmp_path):
    tensors = _tensors()
    path = tmp_path / "m.safetensors"
    save_file(tensors, path, metadata={"format": "pt", "note": "ünïcode"})
    back = load_file(path)
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype, name
        assert back[name].shape == t.shape, name
        assert torch.equal(back[name], t), name
    assert read_metadata(path) == {"format": "pt", "note": "ünïcode"}
    # each tensor owns its memory: changing one leaves the others alone
    back["f32"].zero_()
    assert torch.equal(back["row_view"], tensors["row_view"])


def test_header_padded_to_eight_and_data_tiles_the_buffer(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(_tensors(), path)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    text = raw[8 : 8 + n].decode()
    assert text.rstrip(" ").endswith("}")  # padding, if any, is spaces
    header = json.loads(text)
    assert "__metadata__" not in header  # none given
    spans = sorted(v["data_offsets"] for v in header.values())
    assert spans[0][0] == 0 and spans[-1][1] == len(raw) - 8 - n
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    for v in header.values():  # each tensor aligned to its element size
        size = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}.get(v["dtype"], 1)
        assert v["data_offsets"][0] % size == 0


HAND_HEADER = b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"I8","shape":[],"data_offsets":[8,9]}}'


def _handmade(header: bytes = HAND_HEADER) -> bytes:
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + struct.pack("<2f", 1.5, -2.0) + bytes([7])


def test_reads_a_hand_built_file_and_writes_the_same_bytes(tmp_path):
    path = tmp_path / "hand.safetensors"
    path.write_bytes(_handmade())
    back = load_file(path)
    assert torch.equal(back["a"], torch.tensor([1.5, -2.0]))
    assert back["b"].shape == () and back["b"].dtype == torch.int8 and back["b"].item() == 7
    ours = tmp_path / "ours.safetensors"
    save_file({"b": torch.tensor(7, dtype=torch.int8), "a": torch.tensor([1.5, -2.0])}, ours)
    assert ours.read_bytes() == _handmade()


@pytest.mark.parametrize("cut", [3, 8, 20, -1])
def test_truncated_file_is_refused(tmp_path, cut):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(_handmade()[:cut])
    with pytest.raises(CalmError) as e:
        load_file(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_corrupt_headers_are_refused(tmp_path):
    good = _handmade()
    (n,) = struct.unpack("<Q", good[:8])
    cases = {
        "not_json": good[:8] + b"x" * n + good[8 + n :],
        "bad_dtype": good.replace(b'"I8"', b'"Q8"'),
        "bad_offsets": good.replace(b"[8,9]", b"[7,8]"),
        "trailing": good + b"\0",
        "huge_length": struct.pack("<Q", 2**40) + good[8:],
        # c lies inside a: the spans still end at the data's length, but they overlap
        "overlap": _handmade(HAND_HEADER[:-1] + b',"c":{"dtype":"I8","shape":[],"data_offsets":[4,5]}}'),
        "not_an_object": _handmade(b"[1, 2]"),
        "bad_metadata": _handmade(HAND_HEADER[:-1] + b',"__metadata__":{"k":1}}'),
    }
    for name, raw in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(raw)
        with pytest.raises(CalmError, match="not a valid safetensors file"):
            load_file(path)
    with pytest.raises(CalmError, match="cannot read"):
        load_file(tmp_path / "missing.safetensors")


def test_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(2)}, path)
    before = path.read_bytes()

    def boom(_t):
        raise RuntimeError("disk full")

    monkeypatch.setattr("calm_lightning.utils.safetensors._raw_bytes", boom)
    with pytest.raises(RuntimeError):
        save_file({"a": torch.zeros(2)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left
