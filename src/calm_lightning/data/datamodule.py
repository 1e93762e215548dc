"""`TokenChunkDataModule`: fixed-length token blocks from the prepared shards.

Train: the flat train array cut into non-overlapping blocks of ``block_size`` tokens, starting at an
offset drawn per epoch from (seed, epoch) within the slack ``n_tokens mod block_size``, visited in a
permutation drawn from (seed, epoch). So every epoch has the same number of blocks, the block edges
move between epochs, and a resumed run continues the interrupted epoch's order from the next unseen
block (`ResumableLoader`). Validation: the blocks from the start of the val array, in order, every time.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Dataset, RandomSampler

from calm_lightning.config.schema import DataConfig, TokenizerConfig
from calm_lightning.data.prepare import PreparedData, check_min_tokens, prepare_data
from calm_lightning.data.shards import open_shard
from calm_lightning.data.tokenizer import SpecialTokens, load_tokenizer
from calm_lightning.errors import CalmError


class TokenBlocks(Dataset):
    """Non-overlapping ``block_size``-token blocks of a flat shard, from ``offset`` on."""

    def __init__(self, path: str | Path, dtype: str, n_tokens: int, block_size: int) -> None:
        self.path, self.dtype, self.n_tokens, self.block_size = Path(path), dtype, n_tokens, block_size
        self.num_blocks = n_tokens // block_size
        self.offset = 0
        self._tokens: np.memmap | None = None

    @property
    def slack(self) -> int:
        """Tokens left over after the last whole block; the largest allowed offset."""
        return self.n_tokens - self.num_blocks * self.block_size

    def __len__(self) -> int:
        return self.num_blocks

    def __getitem__(self, i: int) -> torch.Tensor:
        """LongTensor [block_size]."""
        if not 0 <= i < self.num_blocks:
            raise IndexError(i)
        if self._tokens is None:
            self._tokens = open_shard(self.path, self.dtype, self.n_tokens)
        start = self.offset + i * self.block_size
        return torch.from_numpy(self._tokens[start : start + self.block_size].astype(np.int64))

    def __getstate__(self) -> dict[str, Any]:
        # Pickling a memmap copies the whole array into each DataLoader worker; reopen it there instead.
        return {**self.__dict__, "_tokens": None}


class StreamBlocks(Dataset):
    """An in-memory token stream cut into ``block_size`` blocks, the tail kept as one shorter block.

    For scoring a whole external test set (``eval.corpus``): every token is covered except fewer than
    ``multiple`` (K) tokens at the very end, and a tail shorter than ``min_tail`` tokens (one context
    chunk plus one to predict) is dropped. ``batches(batch_size)`` puts the tail in a batch of its own,
    since blocks of one batch must have one length.
    """

    def __init__(self, stream: torch.Tensor, block_size: int, multiple: int, min_tail: int) -> None:
        self.stream, self.block_size = stream.long(), block_size
        self.num_full = stream.numel() // block_size
        tail = (stream.numel() - self.num_full * block_size) // multiple * multiple
        self.tail = tail if tail >= min_tail else 0

    def __len__(self) -> int:
        return self.num_full + (1 if self.tail else 0)

    def __getitem__(self, i: int) -> torch.Tensor:
        """LongTensor [block_size] (the tail: [tail])."""
        if not 0 <= i < len(self):
            raise IndexError(i)
        start = i * self.block_size
        length = self.block_size if i < self.num_full else self.tail
        return self.stream[start : start + length]

    @property
    def num_tokens(self) -> int:
        return self.num_full * self.block_size + self.tail

    def batches(self, batch_size: int) -> list[list[int]]:
        full = [list(range(i, min(i + batch_size, self.num_full))) for i in range(0, self.num_full, batch_size)]
        return full + ([[self.num_full]] if self.tail else [])


class EpochShuffleSampler(RandomSampler):
    """A permutation of the blocks drawn from (seed, epoch) that also sets the epoch's block offset.

    A RandomSampler subclass so Lightning sees a shuffled loader and, under DDP, replaces it by a
    shuffling DistributedSampler (the offset then stays at its epoch-0 value). Lightning calls
    ``set_epoch`` before each epoch; a plain loop must call it itself.
    """

    def __init__(self, dataset: TokenBlocks, seed: int) -> None:
        super().__init__(dataset)
        self.blocks, self.seed = dataset, seed
        self._resume_at: tuple[int, int] | None = None
        self.set_epoch(0)

    def resume_at(self, epoch: int, start: int) -> None:
        """Make the next pass over ``epoch`` skip its first ``start`` blocks (a resumed run's data order)."""
        self._resume_at = (epoch, start)

    def set_epoch(self, epoch: int) -> None:
        # Set here, not in __iter__, because DataLoader workers copy the dataset before iterating.
        self.epoch = epoch
        self.blocks.offset = int(
            np.random.default_rng([self.seed % 2**63, epoch, 0]).integers(0, self.blocks.slack + 1)
        )

    def __iter__(self) -> Iterator[int]:
        perm = np.random.default_rng([self.seed % 2**63, self.epoch, 1]).permutation(len(self.blocks))
        if self._resume_at is not None:
            epoch, start = self._resume_at
            self._resume_at = None
            if epoch == self.epoch:
                perm = perm[start:]
        return iter(perm.tolist())

    def __len__(self) -> int:
        return len(self.blocks)


class ResumableLoader(DataLoader):
    """A train loader whose position goes into checkpoints, so that a resumed run continues the data order.

    Lightning saves ``state_dict()`` with the loops and, on resume, calls ``load_state_dict`` before
    iterating. The position is taken from the trainer's count of processed batches (``batches_done``),
    not from the iterator, which runs ahead of training by the prefetched batches. Under DDP Lightning
    swaps the sampler for a DistributedSampler; that run restarts the interrupted epoch's order instead.
    """

    def __init__(self, *args, batches_done: Callable[[], int], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches_done = batches_done

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(getattr(self.sampler, "epoch", 0)), "batches_done": int(self.batches_done())}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if isinstance(self.sampler, EpochShuffleSampler) and self.batch_size:
            self.sampler.resume_at(state["epoch"], state["batches_done"] * self.batch_size)


class TokenChunkDataModule(L.LightningDataModule):
    """Blocks of ``block_size`` tokens (a multiple of the chunk size K) from a prepared corpus.

    ``vocab_size``, ``special_ids``, ``tokenizer`` and ``meta`` prepare the data on first use, so a
    model can be sized before ``trainer.fit``; under torchrun prepare once before launching, since
    every rank would otherwise prepare a cold cache at the same time.
    """

    def __init__(
        self,
        data_cfg: DataConfig,
        tok_cfg: TokenizerConfig,
        chunk_size: int,
        seed: int,
        *,
        quiet: bool = False,
    ) -> None:
        super().__init__()
        self.data_cfg, self.tok_cfg = data_cfg, tok_cfg
        self.chunk_size, self.seed, self.quiet = chunk_size, seed, quiet
        self._prepared: PreparedData | None = None
        self._tokenizer: Tokenizer | None = None
        self._resumed_state: dict[str, Any] | None = None
        self.train_set: TokenBlocks | None = None
        self.val_set: TokenBlocks | StreamBlocks | None = None
        self.eval_corpus_docs = 0  # documents of the eval corpus, once use_eval_corpus ran
        self._eval_blocks: StreamBlocks | None = None  # kept across setup() calls (Trainer.validate)

    @classmethod
    def from_config(cls, exp, chunk_size: int, *, quiet: bool = False) -> TokenChunkDataModule:
        """The DataModule of an ExperimentConfig, prepared and set up (every command starts here)."""
        dm = cls(exp.data, exp.tokenizer, chunk_size=chunk_size, seed=exp.trainer.seed, quiet=quiet)
        dm.prepare_data()
        dm.setup("fit")
        return dm

    def prepare_data(self) -> None:
        # Once per process: callers prepare before sizing the model, then Lightning calls this hook
        # again in fit/validate, where a second pass would only re-read the corpus to confirm it.
        if self._prepared is None:
            self._prepared = prepare_data(self.data_cfg, self.tok_cfg, quiet=self.quiet)

    def setup(self, stage: str | None = None) -> None:
        block = self.data_cfg.block_size
        if block % self.chunk_size != 0:
            raise CalmError(
                f"data.block_size={block} is not a multiple of the chunk size K={self.chunk_size}"
            )
        meta = self.meta
        check_min_tokens(meta, block, self.data_cfg.batch_size)
        self._check_resumed_state()
        prepared = self.prepared
        splits = meta["splits"]
        self.train_set = TokenBlocks(prepared.train_path, meta["dtype"], splits["train"]["tokens"], block)
        self.val_set = TokenBlocks(prepared.val_path, meta["dtype"], splits["val"]["tokens"], block)
        if self._eval_blocks is not None:
            self.val_set = self._eval_blocks

    def train_dataloader(self) -> DataLoader:
        dataset = self._require(self.train_set)
        return ResumableLoader(
            dataset,
            batch_size=self.data_cfg.batch_size,
            sampler=EpochShuffleSampler(dataset, self.seed),
            drop_last=True,
            num_workers=self.data_cfg.num_workers,
            batches_done=self._batches_done,
        )

    def _batches_done(self) -> int:
        """Train batches processed so far in the current epoch (0 outside a Trainer)."""
        trainer = getattr(self, "trainer", None)
        return 0 if trainer is None else trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def use_eval_corpus(self, corpus_cfg: DataConfig) -> StreamBlocks:
        """Score ``corpus_cfg.corpus`` in full instead of the validation split (``calm eval``'s
        ``eval.corpus``): every document of it, encoded with this data's tokenizer and separated by
        end-of-text as the shards are, no train/validation re-split. Returns the new validation set."""
        from calm_lightning.data.corpus import load_corpus
        from calm_lightning.data.shards import encode_documents

        docs = load_corpus(corpus_cfg)
        dtype = np.dtype(self.meta["dtype"])
        pieces = [ids for ids, _ in encode_documents(self.tokenizer, docs, self.special_ids.eos, dtype)]
        stream = torch.from_numpy(np.concatenate(pieces).astype(np.int64))
        blocks = StreamBlocks(stream, self.data_cfg.block_size, self.chunk_size, 2 * self.chunk_size)
        if len(blocks) == 0:
            raise CalmError(
                f"eval corpus {corpus_cfg.corpus!r} has {stream.numel()} tokens, fewer than two chunks of K={self.chunk_size}"
            )
        self.val_set = self._eval_blocks = blocks
        self.eval_corpus_docs = len(docs)
        return blocks

    def val_dataloader(self) -> DataLoader:
        dataset = self._require(self.val_set)
        batch_size = self.data_cfg.val_batch_size or self.data_cfg.batch_size
        if isinstance(dataset, StreamBlocks):
            return DataLoader(dataset, batch_sampler=dataset.batches(batch_size), num_workers=self.data_cfg.num_workers)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            drop_last=False,
            num_workers=self.data_cfg.num_workers,
        )

    # What the model needs from the data.

    @property
    def prepared(self) -> PreparedData:
        if self._prepared is None:
            # On ranks other than local zero Lightning skips prepare_data, but the cache is complete
            # by the time setup runs, so this only reads.
            self.prepare_data()
        assert self._prepared is not None
        return self._prepared

    @property
    def meta(self) -> dict[str, Any]:
        return self.prepared.meta

    @property
    def vocab_size(self) -> int:
        return self.prepared.vocab_size

    @property
    def special_ids(self) -> SpecialTokens:
        return self.prepared.special_ids

    @property
    def tokenizer_path(self) -> Path:
        return self.prepared.tokenizer_path

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.meta["tokenizer_fingerprint"]

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.prepared.tokenizer_path)
        return self._tokenizer

    # Checkpoint state: the data identity, so a resume on other data is caught.

    def state_dict(self) -> dict[str, Any]:
        if self._prepared is None:
            return {}
        meta = self._prepared.meta
        return {
            "corpus_fingerprint": meta["corpus_fingerprint"],
            "tokenizer_fingerprint": meta["tokenizer_fingerprint"],
            # the tokenizer itself, so that a checkpoint copied alone can still generate
            "tokenizer_json": Path(self._prepared.tokenizer_path).read_bytes().decode("utf-8"),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resumed_state = dict(state_dict)
        if self._prepared is not None:
            self._check_resumed_state()

    def _check_resumed_state(self) -> None:
        state, meta = self._resumed_state, self.meta
        if not state:
            return
        if state.get("tokenizer_fingerprint") not in (None, meta["tokenizer_fingerprint"]):
            raise CalmError(
                "the checkpoint was trained with another tokenizer than the one the data now uses "
                f"({self.prepared.tokenizer_path}); its token ids would not mean the same"
            )
        if state.get("corpus_fingerprint") not in (None, meta["corpus_fingerprint"]):
            warnings.warn("resuming on a different corpus than the checkpoint was trained on", stacklevel=2)

    @staticmethod
    def _require(dataset: TokenBlocks | StreamBlocks | None) -> TokenBlocks | StreamBlocks:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        return dataset
