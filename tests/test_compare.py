"""`calm compare` on tiny logged runs, `calm eval` with the head's sampling overrides, the HParams
summary of a run, `base:` lists and the comparison YAMLs (experiments/compare/)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from calm_lightning.cli import main
from calm_lightning.config.loader import load_config
from calm_lightning.errors import CalmError

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TABLE_COLUMNS = (
    "run",
    "model",
    "K",
    "steps",
    "BrierLM",
    "Brier-1",
    "Brier-2",
    "Brier-3",
    "Brier-4",
    "head params",
    "evals/vector",
    "train time",
    "train tokens/s",
    "train FLOPs",
    "gen tokens/s",
)


@pytest.fixture(scope="module")
def tiny_flow_run(tiny_calm_run) -> Path:
    """The tiny CALM run again with the flow head (midpoint, 4 steps by default)."""
    overrides = [*tiny_calm_run.overrides, "model.head.name=flow", "logging.name=cmp_flow"]
    assert main(["--debug", "train", str(tiny_calm_run.config), *overrides]) == 0
    run_dir = tiny_calm_run.runs_dir / "cmp_flow" / "version_0"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    return run_dir


def _table(markdown: str, first_column: str) -> list[list[str]]:
    """Rows (header first) of the markdown table whose header starts with ``| first_column |``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_column} |"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        if not line.startswith("|---"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def test_compare_writes_table_and_figures(tiny_calm_run, tiny_flow_run, tiny_ar_run, tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(
        [
            "compare",
            str(tiny_calm_run.run_dir),
            str(tiny_flow_run),
            str(tiny_ar_run.run_dir.parent),
            "--out",
            str(out),
            "--sweep-steps",
            "1,2",
            "--limit-batches",
            "1",
            "--gen-tokens",
            "8",
        ]
    )
    assert rc == 0
    markdown = (out / "comparison.md").read_text(encoding="utf-8")
    assert "| run | model |" in capsys.readouterr().out  # the table is printed too

    header, *rows = _table(markdown, "run")
    assert tuple(header) == TABLE_COLUMNS
    by_run = {row[0]: dict(zip(header, row)) for row in rows}
    assert set(by_run) == {"calm", "cmp_flow", "ar"}
    assert by_run["calm"]["model"] == "CALM-energy" and by_run["calm"]["evals/vector"] == "1"
    assert by_run["cmp_flow"]["evals/vector"] == "8"  # midpoint x 4 steps
    assert by_run["ar"]["model"] == "token baseline" and by_run["ar"]["head params"] == "—"
    for row in by_run.values():
        assert row["steps"] == "2" and row["BrierLM"] != "—" and "±" in row["Brier-1"]
        assert row["Brier-4"] == "—"  # the tiny runs evaluate Brier-1..2 only
        assert float(row["gen tokens/s"].replace(",", "")) > 0 and float(row["train FLOPs"]) > 0
    assert int(by_run["cmp_flow"]["head params"].replace(",", "")) > 0

    sweep_header, *sweep = _table(markdown, "run | head")
    points = {(r[1], r[2], r[3]) for r in sweep}
    assert points == {
        ("energy", "one-step", "1"),
        ("flow", "euler", "1"),
        ("flow", "euler", "2"),
        ("flow", "midpoint", "1"),
        ("flow", "midpoint", "2"),
    }

    # Floors on both position sets (CALM's chunk starts, the baseline's every token), and paired
    # differences: every pair of runs (same blocks) and each run against its bigram floor.
    floor_rows = _table(markdown, "floor")[1:]
    assert {r[0] for r in floor_rows} == {
        "unigram floor (every token)", "bigram floor (every token)",
        "unigram floor (chunk starts, K=4)", "bigram floor (chunk starts, K=4)",
    }
    paired = {(r[0], r[1]): r for r in _table(markdown, "A")[1:]}
    assert {("calm", "cmp_flow"), ("calm", "ar"), ("cmp_flow", "ar")} <= set(paired)
    assert ("ar", "bigram floor (every token)") in paired and ("calm", "bigram floor (chunk starts, K=4)") in paired
    assert all("±" in r[2] for r in paired.values())

    for name in ("brierlm_vs_step.png", "brierlm_vs_sampling_steps.png", "brierlm_vs_flops.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 10_000, name
        assert f"]({name})" in markdown
    summary = json.loads((out / "comparison.json").read_text())
    assert [r["label"] for r in summary["runs"]] == ["calm", "cmp_flow", "ar"] and len(summary["sweep"]) == 5
    assert len(summary["floors"]) == 4 and len(summary["paired"]) == len(paired)
    assert "val/brier1_se" in summary["runs"][0]["scores"] and "blocks" not in summary["runs"][0]
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_compare_two_energy_runs_has_no_sweep_or_flops_figure(tiny_calm_run, tmp_path):
    out = tmp_path / "cmp"
    assert (
        main(
            [
                "compare",
                str(tiny_calm_run.run_dir),
                str(tiny_calm_run.run_dir),
                "--out",
                str(out),
                "--gen-tokens",
                "0",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "brierlm_vs_step.png",
        "comparison.json",
        "comparison.md",
    ]
    labels = [row[0] for row in _table((out / "comparison.md").read_text(), "run")[1:]]
    assert labels == ["calm/version_0", "calm/version_0"]  # a shared name is told apart by its version


@pytest.mark.parametrize("kind", ["missing", "foreign", "autoencoder"])
def test_compare_bad_run_dir_is_one_line(kind, tiny_ae_run, tmp_path, capsys):
    path = {"missing": tmp_path / "nope", "foreign": tmp_path, "autoencoder": tiny_ae_run.run_dir}[kind]
    (tmp_path / "notes.txt").write_text("not a run")
    assert main(["compare", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert {
        "missing": "run directory not found",
        "foreign": "not a calm-lightning run",
        "autoencoder": "is an autoencoder run",
    }[kind] in err
    assert not (tmp_path / "out").exists()


def test_eval_uses_head_sampling_overrides(tiny_flow_run, monkeypatch, capsys):
    from calm_lightning.models.heads import flow

    seen = []
    real = flow.integrate_flow

    def spy(velocity, x0, num_steps, solver):
        seen.append((num_steps, solver))
        return real(velocity, x0, num_steps, solver)

    monkeypatch.setattr(flow, "integrate_flow", spy)
    rc = main(
        [
            "eval",
            str(tiny_flow_run),
            "model.head.flow.num_steps=2",
            "model.head.flow.solver=euler",
            "--limit-batches",
            "1",
            "--json",
        ]
    )
    assert rc == 0
    assert "val/brierlm" in json.loads(capsys.readouterr().out)["metrics"]
    assert seen and set(seen) == {(2, "euler")}  # trained with midpoint x 4: the override reached the head


@pytest.mark.parametrize(
    "override", ["model.backbone.n_layers=2", "model.head.num_samples=4", "model.head.flow.num_blocks=2"]
)
def test_eval_refuses_weight_changing_overrides(override, tiny_flow_run, capsys):
    assert main(["eval", str(tiny_flow_run), override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and override.split("=")[0] in err and "can be overridden" in err


def test_runs_log_hparams_for_tensorboard(tiny_flow_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(tiny_flow_run))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {"val/brierlm", "val/brier1", "val/head_loss"} <= {m.name.tag for m in experiment.metric_infos}
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["model/head/name"].string_value == "flow"
    assert start.session_start_info.hparams["trainer/max_steps"].number_value == 2


def test_base_list_merges_left_to_right(tmp_path):
    (tmp_path / "a.yaml").write_text("model:\n  kind: calm\ntrainer:\n  max_steps: 5\n  seed: 1\n")
    (tmp_path / "b.yaml").write_text("trainer:\n  max_steps: 7\n")
    (tmp_path / "c.yaml").write_text("base: [a.yaml, b.yaml]\ntrainer:\n  seed: 3\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert (cfg.model.kind, cfg.trainer.max_steps, cfg.trainer.seed) == ("calm", 7, 3)
    (tmp_path / "d.yaml").write_text("base: [a.yaml, nowhere.yaml]\n")
    with pytest.raises(CalmError, match="base config 'nowhere.yaml' not found"):
        load_config(tmp_path / "d.yaml")


def _resolved(path: Path) -> dict:
    return OmegaConf.to_container(load_config(path))


def test_head_experiments_differ_only_in_the_head():
    for head in ("flow", "diffusion"):
        energy, cfg = (
            _resolved(EXPERIMENTS / "calm_energy.yaml"),
            _resolved(EXPERIMENTS / f"calm_{head}.yaml"),
        )
        assert cfg["model"]["head"]["name"] == head
        for c in (cfg, energy):
            c["model"].pop("head"), c["logging"].pop("name")
        assert cfg == energy
    budgets = [
        _resolved(EXPERIMENTS / "compare" / f"heads_{h}.yaml") for h in ("energy", "flow", "diffusion")
    ]
    assert [b["logging"]["name"] for b in budgets] == ["heads_energy", "heads_flow", "heads_diffusion"]
    for section in ("data", "optim", "trainer", "sampling", "eval", "tokenizer"):
        assert budgets[0][section] == budgets[1][section] == budgets[2][section], section


def test_chunk_size_experiments_share_data_and_budget():
    baseline = _resolved(EXPERIMENTS / "compare" / "k_ar_baseline.yaml")
    for K in (1, 2, 4, 8):
        ae = _resolved(EXPERIMENTS / "compare" / f"ae_k{K}.yaml")
        lm = _resolved(EXPERIMENTS / "compare" / f"calm_k{K}.yaml")
        assert ae["model"]["autoencoder"]["chunk_size"] == lm["model"]["autoencoder"]["chunk_size"] == K
        assert (
            ae["model"]["autoencoder"]["latent_size"] == lm["model"]["autoencoder"]["latent_size"] == 32 * K
        )
        assert (
            ae["logging"]["export_path"]
            == lm["model"]["autoencoder_path"]
            == f"artifacts/autoencoder_k{K}.pt"
        )
        assert (
            lm["data"]["block_size"] % 8 == 0
            and lm["model"]["backbone"]["max_seq_len"] >= lm["data"]["block_size"] // K
        )
        assert lm["data"] == baseline["data"] and lm["trainer"] == baseline["trainer"]
        assert lm["optim"] == baseline["optim"] and lm["model"]["backbone"] == baseline["model"]["backbone"]
        assert ae["tokenizer"] == lm["tokenizer"]


def test_ablations_vary_one_thing_and_each_run_reads_an_autoencoder_of_its_shape():
    """Every run of docs/ablations.md reads an autoencoder some ablation YAML exports, with the same K
    and l; base is the paper's l = 128, and a run differs from base only where its name says."""
    folder = EXPERIMENTS / "ablations"
    exports = {}
    for path in folder.glob("ae_*.yaml"):
        ae = _resolved(path)
        exports[ae["logging"]["export_path"]] = ae["model"]["autoencoder"]
    base = _resolved(folder / "base.yaml")
    assert base["model"]["autoencoder"]["latent_size"] == 128
    runs = [p for p in folder.glob("*.yaml") if not p.name.startswith("ae_") and p.name != "budget.yaml"]
    assert len(runs) >= 14
    for path in runs:
        run = _resolved(path)
        made = exports[run["model"]["autoencoder_path"]]
        for key in ("chunk_size", "latent_size"):
            assert run["model"]["autoencoder"][key] == made[key], (path.name, key)
        changed = {
            f"{section}.{k}" for section in ("model", "optim", "data", "trainer")
            for k in set(run[section]) | set(base[section]) if run[section].get(k) != base[section].get(k)
        }
        assert len(changed - {"model.autoencoder_path", "model.autoencoder"}) <= 2, (path.name, changed)
