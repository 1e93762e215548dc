"""Config schema, YAML chains and overrides: strict, typed, errors naming the full key."""

from pathlib import Path

import pytest

from calm_lightning.config.loader import load_config, to_object
from calm_lightning.errors import CalmError

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_without_yaml():
    cfg = load_config(None)
    assert cfg.model.kind == "autoencoder"
    assert cfg.model.autoencoder.chunk_size == 4


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.rglob("*.yaml")), ids=lambda p: p.name)
def test_every_experiment_yaml_loads(path):
    cfg = load_config(path)
    assert cfg.data.block_size % cfg.model.autoencoder.chunk_size == 0


def test_base_chain_and_overrides(tmp_path):
    write(tmp_path, "base.yaml", "model:\n  kind: calm\n  backbone:\n    d_model: 64\n    n_heads: 2\n")
    child = write(tmp_path, "child.yaml", "base: base.yaml\nmodel:\n  head:\n    name: flow\n")
    cfg = load_config(child, ["trainer.max_steps=7", "model.backbone.n_layers=3"])
    assert (cfg.model.kind, cfg.model.backbone.d_model, cfg.model.head.name) == ("calm", 64, "flow")
    assert cfg.trainer.max_steps == 7 and cfg.model.backbone.n_layers == 3


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.max_stepz=5"], "trainer.max_stepz: unknown config key"),
        (["trainer.max_steps=abc"], "trainer.max_steps"),
        (["model.kind=gpt"], "model.kind: must be one of autoencoder, calm, ar"),
        (["data.block_size=30"], "data.block_size: must be a multiple of model.autoencoder.chunk_size K=4"),
        (["model.autoencoder.latent_size=0"], "model.autoencoder.latent_size: must be > 0"),
        (["sampling.temperatures=[1.5]"], "sampling.temperatures[0]: must be in (0, 1]"),
        (["model.head.name=gan"], "model.head.name: must be one of"),
        (["model.head.energy.alpha=2.0"], "model.head.energy.alpha"),
        (["model.head.aux_token_weight=-0.1"], "model.head.aux_token_weight: must be >= 0"),
        (["model.head.aux_token_weight=nan"], "model.head.aux_token_weight: must be >= 0"),
        (["optim.schedule=linear"], "optim.schedule: must be one of constant, constant_with_warmup, cosine"),
        (["sampling.sampler=batch", "sampling.temperatures=[0.25]", "sampling.num_candidates=3"], "sampling.num_candidates"),
        (["trainer.max_steps"], "not of the form key=value"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(CalmError, match=None) as exc:
        load_config(None, overrides)
    assert message in str(exc.value)


def test_unknown_key_in_yaml(tmp_path):
    p = write(tmp_path, "bad.yaml", "optim:\n  learning_rate: 0.1\n")
    with pytest.raises(CalmError, match="optim.learning_rate: unknown config key"):
        load_config(p)


def test_yaml_syntax_error_gives_file_and_line(tmp_path):
    p = write(tmp_path, "bad.yaml", "model:\n  kind: calm\n  backbone: [1, 2\n")
    with pytest.raises(CalmError) as exc:
        load_config(p)
    assert f"{p}:" in str(exc.value) and "YAML syntax error" in str(exc.value)


def test_missing_base_is_named(tmp_path):
    p = write(tmp_path, "child.yaml", "base: nowhere.yaml\n")
    with pytest.raises(CalmError, match="base config 'nowhere.yaml' not found"):
        load_config(p)


def test_missing_config_file(tmp_path):
    with pytest.raises(CalmError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_wrong_type_in_yaml(tmp_path):
    p = write(tmp_path, "bad.yaml", "data:\n  batch_size: many\n")
    with pytest.raises(CalmError, match="data.batch_size"):
        load_config(p)


def test_tokens_per_step_sets_accumulation_and_must_divide():
    from calm_lightning.training import accumulation

    exp = to_object(load_config(None, ["data.batch_size=4", "data.block_size=64", "optim.tokens_per_step=1024",
                                       "trainer.accelerator=cpu"]))
    assert accumulation(exp) == 4  # 1024 / (4 x 64 x 1 process)
    two = to_object(load_config(None, ["data.batch_size=4", "data.block_size=64", "optim.tokens_per_step=1024",
                                       "trainer.accelerator=cpu", "trainer.devices=2"]))
    assert accumulation(two) == 2
    off = to_object(load_config(None, ["optim.accumulate_grad_batches=3"]))
    assert accumulation(off) == 3  # tokens_per_step=0 leaves the explicit count
    bad = to_object(load_config(None, ["data.batch_size=3", "data.block_size=64", "optim.tokens_per_step=1000",
                                       "trainer.accelerator=cpu"]))
    with pytest.raises(CalmError, match=r"optim.tokens_per_step=1000 is not a multiple of .* = 192"):
        accumulation(bad)
    with pytest.raises(CalmError, match="optim.tokens_per_step"):
        load_config(None, ["optim.tokens_per_step=-1"])


@pytest.mark.parametrize(
    ("typed", "resolved"), [("32", "32-true"), ("bf16", "bf16-mixed"), ("16", "16-mixed"), ("64", "64-true"),
                            ("bf16-true", "bf16-true")]
)
def test_lightning_precision_aliases_are_accepted(tmp_path, typed, resolved):
    from calm_lightning.utils.hardware import resolve_precision

    cfg = to_object(load_config(None, [f"trainer.precision={typed}"]))
    assert resolve_precision(cfg.trainer.precision, "cpu") == resolved
    yaml = tmp_path / "p.yaml"
    yaml.write_text("trainer:\n  precision: 32\n")  # an int in YAML, as users type it
    assert resolve_precision(to_object(load_config(yaml)).trainer.precision, "cpu") == "32-true"
    with pytest.raises(CalmError, match="trainer.precision"):
        load_config(None, ["trainer.precision=8"])
