"""Pre-tokenise phase 1's text mixture into packed blocks on disk, and read them back by block index.

    python -m train.pretokenize --config train/configs/phase1_small.yaml --output runs/phase1_small_blocks --num-proc 2

then set ``pretokenized: runs/phase1_small_blocks`` in the phase-1 config (or pass it as ``pretokenized=...``).

- Pipeline (each step a ``datasets`` Arrow file on disk, so memory stays flat in the corpus size): every source is
  read once into Arrow; the sources are mixed by weight (``datasets.interleave_datasets``, each text drawn once, seeded
  by the config's ``seed``); the length filter and the text hashes run in parallel (``map(num_proc=...)``); exact-repeat
  dedup keeps each whitespace-normalised text's first occurrence in mixture order (64-bit BLAKE2b, the same filter as
  ``train.data.TextStream``); the kept texts are tokenised in parallel, each followed by ``</s>``; one sequential pass
  packs the token stream into blocks ``[<s>, t_1 … t_{L-1}]`` (RoBERTa's FULL-SENTENCES packing, Liu et al. 2019 §4.2)
  and only the last incomplete block is dropped. Memory: one batch of texts, plus 8 bytes per text for the dedup
  hashes and the mixture's row indices (1e9 texts: 16 GB).
- Format: ``blocks/`` is a ``Dataset.save_to_disk`` folder (Arrow shards, one fixed-size ``input_ids`` int32 list of
  ``seq_len`` per row) and ``manifest.json`` records the tokenizer hash, ``seq_len``, what was read and dropped per
  source and the config keys the blocks depend on. Arrow through ``datasets`` rather than MosaicML-streaming MDS: no
  extra dependency, and ``load_from_disk`` memory-maps the shards, so any process reads any set of rows by index
  (a numpy gather from zero-copy views of its record batches) with no copy and no index files of its own.
- Order: ``BlockOrder`` maps the run-wide block index ``g`` to a block of the folder: epoch ``g // blocks`` visits
  every block once in an order drawn from ``(seed, epoch)`` (a Feistel permutation, so no per-epoch index array is
  stored: O(1) memory however many blocks there are).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets.arrow_writer import ArrowWriter
from transformers import PreTrainedTokenizerBase

from train.common import run_command_line
from train.data import TextSourceSpec, dedup_key, load_text_dataset, mix_text_datasets

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
BLOCKS_DIR = "blocks"
FORMAT = "chroma-moe-packed-blocks/1"
MAP_BATCH = 1000  # texts per parallel map batch
PACK_BATCH = 10_000  # tokenised texts read per packing step
MAX_SHARD_SIZE = "500MB"
KEPT, TOO_SHORT, TOO_LONG, DUPLICATE = 0, 1, 2, 3
STATUS_NAMES = ("kept", "too_short", "too_long", "duplicate")
FEISTEL_ROUNDS = 6


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """SHA-256 of the fast tokenizer's serialised JSON (vocabulary, merges, specials, normalisation): two tokenizers
    with the same hash produce the same ids."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode("utf-8")).hexdigest()


def _source_rows(spec: str, text_field: str, source: int) -> Iterator[dict[str, Any]]:
    for row in load_text_dataset(spec, text_field=text_field):
        yield {"text": row["text"], "source": source}


def _filter_columns(batch: dict[str, list], min_chars: int, max_chars: int | None) -> dict[str, list]:
    """Per text: its length status and the hash of its whitespace-normalised form (``TextStream``'s dedup key)."""
    status, hashes = [], []
    for text in batch["text"]:
        length = len(text.strip())
        too_long = max_chars is not None and length > max_chars
        status.append(TOO_SHORT if length < min_chars else TOO_LONG if too_long else KEPT)
        hashes.append(dedup_key(text) - 2**63)  # shifted into int64, which Arrow converts
    return {"status": status, "hash": hashes}


def _column(dataset: datasets.Dataset, name: str) -> np.ndarray:
    """One column of every row as a numpy array (the other columns are not read)."""
    return dataset.select_columns([name]).with_format("numpy")[:][name]


