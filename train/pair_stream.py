"""Phase-2 pairs on disk, read by index, and the step -> global batch sampler.

Storage (`ChromaMoePairStore`): every pair source is written once, record by record, to an Arrow file (the `datasets`
on-disk format) under `<output_dir>/pairs/` and memory-mapped back with `datasets.Dataset.from_file`. A step reads
only the rows of its own process's slice of the global batch, so no process holds a pair file in memory, however
large (the contrastors recipe: memory-mapped Arrow, each rank reads its slice; Nussbaum et al. 2024,
arXiv:2402.01613). A stored file is reused while its source's fingerprint (config entry, input file sizes and
modification times) is unchanged, so a resumed run reads the very rows the interrupted one read.

Sampling (`ChromaMoePairSampler`): the global batch of step s is a function of (seed, s) only, so a resumed run needs
only s and processes agree without communicating.

- `mixed`: each epoch is one seeded permutation of all pairs of all sources, cut into whole global batches.
- `per_source`: each global batch comes from ONE source, so its in-batch negatives share the positives' domain and
  format instead of being told apart by them (as contrastors/nomic-embed, FlagEmbedding and GTE, Li et al. 2023,
  arXiv:2308.03281, batch their fine-tuning data). Source k is drawn with probability n_k^α / Σ_j n_j^α (n_k its
  pairs; temperature sampling as in XLM-R, Conneau et al. 2020, arXiv:1911.02116): α = 1 is proportional to size,
  α = 0 uniform over sources. Within a source, each epoch is a seeded permutation consumed in whole global batches; the
  epoch and position of step s's batch follow from how many of the steps before s drew that source, which is counted
  from the seeded source draws (made in blocks of `SOURCE_BLOCK_STEPS` steps, counts cached per block: resuming at
  step s costs O(s / SOURCE_BLOCK_STEPS) block draws).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from datasets.arrow_writer import ArrowWriter

from train.common import ConfigError
from train.data import PAIR_FEATURES

logger = logging.getLogger(__name__)

PAIRS_DIR = "pairs"
BATCH_SAMPLING = ("mixed", "per_source")
SOURCE_BLOCK_STEPS = 4096
WRITER_BATCH_ROWS = 1000  # records per Arrow record batch while writing: bounds the writer's memory


def path_fingerprint(path: str | Path) -> list[list[Any]]:
    """[name, size in bytes, modification time in ns] of a file, or of every file under a folder (sorted); [] for what
    is not on disk (a Hub id). A stored source whose fingerprint changed is written again."""
    root = Path(path)
    if root.is_file():
        return [[root.name, root.stat().st_size, root.stat().st_mtime_ns]]
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    return [[str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


@dataclass(frozen=True)
class ChromaMoePairSource:
    """One pair source of a `ChromaMoePairStore`.

    Args:
        name: How messages name it, e.g. `train_sources[1] (data/pairs.jsonl)`.
        rows: Called (only when the stored file is missing or stale) to yield its records as mappings with the
            `train.data.PAIR_FEATURES` keys (query, positive, negatives, task); it should stream them.
        fingerprint: JSON-serialisable identity of the source; the stored file is reused while it is equal.
        max_pairs: Keep a seeded random subset of this many pairs (None: all).
    """

    name: str
    rows: Callable[[], Iterable[Mapping[str, Any]]]
    fingerprint: Mapping[str, Any]
    max_pairs: int | None = None


def _write_pairs(rows: Iterable[Mapping[str, Any]], target: Path) -> int:
    """Stream records into an Arrow file (temporary file, then one rename); returns the number of records."""
    partial = target.with_name(target.name + ".tmp")
    with ArrowWriter(features=PAIR_FEATURES, path=str(partial), writer_batch_size=WRITER_BATCH_ROWS) as writer:
        for row in rows:
            writer.write({key: row[key] for key in PAIR_FEATURES})
        count, _ = writer.finalize()
    os.replace(partial, target)
    return count


class ChromaMoePairStore:
    """Pair sources as memory-mapped Arrow datasets; `rows(sources, rows)` reads records by (source, row) index.

    Build it with `ChromaMoePairStore.open`. `parts[k]` is source k's `datasets.Dataset` (after its `max_pairs` cut),
    `names[k]` its name, `sizes[k]` its number of pairs.
    """

    def __init__(self, parts: list[datasets.Dataset], names: list[str]) -> None:
        self.parts = parts
        self.names = names
        self.sizes = [len(part) for part in parts]

    def __len__(self) -> int:
        return sum(self.sizes)

    @classmethod
    def open(cls, directory: str | Path, sources: Sequence[ChromaMoePairSource], seed: int) -> ChromaMoePairStore:
        """Source k is `directory/source_<k>.arrow`, written from `sources[k].rows()` unless `source_<k>.json` records
        the same name and fingerprint; then cut to `max_pairs` by the permutation `datasets.Dataset.shuffle(seed=seed
        + k)` would draw (its first `max_pairs` rows, in that order). Under several processes, open it on the main
        process first (`accelerator.main_process_first()`): the others then find every file current.

        Raises:
            ConfigError: a source gave no pairs.
        """
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        parts = []
        for index, source in enumerate(sources):
            data_file, manifest_file = folder / f"source_{index}.arrow", folder / f"source_{index}.json"
            expected = json.loads(json.dumps({"name": source.name, "fingerprint": source.fingerprint}))
            stored = json.loads(manifest_file.read_text(encoding="utf-8")) if manifest_file.is_file() else {}
            if data_file.is_file() and {key: stored.get(key) for key in expected} == expected:
                logger.info("%s: reusing %s (%d pairs)", source.name, data_file, stored["pairs"])
            else:
                manifest_file.unlink(missing_ok=True)  # a crash while writing must not leave an old manifest beside new rows
                count = _write_pairs(source.rows(), data_file)
                partial = manifest_file.with_name(manifest_file.name + ".tmp")
                partial.write_text(json.dumps({**expected, "pairs": count}), encoding="utf-8")
                os.replace(partial, manifest_file)
                logger.info("%s: wrote %d pairs to %s", source.name, count, data_file)
            part = datasets.Dataset.from_file(str(data_file))
            if len(part) == 0:
                raise ConfigError(f"config key {source.name} gave no pairs")
            if source.max_pairs is not None and source.max_pairs < len(part):
                kept = np.random.default_rng(seed + index).permutation(len(part))[: source.max_pairs]
                part = part.select(kept, keep_in_memory=True)  # an in-memory index over the mapped file
            parts.append(part)
        return cls(parts, [source.name for source in sources])

    def rows(self, sources: np.ndarray, rows: np.ndarray) -> list[dict[str, Any]]:
        """The records at `(sources[i], rows[i])` for i < n, in that order (both `(n,)` integer arrays); only these
        rows are read from disk."""
        records: list[dict[str, Any]] = [{} for _ in range(len(rows))]
        for source in np.unique(sources):
            positions = np.flatnonzero(sources == source)  # (m,)
            columns = self.parts[source][rows[positions].tolist()]
            for column, values in columns.items():
                for position, value in zip(positions, values):
                    records[position][column] = value
        return records


class ChromaMoePairSampler:
    """The (source, row) indices of each optimizer step's global batch, as a function of (seed, step) only.

    Args:
        sizes: Pairs per source (`ChromaMoePairStore.sizes`); names: their names, for error messages.
        global_batch_size: Pairs per step over all processes.
        seed: The run's seed.
        batch_sampling: `mixed` (one permutation of all pairs per epoch) or `per_source` (each global batch from one
            source drawn ∝ size^`source_alpha`); see the module docstring.
        source_alpha: The exponent α of `per_source` (unused by `mixed`). The default 0.5 gives a source 100× smaller
            10× fewer batches: not 100× (α = 1, its task barely trained) nor as many (α = 0, its pairs repeated 100×
            as often).

    Raises:
        ConfigError: an unknown `batch_sampling`, a negative `source_alpha`, or a global batch larger than all pairs
            (`mixed`) or than one source (`per_source`, naming the source).
    """

    def __init__(
        self,
        sizes: Sequence[int],
        names: Sequence[str],
        global_batch_size: int,
        seed: int,
        batch_sampling: str = "mixed",
        source_alpha: float = 0.5,
    ) -> None:
        if batch_sampling not in BATCH_SAMPLING:
            raise ConfigError(f"config key 'batch_sampling'={batch_sampling!r}: expected one of {list(BATCH_SAMPLING)}")
        if not source_alpha >= 0:
            raise ConfigError(f"config key 'source_alpha'={source_alpha!r}: must be >= 0")
        self.sizes = np.asarray(sizes, dtype=np.int64)  # (K,)
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.batch_sampling = batch_sampling
        if batch_sampling == "mixed":
            if self.sizes.sum() < global_batch_size:
                raise ConfigError(
                    f"config key 'global_batch_size'={global_batch_size} exceeds the {self.sizes.sum()} training pairs"
                )
        else:
            for name, size in zip(names, self.sizes):
                if size < global_batch_size:
                    raise ConfigError(
                        f"config key 'global_batch_size'={global_batch_size} exceeds {name}, which has {size} pairs: "
                        "batch_sampling 'per_source' draws every global batch from one source; lower "
                        "global_batch_size, give that source more pairs, or use batch_sampling 'mixed'"
                    )
        weights = self.sizes.astype(np.float64) ** source_alpha  # (K,)
        self.probabilities = weights / weights.sum()  # (K,) per_source: P(a step draws source k)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])  # (K + 1,) mixed: first global index of each source
        self._counts_before = [np.zeros(len(self.sizes), dtype=np.int64)]  # per block b: (K,) draws in blocks < b
        self._permutations: dict[int, tuple[int, np.ndarray]] = {}  # source (-1: all, mixed) -> (epoch, permutation)

    def _permutation(self, source: int, epoch: int) -> np.ndarray:
        """The seeded order of epoch `epoch` of one source (`-1`: all pairs, `mixed`; the order of the former
        `train.phase2.batch_indices`); the latest epoch of each is cached."""
        cached = self._permutations.get(source)
        if cached is None or cached[0] != epoch:
            if source < 0:
                order = np.random.default_rng([self.seed, epoch]).permutation(int(self.sizes.sum()))
            else:
                order = np.random.default_rng([self.seed, 2, source, epoch]).permutation(int(self.sizes[source]))
            cached = self._permutations[source] = (epoch, order)
        return cached[1]

    def _block_sources(self, block: int) -> np.ndarray:
        """`(SOURCE_BLOCK_STEPS,)` the source drawn by each step of block `block` (steps block·B ... block·B + B - 1)."""
        rng = np.random.default_rng([self.seed, 1, block])
        return rng.choice(len(self.sizes), size=SOURCE_BLOCK_STEPS, p=self.probabilities)

    def source_draw(self, step: int) -> tuple[int, int]:
        """`per_source`: (the source of step `step`, the number of steps before it that drew the same source)."""
        block, offset = divmod(step, SOURCE_BLOCK_STEPS)
        while len(self._counts_before) <= block:
            drawn = self._block_sources(len(self._counts_before) - 1)
            self._counts_before.append(self._counts_before[-1] + np.bincount(drawn, minlength=len(self.sizes)))
        drawn = self._block_sources(block)
        source = int(drawn[offset])
        return source, int(self._counts_before[block][source] + np.count_nonzero(drawn[:offset] == source))

    def global_batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """`(sources, rows)`, two `(global_batch_size,)` int64 arrays: pair i of step `step` (0-based) is row
        `rows[i]` of source `sources[i]`. A last partial batch of an epoch is dropped."""
        size = self.global_batch_size
        if self.batch_sampling == "mixed":
            epoch, position = divmod(step, int(self.sizes.sum()) // size)
            chosen = self._permutation(-1, epoch)[position * size : (position + 1) * size]  # (G,) global indices
            sources = np.searchsorted(self.offsets, chosen, side="right") - 1  # (G,)
            return sources, chosen - self.offsets[sources]
        source, served = self.source_draw(step)
        epoch, position = divmod(served, int(self.sizes[source]) // size)
        rows = self._permutation(source, epoch)[position * size : (position + 1) * size]  # (G,)
        return np.full(size, source, dtype=np.int64), rows

    def process_batch(self, step: int, rank: int, world: int) -> tuple[np.ndarray, np.ndarray]:
        """Process `rank`'s slice (of `world`) of `global_batch(step)`: its `global_batch_size / world` consecutive
        pairs. Raises ValueError when the batch does not split evenly."""
        if self.global_batch_size % world:
            raise ValueError(f"global batch of {self.global_batch_size} pairs does not split over {world} processes")
        local = self.global_batch_size // world
        sources, rows = self.global_batch(step)
        return sources[rank * local : (rank + 1) * local], rows[rank * local : (rank + 1) * local]
