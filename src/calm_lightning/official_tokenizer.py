"""The reference checkpoints' tokenizer (Llama-3 + an appended ``[PAD]``) under the kit's special names.

The kit finds its specials by name (``data.tokenizer.special_ids``: ``<|bos|>``, ``<|eos|>`` or an EOS
fallback such as ``<|end_of_text|>``, ``<|pad|>``, ``<|mask|>``); a tokenizer lacking them would get
them appended, growing the vocabulary past the checkpoint's embedding (128,257 rows). Instead the
tokens the reference uses keep their ids and take the kit's names:
    bos  <- config.json's bos_token_id (<|begin_of_text|>), renamed <|bos|>
    eos  <- eos_token_id (<|end_of_text|>), kept: it is one of the kit's EOS fallbacks
    pad  <- pad_token_id (the appended [PAD]), renamed <|pad|>
    mask <- the first unused <|reserved_special_token_N|>, renamed <|mask|>
The reference masks autoencoder inputs with id 0 (ids times a keep mask), not with a token of its own:
the converted ``AutoencoderConfig.mask_token_id`` is 0, and the ``<|mask|>`` name only satisfies the
kit's data pipeline. Renaming touches the added-token table, the vocabulary entry (if any) and the
post-processor's template; every id keeps its place.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tokenizers import Tokenizer

from calm_lightning.data.tokenizer import (
    BOS,
    EOS,
    EOS_FALLBACKS,
    MASK,
    PAD,
    SpecialTokens,
    load_tokenizer,
    special_ids,
    vocab_size,
)
from calm_lightning.errors import CalmError

RESERVED = re.compile(r"<\|reserved_special_token_(\d+)\|>")
NAME_FALLBACKS = {"bos": "<|begin_of_text|>", "eos": "<|end_of_text|>", "pad": "[PAD]"}


def _rename_everywhere(obj, renames: dict[str, str]):
    """Every string equal to an old name (values and dict keys) replaced by its new name."""
    if isinstance(obj, str):
        return renames.get(obj, obj)
    if isinstance(obj, list):
        return [_rename_everywhere(x, renames) for x in obj]
    if isinstance(obj, dict):
        return {renames.get(k, k): _rename_everywhere(v, renames) for k, v in obj.items()}
    return obj


def rename_tokens(tok: Tokenizer, renames: dict[str, str]) -> Tokenizer:
    """A copy of ``tok`` whose tokens ``old`` are called ``new`` at the same ids."""
    d = json.loads(tok.to_str())
    for entry in d.get("added_tokens", []):
        entry["content"] = renames.get(entry["content"], entry["content"])
    vocab = d.get("model", {}).get("vocab")
    if isinstance(vocab, dict):
        d["model"]["vocab"] = {renames.get(k, k): v for k, v in vocab.items()}
    if d.get("post_processor") is not None:
        d["post_processor"] = _rename_everywhere(d["post_processor"], renames)
    return Tokenizer.from_str(json.dumps(d))


def official_tokenizer(
    source: str | Path | Tokenizer, expected_vocab: int, ids: dict
) -> tuple[Tokenizer, SpecialTokens, dict[str, str]]:
    """The reference tokenizer with the kit's special names, its special ids and the renames made.

    ``ids``: the reference config's ``bos_token_id``, ``eos_token_id``, ``pad_token_id`` (None = look
    the token up by its Llama-3 name). CalmError if the vocabulary is not ``expected_vocab`` ids, a
    special is not a special token, or no reserved token is left for the mask.
    """
    where = "the given tokenizer" if isinstance(source, Tokenizer) else str(source)
    tok = Tokenizer.from_str(source.to_str()) if isinstance(source, Tokenizer) else load_tokenizer(source)
    n = vocab_size(tok)
    if n != expected_vocab:
        raise CalmError(f"{where}: {n} token ids, but the checkpoint's embedding has {expected_vocab} rows")
    specials = {i: t.content for i, t in tok.get_added_tokens_decoder().items() if t.special}
    targets: dict[str, int] = {}
    for role in ("bos", "eos", "pad"):
        i = ids.get(f"{role}_token_id")
        if i is None:
            i = tok.token_to_id(NAME_FALLBACKS[role])
        if i is None or i not in specials:
            raise CalmError(f"{where}: the {role} token (id {i}, from config.json) is not a special token of this tokenizer")
        targets[role] = i
    if len(set(targets.values())) < 3:
        raise CalmError(f"{where}: bos, eos and pad share an id ({targets})")
    existing = tok.token_to_id(MASK)
    if existing is not None:
        targets["mask"] = existing
    else:
        free = sorted((int(m.group(1)), i) for i, c in specials.items()
                      if (m := RESERVED.fullmatch(c)) and i not in targets.values())
        if not free:
            raise CalmError(f"{where}: no <|reserved_special_token_N|> left to serve as {MASK}")
        targets["mask"] = free[0][1]

    wanted = {"bos": BOS, "pad": PAD, "mask": MASK}
    if specials[targets["eos"]] not in (EOS, *EOS_FALLBACKS):
        wanted["eos"] = EOS
    renames = {}
    for role, name in wanted.items():
        old = tok.id_to_token(targets[role])
        if old == name:
            continue
        if tok.token_to_id(name) is not None:
            raise CalmError(f"{where}: {name} already names id {tok.token_to_id(name)}, not the {role} id {targets[role]}")
        renames[old] = name
    renamed = rename_tokens(tok, renames) if renames else tok

    got = special_ids(renamed)
    want = SpecialTokens(**targets)
    if got != want or vocab_size(renamed) != n:
        raise CalmError(f"{where}: special tokens resolve to {got.as_dict()} after renaming, expected {want.as_dict()}")
    before, after = tok.get_vocab(with_added_tokens=True), renamed.get_vocab(with_added_tokens=True)
    if {renames.get(k, k): v for k, v in before.items()} != after:
        raise CalmError(f"{where}: renaming the special tokens moved other ids")  # a converter bug
    return renamed, want, renames
