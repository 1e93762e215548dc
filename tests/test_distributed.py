"""Two CPU processes with DDP (gloo) through the real Trainer: BrierLM, losses and weights synchronise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from calm_lightning.metrics.functional import brierlm_from_sums

PROBE = Path(__file__).resolve().parent / "scripts" / "ddp_probe.py"


@pytest.fixture(scope="module")
def ddp_run(tiny_calm_run, tiny_ae_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    overrides = [*tiny_calm_run.overrides, f"model.autoencoder_path={tiny_ae_run.export_path}",
                 "logging.name=ddp", "trainer.devices=2", "trainer.strategy=ddp", "trainer.max_steps=4",
                 "trainer.val_check_interval=2", "trainer.limit_val_batches=2", "eval.brier_max_n=4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(PROBE), str(out), str(tiny_calm_run.config), *overrides],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return ranks


def test_both_ranks_trained_the_same_steps(ddp_run):
    r0, r1 = ddp_run
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["global_step"] == r1["global_step"] == 4
    assert len(r0["validations"]) == len(r1["validations"]) == 2


def test_weights_stay_identical_across_ranks(ddp_run):
    """DDP averages gradients, so every rank applies the same update to the same weights."""
    r0, r1 = ddp_run
    assert r0["weights_head"] == r1["weights_head"]
    assert r0["weights_sum"] == r1["weights_sum"] and r0["weights_abs_sum"] == r1["weights_abs_sum"]


def test_brierlm_is_computed_from_both_ranks_states(ddp_run):
    r0, r1 = ddp_run
    for v0, v1 in zip(r0["validations"], r1["validations"]):
        s0, s1 = torch.tensor(v0["local"]["sums"]), torch.tensor(v1["local"]["sums"])
        c0, c1 = torch.tensor(v0["local"]["counts"]), torch.tensor(v1["local"]["counts"])
        assert c0.sum() > 0 and c1.sum() > 0
        assert not torch.equal(s0, s1)  # the ranks saw different validation blocks
        expected = brierlm_from_sums(s0 + s1, c0 + c1)
        for rank in (v0, v1):  # both ranks log the global value
            for key, value in expected.items():
                assert rank["logged"][f"val/{key}"] == pytest.approx(float(value), abs=1e-6), key
        # and it differs from what either rank alone would report
        alone = brierlm_from_sums(s0, c0)
        assert any(abs(float(alone[k]) - float(expected[k])) > 1e-9 for k in expected)


def test_validation_loss_is_averaged_over_ranks(ddp_run):
    r0, r1 = ddp_run
    for v0, v1 in zip(r0["validations"], r1["validations"]):
        mean0 = sum(v0["local"]["losses"]) / len(v0["local"]["losses"])
        mean1 = sum(v1["local"]["losses"]) / len(v1["local"]["losses"])
        assert mean0 != mean1
        assert v0["logged"]["val/head_loss"] == pytest.approx((mean0 + mean1) / 2, rel=1e-5)
        assert v1["logged"]["val/head_loss"] == v0["logged"]["val/head_loss"]
