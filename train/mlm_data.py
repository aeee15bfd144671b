"""Phase 1's input pipeline: packed blocks read on the fly or from a pre-tokenised folder, BERT/SpanBERT masking
deterministic per block, and each process's slice of every global batch.

- ``PackedBlocks``: the on-the-fly path (small runs): each process tokenises its share of the texts and packs it into
  ``seq_len`` blocks in the loop (its batches depend on the number of processes).
- ``ShardMicroBatches`` + ``shard_loader``: the scale path: one process's micro-batches read by block index from the
  memory-mapped shards of ``python -m train.pretokenize``, in DataLoader workers.
- ``MlmMasker``: the masking of a block depends only on (seed, its run-wide index).
- ``BatchLayout``: which rows of a step's blocks a process's micro-batch takes.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from train.common import ConfigError
from train.data import TextStream
from train.pretokenize import BlockOrder, PackedBlockShards

logger = logging.getLogger(__name__)

MASK_FRACTION, RANDOM_FRACTION = 0.8, 0.1  # of the predicted tokens; the remaining 10% keep their token (BERT)
SPAN_P, SPAN_MAX = 0.2, 10  # SpanBERT's geometric span-length distribution
TEXTS_PER_READ = 256  # texts tokenised per batch call (the fast tokenizer parallelises over them)


class PackedBlocks:
    """Endless stream of one process's packed blocks ``[<s>, t_1 … t_{L-1}]`` cut from the concatenation
    ``text₁ </s> text₂ </s> …`` of its share of the texts.

    ``make_stream(epoch)`` returns a fresh ``TextStream`` for each pass over the data (dedup is per pass). Every process
    reads and filters the whole stream (so all see the same filtered sequence) but tokenises and packs only its share:
    texts ``i`` with ``i mod processes == rank`` (``datasets.distributed.split_dataset_by_node``'s rule for an iterable
    that is not split by files). The blocks a process trains on therefore depend on the number of processes.

    ``blocks_emitted`` counts the run's blocks, all processes together: every process takes the same number per step,
    so a ``take(n)`` advances it by ``n · processes``. The position is (epoch, the text stream's state after the last
    text read, the filtered texts passed this epoch, the tokens read but not yet emitted, blocks emitted), so a
    restored stream continues with exactly the blocks an uninterrupted one would have produced. ``run_state`` and
    ``load_run_state`` gather every process's position into a checkpoint and refuse one of another process count.
    """

    def __init__(
        self,
        make_stream: Callable[[int], TextStream],
        tokenizer: PreTrainedTokenizerBase,
        seq_len: int,
        rank: int = 0,
        processes: int = 1,
        verbose: bool = True,
    ) -> None:
        if not 0 <= rank < processes:
            raise ValueError(f"rank {rank} of {processes} processes: expected 0 <= rank < processes")
        self.make_stream = make_stream
        self.verbose = verbose  # log each epoch's filter counts (the main process does; the others read the same data)
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.rank = rank
        self.processes = processes
        self.epoch = 0
        self.blocks_emitted = 0
        self._buffer = np.empty(0, dtype=np.int64)
        self._stream: TextStream | None = None
        self._iterator: Iterator[str] | None = None
        self._restore: dict[str, Any] | None = None  # a loaded text-stream position, applied when the stream opens
        self._texts_this_epoch = 0  # filtered texts of every process passed in this epoch

    def _open(self) -> None:
        self._stream = self.make_stream(self.epoch)
        if self._restore is not None:
            self._stream.load_state_dict(self._restore)
            self._restore = None
        self._iterator = self._share(iter(self._stream))

    def _share(self, texts: Iterator[str]) -> Iterator[str]:
        """This process's texts of the filtered stream; when it yields, the stream has read nothing past that text."""
        for text in texts:
            index = self._texts_this_epoch
            self._texts_this_epoch += 1
            if index % self.processes == self.rank:
                yield text

    def _read(self) -> list[np.ndarray]:
        """Tokenise this process's next texts (each followed by ``</s>``); crosses into the next epoch at the end of
        the data. ValueError if an epoch yields no text for this process."""
        while True:
            if self._iterator is None:
                self._open()
            texts = list(itertools.islice(self._iterator, TEXTS_PER_READ))
            if texts:
                encoded = self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)
                eos = [self.tokenizer.eos_token_id]
                return [np.asarray(ids + eos, dtype=np.int64) for ids in encoded["input_ids"]]
            if self._texts_this_epoch <= self.rank:
                raise ValueError(
                    f"the phase-1 data yielded {self._texts_this_epoch} text(s) in epoch {self.epoch}, none for "
                    f"process {self.rank} of {self.processes}: {self._stream.stats.summary()}"
                )
            if self.verbose:
                logger.info(f"data epoch {self.epoch} done: {self._stream.stats.summary()}")
            self.epoch += 1
            self._iterator, self._stream, self._texts_this_epoch = None, None, 0

    def take(self, count: int) -> tuple[int, np.ndarray]:
        """This process's next ``count`` blocks ``(count, seq_len)`` and ``blocks_emitted`` before them."""
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
        self.blocks_emitted += count * self.processes
        return first, blocks

    def state_dict(self) -> tuple[dict[str, Any], np.ndarray]:
        """This process's (JSON-able position, unread token buffer). The text stream only moves inside ``take``, so
        its state now is its state after the last text read, the one that matches the buffer."""
        text_stream = self._stream.state_dict() if self._stream is not None else self._restore
        position = {
            "epoch": self.epoch,
            "blocks_emitted": self.blocks_emitted,
            "texts_this_epoch": self._texts_this_epoch,
            "text_stream": text_stream,
        }
        return position, self._buffer.copy()

    def load_state_dict(self, position: Mapping[str, Any], buffer: np.ndarray) -> None:
        """Continue from this process's ``state_dict()``."""
        self.epoch = position["epoch"]
        self.blocks_emitted = position["blocks_emitted"]
        self._texts_this_epoch = position["texts_this_epoch"]
        self._restore = position["text_stream"]
        self._buffer = buffer.astype(np.int64)
        self._iterator = self._stream = None

    @staticmethod
    def run_state(states: Sequence[tuple[Mapping[str, Any], np.ndarray]]) -> tuple[dict[str, Any], np.ndarray]:
        """Every process's ``state_dict()``, in rank order → the checkpoint's data position
        ``{"processes": P, "blocks_emitted": n, "ranks": [{"epoch", "texts_this_epoch", "text_stream",
        "buffer_tokens"}, …]}`` and the P unread-token buffers concatenated (int64)."""
        ranks = [
            {key: value for key, value in position.items() if key != "blocks_emitted"} | {"buffer_tokens": len(buffer)}
            for position, buffer in states
        ]
        position = {"processes": len(states), "blocks_emitted": states[0][0]["blocks_emitted"], "ranks": ranks}
        return position, np.concatenate([buffer for _, buffer in states]).astype(np.int64)

    def load_run_state(self, position: Mapping[str, Any], buffer: np.ndarray) -> None:
        """Continue from ``run_state``'s checkpoint: this process takes its own rank's position and buffer. ConfigError
        naming both counts if the checkpoint was written by another number of processes (each process's texts, and
        so its blocks, depend on that number)."""
        if "processes" not in position:
            raise ConfigError(
                "the checkpoint's on-the-fly data position has no process count: it was written before phase 1 split "
                "the texts over processes and cannot be resumed; start a fresh run (or continue from its final/ "
                "folder)"
            )
        if position["processes"] != self.processes:
            raise ConfigError(
                f"the on-the-fly data position was written by {position['processes']} process(es), this run has "
                f"{self.processes}: on-the-fly batches depend on the number of processes; resume with "
                f"{position['processes']} (a run from pre-tokenised data, config key 'pretokenized', resumes on any)"
            )
        sizes = [rank["buffer_tokens"] for rank in position["ranks"]]
        start = sum(sizes[: self.rank])
        own = dict(position["ranks"][self.rank]) | {"blocks_emitted": position["blocks_emitted"]}
        self.load_state_dict(own, buffer[start : start + sizes[self.rank]])

    def filter_summary(self) -> str:
        return self._stream.stats.summary() if self._stream is not None else "no text read in this epoch yet"


