"""The `calm` CLI with FSDP's GPU-only guards lifted (`ddp_probe.lift_cpu_fsdp_refusals`), for CPU tests.

Run as ``python fsdp_cli.py <calm arguments>``; Lightning re-launches the same command for rank 1.
"""

from __future__ import annotations

import sys

from ddp_probe import lift_cpu_fsdp_refusals

from calm_lightning.cli import main

if __name__ == "__main__":
    lift_cpu_fsdp_refusals()
    raise SystemExit(main(sys.argv[1:]))
