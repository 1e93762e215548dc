"""`calm train CONFIG [key=value ...]`: train the model an experiment YAML describes."""

from __future__ import annotations

NAME = "train"
HELP = "train the model an experiment YAML describes"


def add_arguments(p) -> None:
    p.add_argument("config", help="experiment YAML")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.max_steps=50")


def run(args) -> int:
    from calm_lightning.config.loader import load_config
    from calm_lightning.runs import is_rank_zero
    from calm_lightning.training import train
    from calm_lightning.ui import print_run_summary

    result = train(load_config(args.config, args.overrides))
    if is_rank_zero():  # every rank of a multi-process run returns here; one summary is enough
        print_run_summary(result)
    return 0
