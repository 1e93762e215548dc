"""`calm sample` end to end on tiny checkpoints trained through the real CLI (fixtures in conftest.py)."""

from __future__ import annotations

import pytest
from rich.console import Console

from calm_lightning.callbacks.samples import TemperatureSamples
from calm_lightning.checkpoints import load_language_model as load_for_sampling
from calm_lightning.cli import main
from calm_lightning.sampling.generate import GenerationConfig
from calm_lightning.sampling.text import sample_text as sample


def run_sample(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["sample", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_calm_sample_streams_the_continuation_reproducibly(tiny_calm_run, capsys):
    args = (
        str(tiny_calm_run.run_dir),
        "--prompt",
        "the king",
        "--max-new-tokens",
        "12",
        "--temperature",
        "0.5",
        "--num-candidates",
        "8",
        "--seed",
        "3",
        "--device",
        "cpu",
    )
    rc, out, err = run_sample(capsys, *args)
    assert rc == 0, err
    assert out.startswith("the king") and out.endswith("\n")
    assert "calm checkpoint step 2, K=4" in err and "batch sampler N=8" in err
    assert run_sample(capsys, *args)[1] == out  # same seed, same text

    # The streamed pieces add up to the text decoded at the end.
    loaded = load_for_sampling(tiny_calm_run.checkpoint, "cpu")
    result = sample(
        loaded, ["the king"], GenerationConfig(max_new_tokens=12, temperature=0.5, num_candidates=8), seed=3
    )
    assert out == "the king" + result.continuations[0] + "\n"
    assert 0 < len(result.tokens[0]) <= 12 and result.steps <= 3


def test_calm_exact_sampler_and_baseline_batch_of_prompts(tiny_calm_run, tiny_ar_run, capsys):
    rc, out, err = run_sample(
        capsys,
        str(tiny_calm_run.checkpoint),
        "--prompt",
        "love",
        "--sampler",
        "exact",
        "--temperature",
        "0.4",
        "--max-draws",
        "16",
        "--max-new-tokens",
        "8",
    )
    assert rc == 0, err
    assert out.startswith("love") and "exact sampler max_draws=16" in err

    rc, out, err = run_sample(
        capsys,
        str(tiny_ar_run.run_dir),
        "--prompt",
        "the king",
        "--prompt",
        "thou art",
        "--prompt",
        "",
        "--max-new-tokens",
        "6",
        "--temperature",
        "0.7",
    )
    assert rc == 0, err
    assert "ar checkpoint step 2" in err
    assert [line for line in out.splitlines() if line.startswith("─")] and "sample 3 of 3" in out
    assert "the king" in out and "thou art" in out


def test_the_tokenizer_is_found_without_preparing_the_data(tiny_ar_run, monkeypatch):
    from calm_lightning.data.datamodule import TokenChunkDataModule

    def fail(*a, **k):
        raise AssertionError("the data was prepared again")

    monkeypatch.setattr(TokenChunkDataModule, "from_config", fail)
    loaded = load_for_sampling(tiny_ar_run.run_dir, "cpu")
    assert loaded.kind == "ar" and loaded.chunk_size == 1
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("the king").ids) == "the king"


LONG = "the king and queen " * 60  # ~240 tokens: beyond 32 chunks of 4 (CALM) and 32 tokens (baseline)


@pytest.mark.parametrize(
    "run, args, message",
    [
        ("calm", ["--temperature", "0"], "temperature must be in (0, 1], got 0.0"),
        ("calm", ["--temperature", "1.5"], "temperature must be in (0, 1], got 1.5"),
        ("calm", ["--temperature", "0.25", "--num-candidates", "3"], "num_candidates must be >= 1/T = 4"),
        ("calm", ["--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
        ("calm", ["--prompt", LONG], "but the model's context is 32 chunks of K=4 tokens"),
        ("ar", ["--prompt", LONG], "but the model's context is 32 tokens"),
        ("ar", ["--prompt", "the", "--max-new-tokens", "40"], "plus max_new_tokens=40 needs"),
        ("ae", [], "is an autoencoder checkpoint"),
        ("missing", [], "checkpoint not found"),
        ("calm", ["--device", "warp-drive"], "unknown device"),
    ],
)
def test_bad_inputs_exit_2_with_one_line(run, args, message, capsys, request, tmp_path):
    paths = {
        "calm": lambda: request.getfixturevalue("tiny_calm_run").run_dir,
        "ar": lambda: request.getfixturevalue("tiny_ar_run").checkpoint,
        "ae": lambda: request.getfixturevalue("tiny_ae_run").run_dir,
        "missing": lambda: tmp_path / "no_such_run",
    }
    rc, out, err = run_sample(capsys, str(paths[run]()), *args)
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], err
    assert not any(line.startswith("Traceback") for line in lines)


def test_samples_callback_console_table_and_markdown():
    samples = [(1.0, "the king", "is [bold]dead[/bold]\nlong live | the king"), (0.5, "the king", "")]
    md = TemperatureSamples.markdown(TemperatureSamples.__new__(TemperatureSamples), samples, "1 skipped")
    assert md.splitlines()[:2] == ["| T | prompt | continuation |", "|---|---|---|"]
    assert "long live \\| the king" in md and "_1 skipped_" in md

    console = Console(record=True, width=120, color_system=None)
    console.print(TemperatureSamples.panel(samples, "1 skipped", step=7))
    text = console.export_text()
    assert "samples at step 7" in text and "continuation" in text and "1 skipped" in text
    assert "[bold]dead[/bold]" in text  # literal text, never markup
    assert "|---|" not in text and "⏎" in text
