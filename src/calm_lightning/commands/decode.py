"""`calm decode AE LATENTS`: latents (a `calm encode` file, or any [L, l] mu) back to text, by the
autoencoder's argmax per chunk; one text per line block, or to ``--out``."""

from __future__ import annotations

NAME = "decode"
HELP = "latents -> text with an autoencoder"


def add_arguments(p) -> None:
    p.add_argument("autoencoder", help="artifacts/autoencoder.pt, an export folder or an autoencoder run")
    p.add_argument("latents", help="a .safetensors (calm encode) or .npy file")
    p.add_argument("--noise", type=float, default=0.0, metavar="S",
                   help="decode mu + S * sigma * N(0, I) instead of mu (default 0: mu)")
    p.add_argument("--seed", type=int, default=0, help="seed of --noise (default 0)")
    p.add_argument("--out", metavar="FILE", help="write the text(s) here instead of standard output")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default cpu)")


def run(args) -> int:
    import torch

    from calm_lightning.api import load_autoencoder
    from calm_lightning.checkpoints import resolve_device
    from calm_lightning.errors import CalmError
    from calm_lightning.latents import load_latents
    from calm_lightning.utils.io import atomic_write_text

    if args.noise < 0:
        raise CalmError(f"--noise must be >= 0, got {args.noise}")
    latents = load_latents(args.latents)
    ae = load_autoencoder(args.autoencoder, device=str(resolve_device(args.device)))
    if latents.mu.ndim != 2 or latents.mu.shape[-1] != ae.model.latent_size:
        raise CalmError(
            f"{args.latents}: latents of shape {list(latents.mu.shape)} but the autoencoder takes [L, {ae.model.latent_size}]"
        )
    z = latents.mu
    if args.noise > 0:
        g = torch.Generator().manual_seed(args.seed)
        z = z + args.noise * latents.sigma * torch.randn(z.shape, generator=g)
    texts, exact = [], 0
    for a, b in latents.texts():
        ids = ae.decode_ids(z[a:b])
        if latents.tokens is not None:
            exact += int(torch.equal(torch.tensor(ids).view(-1, ae.chunk_size), latents.tokens[a:b].cpu()))
        while ids and ids[-1] == ae.eos_id:  # end-of-text padding of the last chunk
            ids.pop()
        texts.append(ae.tokenizer.decode(ids))
    if latents.tokens is not None:
        import sys

        print(f"{exact} of {len(texts)} text(s) decoded to exactly the encoded tokens", file=sys.stderr)
    text = "\n\n".join(texts)
    if args.out:
        atomic_write_text(args.out, text + "\n")
        print(f"wrote {args.out}: {len(texts)} text(s)")
    else:
        print(text)
    return 0
