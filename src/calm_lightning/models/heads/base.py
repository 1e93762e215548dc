"""The generative-head interface: a training loss and a sampler (MAR style), plus what the rest of the
kit needs to know about a head without building it (the plugin contract, ``heads/__init__.py``).

Every head maps a backbone hidden state h (the condition) to a distribution over latent vectors of
size l. CALM trains it against the frozen autoencoder's posterior N(mu, sigma^2) of the next chunk and
samples from it to generate.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:  # HeadConfig is built from the registered heads (``heads.head_config_class``)
    from calm_lightning.models.config import HeadConfig

HEAD_CONFIG_KEY = "model.head"  # where the head config sits in the experiment config


@dataclass(frozen=True)
class SweepSetting:
    """One labelled sampler setting of `calm compare`'s sampling-steps sweep."""

    solver: str  # label, e.g. euler | midpoint (flow), ancestral | ddim (diffusion), one-step (energy)
    steps: int  # sampling steps (1 for a one-step sampler)
    evals_per_sample: int  # head network evaluations per vector with this setting
    overrides: tuple[str, ...] = ()  # `calm eval` key=value overrides (``sampling_keys`` only) selecting it


class GenerativeHead(nn.Module, abc.ABC):
    """Interface shared by the energy, flow and diffusion heads.

    Args:
        hidden_size: D, width of the conditioning hidden state.
        latent_size: l, size of the latent vectors produced.
        cfg: the head section of the model config (``cfg.name`` selects the head in the registry).
        num_backbone_layers: used to size the head when ``num_blocks`` is 0 (layers / 4, at least 1).

    Class-level declarations (the plugin contract; classmethods take the whole ``HeadConfig``):
        ``name`` (set by ``register_head``), ``config_class``, ``sampling_keys``, ``default_sweep_steps``,
        ``validate``, ``param_split``, ``sample_evals``, ``train_evals``, ``sampling_sweep``.
    """

    name: ClassVar[str] = ""  # registry name and config section ``model.head.<name>``; set by register_head
    config_class: ClassVar[type | None] = None  # dataclass of the section ``model.head.<name>.*``; None = none
    sampling_keys: ClassVar[tuple[str, ...]] = ()  # fields of that section `calm eval` may override
    default_sweep_steps: ClassVar[tuple[int, ...]] = ()  # steps `calm compare` sweeps when not told

    def __init__(self, hidden_size: int, latent_size: int, cfg: HeadConfig, num_backbone_layers: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.latent_size = latent_size
        self.cfg = cfg
        self.num_backbone_layers = num_backbone_layers

    @abc.abstractmethod
    def loss(self, hidden: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
        """Per-position training loss.

        hidden: [P, D] conditions; mu, log_sigma: [P, l] target posterior of the next chunk.
        Returns [P] losses (float32); the caller averages (and may mask).
        """

    @abc.abstractmethod
    def sample(self, hidden: torch.Tensor, num_samples: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw latents. hidden: [P, D] -> [P, S, l] with S = num_samples, independent per (p, s)."""

    @property
    def evals_per_sample(self) -> int:
        """Network evaluations needed for one sample (1 for energy, solver steps for flow/diffusion)."""
        return self.sample_evals(self.cfg)

    # ------------------------------------------------------------------ declarations, from the config alone
    @classmethod
    def key(cls, field: str) -> str:
        """The full config key of a field of this head's section, e.g. ``model.head.flow.num_steps``."""
        return f"{HEAD_CONFIG_KEY}.{cls.name}.{field}"

    @classmethod
    def section(cls, cfg: HeadConfig) -> Any:
        """This head's own section of ``cfg`` (an instance of ``config_class``)."""
        return getattr(cfg, cls.name)

    @classmethod
    def validate(cls, cfg: HeadConfig) -> list[str]:
        """Value checks of this head's section: one message per problem, each starting with its full key."""
        return []

    @classmethod
    def param_split(
        cls, cfg: HeadConfig, hidden_size: int, latent_size: int, num_backbone_layers: int
    ) -> tuple[int, int]:
        """Parameters as (run once per position, run once per network evaluation), for ``flops.py``.

        Default: the head built on the meta device (no memory, no maths), every parameter counted per
        evaluation; a head that shares work across samples or solver steps says so by overriding this.
        """
        with torch.device("meta"):
            head = cls(hidden_size, latent_size, cfg, num_backbone_layers)
        return 0, sum(p.numel() for p in head.parameters())

    @classmethod
    def sample_param_split(
        cls, cfg: HeadConfig, hidden_size: int, latent_size: int, num_backbone_layers: int
    ) -> tuple[int, int]:
        """``param_split`` as sampling runs the head, where it may differ from training (default: the
        same). The adaLN heads feed one timestep per solver step to every row, so their time MLP runs
        once per step for the whole batch and leaves the per-evaluation count."""
        return cls.param_split(cfg, hidden_size, latent_size, num_backbone_layers)

    @classmethod
    def sample_evals(cls, cfg: HeadConfig) -> int:
        """Network evaluations per generated sample (1 = a one-step sampler)."""
        return 1

    @classmethod
    def train_evals(cls, cfg: HeadConfig) -> int:
        """Network evaluations per training position: N = ``num_samples`` (one per sample or replica)."""
        return cfg.num_samples

    @classmethod
    def sampling_sweep(cls, cfg: HeadConfig, steps: Sequence[int] | None = None) -> list[SweepSetting]:
        """The sampler settings `calm compare` evaluates (``steps``: None = ``default_sweep_steps``).

        Default: the trained setting only, i.e. no sweep (a one-step head such as energy).
        """
        n = cls.sample_evals(cfg)
        return [SweepSetting("one-step" if n == 1 else "as trained", n, n)]


def resolve_num_blocks(num_blocks: int, num_backbone_layers: int) -> int:
    return num_blocks if num_blocks > 0 else max(1, num_backbone_layers // 4)
