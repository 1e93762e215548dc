"""Checkpoints: resolve a run reference, read and check the file once, rebuild what it holds.

Every command and the Python API go through `read_checkpoint`: the file's CRC-32s are checked and
it is memory-mapped once; the LightningModule (`Checkpoint.build_module`), the tokenizer it carries
(`Checkpoint.tokenizer`) and the language model ready to generate (`load_language_model`) are all
built from that one blob. Run references: a ``.ckpt`` file, a ``runs/<name>/version_<n>`` folder
(its ``checkpoints/last.ckpt``), ``runs/<name>`` (its latest version holding one) or an export
folder (`export.py`).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from calm_lightning.errors import CalmError
from calm_lightning.runs import resolve_run_reference
from calm_lightning.utils.io import torch_file_problem


def resolve_device(device: str) -> torch.device:
    """``auto`` (CUDA if available), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; refuses what is absent."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise CalmError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CalmError("device cuda requested but no CUDA GPU is available")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise CalmError("device mps requested but MPS is not available")
    return dev


def read_blob(ckpt: Path) -> dict[str, Any]:
    """A checkpoint file (memory-mapped), after checking every CRC-32 of it (torch.load alone would
    accept a truncated or bit-flipped checkpoint and use wrong weights)."""
    problem = torch_file_problem(ckpt)
    if problem is not None:
        raise CalmError(f"{ckpt}: corrupt or truncated checkpoint ({problem}); use another checkpoint of the run")
    try:
        blob = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
        blob["hyper_parameters"]  # every Lightning checkpoint has it: KeyError (below) otherwise
        return blob
    except Exception as e:  # noqa: BLE001 - every unreadable checkpoint is the same user-facing problem
        raise CalmError(f"{ckpt}: not a readable calm-lightning checkpoint ({type(e).__name__})") from None


@dataclass
class Checkpoint:
    """One checkpoint, read once: its path, the blob and what the stored config says."""

    path: Path
    blob: dict[str, Any] = field(repr=False)

    @property
    def hparams(self) -> dict[str, Any]:
        return self.blob["hyper_parameters"]

    @property
    def config(self) -> dict[str, Any]:
        """The run's resolved config as a plain dict (as stored)."""
        return self.hparams["config"]

    @property
    def kind(self) -> str:
        return self.config["model"]["kind"]

    @property
    def chunk_size(self) -> int:
        """K of the model's autoencoder (CALM), the config's K (autoencoder), 1 for the baseline."""
        if self.kind == "ar":
            return 1
        stored = self.hparams.get("autoencoder_config", {}).get("chunk_size")
        return int(stored or self.config["model"]["autoencoder"].get("chunk_size", 4))

    @property
    def step(self) -> int:
        return int(self.blob.get("global_step", 0))

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.hparams.get("tokenizer_fingerprint", "") or ""

    def experiment(self, overrides: list[str] | tuple[str, ...] = ()):
        """The typed ExperimentConfig (stored config + ``overrides``), validated."""
        from omegaconf import OmegaConf

        from calm_lightning.config.loader import load_config_from_dict

        return OmegaConf.to_object(load_config_from_dict(self.config, overrides))

    def budget(self) -> dict[str, Any]:
        """`callbacks.budget.budget_status`: whether the run finished its steps or a guard cut it."""
        from calm_lightning.callbacks.budget import GUARD_STATE_KEY, budget_status

        max_steps = int(self.config.get("trainer", {}).get("max_steps", -1))
        return budget_status(self.step, max_steps, self.blob.get("callbacks", {}).get(GUARD_STATE_KEY))

    @functools.cached_property
    def tokenizer_json(self) -> str | None:
        """The tokenizer.json text the checkpoint carries, if it matches the recorded fingerprint."""
        state = self.blob.get("TokenChunkDataModule") or {}
        text = state.get("tokenizer_json")
        fp = self.tokenizer_fingerprint
        if not text or (fp and hashlib.sha256(text.encode("utf-8")).hexdigest() != fp):
            return None
        return text

    def tokenizer(self):
        """The run's tokenizer: the embedded copy, else found by fingerprint (older checkpoints)."""
        from tokenizers import Tokenizer

        text = self.tokenizer_json
        if text is not None:
            return Tokenizer.from_str(text)
        from calm_lightning.data.tokenizer import load_tokenizer

        return load_tokenizer(find_tokenizer(self.experiment(), self.tokenizer_fingerprint, self.chunk_size))

    def materialise_tokenizer(self, cache_dir: str | Path) -> Path | None:
        """Write the embedded tokenizer under ``cache_dir/embedded/`` (once) and return its path, so
        data preparation can use it instead of training one; None if the checkpoint carries none."""
        from calm_lightning.utils.io import atomic_write_text

        text = self.tokenizer_json
        if text is None:
            return None
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        path = Path(cache_dir).expanduser() / "embedded" / digest[:16] / "tokenizer.json"
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, text)
        return path

    def build_module(self, config: dict[str, Any] | None = None):
        """The LightningModule of the run, its weights loaded from this blob (no second read).
        ``config``: a replacement for the stored config (evaluation overrides); shapes must not change."""
        import inspect

        cls = module_class(self.kind)
        accepted = inspect.signature(cls.__init__).parameters
        hparams = {k: v for k, v in self.hparams.items() if k in accepted}  # exports record a little more
        if config is not None:
            hparams["config"] = config
        module = cls(**hparams)
        module.load_state_dict(self.blob["state_dict"])
        return module


