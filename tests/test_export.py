"""Portable exports (`calm export`), lone checkpoints that evaluate, `calm encode` / `calm decode`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import calm_lightning
from calm_lightning.cli import main
from calm_lightning.utils.safetensors import load_file


def run(capsys, *args: str) -> tuple[int, str, str]:
    rc = main([*args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def calm_export(tiny_calm_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "calm"
    assert main(["export", str(tiny_calm_run.run_dir.parent), "--out", str(out)]) == 0
    return out


def test_export_folder_holds_safetensors_tokenizer_and_the_autoencoder(calm_export):
    names = sorted(str(p.relative_to(calm_export)) for p in calm_export.rglob("*") if p.is_file())
    assert names == ["autoencoder/config.json", "autoencoder/model.safetensors", "config.json",
                     "model.safetensors", "tokenizer.json"]
    meta = json.loads((calm_export / "config.json").read_text())
    assert meta["kind"] == "calm" and meta["step"] == 2 and "config" in meta["hparams"]
    assert not any(k.startswith("autoencoder.") for k in load_file(calm_export / "model.safetensors"))
    assert not list(calm_export.parent.glob(".calm.tmp-*"))  # written aside, renamed into place


def test_export_generates_exactly_as_the_checkpoint(tiny_calm_run, calm_export):
    from_ckpt = calm_lightning.load(tiny_calm_run.checkpoint, device="cpu")
    from_export = calm_lightning.load(calm_export, device="cpu")
    for a, b in zip(from_ckpt.model.state_dict().items(), from_export.model.state_dict().items(), strict=True):
        assert a[0] == b[0] and torch.equal(a[1], b[1]), a[0]
    kwargs = dict(max_new_tokens=12, temperature=0.5, num_candidates=8, seed=3)
    assert from_export.generate("the king", **kwargs) == from_ckpt.generate("the king", **kwargs)


def test_tied_autoencoder_matrix_survives_the_round_trip(tiny_calm_run, calm_export):
    ae = calm_lightning.load_autoencoder(calm_export).model
    original = calm_lightning.load(tiny_calm_run.checkpoint, device="cpu").model.autoencoder
    assert torch.equal(ae.embedding.weight, original.embedding.weight)
    z = torch.randn(3, ae.latent_size, generator=torch.Generator().manual_seed(0))
    # the output projection is the embedding matrix itself: same logits, and still one Parameter
    assert torch.allclose(ae.decode_logits(z), original.decode_logits(z))
    assert sum(p.numel() for p in ae.parameters()) == sum(p.numel() for p in original.parameters())


def test_corrupt_export_is_refused_in_one_line(calm_export, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(calm_export, bad)
    weights = bad / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    rc, out, err = run(capsys, "sample", str(bad), "--prompt", "the", "--max-new-tokens", "4")
    assert rc == 2 and "checksum mismatch" in err and len(err.strip().splitlines()) == 1


def test_export_refuses_to_overwrite_a_foreign_folder(tiny_ar_run, tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    rc, _, err = run(capsys, "export", str(tiny_ar_run.run_dir), "--out", str(tmp_path / "mine"))
    assert rc == 2 and "not an export folder" in err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def _eval_json(capsys, *args: str) -> dict:
    rc, out, err = run(capsys, "eval", *args, "--json")
    assert rc == 0, err
    return json.loads(out)


def test_lone_checkpoint_evaluates_with_its_own_tokenizer(tiny_ar_run, tmp_path, capsys):
    """Copied alone, with the data cache gone: `calm eval` uses the tokenizer the checkpoint carries
    (no tokenizer is trained again) and scores exactly what it scored at home."""
    home = _eval_json(capsys, str(tiny_ar_run.checkpoint))
    alone = tmp_path / "model.ckpt"
    shutil.copy(tiny_ar_run.checkpoint, alone)
    cache = tiny_ar_run.cache_dir
    hidden = cache.with_name(cache.name + ".hidden")
    cache.rename(hidden)
    try:
        away = _eval_json(capsys, str(alone))
        trained = [p for p in cache.glob("*/tok-*") if not p.name.startswith("tok-user")]
        assert not trained, f"a tokenizer was trained again: {trained}"
        assert list(cache.glob("embedded/*/tokenizer.json"))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        hidden.rename(cache)
    assert away["metrics"] == home["metrics"]


def test_export_folder_evaluates_like_its_checkpoint(tiny_calm_run, calm_export, capsys):
    a = _eval_json(capsys, str(tiny_calm_run.checkpoint), "--limit-batches", "1")
    b = _eval_json(capsys, str(calm_export), "--limit-batches", "1")
    assert a["metrics"] == b["metrics"] and b["step"] == 2


def test_fine_tuning_starts_from_an_export(tiny_ar_run, tmp_path, capsys):
    out = tmp_path / "ar_export"
    assert main(["export", str(tiny_ar_run.checkpoint), "--out", str(out)]) == 0
    overrides = [o for o in tiny_ar_run.overrides if not o.startswith("logging.name=")]
    overrides = [o for o in overrides if not o.startswith("trainer.seed=")]
    rc = main(["train", str(tiny_ar_run.config), *overrides, "logging.name=ar_from_export",
               f"model.init_from={out}", "trainer.max_steps=1", "trainer.val_check_interval=1",
               "trainer.checkpoint_every_n_steps=1", "sampling.prompts=[]", "trainer.seed=1"])
    assert rc == 0
    capsys.readouterr()
    # another seed: without init_from the weights would be a different random draw, far from the export's
    start = calm_lightning.load(out, device="cpu").model.embed.weight
    tuned = calm_lightning.load(tiny_ar_run.runs_dir / "ar_from_export", device="cpu").model.embed.weight
    assert (tuned - start).norm() < 0.2 * start.norm()


@pytest.mark.parametrize("suffix", [".safetensors", ".npy"])
def test_encode_decode_round_trip(tiny_ae_run, tmp_path, capsys, suffix):
    texts = ["the king is dead", "long live the queen"]
    latents = tmp_path / f"z{suffix}"
    rc, out, err = run(capsys, "encode", str(tiny_ae_run.export_path), "--text", texts[0], "--text", texts[1],
                       "--out", str(latents))
    assert rc == 0, err
    assert "2 text(s)" in out
    ae = calm_lightning.load_autoencoder(tiny_ae_run.export_path)
    expected = ae.encode(texts)
    if suffix == ".safetensors":
        stored = load_file(latents)
        assert stored["offsets"].tolist() == [0, len(expected[0][0]), len(expected[0][0]) + len(expected[1][0])]
        assert torch.allclose(stored["mu"], torch.cat([e[0] for e in expected]), atol=1e-6)
        assert torch.allclose(stored["sigma"], torch.cat([e[1] for e in expected]))
    rc, out, err = run(capsys, "decode", str(tiny_ae_run.export_path), str(latents))
    assert rc == 0, err
    if suffix == ".safetensors":  # one text per encoded text, each what the API decodes
        assert out.rstrip("\n") == "\n\n".join(ae.decode(mu) for mu, _ in expected)
        assert "text(s) decoded to exactly the encoded tokens" in err
    else:  # .npy keeps no boundaries: one text
        assert out.rstrip("\n") == ae.decode(torch.cat([e[0] for e in expected]))


def test_encode_corpus_file_and_bad_inputs(tiny_ae_run, tiny_corpus, tmp_path, capsys):
    doc = sorted(tiny_corpus.glob("*.txt"))[0]
    rc, out, err = run(capsys, "encode", str(tiny_ae_run.export_path), "--corpus", str(doc),
                       "--out", str(tmp_path / "c.safetensors"), "--batch-size", "7")
    assert rc == 0, err
    mu = load_file(tmp_path / "c.safetensors")["mu"]
    ae = calm_lightning.load_autoencoder(tiny_ae_run.export_path)
    assert torch.allclose(mu, ae.encode(doc.read_text())[0][0], atol=1e-6)  # batching changes nothing
    rc, _, err = run(capsys, "encode", str(tiny_ae_run.export_path), "--text", "x", "--out", str(tmp_path / "z.pt"))
    assert rc == 2 and ".safetensors or .npy" in err
    wrong = tmp_path / "wrong.npy"
    import numpy as np

    np.save(wrong, np.zeros((3, 2, ae.model.latent_size + 1), dtype=np.float32))
    rc, _, err = run(capsys, "decode", str(tiny_ae_run.export_path), str(wrong))
    assert rc == 2 and "latents of shape" in err and len(err.strip().splitlines()) == 1


def test_autoencoder_export_evaluates_and_initialises_a_run(tiny_ae_run, tmp_path, capsys):
    out = tmp_path / "ae_export"
    assert main(["export", str(tiny_ae_run.run_dir), "--out", str(out)]) == 0
    capsys.readouterr()
    home = _eval_json(capsys, str(tiny_ae_run.checkpoint), "--limit-batches", "1")
    away = _eval_json(capsys, str(out), "--limit-batches", "1")
    assert away["kind"] == "autoencoder" and away["metrics"] == home["metrics"]
    ae = calm_lightning.load_autoencoder(out)
    assert ae.model.latent_size == calm_lightning.load_autoencoder(tiny_ae_run.export_path).model.latent_size


def test_load_autoencoder_takes_a_run_an_export_folder_and_a_calm_export(tiny_ae_run, calm_export):
    ids_text = "the king is dead"
    reference = calm_lightning.load_autoencoder(tiny_ae_run.export_path).encode(ids_text)[0][0]
    from_run = calm_lightning.load_autoencoder(tiny_ae_run.run_dir.parent).encode(ids_text)[0][0]
    from_calm = calm_lightning.load_autoencoder(calm_export).encode(ids_text)[0][0]  # the CALM's frozen AE
    assert torch.equal(from_run, reference) and torch.equal(from_calm, reference)
