"""Run directories: runs/<name>/version_<n>, with resume of the latest version on request.

With several processes (``trainer.devices=N``) every rank runs ``train()``, and each would pick its own
"next" version: rank zero decides and the processes that Lightning launches inherit its decision
through the environment (``RUN_ENV``); only rank zero writes into the run directory.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from calm_lightning.errors import CalmError
from calm_lightning.utils.io import torch_file_problem

_VERSION = re.compile(r"^version_(\d+)$")


def _versions(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := _VERSION.match(p.name)))


RUN_ENV = "CALM_RUN"  # rank zero's resolved run, copied into the environment of the ranks it launches


def is_rank_zero() -> bool:
    """Whether this process is global rank zero, as launchers announce it before torch.distributed
    starts: a nonzero LOCAL_RANK or NODE_RANK (Lightning sets both for the processes it launches, and
    they inherit everything else, SLURM_PROCID included) means no; else RANK (torchrun) or
    SLURM_PROCID (srun) decide; a lone process is rank zero."""
    if int(os.environ.get("LOCAL_RANK", 0)) or int(os.environ.get("NODE_RANK", 0)):
        return False
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var]) == 0
    return True


def shared_run(runs_dir: str, name: str, resume: bool) -> tuple[int, Path | None]:
    """``resolve_run`` on rank zero (and alone), which then publishes its choice in ``RUN_ENV``; the
    other ranks take the published run of the same runs_dir/name, resolving themselves only where
    none was published (ranks started by an outside launcher such as torchrun)."""
    key = str(Path(runs_dir) / name)
    if not is_rank_zero():
        published = json.loads(os.environ.get(RUN_ENV, "{}"))
        if published.get("run") == key:
            return published["version"], Path(published["ckpt"]) if published["ckpt"] else None
        return resolve_run(runs_dir, name, resume)
    version, ckpt = resolve_run(runs_dir, name, resume)
    os.environ[RUN_ENV] = json.dumps({"run": key, "version": version, "ckpt": str(ckpt) if ckpt else ""})
    return version, ckpt


def resolve_run(runs_dir: str, name: str, resume: bool) -> tuple[int, Path | None]:
    """(version, checkpoint to resume from or None). New runs never overwrite old ones."""
    root = Path(runs_dir) / name
    versions = _versions(root)
    if resume:
        for v in reversed(versions):
            ckpt = root / f"version_{v}" / "checkpoints" / "last.ckpt"
            if ckpt.is_file():
                return v, ckpt
    if resume and versions:
        # A run killed before its first checkpoint: reuse its folder rather than leave an empty one.
        return versions[-1], None
    return (versions[-1] + 1 if versions else 0), None


def check_resumable(ckpt: Path, model_section: dict, kind: str) -> None:
    """Refuse to resume from a damaged checkpoint (every CRC-32 checked) or one whose model differs from
    the config (a clear message, not a shape error)."""
    problem = torch_file_problem(ckpt)
    if problem is None:
        try:
            blob = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is the same user-facing problem
            problem = type(e).__name__
    if problem is not None:
        raise CalmError(
            f"{ckpt}: corrupt or truncated checkpoint, cannot resume ({problem}); copy an intact "
            "step*.ckpt of the same folder over it, or set logging.resume=false"
        )
    stored = blob.get("hyper_parameters", {}).get("config", {}).get("model", {})
    keys = ("kind", "autoencoder") if kind == "autoencoder" else ("kind", "backbone", "head")
    for key in keys:
        if stored.get(key) != model_section.get(key):
            raise CalmError(
                f"{ckpt}: cannot resume, it was trained with a different model.{key}; "
                "use another logging.name or logging.resume=false"
            )


def resolve_run_reference(path: str | Path) -> Path:
    """The checkpoint a run reference names: a ``.ckpt`` file, a ``runs/<name>/version_<n>`` folder
    (its ``checkpoints/last.ckpt``) or ``runs/<name>`` (its latest version holding one)."""
    p = Path(path)
    if p.is_dir():
        direct = p / "checkpoints" / "last.ckpt"
        if direct.is_file():
            return direct
        for v in reversed(_versions(p)):
            candidate = p / f"version_{v}" / "checkpoints" / "last.ckpt"
            if candidate.is_file():
                return candidate
        p = direct
    if not p.is_file():
        raise CalmError(f"checkpoint not found: {p} (pass a .ckpt, runs/<name>/version_<n> or runs/<name>)")
    return p
