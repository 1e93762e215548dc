"""`calm compare RUN RUN ...`: score CALM/baseline runs on the same validation blocks (paired
differences, floors, sampling-steps sweeps) and write a markdown/JSON report with plots."""

from __future__ import annotations

import argparse

NAME = "compare"
HELP = "compare CALM/baseline runs: markdown table and BrierLM plots"


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return values


def _head_steps(text: str) -> tuple[str, list[int]]:
    head, sep, steps = text.partition("=")
    if not sep or not head.strip():
        raise argparse.ArgumentTypeError(f"expected HEAD=N,N,..., got {text!r}")
    return head.strip(), _int_list(steps)


def add_arguments(p) -> None:
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="runs/<name> (its latest version) or runs/<name>/version_<n>")
    p.add_argument("--out", default="runs/compare", help="output folder (default runs/compare)")
    p.add_argument(
        "--head-steps", type=_head_steps, action="append", metavar="HEAD=N,N,...",
        help="sampling steps to sweep for a head (repeat per head; default: each head's own list)",
    )
    p.add_argument(
        "--sweep-steps", type=_int_list, metavar="N,N,...",
        help="the same as --head-steps flow=N,N,... (Euler and midpoint; default 1,2,4,8,16)",
    )
    p.add_argument(
        "--diffusion-steps", type=_int_list, metavar="N,N,...",
        help="the same as --head-steps diffusion=N,N,... (default 10,25,50,100)",
    )
    p.add_argument(
        "--limit-batches", type=int, default=0,
        help="validation batches per sweep evaluation (0 = the run's limit_val_batches)",
    )
    p.add_argument(
        "--gen-tokens", type=int, default=32, metavar="N", help="tokens per document for generation tokens/s (0 = skip)"
    )
    p.add_argument("--device", default="auto", help="generation device: auto, cpu, cuda, cuda:N or mps")


def run(args) -> int:
    from calm_lightning.comparison import compare
    from calm_lightning.ui import err_console

    steps = dict(args.head_steps or [])
    if args.sweep_steps:
        steps["flow"] = args.sweep_steps
    if args.diffusion_steps:
        steps["diffusion"] = args.diffusion_steps
    result = compare(
        args.run_dirs,
        args.out,
        sweep_steps=steps,
        limit_batches=args.limit_batches,
        gen_tokens=args.gen_tokens,
        device=args.device,
        progress=lambda msg: err_console.print(msg, style="dim"),
    )
    print(result.markdown.split("\n## Figures")[0])  # plain text: markdown tables must not be wrapped
    print("wrote " + ", ".join(str(f) for f in result.files))
    return 0
