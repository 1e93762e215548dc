"""The Lightning layer end to end through the real CLI: eval, resume, refusal of bad artefacts, NaN policy."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from calm_lightning.cli import main


def run_cli(capsys, *argv):
    capsys.readouterr()  # drop what fixtures printed while building their runs
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_eval_autoencoder_reports_accuracies(tiny_ae_run, capsys):
    rc, out, _ = run_cli(capsys, "eval", tiny_ae_run.run_dir, "--json")
    assert rc == 0
    result = json.loads(out)
    assert result["kind"] == "autoencoder" and result["step"] == 2
    for key in ("val/token_acc_mu", "val/chunk_acc_mu", "val/token_acc_noise0p3", "val/token_acc_posterior"):
        assert 0.0 <= result["metrics"][key] <= 1.0
    assert result["metrics"]["val/chunk_acc_mu"] <= result["metrics"]["val/token_acc_mu"]


@pytest.mark.parametrize("fixture, loss_key", [("tiny_calm_run", "val/head_loss"), ("tiny_ar_run", "val/ce")])
def test_eval_language_models_report_brier(request, fixture, loss_key, capsys):
    run = request.getfixturevalue(fixture)
    rc, out, _ = run_cli(capsys, "eval", run.checkpoint, "--json")
    assert rc == 0
    metrics = json.loads(out)["metrics"]
    assert {"val/brier1", "val/brier2", "val/brierlm", loss_key} <= set(metrics)
    assert torch.isfinite(torch.tensor(metrics[loss_key]))
    # the two-sample estimates are bounded: each indicator sum lies in [-1, 2]
    assert -1.0 <= metrics["val/brier1"] <= 2.0


def test_eval_missing_checkpoint(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "eval", tmp_path / "nope.ckpt")
    assert rc == 2 and "checkpoint not found" in err and "Traceback" not in err


def test_eval_rejects_model_overrides(tiny_ar_run, capsys):
    rc, _, err = run_cli(capsys, "eval", tiny_ar_run.checkpoint, "model.backbone.n_layers=3")
    assert rc == 2 and "model.backbone.n_layers" in err


def _train_variant(capsys, run, *extra):
    return run_cli(capsys, "train", run.config, *run.overrides, *extra)


def test_calm_without_autoencoder_export(tiny_ae_run, tmp_path, capsys):
    calm = [o.replace("model.kind=autoencoder", "model.kind=calm") for o in tiny_ae_run.overrides]
    rc, _, err = run_cli(capsys, "train", tiny_ae_run.config, *calm, f"model.autoencoder_path={tmp_path / 'none.pt'}",
                         "logging.name=calm_noexport")
    assert rc == 2
    assert "run `make train-ae` first" in err and err.count("\n") == 1


def test_calm_refuses_other_chunk_size(tiny_calm_run, capsys):
    rc, _, err = _train_variant(capsys, tiny_calm_run, "model.autoencoder.chunk_size=2", "logging.name=calm_k2")
    assert rc == 2 and "K=4" in err and "chunk_size=2" in err


def test_calm_refuses_other_tokenizer(tiny_calm_run, capsys):
    rc, _, err = _train_variant(capsys, tiny_calm_run, "tokenizer.vocab_size=320", "logging.name=calm_tok")
    assert rc == 2 and "tokenizer" in err


def test_corrupt_export_is_refused(tiny_ae_run, tiny_calm_run, tmp_path, capsys):
    bad = tmp_path / "ae.pt"
    bad.write_bytes(tiny_ae_run.export_path.read_bytes()[:-100])
    (tmp_path / "ae.json").write_text(tiny_ae_run.export_path.with_suffix(".json").read_text())
    rc, _, err = _train_variant(capsys, tiny_calm_run, f"model.autoencoder_path={bad}", "logging.name=calm_bad")
    assert rc == 2 and "checksum mismatch" in err


def test_resume_continues_the_same_run(tiny_ar_run, capsys):
    rc, *_ = _train_variant(capsys, tiny_ar_run, "logging.name=resume")
    assert rc == 0
    rc, *_ = _train_variant(capsys, tiny_ar_run, "logging.name=resume", "logging.resume=true", "trainer.max_steps=4")
    assert rc == 0
    root = tiny_ar_run.runs_dir / "resume"
    assert sorted(p.name for p in root.iterdir()) == ["version_0"]
    ckpt = torch.load(root / "version_0" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4
    # without resume a new version is created, never overwriting the old one
    rc, *_ = _train_variant(capsys, tiny_ar_run, "logging.name=resume")
    assert rc == 0 and (root / "version_1").is_dir()



@pytest.mark.parametrize("fixture", ["tiny_ae_run", "tiny_calm_run", "tiny_ar_run"])
def test_compile_wraps_the_training_loss_only(request, fixture, capsys, monkeypatch):
    """trainer.compile=true: every training step goes through torch.compile's function, validation,
    Brier rollouts and the sample callback run the plain network, and the checkpoint's keys are the
    eager ones (wrapping the module put `_orig_mod.` into them and broke generation for CALM)."""
    run = request.getfixturevalue(fixture)
    calls = {"compiled": 0, "training": 0}

    def fake_compile(fn, *args, **kwargs):
        calls["compiled"] += 1

        def wrapped(*a, **k):
            calls["training"] += 1
            assert torch.is_grad_enabled()
            return fn(*a, **k)

        return wrapped

    monkeypatch.setattr(torch, "compile", fake_compile)
    name = f"compiled_{fixture}"
    rc, _, err = _train_variant(capsys, run, f"logging.name={name}", "trainer.compile=true")
    assert rc == 0, err
    assert calls == {"compiled": 1, "training": 2}  # max_steps=2, one compilation
    ckpt = torch.load(run.runs_dir / name / "version_0" / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=False)
    assert not any("_orig_mod" in key for key in ckpt["state_dict"])

def test_resume_refuses_a_different_model(tiny_ar_run, capsys):
    rc, *_ = _train_variant(capsys, tiny_ar_run, "logging.name=resume_other")
    assert rc == 0
    rc, _, err = _train_variant(capsys, tiny_ar_run, "logging.name=resume_other", "logging.resume=true",
                                "model.backbone.n_layers=2")
    assert rc == 2 and "different model.backbone" in err


def test_non_finite_loss_stops_with_the_step(tiny_ar_run, capsys):
    rc, _, err = _train_variant(capsys, tiny_ar_run, "logging.name=nan", "optim.lr=1e30", "optim.grad_clip=0",
                                "trainer.max_steps=6", "trainer.checkpoint_every_n_steps=1")
    assert rc == 2
    assert "non-finite loss" in err and "at step" in err


def test_unknown_override_is_one_line(tiny_ar_run, capsys):
    rc, _, err = _train_variant(capsys, tiny_ar_run, "trainer.max_stepz=3")
    assert rc == 2 and err.strip() == "error: trainer.max_stepz: unknown config key (override 'trainer.max_stepz=3')"


def test_plain_pytorch_packages_import_without_lightning():
    code = (
        "import sys\n"
        "sys.modules['lightning'] = None; sys.modules['omegaconf'] = None\n"
        "import calm_lightning.models, calm_lightning.metrics, calm_lightning.sampling.temperature\n"
        "import calm_lightning.sampling.generate\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("override, needle", [("trainer.accelerator=gpu", "trainer:"), ("trainer.strategy=nonsense", "trainer:")])
def test_trainer_misconfiguration_is_one_line(tiny_ar_run, capsys, override, needle):
    rc, _, err = _train_variant(capsys, tiny_ar_run, "logging.name=misconf", override)
    assert rc == 2 and needle in err and "Traceback" not in err


def test_rerunning_a_finished_run_revalidates_and_re_exports(tiny_ae_run, tmp_path, capsys):
    export = tmp_path / "ae.pt"
    args = ["logging.name=ae_rerun", "logging.resume=true", f"logging.export_path={export}"]
    rc, *_ = _train_variant(capsys, tiny_ae_run, *args)
    assert rc == 0
    export.unlink()
    rc, out, _ = _train_variant(capsys, tiny_ae_run, *args)  # finished: no training step, same weights
    assert rc == 0 and "no training step in this session" in out
    meta = json.loads(export.with_suffix(".json").read_text())
    assert "val/token_acc_mu" in meta["metrics"]


def test_weight_decay_groups_by_layer_type():
    """reference: all but biases and norm gains (embeddings decay); linear: Linear weights only; all.
    Decided by layer type, so flattened FSDP views would be grouped the same."""
    from torch import nn

    from calm_lightning.lit.optim import parameter_groups
    from calm_lightning.models.layers import RMSNorm

    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), RMSNorm(4), nn.LayerNorm(4))
    emb, lin_w, lin_b, rms, ln_w, ln_b = (
        model[0].weight, model[1].weight, model[1].bias, model[2].weight, model[3].weight, model[3].bias
    )
    decay, no_decay = parameter_groups(model, 0.1, "reference")
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(emb), id(lin_w)}
    assert {id(p) for p in no_decay["params"]} == {id(lin_b), id(rms), id(ln_w), id(ln_b)}
    decay, no_decay = parameter_groups(model, 0.1, "linear")
    assert [id(p) for p in decay["params"]] == [id(lin_w)]
    assert {id(p) for p in no_decay["params"]} == {id(emb), id(lin_b), id(rms), id(ln_w), id(ln_b)}
    (everything,) = parameter_groups(model, 0.1, "all")
    assert len(everything["params"]) == 6


def test_constant_schedule_warms_up_then_holds():
    """The paper's recipe: linear warm-up, then constant (the reference's HF "constant" dropped the
    warm-up; warmup_steps=0 is that)."""
    from calm_lightning.config.schema import OptimConfig
    from calm_lightning.lit.optim import lr_lambda

    for schedule in ("constant", "constant_with_warmup"):
        fn = lr_lambda(OptimConfig(schedule=schedule, warmup_steps=4), max_steps=100)
        assert [fn(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    fn = lr_lambda(OptimConfig(schedule="constant", warmup_steps=0), max_steps=100)
    assert fn(0) == 1.0


def test_time_guard_stops_loudly_and_a_rerun_continues_to_max_steps(tiny_ar_run, capsys):
    """A guard-stopped run says so (summary, calm eval --json); rerunning the same command continues it
    with a fresh allowance (the guard counts this process's time, not the checkpoint's), and a run
    that reaches its steps is complete again. The bar counts steps, not "Epoch 0/-2"."""
    guard = ["logging.name=guarded", "logging.resume=true", "trainer.max_steps=4", "trainer.val_check_interval=4",
             "trainer.checkpoint_every_n_steps=1"]
    rc, out, _ = _train_variant(capsys, tiny_ar_run, *guard, "trainer.max_time_minutes=1e-6")
    assert rc == 0
    assert "stopped by the time guard at step 1 of 4" in " ".join(out.split())
    rc, out, _ = run_cli(capsys, "eval", tiny_ar_run.runs_dir / "guarded" / "version_0", "--json")
    budget = json.loads(out)["budget"]
    assert budget == {"step": 1, "max_steps": 4, "complete": False, "stopped_by_time_guard": True,
                      "note": "stopped by the time guard at step 1 of 4"}
    # the same command again: one more step (the old guard restored its elapsed time and stopped at once)
    rc, out, _ = _train_variant(capsys, tiny_ar_run, *guard, "trainer.max_time_minutes=1e-6")
    assert rc == 0 and "stopped by the time guard at step 2 of 4" in " ".join(out.split())
    rc, out, _ = _train_variant(capsys, tiny_ar_run, *guard, "trainer.max_time_minutes=30", "trainer.precision=32")
    assert rc == 0 and "WARNING" not in out and "4 of 4" in out
    assert "Epoch 0/-2" not in out and "Training (steps)" in out
    rc, out, _ = run_cli(capsys, "eval", tiny_ar_run.runs_dir / "guarded" / "version_0", "--json")
    assert json.loads(out)["budget"]["complete"] and not json.loads(out)["budget"]["stopped_by_time_guard"]
    assert not (tiny_ar_run.runs_dir / "guarded" / "version_1").exists()


def test_eval_scores_the_whole_split_floors_and_an_external_corpus(tiny_ar_run, tiny_corpus, capsys):
    """calm eval: the whole validation split by default (training's limit_val_batches does not bind
    it), --floors adds unigram/bigram floors on the same positions, eval.corpus scores another corpus
    in full with the run's tokenizer, and NaN never reaches the JSON."""
    rc, out, _ = run_cli(capsys, "eval", tiny_ar_run.checkpoint, "--json", "--limit-batches", "1")
    limited = json.loads(out)
    rc, out, _ = run_cli(capsys, "eval", tiny_ar_run.checkpoint, "--json", "--floors")
    assert rc == 0 and "NaN" not in out
    full = json.loads(out)
    assert full["eval_set"]["source"] == "validation split"
    assert full["eval_set"]["blocks"] >= limited["eval_set"]["blocks"] and limited["eval_set"]["blocks"] <= 4
    floors = full["floors"]
    assert set(floors) == {"unigram", "bigram"}
    for f in floors.values():
        assert {"val/brier1", "val/brier1_se", "val/brier1_lo", "val/brier2", "val/brierlm"} <= set(f)
    assert floors["bigram"]["val/brier1"] > floors["unigram"]["val/brier1"]  # word-internal transitions
    rc, out, _ = run_cli(capsys, "eval", tiny_ar_run.checkpoint, f"eval.corpus={tiny_corpus / 'doc00.txt'}", "--json")
    ext = json.loads(out)
    assert rc == 0 and ext["eval_set"]["documents"] == 1 and ext["eval_set"]["source"].endswith("doc00.txt")
    assert ext["metrics"]["val/brier1"] != full["metrics"]["val/brier1"]
    rc, out, _ = run_cli(capsys, "eval", tiny_ar_run.checkpoint, "--floors")
    assert rc == 0 and "Floor: bigram" in out and "±" in out


