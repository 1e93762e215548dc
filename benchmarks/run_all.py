"""`make bench`: run every benchmark in turn (never in parallel) and write benchmarks/RESULTS.md.

Each benchmark appends a JSON record to benchmarks/results/<name>.json; RESULTS.md shows the latest
record of each (`run_all.py --summary-only` rewrites RESULTS.md without running anything). Run it on an otherwise idle machine: the figures are wall-clock times.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from records import cpu_model

HERE = Path(__file__).resolve().parent
BENCHMARKS = {"train": ["bench_train.py", "--bf16", "--compile"], "brier": ["bench_brier.py"], "temperature": ["bench_temperature.py"],
              "generate": ["bench_generate.py"], "sampling": ["bench_sampling.py"],  # sampling: needs runs/calm_energy
              "gpu": ["gpu.py", "--compile"]}  # gpu: skips without CUDA


def machine() -> str:
    import lightning
    import torch

    return (f"{cpu_model()}; torch {torch.__version__}, lightning {lightning.__version__}, "
            f"{torch.get_num_threads()} threads; {time.strftime('%Y-%m-%d %H:%M')}")


def main() -> int:
    args = sys.argv[1:]
    summary_only = "--summary-only" in args  # rewrite RESULTS.md from the records, run nothing
    only = [] if summary_only else (args or list(BENCHMARKS))
    for name in only:
        print(f"== {name}", flush=True)
        subprocess.run([sys.executable, str(HERE / BENCHMARKS[name][0]), *BENCHMARKS[name][1:]], check=True)
    lines = ["# Benchmark results", "", f"Written on: {machine()}", "",
             "Latest record of each benchmark (min / median over repetitions; see results/*.json for history). "
             "Each section names the date and CPU of its own record, which may predate this machine.", ""]
    for name in BENCHMARKS:
        path = HERE / "results" / f"{name}.json"
        if not path.exists():
            continue
        latest = json.loads(path.read_text())[-1]
        when = latest.get("time") or latest.get("date", "date not recorded")
        where = latest.get("cpu") or latest.get("device") or f"{latest.get('machine', '?')}, CPU model not recorded"
        lines += [f"## {name}", "", f"Recorded {when} on {where}.", "", "```json", json.dumps(latest, indent=1), "```", ""]
    (HERE / "RESULTS.md").write_text("\n".join(lines))
    print(f"wrote {HERE / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
