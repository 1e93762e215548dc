"""Every user-facing data/artefact failure through the real CLI: one line on stderr, exit code 2."""

from __future__ import annotations

import os

import pytest
import torch

from calm_lightning.artifacts import export_autoencoder, load_autoencoder
from calm_lightning.cli import main
from calm_lightning.models.autoencoder import ChunkAutoencoder
from calm_lightning.models.config import AutoencoderConfig


def prepare(tmp_path, capsys, *overrides):
    config = tmp_path / "exp.yaml"
    config.write_text("# test\n")
    capsys.readouterr()
    rc = main(
        [
            "prepare",
            str(config),
            f"data.cache_dir={tmp_path / 'cache'}",
            "tokenizer.vocab_size=300",
            "data.block_size=32",
            *overrides,
        ]
    )
    _, err = capsys.readouterr()
    return rc, err


def write_docs(folder, n=6, words=400):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"d{i}.txt").write_text(" ".join(f"w{(i * 7 + j) % 50}" for j in range(words)) + "\n")
    return folder


def assert_one_line(rc, err, needle):
    assert rc == 2, err
    assert needle in err
    assert err.strip().count("\n") == 0 and "Traceback" not in err


def test_prepare_ok_prints_summary(tmp_path, capsys):
    corpus = write_docs(tmp_path / "c")
    rc, _ = prepare(tmp_path, capsys, f"data.corpus={corpus}", "data.val_fraction=0.2")
    assert rc == 0


def test_missing_corpus_path(tmp_path, capsys):
    rc, err = prepare(tmp_path, capsys, f"data.corpus={tmp_path / 'nowhere'}")
    assert_one_line(rc, err, "nowhere")


def test_empty_corpus(tmp_path, capsys):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "a.txt").write_text("   \n")
    (folder / "b.txt").write_text("")
    rc, err = prepare(tmp_path, capsys, f"data.corpus={folder}")
    assert_one_line(rc, err, "empty")


def test_corpus_smaller_than_one_validation_block(tmp_path, capsys):
    corpus = write_docs(tmp_path / "small", n=3, words=12)
    rc, err = prepare(
        tmp_path, capsys, f"data.corpus={corpus}", "data.block_size=256", "data.val_fraction=0.3"
    )
    assert_one_line(rc, err, "too small")


def test_bad_jsonl_line_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "a fine line"}\n{"text": "another"}\nnot json\n')
    rc, err = prepare(tmp_path, capsys, f"data.corpus={path}")
    assert_one_line(rc, err, f"{path}:3")


def test_jsonl_missing_field(tmp_path, capsys):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "a fine line"}\n{"body": "no text field"}\n')
    rc, err = prepare(tmp_path, capsys, f"data.corpus={path}")
    assert_one_line(rc, err, f"{path}:2")


def test_corrupt_tokenizer_json(tmp_path, capsys):
    corpus = write_docs(tmp_path / "c")
    tok = tmp_path / "tokenizer.json"
    tok.write_text("{ this is not a tokenizer")
    rc, err = prepare(
        tmp_path, capsys, f"data.corpus={corpus}", f"tokenizer.path={tok}", "data.val_fraction=0.2"
    )
    assert_one_line(rc, err, "tokenizer.json")


def test_block_size_not_multiple_of_k(tmp_path, capsys):
    rc, err = prepare(tmp_path, capsys, "data.block_size=30")
    assert_one_line(rc, err, "data.block_size: must be a multiple of model.autoencoder.chunk_size K=4")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_cache_dir(tmp_path, capsys):
    corpus = write_docs(tmp_path / "c")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    rc, err = prepare(tmp_path, capsys, f"data.corpus={corpus}", f"data.cache_dir={ro / 'cache'}")
    assert_one_line(rc, err, "cache")


def test_cache_dir_that_is_a_file(tmp_path, capsys):
    corpus = write_docs(tmp_path / "c")
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    rc, err = prepare(tmp_path, capsys, f"data.corpus={corpus}", f"data.cache_dir={blocker / 'cache'}")
    assert_one_line(rc, err, "cache")


def test_export_load_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = ChunkAutoencoder(
        AutoencoderConfig(
            vocab_size=64, chunk_size=4, latent_size=8, d_model=16, ffn_size=32, mask_token_id=3
        )
    ).eval()
    path = export_autoencoder(
        model,
        tmp_path / "ae.pt",
        tokenizer_fingerprint="abc",
        tokenizer_path="tok.json",
        metrics={"val/token_acc_mu": 0.5},
    )
    loaded, meta = load_autoencoder(path, expect_chunk_size=4, expect_latent_size=8, expect_tokenizer="abc")
    tokens = torch.randint(0, 64, (10, 4))
    mu, log_sigma = model.encode(tokens)
    mu2, log_sigma2 = loaded.encode(tokens)
    assert torch.equal(mu, mu2) and torch.equal(log_sigma, log_sigma2)
    assert torch.equal(model.decode_logits(mu), loaded.decode_logits(mu2))
    assert meta["chunk_size"] == 4 and meta["latent_size"] == 8 and not loaded.training


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"expect_chunk_size": 2}, "K=4"),
        ({"expect_latent_size": 16}, "l=8"),
        ({"expect_tokenizer": "zzz"}, "tokenizer"),
    ],
)
def test_export_mismatch_names_both_values(tmp_path, kwargs, needle):
    from calm_lightning.errors import CalmError

    model = ChunkAutoencoder(
        AutoencoderConfig(vocab_size=64, chunk_size=4, latent_size=8, d_model=16, ffn_size=32)
    )
    path = export_autoencoder(
        model, tmp_path / "ae.pt", tokenizer_fingerprint="abc", tokenizer_path="t", metrics={}
    )
    with pytest.raises(CalmError, match=needle):
        load_autoencoder(path, **kwargs)


@pytest.mark.parametrize(
    "text, where, context",
    [
        ("data:\n  block_size: 32\n    batch_size: 2\n", 3, ""),
        (
            "data:\n  block_size: 32\n  batch_size: [1, 2\n",
            4,
            "(while parsing a flow sequence started at line 3)",
        ),
    ],
)
def test_yaml_syntax_error_names_file_and_line(tmp_path, capsys, text, where, context):
    config = tmp_path / "broken.yaml"
    config.write_text(text)
    capsys.readouterr()
    rc = main(["train", str(config)])
    err = capsys.readouterr().err
    assert_one_line(rc, err, f"{config}:{where}: YAML syntax error")
    assert context in err


def test_experiment_naming_a_missing_base(tmp_path, capsys):
    config = tmp_path / "child.yaml"
    config.write_text("# extends a file that is not there\nbase: nowhere.yaml\n")
    capsys.readouterr()
    rc = main(["prepare", str(config)])
    assert_one_line(rc, capsys.readouterr().err, "base config 'nowhere.yaml' not found")


def test_more_devices_than_available(tiny_ar_run, capsys):
    devices = torch.cuda.device_count() + 1
    capsys.readouterr()
    rc = main(
        [
            "train",
            str(tiny_ar_run.config),
            *tiny_ar_run.overrides,
            "logging.name=too_many_devices",
            "trainer.accelerator=cuda",
            f"trainer.devices={devices}",
        ]
    )
    assert_one_line(rc, capsys.readouterr().err, "trainer: ")
    assert not (tiny_ar_run.runs_dir / "too_many_devices" / "version_0" / "checkpoints").exists()
