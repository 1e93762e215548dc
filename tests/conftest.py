"""Shared session fixtures: a tiny synthetic corpus and tiny runs trained through the real `calm train`.

The runs take a few seconds each and are built once per session, on first use:

- ``tiny_corpus``: a folder of seeded synthetic ``.txt`` documents.
- ``tiny_ae_run``: an autoencoder trained for 2 steps and exported (``run.export_path``).
- ``tiny_calm_run``: CALM (energy head) on that export, 2 steps.
- ``tiny_ar_run``: the token baseline, 2 steps.

Each run is a ``TinyRun`` (run directory, checkpoint, cache dir, export path, the YAML and the exact
``key=value`` overrides given to ``calm train``). All runs share one data cache, so the tokenizer is
trained once and the CALM run passes the export's tokenizer check. To train a variant, pass
``[*run.overrides, "key=value", ...]`` (later overrides win) with a new ``logging.name``; treat the
fixture's own directories as read-only, since other tests share them.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path

import pytest

TINY_WORDS = (
    "the king queen night day love death sword crown heart blood fair sweet lord lady shall doth thou "
    "thee art hath noble grief wind sea fire never ever gentle speak good my lord, and; what? so! café"
).split()


@dataclass(frozen=True)
class TinyRun:
    """A finished tiny run. ``overrides`` reproduce it: ``calm train <config> <overrides...>``."""

    kind: str  # autoencoder | calm | ar
    run_dir: Path  # <runs_dir>/<name>/version_0
    checkpoint: Path  # run_dir/checkpoints/last.ckpt
    cache_dir: Path  # data.cache_dir (shared by every tiny run)
    runs_dir: Path  # logging.runs_dir (shared)
    config: Path  # the (nearly empty) YAML given to `calm train`
    overrides: tuple[str, ...]  # everything else, as key=value
    export_path: Path | None = None  # the exported autoencoder (autoencoder run only)


def tiny_overrides(corpus: Path, root: Path, kind: str, name: str) -> list[str]:
    """Overrides for a tiny CPU run of ``kind`` on ``corpus``, with its cache and runs under ``root``."""
    return [
        f"model.kind={kind}",
        f"data.corpus={corpus}",
        f"data.cache_dir={root / 'cache'}",
        "data.block_size=32",
        "data.batch_size=2",
        "data.val_fraction=0.2",
        "data.prepare_workers=1",
        "tokenizer.vocab_size=300",
        "model.autoencoder.chunk_size=4",
        "model.autoencoder.latent_size=8",
        "model.autoencoder.d_model=16",
        "model.autoencoder.ffn_size=32",
        "model.backbone.n_layers=1",
        "model.backbone.d_model=32",
        "model.backbone.n_heads=2",
        "model.backbone.ffn_size=64",
        "model.backbone.max_seq_len=32",
        "model.head.num_samples=2",
        "model.head.energy.noise_size=8",
        "model.head.energy.num_target_samples=4",
        "optim.warmup_steps=0",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        "trainer.threads=1",
        "trainer.seed=0",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "trainer.checkpoint_every_n_steps=2",
        "trainer.log_every_n_steps=1",
        "eval.brier_max_n=2",
        "sampling.prompts=[the king]",
        "sampling.temperatures=[1.0,0.5]",
        "sampling.num_candidates=8",
        "sampling.max_new_tokens=8",
        f"logging.runs_dir={root / 'runs'}",
        f"logging.name={name}",
    ]


def _train(root: Path, kind: str, name: str, corpus: Path, extra: list[str]) -> TinyRun:
    from calm_lightning.cli import main

    config = root / "tiny.yaml"
    if not config.exists():
        config.write_text("# Tiny CPU test runs (tests/conftest.py); every setting is an override.\n")
    overrides = tiny_overrides(corpus, root, kind, name) + extra
    rc = main(["--debug", "train", str(config), *overrides])
    assert rc == 0, f"tiny {kind} run failed (exit {rc})"
    run_dir = root / "runs" / name / "version_0"
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file(), f"tiny {kind} run wrote no {checkpoint}"
    return TinyRun(kind, run_dir, checkpoint, root / "cache", root / "runs", config, tuple(overrides))


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny_runs")


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A folder of 10 seeded synthetic .txt documents (~1.5k words each, a little non-ASCII)."""
    root = tmp_path_factory.mktemp("tiny_corpus")
    rng = random.Random(0)
    for i in range(10):
        lines = [" ".join(rng.choice(TINY_WORDS) for _ in range(rng.randint(4, 10))) for _ in range(200)]
        (root / f"doc{i:02d}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def tiny_ae_run(tiny_root: Path, tiny_corpus: Path) -> TinyRun:
    export = tiny_root / "ae.pt"
    run = _train(tiny_root, "autoencoder", "ae", tiny_corpus, [f"logging.export_path={export}"])
    assert export.is_file()
    return dataclasses.replace(run, export_path=export)


@pytest.fixture(scope="session")
def tiny_calm_run(tiny_root: Path, tiny_corpus: Path, tiny_ae_run: TinyRun) -> TinyRun:
    return _train(
        tiny_root, "calm", "calm", tiny_corpus, [f"model.autoencoder_path={tiny_ae_run.export_path}"]
    )


@pytest.fixture(scope="session")
def tiny_ar_run(tiny_root: Path, tiny_corpus: Path) -> TinyRun:
    return _train(tiny_root, "ar", "ar", tiny_corpus, [])
