"""GPU-only checks (skipped without CUDA): FSDP with the frozen autoencoder, bf16-mixed, activation
checkpointing, and evaluation/sampling of the result on the GPU, all through the real CLI."""

from __future__ import annotations

import pytest
import torch

from calm_lightning.artifacts import load_autoencoder
from calm_lightning.cli import main

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_fsdp_bf16_calm_run_keeps_the_autoencoder_frozen(tiny_calm_run, tiny_ae_run, capsys):
    overrides = [
        *tiny_calm_run.overrides,
        f"model.autoencoder_path={tiny_ae_run.export_path}",
        "logging.name=gpu_fsdp",
        "trainer.accelerator=gpu",
        "trainer.devices=1",
        "trainer.strategy=fsdp",
        "trainer.precision=bf16-mixed",
        "model.backbone.activation_checkpointing=true",
        "trainer.max_steps=4",
        "trainer.checkpoint_every_n_steps=4",
    ]
    assert main(["--debug", "train", str(tiny_calm_run.config), *overrides]) == 0
    ckpt = tiny_calm_run.runs_dir / "gpu_fsdp" / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["global_step"] == 4
    weights = state["state_dict"]
    # a full (unsharded) state dict, with the frozen autoencoder exactly as exported
    export, _ = load_autoencoder(tiny_ae_run.export_path)
    for name, tensor in export.state_dict().items():
        assert torch.equal(weights[f"model.autoencoder.{name}"].cpu(), tensor.cpu()), name
    trained = [k for k in weights if k.startswith("model.backbone.")]
    assert trained and all(torch.isfinite(weights[k]).all() for k in trained)
    capsys.readouterr()
    assert main(["eval", str(ckpt), "--limit-batches", "1", "--json"]) == 0
    assert "brierlm" in capsys.readouterr().out
    assert main(["sample", str(ckpt), "--prompt", "the king", "--max-new-tokens", "8", "--device", "cuda"]) == 0
