"""Text in, text out: continue prompts with a loaded language model (`checkpoints.LoadedModel`).

Used by `calm sample`, the Python API and `calm compare`. Generation is `sampling.generate` on token
ids; text is decoded incrementally so a single prompt can be streamed as it is produced.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from calm_lightning.sampling.generate import GenerationConfig, generate

TextCallback = Callable[[int, str], None]


@dataclass
class SampleResult:
    prompts: list[str]
    continuations: list[str]  # decoded new text per prompt
    tokens: list[list[int]]  # new token ids per prompt
    steps: int
    stats: list[dict] = field(default_factory=list)  # per-step sampler statistics (CALM, T < 1)


class IncrementalDecoder:
    """Token ids in, new text out, in O(new tokens) per call (`tokenizers.decoders.DecodeStream`).

    Byte-level BPE can split a character across tokens: the stream holds such bytes back until the
    character completes, so the printed text never shows a replacement character that later turns
    into something else. Special tokens are skipped, as ``Tokenizer.decode`` does by default.
    """

    def __init__(self, tokenizer) -> None:
        from tokenizers.decoders import DecodeStream

        self.tokenizer = tokenizer
        self.stream = DecodeStream(skip_special_tokens=True)
        self.ids: list[int] = []
        self.emitted: list[str] = []

    def push(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        text = "".join(p for p in (self.stream.step(self.tokenizer, i) for i in ids) if p)
        self.emitted.append(text)
        return text

    def flush(self) -> str:
        """What the stream still holds back at the end (e.g. an incomplete character), decoded once."""
        full, done = self.tokenizer.decode(self.ids), "".join(self.emitted)
        return full[len(done):] if full.startswith(done) else ""


def sample_text(
    loaded,
    prompts: list[str],
    cfg: GenerationConfig,
    *,
    seed: int = 0,
    on_text: TextCallback | None = None,
) -> SampleResult:
    """Continue each prompt as one batch. ``on_text(row, new_text)`` receives decoded text as it comes."""
    tok = loaded.tokenizer
    cfg = dataclasses.replace(cfg, eos_id=loaded.eos_id)
    ids = [tok.encode(p).ids for p in prompts]
    decoders = [IncrementalDecoder(tok) for _ in prompts]

    def on_step(gained: list[list[int]]) -> None:
        for row, piece in enumerate(gained):
            text = decoders[row].push(piece) if piece else ""
            if text and on_text is not None:
                on_text(row, text)

    generator = torch.Generator(device=loaded.device).manual_seed(seed)
    out = generate(loaded.model, ids, cfg, fill_id=loaded.eos_id, generator=generator, on_step=on_step)
    if on_text is not None:
        for row, dec in enumerate(decoders):
            rest = dec.flush()
            if rest:
                on_text(row, rest)
    texts = [tok.decode(t) for t in out.tokens]
    return SampleResult(list(prompts), texts, out.tokens, out.steps, out.stats)
