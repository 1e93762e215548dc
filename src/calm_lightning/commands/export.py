"""`calm export RUN --out DIR`: a portable folder (config.json, model.safetensors, tokenizer.json and,
for CALM, its autoencoder/) that `calm_lightning.load`, every command and ``model.init_from`` take,
without pickle and without the data cache."""

from __future__ import annotations

NAME = "export"
HELP = "write a run as a portable folder (safetensors + tokenizer.json + config.json)"


def add_arguments(p) -> None:
    p.add_argument("checkpoint", help="a .ckpt, runs/<name>/version_<n> or runs/<name> (its latest version)")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write (replaced if it is an export)")


def run(args) -> int:
    from calm_lightning.export import export_run, read_export_meta

    out = export_run(args.checkpoint, args.out)
    meta = read_export_meta(out, verify=False)
    files = ", ".join(sorted(meta["sha256"]))
    print(f"exported {meta['kind']} step {meta['step']} from {meta.get('source', '?')} to {out} ({files})")
    return 0