def test_init_from_starts_a_new_run_from_another_runs_weights(tiny_ar_run, tiny_ae_run, capsys):
    """model.init_from: a new run (step 0, new optimiser) starting from another run's weights;
    a shape mismatch or another model kind is one line naming the problem."""
    ckpt = tiny_ar_run.checkpoint
    rc, _, err = _train_variant(capsys, tiny_ar_run, "logging.name=ft", f"model.init_from={ckpt}",
                                "trainer.max_steps=1", "optim.lr=1e-12", "optim.weight_decay=0")
    assert rc == 0, err
    source = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    tuned = torch.load(tiny_ar_run.runs_dir / "ft" / "version_0" / "checkpoints" / "last.ckpt",
                       map_location="cpu", weights_only=False)
    assert tuned["global_step"] == 1
    for k, v in source.items():  # one step at lr 1e-12: still the source's weights
        torch.testing.assert_close(tuned["state_dict"][k], v, atol=1e-6, rtol=0)
    rc, _, err = _train_variant(capsys, tiny_ar_run, "logging.name=ft_bad", f"model.init_from={ckpt}",
                                "model.backbone.ffn_size=48")
    assert rc == 2 and "has shape" in err and "ffn" in err and err.count("\n") == 1
    rc, _, err = _train_variant(capsys, tiny_ar_run, "logging.name=ft_kind", f"model.init_from={tiny_ae_run.checkpoint}")
    assert rc == 2 and "autoencoder checkpoint" in err


