"""calm-lightning: a PyTorch Lightning experiment kit for Continuous Autoregressive Language Models."""

__version__ = "0.1.0"
