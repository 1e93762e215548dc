"""Fault injection through the real CLI: kill -9 mid-write and rerun; damaged artefacts are refused.

One kill lands anywhere in a training run; the others land while an atomic write is in flight: the
test polls (every millisecond) for the temporary file the write creates and sends SIGKILL as soon as
it appears, then asserts the temporary file is still there, proof that the process died mid-write.
The rerun must finish and give exactly what an uninterrupted run gives. Every damaged artefact (truncated or
bit-flipped checkpoint, export, tokenizer, shard) must be refused with one line naming it and exit
code 2, never a traceback and never silent use.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from calm_lightning.artifacts import read_autoencoder_meta
from calm_lightning.cli import main
from calm_lightning.utils.io import torch_file_problem

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# A wider baseline than the fixtures' (0.6M parameters, 7 MB checkpoints with the Adam state), so that a
# checkpoint write (with its fsync) lasts long enough to be caught in flight; a step still takes ms.
WIDE_AR = ["model.backbone.d_model=128", "model.backbone.ffn_size=512", "model.backbone.n_layers=2"]
# A wider autoencoder for the same reason: an 8.5 MB export.
WIDE_AE = ["model.autoencoder.d_model=192", "model.autoencoder.ffn_size=768"]


def calm(*args: object) -> list[str]:
    return [sys.executable, "-m", "calm_lightning", *map(str, args)]


def run_cli(capsys, *argv: object) -> tuple[int, str]:
    """`calm ...` in this process; (exit code, stderr)."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def assert_refused(rc: int, err: str, *needles: str) -> None:
    """Exit code 2 and one line on stderr containing every needle, no traceback."""
    assert rc == 2, err
    assert err.startswith("error: ") and err.strip().count("\n") == 0 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def kill_when(cmd: list[str], ready: Callable[[], bool], log: Path, timeout: float = 180) -> None:
    """Start ``cmd`` and SIGKILL it the moment ``ready()`` holds; fail if it ends on its own first."""
    killed = False
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=ENV, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while proc.poll() is None and time.monotonic() < deadline:
                if ready():
                    os.kill(proc.pid, signal.SIGKILL)  # no cleanup, no atexit, no finally: a real crash
                    killed = True
                    break
                time.sleep(0.001)
        finally:
            if proc.poll() is None:  # timed out, or killed above and not yet reaped
                proc.kill()
            proc.wait(timeout=60)
    tail = log.read_text(errors="replace")[-2000:]
    assert killed and proc.returncode == -signal.SIGKILL, (
        f"ended with {proc.returncode} before the fault was injected:\n{tail}"
    )


def run_ok(cmd: list[str]) -> str:
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout + done.stderr


def temp_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp")) if folder.is_dir() else []


