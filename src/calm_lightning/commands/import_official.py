"""`calm import-official AE_DIR [--calm CALM_DIR] --out DIR`: convert the reference implementation's
released checkpoints (Hugging Face folders: config.json + pytorch_model.bin or model.safetensors,
Llama-3 tokenizer with [PAD] appended) into a kit export folder that `calm sample`, `calm eval`,
`calm_lightning.load` and ``model.init_from`` take. The reference architecture is reproduced by
config switches (docs/DEVIATIONS.md); the vocabulary keeps its size (128,257)."""

from __future__ import annotations

NAME = "import-official"
HELP = "convert the reference implementation's released autoencoder / CALM-energy checkpoints"


def add_arguments(p) -> None:
    p.add_argument("autoencoder_dir", metavar="AE_DIR", help="the reference autoencoder's folder")
    p.add_argument("--calm", metavar="CALM_DIR", help="a reference CALM-energy folder (default: autoencoder only)")
    p.add_argument("--tokenizer", metavar="FILE", help="tokenizer.json (default: the one in CALM_DIR or AE_DIR)")
    p.add_argument("--out", required=True, metavar="DIR", help="the export folder to write")


def run(args) -> int:
    from calm_lightning.export import import_official, read_export_meta

    out = import_official(args.autoencoder_dir, args.calm, args.out, tokenizer=args.tokenizer)
    meta = read_export_meta(out, verify=False)
    renames = meta["official"]["tokenizer_renames"]
    print(f"imported {meta['kind']} to {out}; tokenizer tokens renamed (same ids): "
          + ", ".join(f"{a} -> {b}" for a, b in renames.items()))
    return 0
