"""The Python API: the README's example runs as written, and a checkpoint copied alone generates."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

import calm_lightning

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_api_example_runs(tiny_calm_run, tiny_ae_run, capsys):
    section = README.read_text(encoding="utf-8").split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    code = code.replace('"runs/calm_energy"', repr(str(tiny_calm_run.run_dir.parent)))
    code = code.replace('"artifacts/autoencoder.pt"', repr(str(tiny_ae_run.export_path)))
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "Brier-1" in out and "±" in out and "torch.Size([" in out


def test_top_level_exports_the_models_and_configs():
    assert calm_lightning.CALM.__name__ == "CALM" and calm_lightning.ExperimentConfig.__name__ == "ExperimentConfig"
    assert {"load", "load_autoencoder", "ChunkAutoencoder", "BrierLM"} <= set(calm_lightning.__all__)


def test_autoencoder_round_trip_through_the_api(tiny_ae_run):
    ae = calm_lightning.load_autoencoder(tiny_ae_run.export_path)
    (mu, sigma), = ae.encode(["the king"])
    assert mu.shape == sigma.shape and mu.shape[-1] == ae.model.latent_size and bool((sigma > 0).all())
    assert isinstance(ae.decode(mu), str)


def test_a_checkpoint_copied_alone_generates_without_the_data(tiny_calm_run, tmp_path):
    """The tokenizer travels inside the checkpoint: with the data cache gone, it still generates."""
    alone = tmp_path / "elsewhere" / "model.ckpt"
    alone.parent.mkdir()
    shutil.copy(tiny_calm_run.checkpoint, alone)
    cache = tiny_calm_run.cache_dir
    hidden = cache.with_name(cache.name + ".hidden")
    cache.rename(hidden)  # no cached tokenizer or shards anywhere
    try:
        lm = calm_lightning.load(alone, device="cpu")
        text = lm.generate("the king", max_new_tokens=8, seed=1)[0]
        assert isinstance(text, str) and not cache.exists()
        ids = lm.tokenizer.encode("the king").ids
        assert ids and torch.tensor(ids).max() < lm.model.embed.num_embeddings
    finally:
        hidden.rename(cache)
