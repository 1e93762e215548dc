"""Console output with rich: summary tables for prepare, train and eval."""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


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


_BRIER_PART = re.compile(r"(.*/brier(?:\d+|lm))_(se|lo|hi)$")


def display_metrics(metrics: dict[str, float]) -> dict[str, Any]:
    """Metrics for the console: each Brier-n as ``0.0432 ± 0.0021  [0.0391, 0.0473]`` and BrierLM as
    ``5.72  [5.10, 6.31]`` (their _se/_lo/_hi entries folded in); every other metric unchanged."""

    def num(v: float | None, fmt: str) -> str:
        return "n/a" if v is None or not math.isfinite(v) else format(v, fmt)

    folded = {m.group(1) for k in metrics if (m := _BRIER_PART.match(k))}
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if _BRIER_PART.match(k):
            continue
        if k not in folded:
            out[k] = v
            continue
        fmt = ".2f" if k.endswith("brierlm") else ".4f"
        shown = num(v, fmt)
        if f"{k}_se" in metrics:
            shown += f" ± {num(metrics[f'{k}_se'], fmt)}"
        if f"{k}_lo" in metrics:
            shown += f"  [{num(metrics[f'{k}_lo'], fmt)}, {num(metrics.get(f'{k}_hi'), fmt)}]"
        out[k] = shown
    return out


def print_run_summary(result: dict[str, Any]) -> None:
    rows = [
        ("model", result["kind"]),
        ("run directory", result["run_dir"]),
        ("steps", f"{result['global_step']:,} of {result['budget']['max_steps']:,}" if "budget" in result
         else _fmt(result["global_step"])),
        ("trainable parameters", _fmt(result["parameters"])),
        ("wall time", f"{result['wall_time_s'] / 60:.1f} min"),
        ("training tokens/s", f"{result['train_tokens_per_s']:.0f}" if result["train_tokens_per_s"] > 0
         else "n/a (no training step in this session)"),
    ]
    for k, v in sorted(display_metrics(result["metrics"]).items()):
        if not k.startswith("val/"):
            continue
        shown = f"{100 * v:.2f}%" if any(s in k for s in _PERCENT_KEYS) else _fmt(v)
        rows.append((k, shown))
    if "export" in result:
        rows.append(("exported autoencoder", result["export"]))
    print_table("Training summary", rows)
    note = result.get("budget", {}).get("note")
    if note:  # a cut-short run must not pass for a finished one
        console.print(f"[bold red]WARNING: {note}; rerun the same command to continue to the configured steps."
                      "[/bold red]")


def print_eval(result: dict[str, Any]) -> None:
    rows = [(k, _fmt(v)) for k, v in result.items() if not isinstance(v, dict)]
    for k, v in result.get("metrics", {}).items():
        shown = f"{100 * v:.2f}%" if any(s in k for s in _PERCENT_KEYS) else _fmt(v)
        rows.append((k, shown))
    print_table("Evaluation", rows)
    for name, metrics in result.get("floors", {}).items():
        keep = [(k, v) for k, v in metrics.items() if k.startswith("val/brier")]
        print_table(f"Floor: {name} model counted on the training split, same positions", keep)
    note = result.get("budget", {}).get("note")
    if note:
        console.print(f"[bold red]WARNING: the checkpoint's run is incomplete: {note}.[/bold red]")


def print_sample_header(loaded, gcfg) -> None:
    """One line on stderr saying what generates, so stdout holds only the text."""
    what = f"{loaded.kind} checkpoint step {loaded.step:,}" + (f", K={loaded.chunk_size}" if loaded.kind == "calm" else "")
    how = f"T={gcfg.temperature:g}"
    if loaded.kind == "calm" and gcfg.temperature < 1:
        how += f", {gcfg.sampler} sampler" + {"batch": f" N={gcfg.num_candidates}",
                                              "exact": f" max_draws={gcfg.max_draws}"}.get(
            gcfg.sampler, f" N={gcfg.num_candidates} max_draws={gcfg.max_draws}")
    from rich.text import Text

    err_console.print(Text(f"{what} ({loaded.checkpoint}), {how}, {gcfg.max_new_tokens} new tokens, {loaded.device}",
                           style="dim"), soft_wrap=True)


# Model text is printed as produced, except that on a terminal control characters other than newline
# and tab are shown as their Unicode control pictures (an untrained model emits arbitrary bytes).
_CONTROL_PICTURES = {**{c: 0x2400 + c for c in range(32) if c not in (9, 10)}, 127: 0x2421}


def stream_text(text: str, prompt: bool = False) -> None:
    """Write text to stdout now, unwrapped and unstyled (the prompt in bold on a terminal)."""
    from rich.text import Text

    if console.is_terminal:
        text = text.translate(_CONTROL_PICTURES)
        if prompt:
            console.print(Text(text, style="bold"), end="", soft_wrap=True)
            return
    console.file.write(text)
    console.file.flush()


class SampleStream:
    """``on_text`` for one prompt: prints the prompt when its first text arrives (so an error raised
    before generation leaves stdout empty), then each piece as it comes."""

    def __init__(self, prompt: str) -> None:
        self.prompt, self.started = prompt, False

    def __call__(self, row: int, text: str) -> None:
        self._start()
        stream_text(text)

    def finish(self) -> None:
        self._start()
        stream_text("\n")

    def _start(self) -> None:
        if not self.started:
            stream_text(self.prompt, prompt=True)
            self.started = True


def print_samples(result, stream: SampleStream | None = None) -> None:
    """End a streamed sample, or print every prompt with its continuation; sampler notes on stderr."""
    from rich.rule import Rule

    if stream is not None:
        stream.finish()
    else:
        for i, (prompt, cont) in enumerate(zip(result.prompts, result.continuations), start=1):
            console.print(Rule(f"sample {i} of {len(result.prompts)}", style="dim"))
            stream_text(prompt, prompt=True)
            stream_text(cont + "\n")
    fallbacks = {kind: sum(step.get(f"{kind}_fallbacks", 0) for step in result.stats) for kind in ("exact", "batch")}
    if fallbacks.get("exact"):
        err_console.print(f"note: the exact sampler reached --max-draws on {fallbacks['exact']} chunk(s) and returned "
                          "a fallback there (a sample at a higher temperature)", style="yellow", soft_wrap=True,
                          highlight=False)
    if fallbacks.get("batch"):
        err_console.print(f"note: the batch sampler fell back to a lower level on {fallbacks['batch']} chunk(s): no "
                          "chunk appeared 1/T times among --num-candidates", style="yellow", soft_wrap=True,
                          highlight=False)


@contextmanager
def progress_bar(description: str, total: int, unit: str = "items"):
    """A rich progress bar on standard error; yields ``advance(done)`` to report the items done so far."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn(f"{description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
               TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda done: progress.update(task, completed=done)