def _tokenize(batch: dict[str, list], tokenizer: PreTrainedTokenizerBase) -> dict[str, list]:
    encoded = tokenizer(batch["text"], add_special_tokens=False, return_attention_mask=False, verbose=False)
    eos = tokenizer.eos_token_id
    return {"input_ids": [ids + [eos] for ids in encoded["input_ids"]]}


def _pack(
    tokenized: datasets.Dataset, seq_len: int, bos: int, sources: int, path: Path
) -> tuple[int, int, np.ndarray]:
    """Cut the concatenated token stream into (n, seq_len) blocks behind ``<s>`` and write them to the Arrow file
    ``path``; returns (blocks, tokens dropped in the last incomplete block, tokens per source (sources,))."""
    body = seq_len - 1
    features = datasets.Features({"input_ids": datasets.List(datasets.Value("int32"), length=seq_len)})
    tokens_per_source = np.zeros(sources, dtype=np.int64)
    carry = np.empty(0, dtype=np.int32)
    blocks = 0
    with ArrowWriter(features=features, path=str(path)) as writer:
        for table in tokenized.with_format("arrow").iter(batch_size=PACK_BATCH):
            ids = table["input_ids"].combine_chunks()
            lengths = pc.list_value_length(ids).to_numpy()
            tokens_per_source += np.bincount(table["source"].to_numpy(), weights=lengths, minlength=sources).astype(
                np.int64
            )
            flat = np.concatenate([carry, ids.flatten().to_numpy().astype(np.int32)])
            count = len(flat) // body
            carry = flat[count * body :]
            if count:
                packed = np.empty((count, seq_len), dtype=np.int32)
                packed[:, 0] = bos
                packed[:, 1:] = flat[: count * body].reshape(count, body)
                column = pa.FixedSizeListArray.from_arrays(pa.array(packed.reshape(-1)), seq_len)
                writer.write_table(pa.table({"input_ids": column}))
                blocks += count
        writer.finalize()
    return blocks, len(carry), tokens_per_source


def pretokenize(
    sources: Sequence[TextSourceSpec],
    tokenizer: PreTrainedTokenizerBase,
    output: str | Path,
    *,
    seq_len: int,
    seed: int = 0,
    min_chars: int = 20,
    max_chars: int | None = 1_000_000,
    dedup: bool = True,
    num_proc: int = 1,
) -> dict[str, Any]:
    """Tokenise and pack the mixture ``sources`` into ``output`` (``blocks/`` + ``manifest.json``); returns the
    manifest.

    The folder is built under a temporary name next to ``output`` and renamed into place at the end, so a crash never
    leaves a half-written folder that looks complete. ``num_proc`` parallelises filtering and tokenisation; the blocks
    do not depend on it. Raises FileExistsError if ``output`` exists, ValueError if no complete block comes out.
    """
    target = Path(output)
    if target.exists():
        raise FileExistsError(f"pre-tokenised output {target} already exists: remove it or choose another --output")
    tmp = target.parent / f".tmp-{target.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    work = tmp / "work"
    work.mkdir(parents=True)
    sources = list(sources)
    map_options = {"batched": True, "batch_size": MAP_BATCH, "num_proc": num_proc if num_proc > 1 else None}
    loaded = [
        datasets.Dataset.from_generator(
            _source_rows,
            gen_kwargs={"spec": s.spec, "text_field": s.text_field, "source": index},
            features=datasets.Features({"text": datasets.Value("string"), "source": datasets.Value("int32")}),
            cache_dir=str(work),
        )
        for index, s in enumerate(sources)
    ]
    mixed = mix_text_datasets(loaded, [s.weight for s in sources], seed=seed)
    checked = mixed.map(
        _filter_columns,
        fn_kwargs={"min_chars": min_chars, "max_chars": max_chars},
        features=datasets.Features(
            {**mixed.features, "status": datasets.Value("int8"), "hash": datasets.Value("int64")}
        ),
        desc="length filter and hashes",
        **map_options,
    )
    status = _column(checked, "status")  # (texts,) int8
    if dedup:
        hashes = _column(checked, "hash")  # (texts,) int64
        passing = np.flatnonzero(status == KEPT)
        _, first = np.unique(hashes[passing], return_index=True)
        repeat = np.ones(len(passing), dtype=bool)
        repeat[first] = False
        status[passing[repeat]] = DUPLICATE
        del hashes
    source_of = _column(checked, "source")  # (texts,) int32
    kept = checked.select(np.flatnonzero(status == KEPT))
    tokenized = kept.map(
        _tokenize,
        fn_kwargs={"tokenizer": tokenizer},
        remove_columns=["text", "status", "hash"],
        features=datasets.Features(
            {"source": datasets.Value("int32"), "input_ids": datasets.List(datasets.Value("int32"))}
        ),
        desc="tokenise",
        **map_options,
    )
    packed = work / "packed.arrow"
    blocks, tail, tokens_per_source = _pack(tokenized, seq_len, tokenizer.bos_token_id, len(sources), packed)
    if blocks == 0:
        raise ValueError(
            f"no complete {seq_len}-token block: the mixture kept {int((status == KEPT).sum())} of {len(status)} texts "
            f"({int(tokens_per_source.sum())} tokens)"
        )
    datasets.Dataset.from_file(str(packed)).save_to_disk(
        str(tmp / BLOCKS_DIR), max_shard_size=MAX_SHARD_SIZE
    )
    counts = np.zeros((len(sources), len(STATUS_NAMES)), dtype=np.int64)  # (sources, statuses)
    np.add.at(counts, (source_of, status), 1)
    manifest = {
        "format": FORMAT,
        "tokenizer_sha256": tokenizer_hash(tokenizer),
        "seq_len": seq_len,
        "blocks": blocks,
        "tokens": blocks * seq_len,
        "tail_tokens_dropped": tail,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "seed": seed,
        "min_chars": min_chars,
        "max_chars": max_chars,
        "dedup": dedup,
        "texts": {name: int(counts[:, i].sum()) for i, name in enumerate(STATUS_NAMES)} | {"seen": len(status)},
        "sources": [
            {**asdict(spec), "texts_seen": int(counts[i].sum()), "tokens": int(tokens_per_source[i]),
             **{name: int(counts[i, j]) for j, name in enumerate(STATUS_NAMES)}}  # fmt: skip
            for i, spec in enumerate(sources)
        ],
    }
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    del loaded, mixed, checked, kept, tokenized
    shutil.rmtree(work)
    os.replace(tmp, target)
    return manifest


