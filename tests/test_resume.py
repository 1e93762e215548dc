"""A resumed run continues exactly where the interrupted one stopped: same data order, same weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import torch

from calm_lightning.data.datamodule import EpochShuffleSampler, ResumableLoader, TokenBlocks


def _blocks(tmp_path, n_tokens=1000, block=10) -> TokenBlocks:
    path = tmp_path / "train.bin"
    np.arange(n_tokens, dtype=np.uint16).tofile(path)
    return TokenBlocks(path, "uint16", n_tokens, block)


def test_loader_state_continues_the_epoch_order(tmp_path):
    done = {"n": 0}

    def loader():
        ds = _blocks(tmp_path)
        return ResumableLoader(ds, batch_size=4, sampler=EpochShuffleSampler(ds, seed=3), drop_last=True,
                               batches_done=lambda: done["n"])

    full = loader()
    full.sampler.set_epoch(2)
    reference = [b[:, 0].tolist() for b in full]  # first token of each block identifies it
    done["n"] = 7  # checkpoint taken after 7 processed batches of epoch 2
    state = full.state_dict()
    assert state == {"epoch": 2, "batches_done": 7}

    resumed = loader()
    resumed.sampler.set_epoch(2)  # Lightning sets the epoch, then loads the loader state, then iterates
    resumed.load_state_dict(state)
    assert [b[:, 0].tolist() for b in resumed] == reference[7:]
    # the skip applies once: the next pass over an epoch is whole again
    resumed.sampler.set_epoch(3)
    full.sampler.set_epoch(3)
    assert [b[:, 0].tolist() for b in resumed] == [b[:, 0].tolist() for b in full]


def test_skip_is_ignored_for_another_epoch(tmp_path):
    ds = _blocks(tmp_path)
    sampler = EpochShuffleSampler(ds, seed=0)
    sampler.set_epoch(1)
    whole = list(sampler)
    sampler.resume_at(epoch=0, start=8)  # saved at the very end of epoch 0; Lightning moved to epoch 1
    assert list(sampler) == whole


def _state(ckpt):
    ck = torch.load(ckpt, map_location="cpu", weights_only=False)
    return ck["global_step"], ck["state_dict"], ck["optimizer_states"][0]["state"], ck["lr_schedulers"][0]


def test_kill_and_resume_matches_uninterrupted_run(tiny_ar_run):
    """kill -9 mid-run, resume: final weights, optimiser and scheduler equal an uninterrupted run's, bit
    for bit (the token baseline on one CPU thread is deterministic). 16-block batches make an epoch ~30
    steps, so the 50 steps cross an epoch boundary and the kill lands mid-epoch."""
    common = [*tiny_ar_run.overrides, "data.batch_size=16", "trainer.max_steps=50",
              "trainer.checkpoint_every_n_steps=7", "trainer.val_check_interval=25", "logging.resume=true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def cmd(name):
        return [sys.executable, "-m", "calm_lightning", "train", str(tiny_ar_run.config), *common,
                f"logging.name={name}"]

    ref = subprocess.run(cmd("uninterrupted"), env=env, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]

    ckpt = tiny_ar_run.runs_dir / "resumed" / "version_0" / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(cmd("resumed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    step_at_kill = torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]
    assert 0 < step_at_kill < 50
    done = subprocess.run(cmd("resumed"), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "not resumable" not in done.stderr  # Lightning's warning for loaders that restart the epoch

    step, weights, opt, sched = _state(ckpt)
    ref_step, ref_weights, ref_opt, ref_sched = _state(tiny_ar_run.runs_dir / "uninterrupted" / "version_0"
                                                       / "checkpoints" / "last.ckpt")
    assert step == ref_step == 50
    assert weights.keys() == ref_weights.keys()
    for name in weights:
        assert torch.equal(weights[name], ref_weights[name]), name
    for pid in ref_opt:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt[pid][key], ref_opt[pid][key]), (pid, key)
    assert sched["last_epoch"] == ref_sched["last_epoch"] == 50
