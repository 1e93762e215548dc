"""What every benchmark writes: a record header (when, where, which torch) and an append-only JSON file."""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch


def cpu_model() -> str:
    """The CPU's model name and whether it has native bf16 (the two facts that decide its matmul peaks)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = info.splitlines()
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                 platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    native = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return f"{model} ({', '.join(native) if native else 'no native bf16'})"


def record_header(benchmark: str) -> dict[str, Any]:
    return {
        "benchmark": benchmark,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "cpu": cpu_model(),
    }


def append_record(path: Path | None, record: dict[str, Any]) -> None:
    """Append ``record`` to the JSON list in ``path`` (created if missing); None writes nothing."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    history = json.loads(path.read_text()) if path.exists() else []
    path.write_text(json.dumps(history + [record], indent=2) + "\n")
    print(f"appended to {path}")
