"""Two CPU processes through the real Trainer, with DDP and with FSDP (gloo): BrierLM, losses and weights
synchronise, and an FSDP run gives the DDP run's weights and a usable checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from calm_lightning.artifacts import load_autoencoder
from calm_lightning.cli import main
from calm_lightning.metrics.functional import brierlm_from_sums

SCRIPTS = Path(__file__).resolve().parent / "scripts"
PROBE = SCRIPTS / "ddp_probe.py"  # train() with per-rank records; FSDP guards lifted for strategy=fsdp
FSDP_CLI = SCRIPTS / "fsdp_cli.py"  # the calm CLI with the same lifts


def run_script(script: Path, *args: str) -> None:
    """Run a script in a subprocess (a distributed run inside pytest would make Lightning's launcher
    re-run pytest itself), one thread per rank; it must succeed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@dataclass
class DistributedRun:
    ranks: list[dict]  # what each rank's probe recorded (tests/scripts/ddp_probe.py)
    run_dir: Path


def distributed_run(strategy: str, tiny_calm_run, tiny_ae_run, out: Path) -> DistributedRun:
    overrides = [*tiny_calm_run.overrides, f"model.autoencoder_path={tiny_ae_run.export_path}",
                 f"logging.name={strategy}", "trainer.devices=2", f"trainer.strategy={strategy}",
                 "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=2",
                 "eval.brier_max_n=4"]
    run_script(PROBE, str(out), str(tiny_calm_run.config), *overrides)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return DistributedRun(ranks, tiny_calm_run.runs_dir / strategy / "version_0")


@pytest.fixture(scope="module")
def ddp_run(tiny_calm_run, tiny_ae_run, tmp_path_factory) -> DistributedRun:
    return distributed_run("ddp", tiny_calm_run, tiny_ae_run, tmp_path_factory.mktemp("ddp"))


@pytest.fixture(scope="module")
def fsdp_run(tiny_calm_run, tiny_ae_run, tmp_path_factory) -> DistributedRun:
    return distributed_run("fsdp", tiny_calm_run, tiny_ae_run, tmp_path_factory.mktemp("fsdp"))


@pytest.fixture(params=["ddp", "fsdp"])
def any_run(request) -> DistributedRun:
    return request.getfixturevalue(f"{request.param}_run")


