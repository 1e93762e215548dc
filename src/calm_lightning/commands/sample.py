"""`calm sample RUN --prompt TEXT ...`: continue text prompts with a CALM or baseline model
(a run, a checkpoint or an export folder), streamed when there is one prompt."""

from __future__ import annotations

NAME = "sample"
HELP = "continue text prompts with a CALM/baseline checkpoint (streamed)"


def add_arguments(p) -> None:
    from calm_lightning.config.schema import SAMPLERS

    p.add_argument("checkpoint", help="a .ckpt, runs/<name>/version_<n>, runs/<name> or an export folder")
    p.add_argument(
        "--prompt", action="append", metavar="TEXT",
        help="text to continue; repeat for a batch (default: one empty prompt, a document start)",
    )
    p.add_argument("--temperature", type=float, default=0.5, metavar="T", help="T in (0, 1] (default 0.5)")
    p.add_argument(
        "--sampler", choices=SAMPLERS, default="batch",
        help="CALM temperature sampler: exact, batch, or auto (per chunk the cheaper by a pilot; default batch)"
    )
    p.add_argument(
        "--num-candidates", type=int, default=200, metavar="N", help="N of the batch sampler, >= 1/T (default 200)"
    )
    p.add_argument(
        "--max-draws", type=int, default=4096, metavar="N", help="exact sampler: cap on draws per chunk (default 4096)"
    )
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to add per prompt (default 64)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N or mps")


def run(args) -> int:
    from calm_lightning.checkpoints import load_language_model
    from calm_lightning.sampling.generate import GenerationConfig
    from calm_lightning.sampling.text import sample_text
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
    loaded = load_language_model(args.checkpoint, args.device)
    print_sample_header(loaded, gcfg)
    stream = SampleStream(prompts[0]) if len(prompts) == 1 else None  # stream a single prompt
    result = sample_text(loaded, prompts, gcfg, seed=args.seed, on_text=stream)
    print_samples(result, stream)
    return 0
