"""Portable export folders (`calm export`, `calm import-official`): no pickle, no data cache needed.

Layout of ``DIR``::

    config.json         format, kind, the LightningModule's hyperparameters (the run's config...),
                        step, budget, special-token ids and the sha256 of every file below
    model.safetensors   the model's weights (CALM: without its autoencoder)
    tokenizer.json      the run's tokenizer
    autoencoder/        CALM only: the frozen autoencoder as an export of its own
                        (config.json + model.safetensors), loadable by `load_autoencoder`

Tied weights are written under every name they have (the autoencoder's embedding and output
matrix are one Parameter: both names are in the file) and tied again by construction on load:
the model is rebuilt from its config, which ties them, before the weights are copied in.

`read_export` turns a folder back into a `checkpoints.Checkpoint`, so evaluation, sampling,
fine-tuning (``model.init_from``) and the Python API take export folders wherever they take
checkpoints. The folder is written next to its destination and renamed into place: a killed export
leaves the previous one intact.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from calm_lightning.errors import CalmError
from calm_lightning.utils.io import sha256_file

FORMAT = "calm-export/1"
AE_PREFIX = "autoencoder."


def is_export(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() and (p / "model.safetensors").is_file()


def _plain(value: Any) -> Any:
    """JSON-safe copy of hyperparameters (tensors and paths as lists and strings)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if torch.is_tensor(value):
        return value.tolist()
    return value


