"""Prepare the default corpus (Shakespeare + Milton) with the default data and tokenizer configs.

    python data/prepare_default.py [CACHE_DIR]      # CACHE_DIR defaults to .cache/calm

Downloads the corpus on first use, trains the tokenizer, writes the shards and prints a summary;
a second run only checks that everything is still current.
"""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.table import Table

from calm_lightning.config.schema import DataConfig, TokenizerConfig
from calm_lightning.data.prepare import prepare_data, summary
from calm_lightning.errors import CalmError


def main(argv: list[str]) -> int:
    data_cfg = DataConfig(cache_dir=argv[0]) if argv else DataConfig()
    start = time.perf_counter()
    try:
        prepared = prepare_data(data_cfg, TokenizerConfig())
    except CalmError as e:
        print(f"error: {e}", file=sys.stderr)
        return CalmError.exit_code
    table = Table(title="Default corpus", show_header=False)
    for name, value in [*summary(prepared), ("time", f"{time.perf_counter() - start:.1f} s")]:
        table.add_row(name, value)
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
