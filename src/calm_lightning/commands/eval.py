"""`calm eval RUN [key=value ...]`: BrierLM of a CALM/baseline checkpoint (with intervals), token
and chunk accuracies of an autoencoder, on the whole validation split or another corpus."""

from __future__ import annotations

NAME = "eval"
HELP = "BrierLM of a CALM/baseline checkpoint, accuracies of an autoencoder"


def add_arguments(p) -> None:
    p.add_argument("checkpoint", help="a .ckpt, runs/<name>/version_<n> or runs/<name> (its latest version)")
    p.add_argument(
        "overrides",
        nargs="*",
        help="data.* / eval.* / head sampling overrides, e.g. data.corpus=my.txt model.head.flow.num_steps=8",
    )
    p.add_argument("--limit-batches", type=int, default=0, help="evaluate at most this many batches (0 = all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--floors", action="store_true",
        help="also score unigram and bigram models counted on the training split (same positions)",
    )


def _finite(v):
    """NaN (an SE from fewer than 2 blocks) is not JSON: null."""
    import math

    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    return None if isinstance(v, float) and not math.isfinite(v) else v


def run(args) -> int:
    from calm_lightning.evaluation import evaluate
    from calm_lightning.ui import display_metrics, print_eval

    result = evaluate(args.checkpoint, args.overrides, limit_batches=args.limit_batches, floors=args.floors)
    if args.json:
        import json

        print(json.dumps(_finite(result), indent=2, sort_keys=True))
    else:
        floors = {name: display_metrics(m) for name, m in result.get("floors", {}).items()}
        print_eval({**result, "metrics": display_metrics(result["metrics"]), "floors": floors})
    return 0
