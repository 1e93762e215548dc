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


# Lightning's `get_available_flops` knows the peaks of most GPUs per dtype; these correct it where it
# is wrong for dense training. Lightning 2.6 does not parse the name "NVIDIA H200" (the H200 we were
# lent: it returns None) and lists the H200 SXM/NVL bf16/fp16 peaks with 2:4 sparsity (2.0e15, 1.7e15),
# twice the dense datasheet figures. Substrings of `torch.cuda.get_device_name()`, first match wins.
DENSE_PEAK_CORRECTIONS: tuple[tuple[str, dict[torch.dtype, float]], ...] = (
    ("H200 NVL", {torch.bfloat16: 835e12, torch.float16: 835e12}),
    ("H200", {torch.bfloat16: 989e12, torch.float16: 989e12}),
)


def compute_dtype(precision: str) -> torch.dtype:
    """The matmul dtype of a Lightning precision string (``bf16-mixed`` -> bfloat16, ...)."""
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    if precision.startswith("64"):
        return torch.float64
    return torch.float32


def peak_flops_of(device: torch.device, dtype: torch.dtype) -> float:
    """Dense peak FLOP/s of a CUDA device for ``dtype`` (`get_available_flops` + corrections); 0.0 if unknown."""
    from lightning.fabric.utilities.throughput import get_available_flops

    name = torch.cuda.get_device_name(device)
    for key, table in DENSE_PEAK_CORRECTIONS:
        if key.lower() in name.lower() and dtype in table:
            return table[dtype]
    import warnings

    with warnings.catch_warnings():  # "FLOPs not found for ...": we report "no MFU" instead
        warnings.simplefilter("ignore")
        flops = get_available_flops(device, dtype)
    return float(flops or 0.0)


def resolve_peak_flops(configured: float, device: torch.device, precision: str = "bf16-mixed") -> float:
    """``trainer.peak_flops`` if set (> 0), else the GPU's dense peak in the precision's matmul dtype;
    0.0 (no MFU) on CPU or unknown GPUs."""
    if configured > 0:
        return configured
    if device.type == "cuda" and torch.cuda.is_available():
        return peak_flops_of(device, compute_dtype(precision))
    return 0.0
