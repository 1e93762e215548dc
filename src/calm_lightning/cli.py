"""The `calm` console script: a thin dispatcher over `commands/`. User errors print one line and exit 2."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from calm_lightning.errors import CalmError


def build_parser() -> argparse.ArgumentParser:
    import importlib

    from calm_lightning.commands import COMMANDS

    p = argparse.ArgumentParser(
        prog="calm", description="Continuous Autoregressive Language Models with Lightning."
    )
    p.add_argument("--debug", action="store_true", help="show full tracebacks for user errors")
    sub = p.add_subparsers(dest="command", required=True)
    for module_name in COMMANDS:
        command = importlib.import_module(f"calm_lightning.commands.{module_name}")
        sp = sub.add_parser(command.NAME, help=command.HELP, description=command.__doc__.split("\n\n")[0])
        command.add_arguments(sp)
        sp.set_defaults(func=command.run)
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
