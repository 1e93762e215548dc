"""Load an experiment: schema defaults <- base YAML(s) <- experiment YAML <- ``key=value`` overrides.

Strict: an unknown key, a wrong type or a bad value raises `CalmError` naming the full key.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from calm_lightning.config.schema import ExperimentConfig, validate
from calm_lightning.errors import CalmError

BASE_KEY = "base"  # an experiment YAML may name the YAML (or list of YAMLs) it extends, relative to itself


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> list[dict]:
    """Return the YAML dicts from the root base to ``path`` (base first)."""
    path = path.resolve()
    if path in chain:
        raise CalmError(f"{path}: circular 'base' chain ({' -> '.join(str(p) for p in chain)})")
    if not path.is_file():
        raise CalmError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        context, start = getattr(e, "context", None), getattr(e, "context_mark", None)
        if context and start is not None and mark is not None and start.line != mark.line:
            # an unclosed bracket or quote is only noticed lines later; say where it began
            problem += f" ({context} started at line {start.line + 1})"
        raise CalmError(f"{where}: YAML syntax error: {problem}") from None
    if not isinstance(data, dict):
        raise CalmError(f"{path}: expected a mapping of config keys at the top level")
    base = data.pop(BASE_KEY, None)
    if base is None:
        return [data]
    layers: list[dict] = []
    for name in base if isinstance(base, list) else [base]:  # a list of bases merges left to right
        base_path = path.parent / str(name)
        if not base_path.is_file():
            raise CalmError(f"{path}: base config {name!r} not found (looked for {base_path})")
        layers += _read_yaml(base_path, chain + (path,))
    return layers + [data]


def _describe(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None) or ""
    msg = getattr(e, "msg", None) or str(e)
    first = msg.splitlines()[0].strip()
    if "not in struct" in first or "Key '" in first and "not in" in first:
        return f"{key}: unknown config key"
    if "Value '" in first and (
        "could not be converted" in first or "is not a valid" in first or "Invalid value" in first
    ):
        return f"{key}: {first}"
    return f"{key}: {first}" if key else first


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> DictConfig:
    """Merge the schema, the YAML chain and the overrides; validate; return a typed DictConfig."""
    return _merge(_read_yaml(Path(path)) if path is not None else [], overrides)


def load_config_from_dict(config: dict, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Same as `load_config` for a config stored as a plain dict (e.g. in a checkpoint)."""
    return _merge([config], overrides)


def _merge(layers: list[dict], overrides: list[str] | tuple[str, ...]) -> DictConfig:
    cfg = OmegaConf.structured(ExperimentConfig)
    try:
        for layer in layers:
            cfg = OmegaConf.merge(cfg, OmegaConf.create(layer))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise CalmError(f"override {bad[0]!r} is not of the form key=value")
        for o in overrides:
            key, _, value = o.partition("=")
            key = key.strip()
            if OmegaConf.select(cfg, key, default="__missing__") == "__missing__":
                raise CalmError(f"{key}: unknown config key (override {o!r})")
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{key}={value}"]))
    except OmegaConfBaseException as e:
        raise CalmError(_describe(e)) from None
    errors = validate(OmegaConf.to_object(cfg))
    if errors:
        raise CalmError(errors[0] + (f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""))
    return cfg


def to_object(cfg: DictConfig) -> ExperimentConfig:
    return OmegaConf.to_object(cfg)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)
