"""`calm encode AE --text TEXT ... | --corpus FILE --out FILE`: the autoencoder's posterior (mu and
sigma) of every K-token chunk, written as .safetensors (with the token ids and text boundaries) or
.npy (`latents.py`)."""

from __future__ import annotations

NAME = "encode"
HELP = "text -> latents (mu, sigma per K-token chunk) with an autoencoder"


def add_arguments(p) -> None:
    p.add_argument("autoencoder", help="artifacts/autoencoder.pt, an export folder or an autoencoder run")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", action="append", metavar="TEXT", help="a text to encode; repeat for several")
    src.add_argument("--corpus", metavar="FILE", help="a UTF-8 text file, encoded as one text")
    p.add_argument("--out", required=True, metavar="FILE", help="output .safetensors or .npy")
    p.add_argument("--batch-size", type=int, default=4096, metavar="N", help="chunks per forward (default 4096)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default cpu)")


def run(args) -> int:
    from pathlib import Path

    import torch

    from calm_lightning.api import load_autoencoder
    from calm_lightning.checkpoints import resolve_device
    from calm_lightning.errors import CalmError
    from calm_lightning.latents import Latents, check_suffix, save_latents
    from calm_lightning.ui import progress_bar

    out = check_suffix(args.out)
    if args.batch_size < 1:
        raise CalmError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.corpus:
        try:
            texts = [Path(args.corpus).read_text(encoding="utf-8")]
        except (OSError, UnicodeDecodeError) as e:
            raise CalmError(f"{args.corpus}: cannot read the corpus ({type(e).__name__})") from None
    else:
        texts = args.text
    ae = load_autoencoder(args.autoencoder, device=str(resolve_device(args.device)))
    chunks = [ae.chunk_ids(t) for t in texts]
    tokens = torch.cat(chunks)
    offsets = torch.tensor([0, *torch.tensor([c.shape[0] for c in chunks]).cumsum(0).tolist()])
    with progress_bar("encoding", total=tokens.shape[0], unit="chunks") as advance:
        mu, sigma = ae.encode_chunks(tokens, batch_size=args.batch_size, progress=advance)
    meta = {"chunk_size": str(ae.chunk_size), "latent_size": str(mu.shape[-1]),
            "source": args.corpus or "--text", "autoencoder": str(args.autoencoder)}
    save_latents(out, Latents(mu, sigma, offsets, tokens, meta))
    print(f"wrote {out}: {len(texts)} text(s), {tokens.shape[0]} chunks of K={ae.chunk_size}, l={mu.shape[-1]}, "
          f"mean sigma {sigma.mean().item():.3f}")
    return 0