def test_init_from_an_autoencoder_export(tiny_ae_run, capsys):
    rc, _, err = _train_variant(capsys, tiny_ae_run, "logging.name=ae_ft", f"model.init_from={tiny_ae_run.export_path}",
                                "logging.export_path=''", "trainer.max_steps=1", "optim.lr=1e-12", "optim.weight_decay=0")
    assert rc == 0, err
    export = torch.load(tiny_ae_run.export_path, map_location="cpu", weights_only=False)["state_dict"]
    tuned = torch.load(tiny_ae_run.runs_dir / "ae_ft" / "version_0" / "checkpoints" / "last.ckpt",
                       map_location="cpu", weights_only=False)["state_dict"]
    for k, v in export.items():
        torch.testing.assert_close(tuned[f"model.{k}"], v, atol=1e-6, rtol=0)


def test_calm_validation_step_shares_one_backbone_pass_with_the_brier_estimate(tiny_calm_run):
    """K >= max_n: the loss and the Brier estimate read the same hidden states (one backbone call per
    batch, not two), and the Brier sums are exactly those of a separate estimate_brier call."""
    from calm_lightning.checkpoints import read_checkpoint
    from calm_lightning.metrics.estimators import estimate_brier

    module = read_checkpoint(tiny_calm_run.checkpoint).build_module().eval()
    calls = []
    module.model.backbone.register_forward_hook(lambda *a: calls.append(1))
    batch = torch.randint(0, 200, (2, 32), generator=torch.Generator().manual_seed(0))
    module.log = lambda *a, **k: None  # outside a Trainer
    with torch.no_grad():
        module.validation_step(batch, 0)
    assert len(calls) == 1
    shared = module.brier.sums.clone() if hasattr(module.brier, "sums") else None
    gen = torch.Generator().manual_seed(module.cfg.trainer.seed + 0)
    sums, counts = estimate_brier(module.model, batch, max_n=module.cfg.eval.brier_max_n, generator=gen,
                                  num_samples=module.cfg.eval.num_samples)
    module.brier.reset()
    module.brier.update(sums, counts)
    separate = module.brier.compute()
    module.brier.reset()
    with torch.no_grad():
        module.validation_step(batch, 0)
    assert {k: float(v) for k, v in module.brier.compute().items()} == {k: float(v) for k, v in separate.items()}
    assert shared is None or torch.equal(shared, module.brier.sums)


