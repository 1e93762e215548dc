"""The `calm` console script: a thin dispatcher. User errors print one line and exit 2."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from calm_lightning.errors import CalmError


def _config(args):
    from calm_lightning.config.loader import load_config

    return load_config(args.config, args.overrides)


def cmd_prepare(args) -> int:
    from omegaconf import OmegaConf

    from calm_lightning.data.prepare import check_min_tokens, prepare_data, summary
    from calm_lightning.ui import print_table

    exp = OmegaConf.to_object(_config(args))
    # the explicit command hashes every shard, however large (train and eval only hash small ones)
    prepared = prepare_data(exp.data, exp.tokenizer, full_check=True)
    check_min_tokens(prepared.meta, exp.data.block_size)
    print_table("Prepared corpus", summary(prepared))
    return 0


def cmd_train(args) -> int:
    from calm_lightning.runs import is_rank_zero
    from calm_lightning.train import train
    from calm_lightning.ui import print_run_summary

    result = train(_config(args))
    if is_rank_zero():  # every rank of a multi-process run returns here; one summary is enough
        print_run_summary(result)
    return 0


def cmd_eval(args) -> int:
    from calm_lightning.evaluate import evaluate
    from calm_lightning.ui import display_metrics, print_eval

    result = evaluate(args.checkpoint, args.overrides, limit_batches=args.limit_batches, floors=args.floors)
    if args.json:
        import json
        import math

        def finite(v):  # NaN (an SE from fewer than 2 blocks) is not JSON: null
            if isinstance(v, dict):
                return {k: finite(x) for k, x in v.items()}
            return None if isinstance(v, float) and not math.isfinite(v) else v

        print(json.dumps(finite(result), indent=2, sort_keys=True))
    else:
        floors = {name: display_metrics(m) for name, m in result.get("floors", {}).items()}
        print_eval({**result, "metrics": display_metrics(result["metrics"]), "floors": floors})
    return 0


def cmd_sample(args) -> int:
    from calm_lightning.sample import load_for_sampling, sample
    from calm_lightning.sampling.generate import GenerationConfig
    from calm_lightning.ui import SampleStream, print_sample_header, print_samples

    gcfg = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        sampler=args.sampler,
        num_candidates=args.num_candidates,
        max_draws=args.max_draws,
    )
    gcfg.validate()  # before the (slow) load
    prompts = args.prompt or [""]
    loaded = load_for_sampling(args.checkpoint, args.device)
    print_sample_header(loaded, gcfg)
    stream = SampleStream(prompts[0]) if len(prompts) == 1 else None  # stream a single prompt
    result = sample(loaded, prompts, gcfg, seed=args.seed, on_text=stream)
    print_samples(result, stream)
    return 0


def cmd_compare(args) -> int:
    from calm_lightning.comparison import DEFAULT_DIFFUSION_STEPS, DEFAULT_FLOW_STEPS, compare
    from calm_lightning.ui import err_console

    result = compare(
        args.run_dirs,
        args.out,
        flow_steps=args.sweep_steps or DEFAULT_FLOW_STEPS,
        diffusion_steps=args.diffusion_steps or DEFAULT_DIFFUSION_STEPS,
        limit_batches=args.limit_batches,
        gen_tokens=args.gen_tokens,
        device=args.device,
        progress=lambda msg: err_console.print(msg, style="dim"),
    )
    print(result.markdown.split("\n## Figures")[0])  # plain text: markdown tables must not be wrapped
    print("wrote " + ", ".join(str(f) for f in result.files))
    return 0


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="calm", description="Continuous Autoregressive Language Models with Lightning."
    )
    p.add_argument("--debug", action="store_true", help="show full tracebacks for user errors")
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser(
        "prepare",
        help="fetch the corpus, train/load the tokenizer, write token shards (or verify cached ones)",
    )
    sp.add_argument("config", help="experiment YAML")
    sp.add_argument("overrides", nargs="*", help="key=value overrides")
    sp.set_defaults(func=cmd_prepare)

    st = sub.add_parser("train", help="train the model an experiment YAML describes")
    st.add_argument("config", help="experiment YAML")
    st.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.max_steps=50")
    st.set_defaults(func=cmd_train)

    se = sub.add_parser("eval", help="BrierLM of a CALM/baseline checkpoint, accuracies of an autoencoder")
    se.add_argument("checkpoint", help="a .ckpt file or a run directory (uses its checkpoints/last.ckpt)")
    se.add_argument(
        "overrides",
        nargs="*",
        help="data.* / eval.* / head sampling overrides, e.g. data.corpus=my.txt model.head.flow.num_steps=8",
    )
    se.add_argument(
        "--limit-batches", type=int, default=0, help="evaluate at most this many batches (0 = all)"
    )
    se.add_argument("--json", action="store_true", help="print JSON instead of a table")
    se.add_argument(
        "--floors", action="store_true",
        help="also score unigram and bigram models counted on the training split (same positions)",
    )
    se.set_defaults(func=cmd_eval)

    ss = sub.add_parser("sample", help="continue text prompts with a CALM/baseline checkpoint (streamed)")
    ss.add_argument("checkpoint", help="a .ckpt file or a run directory (uses its checkpoints/last.ckpt)")
    ss.add_argument(
        "--prompt",
        action="append",
        metavar="TEXT",
        help="text to continue; repeat for a batch (default: one empty prompt, a document start)",
    )
    ss.add_argument("--temperature", type=float, default=0.5, metavar="T", help="T in (0, 1] (default 0.5)")
    ss.add_argument(
        "--sampler",
        choices=("exact", "batch"),
        default="batch",
        help="CALM temperature sampler (default batch)",
    )
    ss.add_argument(
        "--num-candidates",
        type=int,
        default=200,
        metavar="N",
        help="N of the batch sampler, >= 1/T (default 200)",
    )
    ss.add_argument(
        "--max-draws",
        type=int,
        default=4096,
        metavar="N",
        help="exact sampler: cap on draws per chunk (default 4096)",
    )
    ss.add_argument(
        "--max-new-tokens", type=int, default=64, metavar="N", help="tokens to add per prompt (default 64)"
    )
    ss.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    ss.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N or mps")
    ss.set_defaults(func=cmd_sample)

    sc = sub.add_parser("compare", help="compare CALM/baseline runs: markdown table and BrierLM plots")
    sc.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="runs/<name> (its latest version) or runs/<name>/version_<n>",
    )
    sc.add_argument("--out", default="runs/compare", help="output folder (default runs/compare)")
    sc.add_argument(
        "--sweep-steps",
        type=_int_list,
        metavar="N,N,...",
        help="flow solver steps to evaluate, Euler and midpoint (default 1,2,4,8,16)",
    )
    sc.add_argument(
        "--diffusion-steps",
        type=_int_list,
        metavar="N,N,...",
        help="diffusion sampling steps to evaluate (default 10,25,50,100)",
    )
    sc.add_argument(
        "--limit-batches",
        type=int,
        default=0,
        help="validation batches per sweep evaluation (0 = the run's limit_val_batches)",
    )
    sc.add_argument(
        "--gen-tokens",
        type=int,
        default=32,
        metavar="N",
        help="tokens per document for generation tokens/s (0 = skip)",
    )
    sc.add_argument("--device", default="auto", help="generation device: auto, cpu, cuda, cuda:N or mps")
    sc.set_defaults(func=cmd_compare)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("CALM_DEBUG") == "1"
    try:
        return args.func(args)
    except CalmError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
