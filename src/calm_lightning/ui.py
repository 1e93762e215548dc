"""Console output with rich: summary tables for prepare, train and eval."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

console = Console()


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="cyan")
    table.add_column()
    for k, v in rows:
        table.add_row(str(k), str(v))
    console.print(table)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


_PERCENT_KEYS = ("_acc_",)


def print_run_summary(result: dict[str, Any]) -> None:
    rows = [
        ("model", result["kind"]),
        ("run directory", result["run_dir"]),
        ("steps", _fmt(result["global_step"])),
        ("trainable parameters", _fmt(result["parameters"])),
        ("wall time", f"{result['wall_time_s'] / 60:.1f} min"),
        ("training tokens/s", f"{result['train_tokens_per_s']:.0f}"),
    ]
    for k, v in sorted(result["metrics"].items()):
        if not k.startswith("val/"):
            continue
        shown = f"{100 * v:.2f}%" if any(s in k for s in _PERCENT_KEYS) else _fmt(v)
        rows.append((k, shown))
    if "export" in result:
        rows.append(("exported autoencoder", result["export"]))
    print_table("Training summary", rows)


def print_eval(result: dict[str, Any]) -> None:
    rows = [(k, _fmt(v)) for k, v in result.items() if not isinstance(v, dict)]
    for k, v in result.get("metrics", {}).items():
        shown = f"{100 * v:.2f}%" if any(s in k for s in _PERCENT_KEYS) else _fmt(v)
        rows.append((k, shown))
    print_table("Evaluation", rows)