# --------------------------------------------------------------------------------------------------------------------
# Reading.
# --------------------------------------------------------------------------------------------------------------------


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The ``manifest.json`` of a pre-tokenised folder; FileNotFoundError naming the folder if it is not one."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} is not a pre-tokenised folder ({MANIFEST_FILE} missing); build one with "
            f"python -m train.pretokenize --config CONFIG --output {folder}"
        )
    return json.loads(path.read_text(encoding="utf-8"))


class BlockOrder:
    """The run-wide order of blocks: index ``g`` → block ``π_e(g mod N)`` of the folder, epoch ``e = g // N``.

    ``π_e`` is a pseudo-random permutation of ``[0, N)`` keyed by ``(seed, e)``: a balanced Feistel network on the
    smallest even number of bits covering ``N`` (Luby & Rackoff 1988), with cycle-walking to stay below ``N`` (Black &
    Rogaway 2002). It is computed per index, so the order needs no memory and any process can find any row.
    """

    def __init__(self, num_blocks: int, seed: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks is {num_blocks}: it must be > 0")
        self.num_blocks = num_blocks
        self.seed = seed
        bits = max(2, int(num_blocks - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = np.uint64((1 << self.half) - 1)

    def _keys(self, epoch: int) -> np.ndarray:
        return np.random.default_rng((self.seed, epoch)).integers(0, 2**63, FEISTEL_ROUNDS, dtype=np.uint64)

    def _round(self, right: np.ndarray, key: np.uint64) -> np.ndarray:
        """SplitMix64's finaliser (Steele et al. 2014) of ``right + key``, cut to the half width."""
        z = right + key
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (z ^ (z >> np.uint64(31))) & self.mask

    def _encrypt(self, x: np.ndarray, keys: np.ndarray) -> np.ndarray:
        half = np.uint64(self.half)
        left, right = x >> half, x & self.mask
        for key in keys:
            left, right = right, left ^ self._round(right, key)
        return (left << half) | right

    def __call__(self, indices: np.ndarray) -> np.ndarray:
        """Run-wide block indices (n,) int → block rows (n,) int64 of the folder."""
        indices = np.asarray(indices, dtype=np.int64)
        rows = np.empty(len(indices), dtype=np.int64)
        epochs = indices // self.num_blocks
        for epoch in np.unique(epochs):
            here = epochs == epoch
            keys = self._keys(int(epoch))
            x = (indices[here] % self.num_blocks).astype(np.uint64)
            y = self._encrypt(x, keys)
            outside = y >= self.num_blocks
            while outside.any():
                y[outside] = self._encrypt(y[outside], keys)
                outside = y >= self.num_blocks
            rows[here] = y.astype(np.int64)
        return rows


class PackedBlockShards:
    """The memory-mapped blocks of a pre-tokenised folder, read by row: ``take(rows)`` → (n, seq_len) int64.

    Each Arrow record batch of the shards is viewed, without a copy, as a numpy (rows, seq_len) int32 array over the
    memory map, and ``take`` gathers from those views. (pyarrow's ``take`` on a table of many record batches costs
    time in the number of batches — 20 ms per 8 rows of a 122k-block folder — which capped the per-process rate.)
    Pickling reopens the folder (DataLoader workers under ``spawn``) instead of copying the blocks.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.manifest = read_manifest(folder)
        self.table = datasets.load_from_disk(str(self.folder / BLOCKS_DIR)).data.table  # memory-mapped pyarrow Table
        self.seq_len = self.manifest["seq_len"]
        if self.table.num_rows != self.manifest["blocks"]:
            raise ValueError(
                f"{self.folder}: {BLOCKS_DIR}/ holds {self.table.num_rows} blocks, its manifest says "
                f"{self.manifest['blocks']}: the folder is incomplete or was modified; rebuild it"
            )
        chunks = [chunk for chunk in self.table.column("input_ids").chunks if len(chunk)]
        # (rows_c, seq_len) int32 views over the memory map, one per record batch
        self._chunks = [chunk.flatten().to_numpy(zero_copy_only=True).reshape(-1, self.seq_len) for chunk in chunks]
        self._starts = np.cumsum([0] + [len(chunk) for chunk in chunks[:-1]])  # (batches,) first row of each

    def __reduce__(self) -> tuple[type, tuple[Path]]:
        return PackedBlockShards, (self.folder,)

    def __len__(self) -> int:
        return self.table.num_rows

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows (n,) int in ``[0, len)`` → their blocks (n, seq_len) int64; IndexError naming a row outside."""
        rows = np.asarray(rows, dtype=np.int64)
        outside = (rows < 0) | (rows >= len(self))
        if outside.any():
            raise IndexError(f"{self.folder}: row {int(rows[outside][0])} outside the folder's {len(self)} blocks")
        chunk_of = np.searchsorted(self._starts, rows, side="right") - 1  # (n,)
        blocks = np.empty((len(rows), self.seq_len), dtype=np.int64)
        for chunk in np.unique(chunk_of):
            here = chunk_of == chunk
            blocks[here] = self._chunks[chunk][rows[here] - self._starts[chunk]]
        return blocks


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m train.pretokenize", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="phase-1 YAML config (its data, tokenizer, seq_len, filters)")
    parser.add_argument("--output", required=True, help="new folder for blocks/ and manifest.json")
    parser.add_argument("--num-proc", type=int, default=1, help="processes for filtering and tokenisation")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, as for phase 1")
    args = parser.parse_args(argv)
    # Imported here: phase 1 imports this module to read the blocks; its config class is needed only by this CLI.
    from train.common import load_config
    from train.phase1 import Phase1Config, load_tokenizer

    cfg = load_config(Phase1Config, args.config, args.overrides)
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.model_config())
    manifest = pretokenize(
        cfg.sources(), tokenizer, args.output, seq_len=cfg.seq_len, seed=cfg.seed, min_chars=cfg.min_chars,
        max_chars=cfg.max_chars, dedup=cfg.dedup, num_proc=args.num_proc,
    )  # fmt: skip
    logger.info(
        f"{args.output}: {manifest['blocks']} blocks of {manifest['seq_len']} tokens; texts {manifest['texts']}; "
        f"{manifest['tail_tokens_dropped']} tokens of the last incomplete block dropped"
    )


if __name__ == "__main__":
    run_command_line(main)
