"""The head plugin contract, end to end: a fourth head is ONE new file in ``models/heads/`` plus ONE
experiment YAML, and `calm train`, `calm eval`, `calm sample` and `calm compare` use it with no other
edit (no import list, no schema field, no FLOPs branch, no eval or compare table to extend).

The file is written for the test and removed again; the commands run as subprocesses, since this
process discovered the heads package before the file existed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import calm_lightning.models.heads as heads_pkg

HEAD_FILE = Path(heads_pkg.__file__).parent / "toyhead_for_tests.py"
TOY_HEAD = '''"""Toy Gaussian head written (and removed) by tests/test_head_plugin.py: mean = Linear(h), loss = MSE."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from calm_lightning.models.heads import register_head
from calm_lightning.models.heads.base import GenerativeHead, SweepSetting


@dataclass
class ToyHeadConfig:
    sigma: float = 0.5  # scale of the Gaussian noise added to the predicted mean when sampling


@register_head("toy")
class ToyHead(GenerativeHead):
    config_class = ToyHeadConfig
    sampling_keys = ("sigma",)

    def __init__(self, hidden_size, latent_size, cfg, num_backbone_layers):
        super().__init__(hidden_size, latent_size, cfg, num_backbone_layers)
        self.mean = nn.Linear(hidden_size, latent_size)

    @classmethod
    def validate(cls, cfg):
        return [] if cfg.toy.sigma > 0 else [f"{cls.key('sigma')}: must be > 0, got {cfg.toy.sigma}"]

    @classmethod
    def param_split(cls, cfg, hidden_size, latent_size, num_backbone_layers):
        return 0, hidden_size * latent_size + latent_size  # one Linear per evaluation

    @classmethod
    def sampling_sweep(cls, cfg, steps=None):
        return [SweepSetting(f"sigma={s}", 1, 1, (f"{cls.key('sigma')}={s}",)) for s in (0.5, 1.0)]

    def loss(self, hidden, mu, log_sigma):
        return (self.mean(hidden).float() - mu.float()).square().mean(-1)  # [P]

    def sample(self, hidden, num_samples=1, generator=None):
        mean = self.mean(hidden).float()[:, None]  # [P, 1, l]
        shape = (hidden.shape[0], num_samples, self.latent_size)
        return mean + self.cfg.toy.sigma * torch.randn(shape, generator=generator, device=hidden.device)
'''
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def calm(*args: object, ok: bool = True) -> subprocess.CompletedProcess:
    """`calm ...` in a fresh process (which discovers the heads package again)."""
    done = subprocess.run(
        [sys.executable, "-m", "calm_lightning", *map(str, args)],
        env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert (done.returncode == 0) == ok, done.stdout[-2000:] + done.stderr[-2000:]
    return done


def remove_head_file() -> None:
    HEAD_FILE.unlink(missing_ok=True)
    for cached in (HEAD_FILE.parent / "__pycache__").glob(f"{HEAD_FILE.stem}.*.pyc"):
        cached.unlink(missing_ok=True)


@pytest.mark.slow
def test_a_fourth_head_is_one_file_and_one_yaml(tiny_calm_run, tmp_path):
    # One experiment YAML: the tiny CALM run's settings (conftest.py) with the toy head.
    settings = [
        *tiny_calm_run.overrides,
        "model.head.name=toy",
        "model.head.toy.sigma=0.5",
        f"logging.runs_dir={tmp_path / 'runs'}",
        "logging.name=toy",
    ]
    yaml = tmp_path / "calm_toy.yaml"
    yaml.write_text(
        "# calm train calm_toy.yaml: the toy plugin head (tests/test_head_plugin.py)\n"
        + OmegaConf.to_yaml(OmegaConf.from_dotlist(settings))
    )
    run_dir = tmp_path / "runs" / "toy" / "version_0"
    heads_pkg.HEADS.discover()  # this process's registry is settled before the file appears
    HEAD_FILE.write_text(TOY_HEAD, encoding="utf-8")
    try:
        calm("train", yaml)
        assert (run_dir / "checkpoints" / "last.ckpt").is_file()

        # eval: the head's own sampling key is accepted, a typo in its section is not
        metrics = json.loads(calm("eval", run_dir, "model.head.toy.sigma=1.0", "--limit-batches", "1", "--json").stdout)
        assert "val/brierlm" in metrics["metrics"]
        err = calm("eval", run_dir, "model.head.toy.sigm=1.0", ok=False).stderr
        assert "model.head.toy.sigm" in err and err.count("\n") == 1

        out = calm("sample", run_dir, "--prompt", "the king", "--max-new-tokens", "8", "--num-candidates", "8",
                   "--device", "cpu").stdout
        assert out.startswith("the king")

        cmp = tmp_path / "cmp"
        calm("compare", run_dir, "--out", cmp, "--limit-batches", "1", "--gen-tokens", "4")
        summary = json.loads((cmp / "comparison.json").read_text())
        assert summary["runs"][0]["head"] == "toy" and summary["runs"][0]["evals_per_sample"] == 1
        assert {(p["head"], p["solver"]) for p in summary["sweep"]} == {("toy", "sigma=0.5"), ("toy", "sigma=1.0")}
        assert (cmp / "brierlm_vs_sampling_steps.png").is_file()
    finally:
        remove_head_file()
    assert not HEAD_FILE.exists()
