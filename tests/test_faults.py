"""Fault injection: kill -9 a real `calm train` mid-run, run it again, and it resumes to the end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import torch


def test_kill_during_training_then_resume(tiny_ar_run, tmp_path):
    overrides = [*tiny_ar_run.overrides, "logging.name=killed", "logging.resume=true", "trainer.max_steps=60",
                 "trainer.checkpoint_every_n_steps=5", "trainer.val_check_interval=30"]
    cmd = [sys.executable, "-m", "calm_lightning", "train", str(tiny_ar_run.config), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ckpt = tiny_ar_run.runs_dir / "killed" / "version_0" / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed; make it longer"
        os.kill(proc.pid, signal.SIGKILL)  # no cleanup, no atexit: a real crash
    finally:
        proc.wait(timeout=60)
    step_at_kill = torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]
    assert 0 < step_at_kill < 60
    leftovers = [p.name for p in ckpt.parent.iterdir() if p.name.endswith(".tmp")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Restored all states from the checkpoint" in done.stdout + done.stderr  # resumed, not restarted
    final = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert final["global_step"] == 60
    assert sorted(p.name for p in ckpt.parents[2].iterdir()) == ["version_0"]  # same run, curves continue
    # a temp file left by the kill is never mistaken for a checkpoint, and the resumed run still finished
    assert all(not name.endswith(".ckpt") for name in leftovers)
