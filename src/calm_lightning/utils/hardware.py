"""What the hardware is good at, so ``trainer.precision=auto`` picks the fastest safe precision."""

from __future__ import annotations

import functools
from pathlib import Path

import torch


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 matmul instructions (AVX512_BF16 or AMX).

    Without them oneDNN emulates bf16 and a bf16 matmul is *slower* than fp32 (measured 19 vs 42
    GFLOP/s on a Xeon with AVX-512 but no AVX512_BF16), so autocast would only cost time.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, accelerator: str = "auto") -> str:
    """Map ``auto`` to bf16-mixed where bf16 is fast (recent GPUs, bf16-capable CPUs), else 32-true;
    Lightning's aliases (32, bf16, ...) to their full names."""
    from calm_lightning.config.schema import canonical_precision

    precision = canonical_precision(precision)
    if precision != "auto":
        return precision
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_has_fast_bf16() else "32-true"


# Dense bf16 tensor-core peak FLOP/s of known GPUs (vendor datasheets, without 2:4 sparsity), matched
# as substrings of ``torch.cuda.get_device_name()`` in this order (the first match wins).
KNOWN_PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989e12),  # also GH200
    ("A100", 312e12),  # SXM and PCIe
)


def peak_flops_of(device_name: str) -> float:
    """Peak bf16 FLOP/s of a GPU named like ``torch.cuda.get_device_name()``; 0.0 if unknown."""
    for key, flops in KNOWN_PEAK_FLOPS:
        if key.lower() in device_name.lower():
            return flops
    return 0.0


def resolve_peak_flops(configured: float, device: torch.device) -> float:
    """``trainer.peak_flops`` if set (> 0), else the known GPU's peak; 0.0 (no MFU) on CPU or unknown GPUs."""
    if configured > 0:
        return configured
    if device.type == "cuda" and torch.cuda.is_available():
        return peak_flops_of(torch.cuda.get_device_name(device))
    return 0.0