def write_export_folder(
    out: str | Path,
    *,
    kind: str,
    hparams: dict[str, Any],
    state: dict[str, torch.Tensor],
    tokenizer_json: str,
    step: int = 0,
    guard_state: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write an export folder atomically. ``state``: the model's state dict (CALM: including its
    ``autoencoder.*`` weights, which go to the ``autoencoder/`` sub-export)."""
    from tokenizers import Tokenizer

    from calm_lightning.data.tokenizer import special_ids

    out = Path(out)
    if out.exists() and not is_export(out) and any(out.iterdir()):  # before any work
        raise CalmError(f"{out}: exists and is not an export folder; choose another --out")
    ids = special_ids(Tokenizer.from_str(tokenizer_json))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
        checked = ["tokenizer.json"]
        main = state
        if kind == "calm":
            main = {k: v for k, v in state.items() if not k.startswith(AE_PREFIX)}
            ae_state = {k[len(AE_PREFIX):]: v for k, v in state.items() if k.startswith(AE_PREFIX)}
            ae_hparams = {"autoencoder_config": hparams["autoencoder_config"],
                          "tokenizer_fingerprint": hparams.get("tokenizer_fingerprint", "")}
            (tmp / "autoencoder").mkdir()
            _write_one(tmp / "autoencoder", "autoencoder", ae_hparams, ae_state, ids, step=0)
            checked.append("autoencoder/config.json")
        for name, text in (extra_files or {}).items():  # e.g. an experiment YAML to fine-tune from
            (tmp / name).write_text(text, encoding="utf-8")
        _write_one(tmp, kind, hparams, main, ids, step=step, guard_state=guard_state, extra=extra,
                   also_checked=checked)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_one(folder: Path, kind: str, hparams, state, ids, *, step: int, guard_state=None, extra=None,
               also_checked: list[str] = ()) -> None:
    """``folder/model.safetensors`` and ``folder/config.json`` (with the sha256 of the weights and of
    ``also_checked``, files already written there)."""
    import dataclasses

    from calm_lightning.utils.safetensors import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, folder / "model.safetensors")
    files = ["model.safetensors", *also_checked]
    meta = {
        "format": FORMAT,
        "kind": kind,
        "hparams": _plain(hparams),
        "step": step,
        "guard_state": _plain(guard_state),
        "special_ids": dataclasses.asdict(ids) if dataclasses.is_dataclass(ids) else _plain(ids),
        "sha256": {f: sha256_file(folder / f) for f in files},
        **(extra or {}),
    }
    (folder / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_export_meta(folder: str | Path, *, verify: bool = True) -> dict[str, Any]:
    folder = Path(folder)
    try:
        meta = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CalmError(f"{folder}: unreadable export config.json ({type(e).__name__})") from None
    if meta.get("format") != FORMAT:
        raise CalmError(f"{folder}: not a calm-lightning export (format {meta.get('format')!r})")
    if verify:
        for name, digest in meta.get("sha256", {}).items():
            path = folder / name
            if not path.is_file():
                raise CalmError(f"{folder}: {name} is missing from the export")
            if sha256_file(path) != digest:
                raise CalmError(f"{path}: checksum mismatch, the export is corrupt or truncated")
    return meta


def read_export(folder: str | Path):
    """An export folder as a `checkpoints.Checkpoint` (the blob a Lightning checkpoint would give)."""
    from calm_lightning.callbacks.budget import GUARD_STATE_KEY
    from calm_lightning.checkpoints import Checkpoint
    from calm_lightning.utils.safetensors import load_file

    folder = Path(folder)
    meta = read_export_meta(folder)
    kind = meta["kind"]
    if kind not in ("autoencoder", "calm", "ar") or "config" not in meta["hparams"]:
        raise CalmError(f"{folder}: an export of kind {kind!r} without a run config cannot be loaded as a run")
    state = dict(load_file(folder / "model.safetensors"))
    if kind == "calm":
        read_export_meta(folder / "autoencoder")
        ae = load_file(folder / "autoencoder" / "model.safetensors")
        state.update({AE_PREFIX + k: v for k, v in ae.items()})
    blob = {
        "hyper_parameters": meta["hparams"],
        "state_dict": {f"model.{k}": v for k, v in state.items()},
        "global_step": int(meta.get("step", 0)),
        "callbacks": {GUARD_STATE_KEY: meta["guard_state"]} if meta.get("guard_state") else {},
        "TokenChunkDataModule": {"tokenizer_json": (folder / "tokenizer.json").read_text(encoding="utf-8")},
    }
    return Checkpoint(folder / "config.json", blob)


def export_run(reference: str | Path, out: str | Path) -> Path:
    """`calm export`: a run reference (or .ckpt) -> a portable folder."""
    from calm_lightning.callbacks.budget import GUARD_STATE_KEY
    from calm_lightning.checkpoints import read_checkpoint

    ckpt = read_checkpoint(reference)
    text = ckpt.tokenizer_json
    if text is None:
        text = ckpt.tokenizer().to_str()
    module = ckpt.build_module()
    hparams = dict(ckpt.hparams)
    if ckpt.kind == "autoencoder":
        import dataclasses

        hparams["autoencoder_config"] = dataclasses.asdict(module.model.cfg)
    return write_export_folder(
        out, kind=ckpt.kind, hparams=hparams, state=module.model.state_dict(), tokenizer_json=text,
        step=ckpt.step, guard_state=ckpt.blob.get("callbacks", {}).get(GUARD_STATE_KEY),
        extra={"source": str(ckpt.path)},
    )


def load_autoencoder_folder(folder: str | Path, *, verify: bool = True):
    """(ChunkAutoencoder in eval mode, tokenizer or None) from an export folder: an autoencoder run's
    export, a CALM export's ``autoencoder/`` or the CALM export itself (its autoencoder).
    ``verify=False``: the caller has just checked the checksums (`artifacts.load_autoencoder`)."""
    from calm_lightning.models.autoencoder import ChunkAutoencoder
    from calm_lightning.models.config import AutoencoderConfig
    from calm_lightning.utils.safetensors import load_file

    folder = Path(folder)
    meta = read_export_meta(folder, verify=verify)
    if meta["kind"] == "calm":
        folder, meta = folder / "autoencoder", read_export_meta(folder / "autoencoder", verify=verify)
    if meta["kind"] != "autoencoder":
        raise CalmError(f"{folder}: a {meta['kind']} export has no autoencoder")
    model = ChunkAutoencoder(AutoencoderConfig(**meta["hparams"]["autoencoder_config"]))
    state = load_file(folder / "model.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CalmError(f"{folder}: weights do not fit the autoencoder ({(missing or unexpected)[0]})")
    tok_path = next((p / "tokenizer.json" for p in (folder, folder.parent) if (p / "tokenizer.json").is_file()), None)
    tokenizer = None
    if tok_path is not None:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tok_path))
    return model.eval(), tokenizer


def import_official(ae_dir: str | Path, calm_dir: str | Path | None, out: str | Path,
                    *, tokenizer: str | Path | None = None) -> Path:
    """`calm import-official`: the reference implementation's released autoencoder (and CALM-energy)
    folders -> an export folder (`official.convert_official` does the conversion; the configs it
    returns set every reference-architecture switch, so the kit computes the reference's function)."""
    import dataclasses
    import hashlib

    from omegaconf import OmegaConf

    from calm_lightning.config.loader import load_config_from_dict
    from calm_lightning.official import convert_official

    models = convert_official(ae_dir, calm_dir, tokenizer=tokenizer)
    text = models.tokenizer.to_str()
    kind = models.model_config["kind"]
    section = {k: v for k, v in models.model_config.items() if v is not None}
    config = OmegaConf.to_container(load_config_from_dict({"model": section}), resolve=True)
    ae_config = dataclasses.asdict(models.autoencoder_config)
    hparams: dict[str, Any] = {
        "config": config,
        "autoencoder_config": ae_config,
        "tokenizer_fingerprint": hashlib.sha256(text.encode("utf-8")).hexdigest(),
    }
    if kind == "calm":
        state = models.calm.state_dict()
    else:
        hparams.update(vocab_size=ae_config["vocab_size"], mask_token_id=ae_config["mask_token_id"])
        state = models.autoencoder.state_dict()
    extra = {"source": {"autoencoder": str(ae_dir), "calm": str(calm_dir) if calm_dir else None},
             "official": {"reference_config": _plain(models.reference_config), "files": models.files,
                          "tokenizer_renames": models.tokenizer_renames}}
    out = Path(out)
    recipe = _finetune_yaml(out, section, kind)
    return write_export_folder(out, kind=kind, hparams=hparams, state=state, tokenizer_json=text, extra=extra,
                               extra_files={"experiment.yaml": recipe})


def _finetune_yaml(out: Path, model_section: dict, kind: str) -> str:
    """experiment.yaml of an imported folder: its model (every reference switch), its tokenizer and,
    for fine-tuning, ``model.init_from`` (and CALM's ``autoencoder_path``) pointing at the folder."""
    import yaml

    where = str(out.resolve())
    model = {**model_section, "init_from": where}
    if kind == "calm":
        model["autoencoder_path"] = where
    body = {"model": model, "tokenizer": {"path": str((out / "tokenizer.json").resolve())}}
    head = ("# Imported from the reference implementation's released checkpoint (calm import-official).\n"
            f"# Fine-tune: calm train {out / 'experiment.yaml'} data.corpus=... logging.name=...\n"
            "# Base: the schema defaults; the model section reproduces the reference architecture.\n")
    return head + yaml.safe_dump(body, sort_keys=False)


def official_folder(path: str | Path) -> str | None:
    """"autoencoder" or "calm" if ``path`` is a reference-implementation checkpoint folder (a Hugging
    Face config.json naming the reference's architectures), else None."""
    cfg_path = Path(path) / "config.json"
    if not Path(path).is_dir() or not cfg_path.is_file():
        return None
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict) or "format" in cfg:
        return None
    arch = cfg.get("architectures") or []
    if "Autoencoder" in arch:
        return "autoencoder"
    if "ae_path" in cfg:
        return "calm"
    return None