def test_calm_training_objective_adds_the_weighted_aux_ce_and_logs_its_parts(tiny_calm_run):
    """model.head.aux_token_weight = w: the optimiser sees head loss + w * aux CE, and train/head_loss stays the
    head loss alone (comparable with runs without it); validation's loss is the head loss only."""
    import copy

    from calm_lightning.checkpoints import read_checkpoint
    from calm_lightning.lit.lm_modules import CALMLitModule

    ckpt = read_checkpoint(tiny_calm_run.checkpoint)
    config = copy.deepcopy(ckpt.hparams["config"])
    config["model"]["head"]["aux_token_weight"] = 0.5
    module = CALMLitModule(config, ckpt.hparams["autoencoder_config"])
    batch = torch.randint(0, 200, (2, 32), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    objective, parts = module.training_objective(batch)
    assert set(parts) == {"head_loss", "aux_ce", "objective"}
    torch.testing.assert_close(objective, parts["head_loss"] + 0.5 * parts["aux_ce"])
    torch.manual_seed(0)
    torch.testing.assert_close(module.model.loss(batch).loss, parts["head_loss"])
    with torch.no_grad():
        torch.manual_seed(1)
        val_loss, _ = module.validation_loss(batch)
        torch.manual_seed(1)
        torch.testing.assert_close(val_loss, module.model.loss(batch).loss)  # no aux term in validation
    off, off_parts = CALMLitModule(ckpt.hparams["config"], ckpt.hparams["autoencoder_config"]).training_objective(batch)
    assert set(off_parts) == {"head_loss"}
