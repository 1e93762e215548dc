"""Run directories across the processes of one run (runs.py): who is rank zero, and one shared version."""

from __future__ import annotations

import pytest

from calm_lightning.runs import RUN_ENV, is_rank_zero, shared_run

RANK_VARS = ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID", RUN_ENV)


@pytest.fixture
def env(monkeypatch):
    for var in RANK_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    ("variables", "zero"),
    [
        ({}, True),  # a lone process
        ({"LOCAL_RANK": "0", "NODE_RANK": "0"}, True),  # Lightning's launching process
        ({"LOCAL_RANK": "1", "NODE_RANK": "0"}, False),  # a process Lightning launched
        ({"LOCAL_RANK": "1", "SLURM_PROCID": "0"}, False),  # ... which inherited the job's SLURM_PROCID
        ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, False),  # first process of the second node
        ({"RANK": "0", "LOCAL_RANK": "0"}, True),  # torchrun
        ({"RANK": "5", "LOCAL_RANK": "0"}, False),
        ({"SLURM_PROCID": "0"}, True),  # srun
        ({"SLURM_PROCID": "3"}, False),
    ],
)
def test_rank_zero_from_the_launcher_environment(env, variables, zero):
    for var, value in variables.items():
        env.setenv(var, value)
    assert is_rank_zero() is zero


def test_other_ranks_take_rank_zeros_version(env, tmp_path):
    (tmp_path / "exp" / "version_0").mkdir(parents=True)
    assert shared_run(str(tmp_path), "exp", resume=False) == (1, None)  # rank zero: a new version
    (tmp_path / "exp" / "version_1").mkdir()  # rank zero's logger created it
    env.setenv("LOCAL_RANK", "1")
    assert shared_run(str(tmp_path), "exp", resume=False) == (1, None)  # not version 2
    # a published run of another experiment is not taken
    for v in range(3):
        (tmp_path / "other" / f"version_{v}").mkdir(parents=True)
    assert shared_run(str(tmp_path), "other", resume=False) == (3, None)


def test_published_resume_checkpoint_is_shared(env, tmp_path):
    ckpt = tmp_path / "exp" / "version_0" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")
    assert shared_run(str(tmp_path), "exp", resume=True) == (0, ckpt)
    env.setenv("LOCAL_RANK", "1")
    assert shared_run(str(tmp_path), "exp", resume=True) == (0, ckpt)
