"""`calm prepare CONFIG [key=value ...]`: fetch the corpus, train or load the tokenizer, write the
token shards (or verify cached ones)."""

from __future__ import annotations

NAME = "prepare"
HELP = "fetch the corpus, train/load the tokenizer, write token shards (or verify cached ones)"


def add_arguments(p) -> None:
    p.add_argument("config", help="experiment YAML")
    p.add_argument("overrides", nargs="*", help="key=value overrides")


def run(args) -> int:
    from omegaconf import OmegaConf

    from calm_lightning.config.loader import load_config
    from calm_lightning.data.prepare import check_min_tokens, prepare_data, summary
    from calm_lightning.ui import print_table

    exp = OmegaConf.to_object(load_config(args.config, args.overrides))
    # the explicit command hashes every shard, however large (train and eval only hash small ones)
    prepared = prepare_data(exp.data, exp.tokenizer, full_check=True)
    check_min_tokens(prepared.meta, exp.data.block_size)
    print_table("Prepared corpus", summary(prepared))
    return 0
