"""Generative heads behind one interface and a registry: ``HEADS[name]``, ``build_head``, ``HeadConfig``.

A new head is one file in this package (plus an experiment YAML), nothing else. The file defines a
``GenerativeHead`` subclass (``loss`` and ``sample``) decorated with ``@register_head("<name>")`` and
declares on the class what the kit needs without building it:

* ``config_class``: a dataclass, the section ``model.head.<name>.*`` of the strict config schema;
* ``validate(cfg)``: its value checks, as messages naming the full key;
* ``param_split`` / ``sample_evals`` / ``train_evals``: its FLOPs (``calm_lightning.flops``);
* ``sampling_keys``: the section's fields `calm eval` may override (sampling only, no weights change);
* ``sampling_sweep`` / ``default_sweep_steps``: the sampler settings `calm compare` evaluates.

Discovery: the first time the registry is read, every module of this package is imported once
(``pkgutil.iter_modules``); modules that register nothing (base, adaln, energy_loss) are helpers.
``HeadConfig`` (re-exported by ``models.config``) is then built with one field per registered head,
so head modules must import it only for type checking.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator, MutableMapping
from dataclasses import field, make_dataclass
from typing import TYPE_CHECKING

from calm_lightning.models.config import CommonHeadConfig
from calm_lightning.models.heads.base import HEAD_CONFIG_KEY, GenerativeHead

if TYPE_CHECKING:
    from calm_lightning.models.config import HeadConfig


class HeadRegistry(MutableMapping):
    """name -> head class. Reading it imports the package's modules first (once); writing does not."""

    def __init__(self) -> None:
        self._heads: dict[str, type[GenerativeHead]] = {}
        self._state = "new"  # new | discovering | done

    def discover(self) -> None:
        """Import every module of this package (once); each ``register_head`` adds its class."""
        if self._state != "new":  # a read during discovery sees the heads registered so far
            return
        self._state = "discovering"
        try:
            for module in pkgutil.iter_modules(__path__):
                if not module.name.startswith("_"):
                    importlib.import_module(f"{__name__}.{module.name}")
        except BaseException:
            self._state = "new"
            raise
        self._state = "done"

    @property
    def discovered(self) -> bool:
        return self._state == "done"

    def __getitem__(self, name: str) -> type[GenerativeHead]:
        self.discover()
        return self._heads[name]

    def __setitem__(self, name: str, cls: type[GenerativeHead]) -> None:
        cls.name = name
        self._heads[name] = cls

    def __delitem__(self, name: str) -> None:
        del self._heads[name]

    def __iter__(self) -> Iterator[str]:
        self.discover()
        return iter(list(self._heads))

    def __len__(self) -> int:
        self.discover()
        return len(self._heads)

    def __repr__(self) -> str:
        return f"HeadRegistry({sorted(self)})"


HEADS = HeadRegistry()


def register_head(name: str):
    """Class decorator: ``@register_head("foo")`` makes the head ``model.head.name=foo``."""

    def deco(cls: type[GenerativeHead]) -> type[GenerativeHead]:
        HEADS[name] = cls
        return cls

    return deco


_head_config: type | None = None


def head_config_class() -> type:
    """``HeadConfig``: ``CommonHeadConfig`` plus one field per registered head with a ``config_class``
    (``model.head.<name>``, defaults from that dataclass). Built once, after discovery."""
    global _head_config
    if _head_config is None:
        HEADS.discover()
        if not HEADS.discovered:
            raise RuntimeError(
                "HeadConfig was used while the head modules were being imported; a head module "
                "must import HeadConfig under TYPE_CHECKING only"
            )
        sections = [
            (name, cls.config_class, field(default_factory=cls.config_class))
            for name, cls in HEADS.items()
            if cls.config_class is not None
        ]
        _head_config = make_dataclass("HeadConfig", sections, bases=(CommonHeadConfig,))
        _head_config.__module__ = CommonHeadConfig.__module__  # pickles as models.config.HeadConfig
        _head_config.__doc__ = (
            "Generative head: which one (registry name), the shared settings and each head's own "
            f"section ({', '.join(name for name, _, _ in sections)})."
        )
    return _head_config


def sampling_override_keys() -> tuple[str, ...]:
    """Full keys of every head's sampling-only settings (``model.head.<name>.<field>``), which `calm eval`
    accepts as overrides: the head is rebuilt from the overridden config, its weights unchanged."""
    return tuple(f"{HEAD_CONFIG_KEY}.{name}.{key}" for name, cls in HEADS.items() for key in cls.sampling_keys)


def build_head(hidden_size: int, latent_size: int, cfg: HeadConfig, num_backbone_layers: int) -> GenerativeHead:
    """The head named ``cfg.name`` (a ``HeadConfig``), sized for hidden size D and latent size l."""
    if cfg.name not in HEADS:
        raise KeyError(f"unknown head {cfg.name!r}; registered: {sorted(HEADS)}")
    return HEADS[cfg.name](hidden_size, latent_size, cfg, num_backbone_layers)


def __getattr__(name: str):
    if name == "HeadConfig":
        return head_config_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["HEADS", "GenerativeHead", "HeadConfig", "build_head", "head_config_class", "register_head"]