def file_digests(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` by relative path; meta.json without its mtimes (not content)."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.name == "meta.json":
            meta = json.loads(data)
            for split in meta["splits"].values():
                split.pop("mtime_ns")
            data = json.dumps(meta, sort_keys=True).encode()
        out[str(path.relative_to(root))] = hashlib.sha256(data).hexdigest()
    return out


def flip_bit_in_tensor_data(path: Path) -> None:
    """Flip one bit inside the largest tensor of a torch.save file (not in its zip bookkeeping)."""
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0x04
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------------------------------
# calm prepare


@pytest.fixture(scope="module")
def prepare_corpus(tmp_path_factory) -> Path:
    """~0.5 MB of seeded text in 8 documents: tokenising it takes about half a second on one thread."""
    root = tmp_path_factory.mktemp("prepare_corpus")
    rng = random.Random(8)
    words = [
        "".join(rng.choice("abcdefghijklmnoprstuvwyz") for _ in range(rng.randint(2, 9))) for _ in range(3000)
    ]
    for i in range(8):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 14))) for _ in range(1000)]
        (root / f"doc{i}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def prepare_args(tmp_path: Path, corpus: Path, cache: Path) -> list[object]:
    config = tmp_path / "prepare.yaml"
    config.write_text("# fault tests: every setting is an override\n")
    return [
        "prepare",
        config,
        f"data.corpus={corpus}",
        f"data.cache_dir={cache}",
        "data.block_size=32",
        "data.val_fraction=0.2",
        "data.prepare_workers=1",
        "tokenizer.vocab_size=300",
    ]


@pytest.fixture(scope="module")
def uninterrupted_prepare(prepare_corpus, tmp_path_factory) -> dict[str, str]:
    """Digests of every file an uninterrupted `calm prepare` writes, in a cache of its own."""
    root = tmp_path_factory.mktemp("prepare_reference")
    run_ok(calm(*prepare_args(root, prepare_corpus, root / "cache")))
    digests = file_digests(root / "cache")
    assert any(k.endswith("train.bin") for k in digests) and any(
        k.endswith("tokenizer.sha256") for k in digests
    )
    return digests


@pytest.mark.parametrize("split", ["train", "val"])
def test_kill_during_prepare_then_rerun_gives_identical_files(
    split, prepare_corpus, uninterrupted_prepare, tmp_path
):
    cache = tmp_path / "cache"
    cmd = calm(*prepare_args(tmp_path, prepare_corpus, cache))

    def writing_shard() -> bool:
        return any(cache.glob(f"*/shards-*/.{split}.bin.*.tmp"))

    kill_when(cmd, writing_shard, tmp_path / "killed.log")
    (shard_dir,) = cache.glob("*/shards-*")
    assert [p.name.split(".")[1] for p in temp_files(shard_dir)] == [split]  # died mid-write of that shard
    assert not (shard_dir / "meta.json").exists()  # nothing committed, so nothing can be read back
    assert (shard_dir / "train.bin").exists() == (split == "val")  # the train shard was already complete

    run_ok(cmd)
    assert temp_files(shard_dir) == []
    assert file_digests(cache) == uninterrupted_prepare  # tokenizer, checksum, shards, meta: same bytes


# --------------------------------------------------------------------------------------------------
# training, checkpoints and the autoencoder export


def test_kill_during_training_then_resume(tiny_ar_run, tmp_path):
    overrides = [
        *tiny_ar_run.overrides,
        "logging.name=killed",
        "logging.resume=true",
        "trainer.max_steps=60",
        "trainer.checkpoint_every_n_steps=5",
        "trainer.val_check_interval=30",
    ]
    cmd = calm("train", tiny_ar_run.config, *overrides)
    ckpt = tiny_ar_run.runs_dir / "killed" / "version_0" / "checkpoints" / "last.ckpt"
    kill_when(cmd, ckpt.exists, tmp_path / "killed.log")
    step_at_kill = torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]
    assert 0 < step_at_kill < 60
    out = run_ok(cmd)
    assert "Restored all states from the checkpoint" in out  # resumed, not restarted
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 60
    assert sorted(p.name for p in ckpt.parents[2].iterdir()) == ["version_0"]  # same run, curves continue


def test_kill_during_checkpoint_write_then_resume(tiny_ar_run, tmp_path):
    name, max_steps = "ckpt_kill", 6
    cmd = calm(
        "train",
        tiny_ar_run.config,
        *tiny_ar_run.overrides,
        *WIDE_AR,
        f"logging.name={name}",
        "logging.resume=true",
        f"trainer.max_steps={max_steps}",
        "trainer.checkpoint_every_n_steps=1",
        "trainer.val_check_interval=3",
    )
    ckpt_dir = tiny_ar_run.runs_dir / name / "version_0" / "checkpoints"
    last = ckpt_dir / "last.ckpt"

    def writing_after_a_good_one() -> bool:
        return last.exists() and bool(temp_files(ckpt_dir))

    kill_when(cmd, writing_after_a_good_one, tmp_path / "killed.log")
    leftovers = temp_files(ckpt_dir)
    assert leftovers, "the kill did not land mid-write"
    assert torch_file_problem(last) is None  # the previous checkpoint is intact ...
    step_at_kill = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert 0 < step_at_kill < max_steps  # ... and it is a real one, from before the kill

    out = run_ok(cmd)
    assert "Restored all states from the checkpoint" in out  # resumed, not restarted
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == max_steps
    assert not any(p.exists() for p in leftovers) and temp_files(ckpt_dir) == []  # removed, never read
    assert sorted(p.name for p in ckpt_dir.parents[1].iterdir()) == ["version_0"]


def test_kill_during_autoencoder_export_keeps_the_last_good_one(tiny_ae_run, tmp_path, capsys):
    export = tmp_path / "export" / "ae.pt"
    args = [
        "train",
        tiny_ae_run.config,
        *tiny_ae_run.overrides,
        *WIDE_AE,
        "logging.name=export_kill",
        "logging.resume=true",
        f"logging.export_path={export}",
        "trainer.checkpoint_every_n_steps=100",
    ]
    # the run before and the rerun after the kill go through the CLI in this process (no import time)
    assert run_cli(capsys, *args, "trainer.max_steps=1")[0] == 0
    good = read_autoencoder_meta(export)  # verifies the sha256 sidecar

    kill_when(
        calm(*args, "trainer.max_steps=2"),
        lambda: any(export.parent.glob(".ae.pt.*.tmp")),
        tmp_path / "killed.log",
    )
    assert any(export.parent.glob(".ae.pt.*.tmp")), "the kill did not land mid-export"
    assert read_autoencoder_meta(export)["sha256"] == good["sha256"]  # the previous export, intact

    assert run_cli(capsys, *args, "trainer.max_steps=2")[0] == 0  # finished: revalidates and exports again
    new = read_autoencoder_meta(export)
    assert new["sha256"] != good["sha256"] and temp_files(export.parent) == []
    last = tiny_ae_run.runs_dir / "export_kill" / "version_0" / "checkpoints" / "last.ckpt"
    trained = torch.load(last, map_location="cpu", weights_only=False)
    assert trained["global_step"] == 2
    exported = torch.load(export, map_location="cpu", weights_only=False)["state_dict"]
    # the export holds the step-2 weights
    assert all(torch.equal(v, trained["state_dict"][f"model.{k}"]) for k, v in exported.items())


# --------------------------------------------------------------------------------------------------
# damaged artefacts: refused with one line, exit code 2, nothing trained


def damage(path: Path, how: str) -> None:
    if how == "truncate":
        path.write_bytes(path.read_bytes()[:-64])
    elif how == "bitflip":
        if zipfile.is_zipfile(path):
            flip_bit_in_tensor_data(path)
        else:
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0x04
            path.write_bytes(bytes(data))
    else:
        raise ValueError(how)


@pytest.mark.parametrize("how", ["truncate", "bitflip"])
@pytest.mark.parametrize("command", ["eval", "sample"])
def test_damaged_checkpoint_is_refused_by_eval_and_sample(command, how, tiny_ar_run, tmp_path, capsys):
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(tiny_ar_run.checkpoint.read_bytes())
    damage(ckpt, how)
    if how == "bitflip":  # torch.load alone takes it, wrong weights and all
        assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 2
    extra = ["--prompt", "the king", "--device", "cpu"] if command == "sample" else []
    rc, err = run_cli(capsys, command, ckpt, *extra)
    assert_refused(rc, err, f"{ckpt}: corrupt or truncated checkpoint")


@pytest.mark.parametrize("how", ["truncate", "bitflip"])
def test_damaged_last_checkpoint_stops_resume(how, tiny_ar_run, tmp_path, capsys):
    runs = tmp_path / "runs"
    (runs / "ar").mkdir(parents=True)
    last = runs / "ar" / "version_0" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(tiny_ar_run.checkpoint.read_bytes())
    damage(last, how)
    damaged = last.read_bytes()
    rc, err = run_cli(
        capsys,
        "train",
        tiny_ar_run.config,
        *tiny_ar_run.overrides,
        f"logging.runs_dir={runs}",
        "logging.resume=true",
        "trainer.max_steps=4",
    )
    assert_refused(rc, err, f"{last}: corrupt or truncated checkpoint, cannot resume")
    assert last.read_bytes() == damaged and sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]
    assert sorted(p.name for p in (runs / "ar").iterdir()) == ["version_0"]  # no fresh run started either


def test_bit_flipped_export_is_refused(tiny_ae_run, tiny_calm_run, tmp_path, capsys):
    export = tmp_path / "ae.pt"
    export.write_bytes(tiny_ae_run.export_path.read_bytes())
    export.with_suffix(".json").write_text(tiny_ae_run.export_path.with_suffix(".json").read_text())
    damage(export, "bitflip")
    rc, err = run_cli(
        capsys,
        "train",
        tiny_calm_run.config,
        *tiny_calm_run.overrides,
        f"model.autoencoder_path={export}",
        f"logging.runs_dir={tmp_path / 'runs'}",
    )
    assert_refused(rc, err, f"{export}: checksum mismatch")
    assert not (tmp_path / "runs").exists()


@pytest.fixture
def own_cache(tiny_ar_run, tmp_path, capsys) -> list[str]:
    """Overrides of the tiny baseline with its data prepared again into this test's own cache."""
    overrides = [
        *tiny_ar_run.overrides,
        f"data.cache_dir={tmp_path / 'cache'}",
        f"logging.runs_dir={tmp_path / 'runs'}",
    ]
    rc, err = run_cli(capsys, "prepare", tiny_ar_run.config, *overrides)
    assert rc == 0, err
    return overrides


def swap_two_token_ids(path: Path) -> None:
    """An edit the tokenizer parser accepts: two tokens trade ids (every later encoding changes)."""
    obj = json.loads(path.read_text(encoding="utf-8"))
    vocab = obj["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(obj), encoding="utf-8")


@pytest.mark.parametrize("how", ["swap_ids", "truncate", "garbage_without_checksum"])
def test_damaged_cached_tokenizer_is_refused(how, own_cache, tiny_ar_run, tmp_path, capsys):
    from tokenizers import Tokenizer

    (tok,) = (tmp_path / "cache").glob("*/tok-*/tokenizer.json")
    if how == "swap_ids":
        swap_two_token_ids(tok)
        Tokenizer.from_file(str(tok))  # still parses: only the checksum can tell
    elif how == "truncate":
        damage(tok, "truncate")
    else:
        tok.write_text("{ not a tokenizer")
        tok.with_name("tokenizer.sha256").unlink()
    rc, err = run_cli(capsys, "train", tiny_ar_run.config, *own_cache)
    needle = "not a valid tokenizer.json" if how == "garbage_without_checksum" else "checksum differs"
    assert_refused(rc, err, str(tok), needle, f"delete {tok.parent}")
    assert not (tmp_path / "runs").exists()  # refused before any training


def test_tokenizer_without_its_checksum_file_is_adopted(own_cache, tiny_ar_run, tmp_path, capsys):
    # the state a kill between tokenizer.json and tokenizer.sha256 leaves (or a cache from before checksums)
    (tok,) = (tmp_path / "cache").glob("*/tok-*/tokenizer.json")
    checksum = tok.with_name("tokenizer.sha256")
    recorded = checksum.read_text()
    checksum.unlink()
    assert run_cli(capsys, "prepare", tiny_ar_run.config, *own_cache)[0] == 0
    assert (
        checksum.read_text()
        == recorded
        == f"{hashlib.sha256(tok.read_bytes()).hexdigest()}  tokenizer.json\n"
    )


@pytest.mark.parametrize("how, needle", [("truncate", "shard has"), ("bitflip", "shard checksum differs")])
def test_damaged_shard_is_refused(how, needle, own_cache, tiny_ar_run, tmp_path, capsys):
    (shard,) = (tmp_path / "cache").glob("*/shards-*/train.bin")
    damage(shard, how)
    for command in ("train", "prepare"):  # neither trains on it nor quietly writes over it
        rc, err = run_cli(capsys, command, tiny_ar_run.config, *own_cache)
        assert_refused(rc, err, str(shard), needle)
    assert not (tmp_path / "runs").exists()


def test_large_shards_are_hashed_when_written_to_and_by_calm_prepare(
    own_cache, tiny_ar_run, tmp_path, capsys, monkeypatch
):
    from calm_lightning.data import shards
    from calm_lightning.errors import CalmError

    monkeypatch.setattr(shards, "HASH_ALWAYS_BYTES", 0)  # every shard counts as large
    (shard_dir,) = (tmp_path / "cache").glob("*/shards-*")
    train = shard_dir / "train.bin"
    # touched but intact (e.g. a copied cache): `calm prepare` verifies it and records the new time
    os.utime(train, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert run_cli(capsys, "prepare", tiny_ar_run.config, *own_cache)[0] == 0
    meta = shards.read_meta(shard_dir)
    assert meta["splits"]["train"]["mtime_ns"] == os.stat(train).st_mtime_ns
    # bits that rot without a write are not re-hashed on every start (the cost this design avoids) ...
    stat = os.stat(train)
    damage(train, "bitflip")
    os.utime(train, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert shards.verify_shards(shard_dir, meta)["train"] == train
    # ... but `calm prepare` hashes everything, and any write makes the next start hash the shard
    rc, err = run_cli(capsys, "prepare", tiny_ar_run.config, *own_cache)
    assert_refused(rc, err, str(train), "shard checksum differs")
    os.utime(train)
    with pytest.raises(CalmError, match="shard checksum differs"):
        shards.verify_shards(shard_dir, meta)
