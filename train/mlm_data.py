"""Phase 1's input pipeline: packed blocks read on the fly or from a pre-tokenised folder, BERT/SpanBERT masking
deterministic per block, and each process's slice of every global batch.

- ``PackedBlocks``: the on-the-fly path (small runs): texts tokenised and packed into ``seq_len`` blocks in the loop.
- ``ShardMicroBatches`` + ``shard_loader``: the scale path: one process's micro-batches read by block index from the
  memory-mapped shards of ``python -m train.pretokenize``, in DataLoader workers.
- ``MlmMasker``: the masking of a block depends only on (seed, its run-wide index).
- ``BatchLayout``: which rows of a step's blocks a process's micro-batch takes.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from train.data import TextStream
from train.pretokenize import BlockOrder, PackedBlockShards

logger = logging.getLogger(__name__)

MASK_FRACTION, RANDOM_FRACTION = 0.8, 0.1  # of the predicted tokens; the remaining 10% keep their token (BERT)
SPAN_P, SPAN_MAX = 0.2, 10  # SpanBERT's geometric span-length distribution
TEXTS_PER_READ = 256  # texts tokenised per batch call (the fast tokenizer parallelises over them)


class PackedBlocks:
    """Endless stream of packed blocks ``[<s>, t_1 … t_{L-1}]`` cut from the concatenation ``text₁ </s> text₂ </s> …``.

    ``make_stream(epoch)`` returns a fresh ``TextStream`` for each pass over the data (dedup is per pass). The position
    is (epoch, the text stream's state after the last text read, the tokens read but not yet emitted, blocks emitted),
    so a restored stream continues with exactly the blocks an uninterrupted one would have produced.
    """

    def __init__(
        self,
        make_stream: Callable[[int], TextStream],
        tokenizer: PreTrainedTokenizerBase,
        seq_len: int,
        verbose: bool = True,
    ) -> None:
        self.make_stream = make_stream
        self.verbose = verbose  # log each epoch's filter counts (the main process does; the others read the same data)
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.epoch = 0
        self.blocks_emitted = 0
        self._buffer = np.empty(0, dtype=np.int64)
        self._stream: TextStream | None = None
        self._iterator = None
        self._restore: dict[str, Any] | None = None  # a loaded text-stream position, applied when the stream opens
        self._texts_this_epoch = 0

    def _open(self) -> None:
        self._stream = self.make_stream(self.epoch)
        if self._restore is not None:
            self._stream.load_state_dict(self._restore)
            self._restore = None
        self._iterator = iter(self._stream)

    def _read(self) -> list[np.ndarray]:
        """Tokenise the next texts (each followed by ``</s>``); crosses into the next epoch at the end of the data."""
        while True:
            if self._iterator is None:
                self._open()
            texts = list(itertools.islice(self._iterator, TEXTS_PER_READ))
            if texts:
                self._texts_this_epoch += len(texts)
                encoded = self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)
                eos = [self.tokenizer.eos_token_id]
                return [np.asarray(ids + eos, dtype=np.int64) for ids in encoded["input_ids"]]
            if self._texts_this_epoch == 0:
                raise ValueError(
                    f"the phase-1 data yielded no text in epoch {self.epoch}: {self._stream.stats.summary()}"
                )
            if self.verbose:
                logger.info(f"data epoch {self.epoch} done: {self._stream.stats.summary()}")
            self.epoch += 1
            self._iterator, self._stream, self._texts_this_epoch = None, None, 0

    def take(self, count: int) -> tuple[int, np.ndarray]:
        """The next ``count`` blocks ``(count, seq_len)`` and the run-wide index of the first."""
        body = self.seq_len - 1
        needed = count * body
        pieces, have = [self._buffer], len(self._buffer)
        while have < needed:
            new = self._read()
            pieces.extend(new)
            have += sum(len(piece) for piece in new)
        flat = np.concatenate(pieces)
        self._buffer = flat[needed:]
        blocks = np.empty((count, self.seq_len), dtype=np.int64)
        blocks[:, 0] = self.tokenizer.bos_token_id
        blocks[:, 1:] = flat[:needed].reshape(count, body)
        first = self.blocks_emitted
        self.blocks_emitted += count
        return first, blocks

    def state_dict(self) -> tuple[dict[str, Any], np.ndarray]:
        """(JSON-able position, unread token buffer). The text stream only moves inside ``take``, so its state now is
        its state after the last text read, the one that matches the buffer."""
        text_stream = self._stream.state_dict() if self._stream is not None else self._restore
        position = {
            "epoch": self.epoch,
            "blocks_emitted": self.blocks_emitted,
            "texts_this_epoch": self._texts_this_epoch,
            "text_stream": text_stream,
        }
        return position, self._buffer.copy()

    def load_state_dict(self, position: Mapping[str, Any], buffer: np.ndarray) -> None:
        self.epoch = position["epoch"]
        self.blocks_emitted = position["blocks_emitted"]
        self._texts_this_epoch = position["texts_this_epoch"]
        self._restore = position["text_stream"]
        self._buffer = buffer.astype(np.int64)
        self._iterator = self._stream = None

    def filter_summary(self) -> str:
        return self._stream.stats.summary() if self._stream is not None else "no text read in this epoch yet"


@dataclass(frozen=True)
class BatchLayout:
    """Where one process's micro-batches sit in the run's sequence of blocks: step ``s`` is the ``blocks_per_step``
    blocks from ``s · blocks_per_step``; its micro-batch ``j`` on process ``rank`` of ``processes`` is the step's rows
    ``(j · processes + rank) · batch_size`` … +``batch_size`` (rows of a micro-batch consecutive, processes
    interleaved), for ``j`` < ``accum``. Independent of the process count: the same step is the same blocks."""

    blocks_per_step: int
    batch_size: int
    accum: int
    processes: int
    rank: int

    def offset(self, micro: int) -> int:
        """First row of micro-batch ``micro`` within its step."""
        return (micro * self.processes + self.rank) * self.batch_size

    def first_block(self, item: int) -> int:
        """Run-wide index of the first block of this process's ``item``-th micro-batch (step ``item // accum``)."""
        step, micro = divmod(item, self.accum)
        return step * self.blocks_per_step + self.offset(micro)


def onthefly_micro_batches(
    blocks: PackedBlocks, masker: MlmMasker, layout: BatchLayout
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One step of the on-the-fly path: pack the step's blocks (every process packs all of them) and keep this
    process's ``layout.accum`` micro-batches, each (input_ids (b, L), labels (b, L)) int64 on the CPU."""
    first, packed = blocks.take(layout.blocks_per_step)
    micro = []
    for j in range(layout.accum):
        start = layout.offset(j)
        inputs, labels = masker(packed[start : start + layout.batch_size], first + start)
        micro.append((torch.from_numpy(inputs), torch.from_numpy(labels)))
    return micro


class MlmMasker:
    """BERT masking of packed blocks; deterministic per block (its RNG is seeded by (seed, block index)), so the same
    block gets the same mask whatever the process count, the resume point or the order blocks are masked in."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, probability: float, span_masking: bool, seed: int) -> None:
        vocab_size = len(tokenizer)
        self.is_special = np.zeros(vocab_size, dtype=bool)
        self.is_special[tokenizer.all_special_ids] = True
        self.replacements = np.flatnonzero(~self.is_special)  # random-token replacements are never special tokens
        self.mask_id = tokenizer.mask_token_id
        self.probability = probability
        self.span_masking = span_masking
        self.seed = seed

    def _choose(self, block: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Positions to predict: ``round_random(p · #maskable)`` of the non-special tokens (fairseq's randomised
        rounding keeps the expected count at exactly p · n), single tokens or SpanBERT spans."""
        maskable = ~self.is_special[block]  # (L,)
        candidates = np.flatnonzero(maskable)
        count = min(int(self.probability * len(candidates) + rng.random()), len(candidates))
        if not self.span_masking:
            return np.sort(rng.choice(candidates, size=count, replace=False))
        selected = np.zeros(len(block), dtype=bool)
        total = 0
        while total < count:
            length = min(int(rng.geometric(SPAN_P)), SPAN_MAX)
            start = rng.choice(np.flatnonzero(maskable & ~selected))
            span = np.arange(start, min(start + length, len(block)))
            span = span[maskable[span] & ~selected[span]][: count - total]
            selected[span] = True
            total += len(span)
        return np.flatnonzero(selected)

    def __call__(self, blocks: np.ndarray, first_index: int) -> tuple[np.ndarray, np.ndarray]:
        """blocks (n, L) whose first has run-wide index ``first_index`` -> (input_ids (n, L), labels (n, L), -100 where
        nothing is predicted)."""
        inputs = blocks.copy()
        labels = np.full_like(blocks, -100)
        for row, block in enumerate(blocks):
            rng = np.random.default_rng((self.seed, first_index + row))
            chosen = self._choose(block, rng)
            labels[row, chosen] = block[chosen]
            draw = rng.random(len(chosen))
            inputs[row, chosen[draw < MASK_FRACTION]] = self.mask_id
            randomised = chosen[(draw >= MASK_FRACTION) & (draw < MASK_FRACTION + RANDOM_FRACTION)]
            inputs[row, randomised] = rng.choice(self.replacements, size=len(randomised))
        return inputs, labels


class ShardMicroBatches(Dataset):
    """One process's micro-batches read from a pre-tokenised folder. Item ``k`` is micro-batch ``k mod A`` of step
    ``k // A`` of ``layout``: (input_ids (b, L), labels (b, L)) int64 tensors, masked like any block of that run-wide index. Only
    its own ``b`` rows are read (one Arrow ``take``), so processes never read each other's data."""

    def __init__(self, shards: PackedBlockShards, order: BlockOrder, masker: MlmMasker, layout: BatchLayout) -> None:
        self.shards = shards
        self.order = order
        self.masker = masker
        self.layout = layout

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.layout.first_block(item)
        blocks = self.shards.take(self.order(np.arange(first, first + self.layout.batch_size)))  # (b, L)
        inputs, labels = self.masker(blocks, first)
        return torch.from_numpy(inputs), torch.from_numpy(labels)


def shard_loader(
    micro_batches: ShardMicroBatches, items: range, num_workers: int, pin_memory: bool = False
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The micro-batches ``items`` of ``micro_batches`` in order, read and masked by ``num_workers`` DataLoader workers
    ahead of the step (0: in this process)."""
    loader = DataLoader(micro_batches, batch_size=None, sampler=items, num_workers=num_workers, pin_memory=pin_memory)
    return iter(loader)
