"""Phase-2 pairs on disk and the step -> batch sampler (`train/pair_stream.py`): rows read back by index equal the
records written, `max_pairs` keeps the subset a seeded shuffle keeps, files are written once; `mixed` is the former
batch order; `per_source` batches are single-source, cover each source's epochs, follow size^α, resume exactly and split
over processes; reading a batch from a 64 MB pair file allocates a small fraction of it; phase 2 trains and resumes
exactly with `per_source`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import numpy as np
import pytest

from train.common import ConfigError
from train.data import PAIR_FEATURES
from train.pair_stream import (
    SOURCE_BLOCK_STEPS,
    ChromaMoePairSampler,
    ChromaMoePairSource,
    ChromaMoePairStore,
    path_fingerprint,
)

from test_phase2 import one_thread, read_log, tiny_config, train_crashing_in_step_3, workspace  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[1]


def records(prefix: str, count: int) -> list[dict]:
    return [{"query": f"{prefix} q{i}", "positive": f"{prefix} d{i}", "negatives": [f"{prefix} n{i}"] * (i % 3),
             "task": "finance_qa"} for i in range(count)]  # fmt: skip


def jsonl_source(path: Path, rows: list[dict], name: str, max_pairs: int | None = None, calls: list | None = None):
    """A source reading `path` through `load_pair_dataset(streaming=True)`, as phase 2 does; `calls` counts reads."""
    from train.data import load_pair_dataset

    if not path.is_file():
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")

    def read():
        if calls is not None:
            calls.append(name)
        return load_pair_dataset(str(path), task="finance_qa", streaming=True)

    return ChromaMoePairSource(name, read, {"files": path_fingerprint(path)}, max_pairs)


def test_store_reads_rows_by_index_and_keeps_the_shuffled_subset(tmp_path):
    first, second = records("a", 30), records("b", 7)
    sources = [jsonl_source(tmp_path / "a.jsonl", first, "A", max_pairs=10), jsonl_source(tmp_path / "b.jsonl", second, "B")]
    store = ChromaMoePairStore.open(tmp_path / "pairs", sources, seed=5)
    assert store.sizes == [10, 7] and len(store) == 17 and store.names == ["A", "B"]
    # max_pairs keeps exactly what the former in-memory `Dataset.shuffle(seed=seed + index).select(range(max_pairs))` kept
    former = datasets.Dataset.from_list(first, features=PAIR_FEATURES).shuffle(seed=5 + 0).select(range(10))
    assert store.parts[0].to_list() == former.to_list()
    got = store.rows(np.array([1, 0, 1, 0]), np.array([6, 9, 0, 0]))
    assert got == [second[6], former[9], second[0], former[0]]


def test_store_is_written_once_and_again_when_its_file_changes(tmp_path):
    calls: list[str] = []
    path = tmp_path / "a.jsonl"
    ChromaMoePairStore.open(tmp_path / "pairs", [jsonl_source(path, records("a", 12), "A", calls=calls)], seed=0)
    reopened = ChromaMoePairStore.open(tmp_path / "pairs", [jsonl_source(path, [], "A", calls=calls)], seed=0)
    assert calls == ["A"] and reopened.sizes == [12]  # the second open read nothing
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(records("z", 1)[0]) + "\n")
    changed = ChromaMoePairStore.open(tmp_path / "pairs", [jsonl_source(path, [], "A", calls=calls)], seed=0)
    assert calls == ["A", "A"] and changed.sizes == [13] and changed.rows(np.array([0]), np.array([12]))[0]["query"] == "z q0"


def test_a_source_without_pairs_is_refused(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^config key train_sources\[0\] \(empty\) gave no pairs$"):
        ChromaMoePairStore.open(tmp_path / "pairs", [jsonl_source(empty, [], "train_sources[0] (empty)")], seed=0)


def test_mixed_is_the_former_batch_order():
    """`mixed` = the former `batch_indices`: per epoch one permutation `default_rng([seed, epoch])` of all pairs (the
    sources concatenated), cut into whole global batches."""
    sampler = ChromaMoePairSampler([7, 5], ["A", "B"], global_batch_size=4, seed=3, batch_sampling="mixed")
    offsets = np.array([0, 7])
    for step in range(9):
        epoch, position = divmod(step, 3)
        expected = np.random.default_rng([3, epoch]).permutation(12)[position * 4 : (position + 1) * 4]
        sources, rows = sampler.global_batch(step)
        assert (offsets[sources] + rows).tolist() == expected.tolist()
        assert all(row < size for row, size in zip(rows, np.array([7, 5])[sources]))
    epoch0 = np.concatenate([np.stack(sampler.global_batch(step), axis=1) for step in range(3)])
    assert len({tuple(pair) for pair in epoch0.tolist()}) == 12  # one epoch: 3 disjoint batches
    assert sampler.global_batch(3)[1].tolist() != sampler.global_batch(0)[1].tolist()  # a new permutation


def test_per_source_batches_are_single_source_and_cover_each_epoch():
    sizes, size = [40, 9, 100], 4
    sampler = ChromaMoePairSampler(sizes, ["A", "B", "C"], size, seed=7, batch_sampling="per_source", source_alpha=0.5)
    served: dict[int, list[np.ndarray]] = {0: [], 1: [], 2: []}
    for step in range(600):
        sources, rows = sampler.global_batch(step)
        assert len(set(sources.tolist())) == 1 and len(rows) == size
        served[int(sources[0])].append(rows)
    for source, batches in served.items():
        per_epoch = sizes[source] // size
        assert len(batches) > 2 * per_epoch  # every source went through two epochs or more
        for epoch in range(len(batches) // per_epoch):
            rows = np.concatenate(batches[epoch * per_epoch : (epoch + 1) * per_epoch])
            expected = np.random.default_rng([7, 2, source, epoch]).permutation(sizes[source])[: per_epoch * size]
            assert rows.tolist() == expected.tolist()  # the epoch's permutation, consumed in whole batches


def batches(sampler: ChromaMoePairSampler, steps: range) -> list[list[int]]:
    return [np.concatenate(sampler.global_batch(step)).tolist() for step in steps]


@pytest.mark.parametrize("batch_sampling", ["mixed", "per_source"])
def test_sampler_is_deterministic_and_resumes_exactly(batch_sampling):
    """Two constructions give the same batches; a sampler that starts at step s (a resume: no history) gives the
    batches the one that ran from step 0 gives, across a source-draw block boundary."""
    args = ([50, 13, 200], ["A", "B", "C"], 8, 11, batch_sampling)
    steps = range(SOURCE_BLOCK_STEPS - 20, SOURCE_BLOCK_STEPS + 20)
    continued = ChromaMoePairSampler(*args)
    sequence = batches(continued, range(0, steps.stop))
    assert batches(ChromaMoePairSampler(*args), range(0, steps.stop)) == sequence
    resumed = ChromaMoePairSampler(*args)
    assert batches(resumed, steps) == sequence[steps.start :]
    assert batches(ChromaMoePairSampler(*args), range(steps.stop - 1, steps.stop)) == sequence[-1:]
    other_seed = ChromaMoePairSampler(args[0], args[1], args[2], 12, batch_sampling)
    assert batches(other_seed, range(20)) != sequence[:20]


@pytest.mark.parametrize("batch_sampling", ["mixed", "per_source"])
def test_two_processes_read_disjoint_slices_that_make_the_global_batch(tmp_path, batch_sampling):
    sources = [jsonl_source(tmp_path / "a.jsonl", records("a", 20), "A"), jsonl_source(tmp_path / "b.jsonl", records("b", 12), "B")]
    store = ChromaMoePairStore.open(tmp_path / "pairs", sources, seed=0)
    sampler = ChromaMoePairSampler(store.sizes, store.names, 8, seed=1, batch_sampling=batch_sampling)
    for step in range(12):
        whole = store.rows(*sampler.process_batch(step, rank=0, world=1))
        ranks = [sampler.process_batch(step, rank, world=2) for rank in range(2)]
        keys = [set(zip(sources_.tolist(), rows.tolist())) for sources_, rows in ranks]
        assert len(keys[0]) == len(keys[1]) == 4 and keys[0].isdisjoint(keys[1])
        assert store.rows(*ranks[0]) + store.rows(*ranks[1]) == whole
    with pytest.raises(ValueError, match="global batch of 8 pairs does not split over 3 processes"):
        sampler.process_batch(0, rank=0, world=3)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_source_frequencies_follow_size_to_the_alpha(alpha):
    sizes = np.array([1000, 100, 10])
    sampler = ChromaMoePairSampler(sizes, ["A", "B", "C"], 8, seed=0, batch_sampling="per_source", source_alpha=alpha)
    steps = 20_000
    drawn = np.bincount([sampler.source_draw(step)[0] for step in range(steps)], minlength=3) / steps
    expected = sizes**alpha / (sizes**alpha).sum()
    # binomial standard deviation at 20,000 steps <= 0.0036: 0.015 is > 4 of them
    assert np.abs(drawn - expected).max() < 0.015, (drawn, expected)


def test_bad_sampling_settings_are_refused_naming_the_key_and_source():
    names = ["train_sources[0] (big.jsonl)", "train_sources[1] (tiny.jsonl)"]
    with pytest.raises(ConfigError) as error:
        ChromaMoePairSampler([100, 5], names, 8, seed=0, batch_sampling="per_source")
    assert str(error.value) == (
        "config key 'global_batch_size'=8 exceeds train_sources[1] (tiny.jsonl), which has 5 pairs: batch_sampling "
        "'per_source' draws every global batch from one source; lower global_batch_size, give that source more pairs, "
        "or use batch_sampling 'mixed'"
    )
    ChromaMoePairSampler([100, 5], names, 8, seed=0, batch_sampling="mixed")  # mixed needs 8 pairs in all only
    with pytest.raises(ConfigError, match=r"^config key 'global_batch_size'=8 exceeds the 7 training pairs$"):
        ChromaMoePairSampler([2, 5], names, 8, seed=0, batch_sampling="mixed")
    with pytest.raises(ConfigError, match=r"^config key 'batch_sampling'='random': expected one of \['mixed', 'per_source'\]$"):
        ChromaMoePairSampler([100, 50], names, 8, seed=0, batch_sampling="random")
    with pytest.raises(ConfigError, match=r"^config key 'source_alpha'=-1: must be >= 0$"):
        ChromaMoePairSampler([100, 50], names, 8, seed=0, batch_sampling="per_source", source_alpha=-1)


def test_phase2_config_checks_the_sampling_keys(workspace, tmp_path):
    with pytest.raises(ConfigError, match=r"^config key 'batch_sampling'='random': expected one of \['mixed', 'per_source'\]$"):
        tiny_config(workspace, tmp_path, "batch_sampling=random")
    with pytest.raises(ConfigError, match=r"^config key 'source_alpha'=-0.5: must be >= 0$"):
        tiny_config(workspace, tmp_path, "source_alpha=-0.5")


MEMORY_PROBE = textwrap.dedent(
    """
    import json, sys, tracemalloc
    from pathlib import Path
    import numpy as np
    import pyarrow as pa
    from train.data import load_pair_dataset
    from train.pair_stream import ChromaMoePairSampler, ChromaMoePairSource, ChromaMoePairStore

    big, warm, out = map(Path, sys.argv[1:4])

    def source(path):
        return ChromaMoePairSource(path.name, lambda: load_pair_dataset(str(path), task="finance_qa", streaming=True), {})

    ChromaMoePairStore.open(out / "warm", [source(warm)], seed=0).rows(np.array([0]), np.array([0]))  # imports
    arrow_before = pa.default_memory_pool().max_memory()
    tracemalloc.start()
    store = ChromaMoePairStore.open(out / "big", [source(big)], seed=0)
    sampler = ChromaMoePairSampler(store.sizes, store.names, 64, seed=0, batch_sampling="per_source")
    sources, rows = sampler.process_batch(3, rank=1, world=2)
    batch = store.rows(sources, rows)
    python_peak = tracemalloc.get_traced_memory()[1]
    arrow_peak = pa.default_memory_pool().max_memory() - arrow_before
    print(json.dumps({"python_peak": python_peak, "arrow_peak": arrow_peak, "rows": rows.tolist(),
                      "queries": [row["query"] for row in batch], "pairs": len(store)}))
    """
)


def test_reading_a_batch_never_materialises_the_pair_file(tmp_path):
    """A 64 MB pair file is streamed to disk and one process's slice of a global batch read back; Python's peak
    allocations (tracemalloc) and Arrow's peak buffer memory each stay under 1/4 of the file (measured: 4.9 MB and
    4.2 MB for 67 MB, mostly the writer's record batches; holding the file as Python records takes more than the file)."""
    big = tmp_path / "big.jsonl"
    count = 16_000
    with big.open("w", encoding="utf-8") as handle:
        for i in range(count):
            row = {"query": f"q{i} " + "why " * 25, "positive": f"d{i} " + "lorem ipsum " * 250, "negatives": ["n " * 500]}
            handle.write(json.dumps(row) + "\n")
    size = big.stat().st_size
    assert size > 64e6
    warm = tmp_path / "warm.jsonl"
    warm.write_text(json.dumps({"query": "q", "positive": "d"}) + "\n", encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(big), str(warm), str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    assert probe["pairs"] == count and len(probe["rows"]) == 32
    assert probe["queries"] == [f"q{i} " + "why " * 25 for i in probe["rows"]]
    assert probe["python_peak"] < size / 4, probe["python_peak"]
    assert probe["arrow_peak"] < size / 4, probe["arrow_peak"]


def test_phase2_trains_per_source_and_resumes_exactly(workspace, tmp_path, monkeypatch):
    """A tiny phase-2 run with `batch_sampling: per_source` reads, at each step, one source's rows: the sampler's. A
    run that crashes in step 3 and resumes from its step-2 checkpoint (reusing its stored pairs) reads the same rows
    and logs the same losses and temperatures."""
    import train.phase2 as phase2

    reads: list[tuple[list[int], list[int]]] = []
    real_rows = ChromaMoePairStore.rows

    def spy(self, sources, rows):
        reads.append((sources.tolist(), rows.tolist()))
        return real_rows(self, sources, rows)

    monkeypatch.setattr(ChromaMoePairStore, "rows", spy)
    extra = ("batch_sampling=per_source", "source_alpha=1.0")
    full = tmp_path / "full"
    config = tiny_config(workspace, full, *extra)
    phase2.train(config)
    store = phase2.load_training_pairs(config, full / "pairs")  # the run's files, reused
    sampler = ChromaMoePairSampler(store.sizes, store.names, config.global_batch_size, config.seed, "per_source", 1.0)
    expected = [tuple(part.tolist() for part in sampler.global_batch(step)) for step in range(4)]
    assert reads == expected
    assert all(len(set(sources)) == 1 for sources, _ in reads)
    assert {sources[0] for sources, _ in reads} == {0, 1}  # both sources served in these 4 steps (seed 0)

    crashed = tmp_path / "crashed"
    train_crashing_in_step_3(monkeypatch, workspace, crashed, *extra)
    reads.clear()
    stored = [(crashed / "pairs" / f"source_{k}.arrow").stat().st_mtime_ns for k in range(2)]
    phase2.train(tiny_config(workspace, crashed, *extra, "resume=auto"))
    assert reads == expected[2:]
    assert [(crashed / "pairs" / f"source_{k}.arrow").stat().st_mtime_ns for k in range(2)] == stored  # not rewritten
    resumed, uninterrupted = read_log(crashed), read_log(full)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4] == [r["step"] for r in uninterrupted]
    for a, b in zip(uninterrupted, resumed):
        assert math.isclose(a["train/loss"], b["train/loss"], rel_tol=1e-6), (a, b)
        assert math.isclose(a["train/temperature"], b["train/temperature"], rel_tol=1e-6), (a, b)
