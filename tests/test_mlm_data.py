"""Phase 1's on-the-fly input path (train/mlm_data.py), tiny and CPU only: each process tokenises only its share of
the texts, the shares are disjoint and together the 1-process stream, the masking indices stay unique in the run, and
a checkpointed position resumes exactly on the same process count and is refused on another."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from train import mlm_data
from train.common import ConfigError
from train.data import TextSourceSpec, build_text_stream


class _RecordingTokenizer:
    """The tokenizer, recording every text it is asked to tokenise."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.texts = tokenizer, []

    def __getattr__(self, name: str):
        return getattr(self.tokenizer, name)

    def __call__(self, texts: list[str], **options):
        self.texts.extend(texts)
        return self.tokenizer(texts, **options)


def _blocks(config: dict, rank: int, processes: int) -> mlm_data.PackedBlocks:
    sources = [TextSourceSpec(entry["spec"]) for entry in config["data"]]
    tokenizer = _RecordingTokenizer(AutoTokenizer.from_pretrained(config["tokenizer"]))
    make_stream = lambda epoch: build_text_stream(sources, seed=epoch, min_chars=1)  # noqa: E731
    return mlm_data.PackedBlocks(make_stream, tokenizer, config["seq_len"], rank=rank, processes=processes)


def _stream_texts(config: dict, epoch: int) -> list[str]:
    sources = [TextSourceSpec(entry["spec"]) for entry in config["data"]]
    return list(build_text_stream(sources, seed=epoch, min_chars=1))


def test_two_processes_tokenise_disjoint_texts_that_make_up_the_one_process_stream(tiny_phase1_config):
    stream = _stream_texts(tiny_phase1_config, epoch=0)
    assert len(stream) == 40
    single = _blocks(tiny_phase1_config, 0, 1)
    ranks = [_blocks(tiny_phase1_config, rank, 2) for rank in range(2)]
    for blocks in (single, *ranks):
        while blocks.epoch == 0:  # to the end of the first pass over the data
            blocks.take(1)
    first_pass = [blocks.tokenizer.texts[: len(stream) // blocks.processes] for blocks in ranks]
    assert single.tokenizer.texts[:40] == stream
    assert first_pass[0] == stream[0::2] and first_pass[1] == stream[1::2]  # disjoint, interleaved, nothing lost

    # Each process packs exactly its own texts' tokens, in order, each closed by </s>.
    tokenizer = AutoTokenizer.from_pretrained(tiny_phase1_config["tokenizer"])
    fresh = _blocks(tiny_phase1_config, 1, 2)
    _, packed = fresh.take(4)  # (4, 32)
    tokens = [t for text in stream[1::2]
              for t in tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]  # fmt: skip
    assert (packed[:, 0] == tokenizer.bos_token_id).all()
    assert packed[:, 1:].reshape(-1).tolist() == tokens[: 4 * 31]
    assert fresh.blocks_emitted == 8  # the run's blocks: 4 here and 4 on the other process


def test_onthefly_micro_batches_mask_each_block_by_its_place_in_the_global_batch(tiny_phase1_config):
    tokenizer = AutoTokenizer.from_pretrained(tiny_phase1_config["tokenizer"])
    masker = mlm_data.MlmMasker(tokenizer, 0.15, span_masking=False, seed=0)
    indices = []
    for rank in range(2):
        layout = mlm_data.BatchLayout(16, batch_size=4, accum=2, processes=2, rank=rank)
        blocks, reference = _blocks(tiny_phase1_config, rank, 2), _blocks(tiny_phase1_config, rank, 2)
        for step in range(3):
            micro = mlm_data.onthefly_micro_batches(blocks, masker, layout)
            _, packed = reference.take(8)  # the same process's blocks, unmasked
            for j, (inputs, labels) in enumerate(micro):
                first = step * 16 + (j * 2 + rank) * 4  # layout.first_block(step · 2 + j)
                want_inputs, want_labels = masker(packed[4 * j : 4 * j + 4], first)
                assert (inputs.numpy() == want_inputs).all() and (labels.numpy() == want_labels).all()
                indices.extend(range(first, first + 4))
    assert sorted(indices) == list(range(48))  # every block index of 3 steps once, over both processes


def test_run_state_resumes_each_process_exactly_and_refuses_another_process_count(tiny_phase1_config):
    ranks = [_blocks(tiny_phase1_config, rank, 2) for rank in range(2)]
    for blocks in ranks:
        blocks.take(7)  # partway through the first pass, with unread tokens left over
    position, buffer = mlm_data.PackedBlocks.run_state([blocks.state_dict() for blocks in ranks])
    position = json.loads(json.dumps(position))  # what the checkpoint's JSON gives back
    assert position["processes"] == 2 and position["blocks_emitted"] == 14
    assert len(buffer) == sum(rank["buffer_tokens"] for rank in position["ranks"]) > 0
    expected = [blocks.take(30)[1] for blocks in ranks]  # crosses into the next pass
    assert all(blocks.epoch > 0 for blocks in ranks)
    for rank in range(2):
        restored = _blocks(tiny_phase1_config, rank, 2)
        restored.load_run_state(position, buffer)
        first, again = restored.take(30)
        assert first == 14 and (again == expected[rank]).all()

    message = (r"the on-the-fly data position was written by 2 process\(es\), this run has 1: on-the-fly batches "
               r"depend on the number of processes; resume with 2 \(a run from pre-tokenised data")  # fmt: skip
    with pytest.raises(ConfigError, match=message):
        _blocks(tiny_phase1_config, 0, 1).load_run_state(position, buffer)
    old_layout, _ = ranks[0].state_dict()  # a checkpoint written before the per-process split: no process count
    with pytest.raises(ConfigError, match="has no process count: it was written before phase 1 split the texts"):
        _blocks(tiny_phase1_config, 0, 1).load_run_state(old_layout, buffer)


def test_starting_the_shard_loader_leaves_the_global_rng_alone(tmp_path):
    """Creating the DataLoader iterator draws its workers' base seed from its own generator: a resumed run's restored
    torch RNG (dropout) is where an uninterrupted run's is."""
    import torch

    state = torch.random.get_rng_state()
    iter(mlm_data.shard_loader([0, 1], range(2), num_workers=0))
    assert torch.equal(torch.random.get_rng_state(), state)


def test_a_process_without_texts_names_the_counts(tiny_phase1_config, tmp_path):
    corpus = tmp_path / "two.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["first text", "second text"]))
    blocks = _blocks({**tiny_phase1_config, "data": [{"spec": str(corpus)}]}, 2, 3)
    with pytest.raises(ValueError, match=r"yielded 2 text\(s\) in epoch 0, none for process 2 of 3"):
        blocks.take(1)
    with pytest.raises(ValueError, match=r"rank 3 of 3 processes: expected 0 <= rank < processes"):
        _blocks(tiny_phase1_config, 3, 3)


def test_the_throughput_benchmark_refuses_a_raw_folder_without_text(tmp_path, monkeypatch):
    """An empty ``raw`` folder once made ``benchmarks.data_throughput`` repeat nothing forever."""
    from benchmarks.data_throughput import write_corpus

    (tmp_path / "raw").mkdir()
    monkeypatch.setenv("CHROMA_SHARED_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=rf"no text in {tmp_path}/raw/\*.jsonl to repeat"):
        write_corpus(tmp_path / "corpus.jsonl", megabytes=1)