def import_official_cached(folder: str | Path, cache_dir: str | Path = ".cache/calm") -> Path:
    """An official folder converted once into ``cache_dir/official/<digest>`` (`import_official`),
    so `load`, `calm sample` and `calm eval` take the released folders directly. A CALM folder finds
    its autoencoder through its config's ``ae_path`` (as given, or a sibling folder of that name)."""
    import hashlib

    folder = Path(folder).expanduser()
    kind = official_folder(folder)
    digest = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.is_file():
            digest.update(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}".encode())
    ae_dir = folder
    calm_dir = None
    if kind == "calm":
        given = json.loads((folder / "config.json").read_text(encoding="utf-8"))["ae_path"]
        candidates = [Path(given).expanduser(), folder.parent / Path(given).name]
        ae_dir = next((c for c in candidates if (c / "config.json").is_file()), None)
        if ae_dir is None:
            raise CalmError(f"{folder}: its autoencoder ae_path={given!r} is not found; run "
                            f"calm import-official AE_DIR --calm {folder} --out DIR")
        calm_dir = folder
        digest.update(str(ae_dir.resolve()).encode())
    out = Path(cache_dir).expanduser() / "official" / digest.hexdigest()[:16]
    if not is_export(out):
        import_official(ae_dir, calm_dir, out)
    return out
