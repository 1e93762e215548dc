"""Pieces several benchmarks use: the matmul FLOP/s reference for MFU, and a backbone from a sizes dict."""

from __future__ import annotations

import statistics
import time

import torch

from calm_lightning.models.config import BackboneConfig


def timed(fn, repeats: int, warmup: int = 1) -> tuple[float, float]:
    """(min, median) wall-clock seconds of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones (CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), statistics.median(times)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops(n: int, repeats: int, dtype: torch.dtype, device: torch.device) -> tuple[float, float]:
    """FLOP/s of an n x n x n matmul in ``dtype``: (best, median) over ``repeats`` after 3 warm-ups."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t)
    flop = 2 * n**3
    return flop / min(times), flop / statistics.median(times)


def backbone_config(sizes: dict, max_seq_len: int) -> BackboneConfig:
    """The backbone of a benchmark's sizes dict (keys n_layers, d_model, n_heads, ffn_size)."""
    return BackboneConfig(
        n_layers=sizes["n_layers"],
        d_model=sizes["d_model"],
        n_heads=sizes["n_heads"],
        ffn_size=sizes["ffn_size"],
        max_seq_len=max_seq_len,
    )