def checkpoint(run: DistributedRun) -> dict:
    return torch.load(run.run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def checkpoint_weights(run: DistributedRun) -> dict[str, torch.Tensor]:
    return {k.removeprefix("model."): v for k, v in checkpoint(run)["state_dict"].items() if k.startswith("model.")}


def test_both_ranks_trained_the_same_steps(any_run):
    r0, r1 = any_run.ranks
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["global_step"] == r1["global_step"] == 4
    assert len(r0["validations"]) == len(r1["validations"]) == 2


def test_all_ranks_share_one_run_directory(any_run):
    """Rank zero picks the version and the rank Lightning launches inherits it (runs.shared_run): one
    version folder, not one per rank."""
    assert sorted(p.name for p in any_run.run_dir.parent.iterdir()) == ["version_0"]
    assert (any_run.run_dir / "config.yaml").is_file()


def test_weights_stay_identical_across_ranks(ddp_run):
    """DDP averages gradients, so every rank applies the same update to the same weights."""
    r0, r1 = ddp_run.ranks
    assert r0["weights_head"] == r1["weights_head"]
    assert r0["weights_sum"] == r1["weights_sum"] and r0["weights_abs_sum"] == r1["weights_abs_sum"]


def test_brierlm_is_computed_from_both_ranks_states(any_run):
    r0, r1 = any_run.ranks
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


def test_validation_loss_is_averaged_over_ranks(any_run):
    r0, r1 = any_run.ranks
    for v0, v1 in zip(r0["validations"], r1["validations"]):
        mean0 = sum(v0["local"]["losses"]) / len(v0["local"]["losses"])
        mean1 = sum(v1["local"]["losses"]) / len(v1["local"]["losses"])
        assert mean0 != mean1
        assert v0["logged"]["val/head_loss"] == pytest.approx((mean0 + mean1) / 2, rel=1e-5)
        assert v1["logged"]["val/head_loss"] == v0["logged"]["val/head_loss"]


def test_fsdp_shards_the_trainable_weights(fsdp_run, ddp_run):
    """Each rank holds part of the trainable weights (FSDP flat-parameter shards); together, all of them."""
    full = sum(v.numel() for k, v in checkpoint_weights(ddp_run).items() if not k.startswith("autoencoder."))
    r0, r1 = fsdp_run.ranks
    assert 0 < r0["local_numel"] < full and 0 < r1["local_numel"] < full
    assert r0["local_numel"] + r1["local_numel"] == full


def test_fsdp_trains_to_the_weights_of_ddp(fsdp_run, ddp_run):
    """Same data, seeds and clipping: sharded gradients, a global-norm clip over the shards and AdamW on
    shards give DDP's update (up to the order of float reductions). Fails if the weight-decay groups or
    the clip norm went wrong under FSDP's flattened parameters."""
    fsdp, ddp = checkpoint_weights(fsdp_run), checkpoint_weights(ddp_run)
    assert fsdp.keys() == ddp.keys()
    groups = [[(g["weight_decay"], len(g["params"])) for g in checkpoint(run)["optimizer_states"][0]["param_groups"]]
              for run in (fsdp_run, ddp_run)]
    assert groups[0] == groups[1] and groups[0][0][0] > 0  # the same weight-decay split (lit/optim.py)
    start = torch.load(fsdp_run.run_dir.parents[1] / "calm" / "version_0" / "checkpoints" / "last.ckpt",
                       map_location="cpu", weights_only=False)["state_dict"]
    moved = 0
    for name, value in ddp.items():
        torch.testing.assert_close(fsdp[name], value, rtol=1e-4, atol=1e-6, msg=name)
        moved += not torch.equal(value, start.get(f"model.{name}", value))
    assert moved > 10  # the runs trained (their weights left the initialisation)


def test_fsdp_leaves_the_frozen_autoencoder_whole(fsdp_run, tiny_ae_run):
    exported = load_autoencoder(tiny_ae_run.export_path)[0].state_dict()
    weights = checkpoint_weights(fsdp_run)
    for name, value in exported.items():
        assert torch.equal(weights[f"autoencoder.{name}"], value), name


def test_fsdp_run_samples_during_training_and_from_its_checkpoint(fsdp_run, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(fsdp_run.run_dir))
    acc.Reload()
    texts = acc.Tensors("samples/text/text_summary")  # TemperatureSamples on the gathered weights
    assert [t.step for t in texts] == [2, 4]
    capsys.readouterr()
    rc = main(["sample", str(fsdp_run.run_dir), "--prompt", "the king", "--max-new-tokens", "8"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.strip()


def test_fsdp_autoencoder_run_exports_its_gathered_weights(tiny_ae_run, tmp_path):
    """Under FSDP the export and the reconstruction callback see the full weights, not rank zero's shards."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    export = tmp_path / "ae_fsdp.pt"
    overrides = [o for o in tiny_ae_run.overrides if not o.startswith(("logging.name=", "logging.export_path="))]
    overrides += ["logging.name=ae_fsdp", f"logging.export_path={export}", "trainer.devices=2",
                  "trainer.strategy=fsdp"]
    run_script(FSDP_CLI, "--debug", "train", str(tiny_ae_run.config), *overrides)
    run_dir = tiny_ae_run.runs_dir / "ae_fsdp" / "version_0"
    exported = load_autoencoder(export)[0].state_dict()
    final = checkpoint_weights(DistributedRun([], run_dir))
    assert exported.keys() == final.keys()
    for name, value in final.items():
        assert torch.equal(exported[name], value), name
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    assert [t.step for t in acc.Tensors("reconstruction/examples/text_summary")] == [2]


def test_fsdp_with_bf16_parameters_and_activation_checkpointing(tiny_calm_run, tiny_ae_run, capsys):
    """tests/test_gpu.py's combination on CPU: FSDP's bf16 mixed precision (parameters cast to bf16 for
    compute; Lightning turns autocast off without CUDA) around the fp32 autoencoder, and activation
    checkpointing inside the sharded blocks."""
    overrides = [*tiny_calm_run.overrides, f"model.autoencoder_path={tiny_ae_run.export_path}",
                 "logging.name=fsdp_bf16", "trainer.devices=2", "trainer.strategy=fsdp",
                 "trainer.precision=bf16-mixed", "model.backbone.activation_checkpointing=true",
                 "trainer.max_steps=4", "trainer.checkpoint_every_n_steps=4"]
    run_script(FSDP_CLI, "--debug", "train", str(tiny_calm_run.config), *overrides)
    run = DistributedRun([], tiny_calm_run.runs_dir / "fsdp_bf16" / "version_0")
    assert checkpoint(run)["global_step"] == 4
    weights = checkpoint_weights(run)
    trained = [k for k in weights if k.startswith("backbone.")]
    assert trained and all(weights[k].dtype == torch.float32 and torch.isfinite(weights[k]).all() for k in trained)
    exported = load_autoencoder(tiny_ae_run.export_path)[0].state_dict()
    assert all(torch.equal(weights[f"autoencoder.{k}"], v) for k, v in exported.items())
    capsys.readouterr()
    assert main(["eval", str(run.run_dir), "--limit-batches", "1", "--json"]) == 0
    assert "brierlm" in capsys.readouterr().out


def test_fsdp_run_resumes_with_its_optimizer_state(tiny_calm_run, tiny_ae_run):
    """Stopped after 2 steps, a 2-rank FSDP run resumes (logging.resume) in the same version: the full
    checkpoint is loaded into the shards and AdamW's moments carry on (step count 4, not 2 again)."""
    base = [*tiny_calm_run.overrides, f"model.autoencoder_path={tiny_ae_run.export_path}",
            "logging.name=fsdp_resume", "trainer.devices=2", "trainer.strategy=fsdp", "logging.resume=true"]
    for steps in (2, 4):
        run_script(FSDP_CLI, "train", str(tiny_calm_run.config), *base, f"trainer.max_steps={steps}")
    run = DistributedRun([], tiny_calm_run.runs_dir / "fsdp_resume" / "version_0")
    assert sorted(p.name for p in run.run_dir.parent.iterdir()) == ["version_0"]
    state = checkpoint(run)
    assert state["global_step"] == 4
    adam_steps = {float(s["step"]) for s in state["optimizer_states"][0]["state"].values()}
    assert adam_steps == {4.0}