@dataclass(frozen=True)
class BatchLayout:
    """Where one process's micro-batches sit in the run's sequence of blocks: step ``s`` is the ``blocks_per_step``
    blocks from ``s · blocks_per_step``; its micro-batch ``j`` on process ``rank`` of ``processes`` is the step's rows
    ``(j · processes + rank) · batch_size`` … +``batch_size`` (rows of a micro-batch consecutive, processes
    interleaved), for ``j`` < ``accum``. From shards independent of the process count: the same step is the same
    blocks (on the fly each process packs its own blocks, which take its places and their indices)."""

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
    """One step of the on-the-fly path: this process packs its own ``layout.accum · layout.batch_size`` blocks and
    returns its ``layout.accum`` micro-batches, each (input_ids (b, L), labels (b, L)) int64 on the CPU. Micro-batch
    ``j`` of step ``s`` is masked as the run's blocks ``layout.first_block(s · accum + j)`` … +b, the indices the
    shard path gives the same place in the global batch: unique in the run, and the packing order for one process."""
    step = blocks.blocks_emitted // layout.blocks_per_step
    _, packed = blocks.take(layout.accum * layout.batch_size)  # (accum · b, L)
    micro = []
    for j in range(layout.accum):
        rows = packed[j * layout.batch_size : (j + 1) * layout.batch_size]
        inputs, labels = masker(rows, layout.first_block(step * layout.accum + j))
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
    its own ``b`` rows are read (``PackedBlockShards.take``), so processes never read each other's data."""

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
    ahead of the step (0: in this process). The loader draws its workers' base seed from a generator of its own, so
    starting it does not move the global torch RNG (dropout's, restored by a resume); the masks use no torch RNG."""
    loader = DataLoader(
        micro_batches, batch_size=None, sampler=items, num_workers=num_workers, pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    return iter(loader)
