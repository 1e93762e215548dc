"""`calm sample`: continue text prompts with a trained CALM or token-baseline checkpoint.

The checkpoint's stored config names everything else: the model (rebuilt through the LightningModule
of its ``model.kind``) and the tokenizer, found by the fingerprint the checkpoint recorded among the
places training could have put it (``tokenizer.path``, the autoencoder export's record, the prepared
cache under ``data.cache_dir``); only if none matches is the data prepared again as training did
(a no-op when the cache is complete). Generation is ``sampling.generate``; text is decoded
incrementally so a single prompt can be streamed as it is produced.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from calm_lightning.errors import CalmError
from calm_lightning.sampling.generate import GenerationConfig, generate

TextCallback = Callable[[int, str], None]


@dataclass
class LoadedModel:
    """A checkpoint ready to generate: the model (eval mode, on ``device``) and its tokenizer."""

    model: torch.nn.Module
    tokenizer: Any  # tokenizers.Tokenizer
    eos_id: int
    kind: str  # calm | ar
    checkpoint: Path
    step: int
    chunk_size: int  # K (1 for the baseline)
    device: torch.device
    budget: dict = field(default_factory=dict)  # callbacks.budget.budget_status of the checkpoint


@dataclass
class SampleResult:
    prompts: list[str]
    continuations: list[str]  # decoded new text per prompt
    tokens: list[list[int]]  # new token ids per prompt
    steps: int
    stats: list[dict] = field(default_factory=list)  # per-step sampler statistics (CALM, T < 1)


def resolve_device(device: str) -> torch.device:
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
    """The tokenizer.json whose sha256 is ``fingerprint``; prepares the data only as a last resort."""
    from calm_lightning.data.tokenizer import tokenizer_fingerprint

    if fingerprint:
        for path in _tokenizer_candidates(exp):
            if path.is_file() and tokenizer_fingerprint(path) == fingerprint:
                return path
    from calm_lightning.train import build_datamodule

    try:
        dm = build_datamodule(exp, chunk_size)
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


def embedded_tokenizer(blob: dict, fingerprint: str):
    """The tokenizer stored in a checkpoint's DataModule state, if its sha256 is ``fingerprint``."""
    import hashlib

    from tokenizers import Tokenizer

    state = blob.get("TokenChunkDataModule") or {}
    text = state.get("tokenizer_json")
    if not text or (fingerprint and hashlib.sha256(text.encode("utf-8")).hexdigest() != fingerprint):
        return None
    return Tokenizer.from_str(text)


def load_for_sampling(checkpoint: str | Path, device: str = "auto") -> LoadedModel:
    """Load a CALM or baseline checkpoint (a .ckpt or a run directory) and its tokenizer."""
    from calm_lightning.data.tokenizer import load_tokenizer, special_ids
    from calm_lightning.evaluate import MODULES, load_checkpoint, resolve_checkpoint
    from calm_lightning.lit.common import experiment_from_dict

    ckpt = resolve_checkpoint(checkpoint)
    blob = load_checkpoint(ckpt)  # CRC-checked and memory-mapped once: config, tokenizer, step, budget
    hparams = blob["hyper_parameters"]
    if "config" not in hparams:
        raise CalmError(f"{ckpt}: checkpoint has no stored config; was it written by calm-lightning?")
    exp = experiment_from_dict(hparams["config"])
    kind = exp.model.kind
    if kind == "autoencoder":
        raise CalmError(
            f"{ckpt} is an autoencoder checkpoint; `calm sample` needs a calm or ar (baseline) checkpoint"
        )
    dev = resolve_device(device)
    K = (
        hparams.get("autoencoder_config", {}).get("chunk_size", exp.model.autoencoder.chunk_size)
        if kind == "calm"
        else 1
    )
    fingerprint = hparams.get("tokenizer_fingerprint", "")
    tokenizer = embedded_tokenizer(blob, fingerprint)
    if tokenizer is None:  # checkpoints written before tokenizers were embedded
        tokenizer = load_tokenizer(find_tokenizer(exp, fingerprint, max(K, 1)))
    module = MODULES[kind].load_from_checkpoint(ckpt, map_location="cpu")
    model = module.model.to(dev).eval()
    from calm_lightning.callbacks.budget import GUARD_STATE_KEY, budget_status

    step = int(blob.get("global_step", 0))
    budget = budget_status(step, exp.trainer.max_steps, blob.get("callbacks", {}).get(GUARD_STATE_KEY))
    return LoadedModel(model, tokenizer, special_ids(tokenizer).eos, kind, ckpt, step, K, dev, budget)


class IncrementalDecoder:
    """Token ids in, new text out: decodes the whole sequence and returns what was not yet returned.

    Byte-level BPE can split a character across tokens; text ending in an incomplete character
    (U+FFFD) is held back until the character completes, so the printed stream never shows a
    replacement character that later turns into something else.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        return self._delta(self.tokenizer.decode(self.ids).rstrip("\ufffd"))

    def flush(self) -> str:
        return self._delta(self.tokenizer.decode(self.ids))

    def _delta(self, text: str) -> str:
        if not text.startswith(self.emitted):  # decoding rewrote earlier text: emit nothing more
            return ""
        delta, self.emitted = text[len(self.emitted) :], text
        return delta


def sample(
    loaded: LoadedModel,
    prompts: list[str],
    cfg: GenerationConfig,
    *,
    seed: int = 0,
    on_text: TextCallback | None = None,
) -> SampleResult:
    """Continue each prompt as one batch. ``on_text(row, new_text)`` receives decoded text as it comes."""
    tok = loaded.tokenizer
    cfg = dataclasses.replace(cfg, eos_id=loaded.eos_id)
    ids = [tok.encode(p).ids for p in prompts]
    decoders = [IncrementalDecoder(tok) for _ in prompts]

    def on_step(gained: list[list[int]]) -> None:
        for row, piece in enumerate(gained):
            text = decoders[row].push(piece) if piece else ""
            if text and on_text is not None:
                on_text(row, text)

    generator = torch.Generator(device=loaded.device).manual_seed(seed)
    out = generate(loaded.model, ids, cfg, fill_id=loaded.eos_id, generator=generator, on_step=on_step)
    if on_text is not None:
        for row, dec in enumerate(decoders):
            rest = dec.flush()
            if rest:
                on_text(row, rest)
    texts = [tok.decode(t) for t in out.tokens]
    return SampleResult(list(prompts), texts, out.tokens, out.steps, out.stats)