def module_class(kind: str):
    """The LightningModule class of a model kind (autoencoder | calm | ar)."""
    if kind == "autoencoder":
        from calm_lightning.lit.autoencoder_module import AutoencoderLitModule

        return AutoencoderLitModule
    from calm_lightning.lit.lm_modules import CALMLitModule, TokenLMLitModule

    return {"calm": CALMLitModule, "ar": TokenLMLitModule}[kind]


def read_checkpoint(reference: str | Path) -> Checkpoint:
    """Resolve a run reference and read its checkpoint once (CRC-checked, memory-mapped); an export
    folder (`export.py`) is read as the checkpoint it came from."""
    from calm_lightning.export import import_official_cached, is_export, official_folder, read_export

    if is_export(reference):
        return read_export(reference)
    if official_folder(reference):  # a released reference checkpoint: converted once, then an export
        return read_export(import_official_cached(reference))
    path = resolve_run_reference(reference)
    ckpt = Checkpoint(path, read_blob(path))
    if "config" not in ckpt.hparams:
        raise CalmError(f"{path}: checkpoint has no stored config; was it written by calm-lightning?")
    return ckpt


def _tokenizer_candidates(exp) -> list[Path]:
    """Where training may have put the tokenizer, most specific first."""
    out = []
    if exp.tokenizer.path:
        out.append(Path(exp.tokenizer.path).expanduser())
    if exp.model.kind == "calm":
        try:  # the export's record of its tokenizer (not its weights: no checksum needed for a path)
            meta = json.loads(Path(exp.model.autoencoder_path).expanduser().with_suffix(".json").read_text())
            out.append(Path(meta["tokenizer_path"]).expanduser())
        except (OSError, ValueError, KeyError, TypeError):
            pass
    cache = Path(exp.data.cache_dir).expanduser()
    out += sorted(cache.glob("*/tok-*/tokenizer.json"))
    return out


def find_tokenizer(exp, fingerprint: str, chunk_size: int) -> Path:
    """The tokenizer.json whose sha256 is ``fingerprint``; prepares the data only as a last resort
    (checkpoints written before tokenizers were embedded)."""
    from calm_lightning.data.datamodule import TokenChunkDataModule
    from calm_lightning.data.tokenizer import tokenizer_fingerprint

    if fingerprint:
        for path in _tokenizer_candidates(exp):
            if path.is_file() and tokenizer_fingerprint(path) == fingerprint:
                return path
    try:
        dm = TokenChunkDataModule.from_config(exp, chunk_size)
    except CalmError as e:
        raise CalmError(
            f"the run's tokenizer ({fingerprint[:12] or 'unrecorded'}) is not in {exp.data.cache_dir} and "
            f"preparing the run's data failed: {e}"
        ) from None
    if fingerprint and dm.tokenizer_fingerprint != fingerprint:
        raise CalmError(
            f"the run's tokenizer ({fingerprint[:12]}) is not in {exp.data.cache_dir} and the run's data now "
            f"gives tokenizer {dm.tokenizer_fingerprint[:12]}"
        )
    return dm.tokenizer_path


@dataclass
class LoadedModel:
    """A language model ready to generate: the model (eval mode, on ``device``) and its tokenizer."""

    model: torch.nn.Module
    tokenizer: Any  # tokenizers.Tokenizer
    eos_id: int
    kind: str  # calm | ar
    checkpoint: Path
    step: int
    chunk_size: int  # K (1 for the baseline)
    device: torch.device
    budget: dict = field(default_factory=dict)  # callbacks.budget.budget_status of the checkpoint


def load_language_model(reference: str | Path, device: str = "auto") -> LoadedModel:
    """A CALM or baseline run reference (or a portable export folder), its tokenizer, on ``device``."""
    from calm_lightning.data.tokenizer import special_ids

    ckpt = read_checkpoint(reference)
    if ckpt.kind == "autoencoder":
        raise CalmError(f"{ckpt.path} is an autoencoder checkpoint; this needs a calm or ar (baseline) checkpoint")
    dev = resolve_device(device)
    tokenizer = ckpt.tokenizer()
    model = ckpt.build_module().model.to(dev).eval()
    return LoadedModel(
        model, tokenizer, special_ids(tokenizer).eos, ckpt.kind, ckpt.path, ckpt.step, ckpt.chunk_size, dev,
        ckpt.budget(),
    )
