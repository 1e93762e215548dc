"""calm-lightning: a PyTorch Lightning experiment kit for Continuous Autoregressive Language Models.

Python API (see README "Python API"): ``load``, ``load_autoencoder``; the plain-PyTorch models and the
configs are importable from here too (``ChunkAutoencoder``, ``CALM``, ``TokenLM``, ``ExperimentConfig``...).
"""

__version__ = "0.1.0"

_LAZY = {
    "load": "calm_lightning.api",
    "load_autoencoder": "calm_lightning.api",
    "LanguageModel": "calm_lightning.api",
    "Autoencoder": "calm_lightning.api",
    "ChunkAutoencoder": "calm_lightning.models.autoencoder",
    "CALM": "calm_lightning.models.calm",
    "TokenLM": "calm_lightning.models.token_lm",
    "Transformer": "calm_lightning.models.backbone",
    "AutoencoderConfig": "calm_lightning.models.config",
    "BackboneConfig": "calm_lightning.models.config",
    "HeadConfig": "calm_lightning.models.config",
    "ExperimentConfig": "calm_lightning.config.schema",
    "BrierLM": "calm_lightning.metrics.brier",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    # Lazy: `import calm_lightning` stays cheap and the plain-PyTorch packages never pull Lightning in.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'calm_lightning' has no attribute {name!r}")
