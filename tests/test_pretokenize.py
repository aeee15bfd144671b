"""Pre-tokenised phase-1 data (train/pretokenize.py) and phase 1 reading it (train/phase1.py), tiny and CPU only: the
manifest's counts, the per-process rows, 2 processes = 1, kill → resume = uninterrupted, and a checkpoint whose data
position does not grow with the steps."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import torch.distributed as dist
import yaml
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file
from test_scale_out import _launch  # the DDP launcher of tests/test_scale_out.py
from transformers import AutoTokenizer

from train import common, mlm_data, phase1
from train.common import ConfigError, TRAINER_STATE_FILE
from train.pretokenize import BlockOrder, PackedBlockShards, pretokenize
from train.pretokenize import main as pretokenize_main

RUN = {"global_batch_tokens": 256, "max_steps": 8, "warmup_steps": 1, "learning_rate": 3e-3, "min_learning_rate": 3e-4,
       "log_every": 4, "checkpoint_every": 100, "dataloader_num_workers": 0}  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread_and_fresh_accelerate_state():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _pretokenized(config: dict, folder: Path, **options) -> dict:
    cfg = phase1.Phase1Config(**config)
    tokenizer = phase1.load_tokenizer(cfg.tokenizer, cfg.model_config())
    pretokenize(cfg.sources(), tokenizer, folder, seq_len=cfg.seq_len, seed=cfg.seed, min_chars=cfg.min_chars,
                max_chars=cfg.max_chars, dedup=cfg.dedup, **options)  # fmt: skip
    return {**config, "pretokenized": str(folder)}


def test_manifest_counts_blocks_and_num_proc_independence(tiny_phase1_config, tmp_path):
    corpus = Path(tiny_phase1_config["data"][0]["spec"])
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    extra = tmp_path / "extra.jsonl"  # 2 too short, 1 too long, 2 repeats (one only after whitespace normalisation)
    rows = ["ab", "cd", "x" * 300, texts[0], "fresh text here", " fresh  text\there "]
    extra.write_text("".join(json.dumps({"body": t}) + "\n" for t in rows))
    data = [tiny_phase1_config["data"][0], {"spec": str(extra), "weight": 0.5, "text_field": "body"}]
    config = {**tiny_phase1_config, "min_chars": 5, "max_chars": 200, "data": data}
    one = _pretokenized(config, tmp_path / "one", num_proc=1)
    two = _pretokenized(config, tmp_path / "two", num_proc=2)
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    first, second = manifest["sources"]
    assert first["texts_seen"] == 40 and second["texts_seen"] == 6
    assert (second["too_short"], second["too_long"]) == (2, 1) and first["too_short"] == first["too_long"] == 0
    # texts[0]'s second copy is a repeat in whichever source the mixture drew it later
    assert first["duplicate"] + second["duplicate"] == 2 and second["duplicate"] >= 1
    assert manifest["texts"] == {"seen": 46, "kept": 41, "too_short": 2, "too_long": 1, "duplicate": 2}

    tokenizer = AutoTokenizer.from_pretrained(config["tokenizer"])
    kept = sorted(set(texts) | {"fresh text here"})
    total = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in kept)
    assert first["tokens"] + second["tokens"] == total  # each kept text once, with its </s>
    assert manifest["blocks"] == total // 31 and manifest["tail_tokens_dropped"] == total % 31
    assert manifest["tokens"] == manifest["blocks"] * 32 and manifest["seq_len"] == 32

    blocks_one, blocks_two = PackedBlockShards(one["pretokenized"]), PackedBlockShards(two["pretokenized"])
    rows_all = np.arange(manifest["blocks"])
    assert (blocks_one.take(rows_all) == blocks_two.take(rows_all)).all()  # num_proc does not change the blocks
    packed = blocks_two.take(rows_all)
    assert (packed[:, 0] == tokenizer.bos_token_id).all()
    assert (packed[:, 1:] == tokenizer.eos_token_id).sum() == manifest["texts"]["kept"] - (
        manifest["tail_tokens_dropped"] > 0  # the dropped tail ends with the last text's </s>
    )
    with pytest.raises(FileExistsError, match="already exists"):
        _pretokenized(config, tmp_path / "two")


def test_take_reads_rows_across_record_batches_like_arrow(tiny_phase1_config, tmp_path, monkeypatch):
    """Blocks saved 3 per Arrow record batch (many batches, as a large corpus has): ``take`` gathers any rows,
    within and across batches, as pyarrow's ``take`` does; a pickled reader reopens the folder; a row outside is
    named."""
    monkeypatch.setattr(datasets.config, "DEFAULT_MAX_BATCH_SIZE", 3)  # save_to_disk's rows per record batch
    config = _pretokenized(tiny_phase1_config, tmp_path / "blocks")
    shards = PackedBlockShards(config["pretokenized"])
    assert shards.table.column("input_ids").num_chunks > 5
    rows = np.random.default_rng(0).permutation(len(shards))  # every row once, batches interleaved
    want = np.asarray(shards.table.column("input_ids").take(rows).to_pylist(), dtype=np.int64)  # (n, L)
    assert (shards.take(rows) == want).all() and (shards.take(rows[:3]) == want[:3]).all()
    reopened = pickle.loads(pickle.dumps(shards))
    assert len(pickle.dumps(shards)) < 1000 and (reopened.take(rows) == want).all()  # the path, not the blocks
    with pytest.raises(IndexError, match=rf"row {len(shards)} outside the folder's {len(shards)} blocks"):
        shards.take(np.array([0, len(shards)]))


def test_block_order_is_a_seeded_permutation_per_epoch():
    order = BlockOrder(37, seed=3)
    rows = order(np.arange(3 * 37))
    epochs = rows.reshape(3, 37)
    assert all(sorted(epoch) == list(range(37)) for epoch in epochs)
    assert not (epochs[0] == epochs[1]).all() and not (epochs[0] == np.arange(37)).all()
    assert (order(np.arange(50, 60)) == rows[50:60]).all()  # any slice, computed alone, agrees
    assert (BlockOrder(37, seed=3)(np.arange(37)) == epochs[0]).all()
    assert not (BlockOrder(37, seed=4)(np.arange(37)) == epochs[0]).all()


class _RecordingShards:
    def __init__(self, shards: PackedBlockShards) -> None:
        self.shards, self.rows = shards, []

    def __len__(self) -> int:
        return len(self.shards)

    def take(self, rows: np.ndarray) -> np.ndarray:
        self.rows.extend(rows.tolist())
        return self.shards.take(rows)


def test_two_processes_read_disjoint_rows_that_make_up_the_one_process_order(tiny_phase1_config, tmp_path):
    config = _pretokenized(tiny_phase1_config, tmp_path / "blocks")
    shards = PackedBlockShards(config["pretokenized"])
    tokenizer = AutoTokenizer.from_pretrained(config["tokenizer"])
    masker = mlm_data.MlmMasker(tokenizer, 0.15, span_masking=False, seed=0)
    order = BlockOrder(len(shards), seed=0)
    steps = 2 * len(shards) // 8 + 1  # 8 blocks per step: crosses two epoch boundaries

    def reader(processes: int, rank: int) -> tuple[mlm_data.ShardMicroBatches, _RecordingShards]:
        recording = _RecordingShards(shards)
        layout = mlm_data.BatchLayout(8, batch_size=4, accum=2 // processes, processes=processes, rank=rank)
        micro = mlm_data.ShardMicroBatches(recording, order, masker, layout)
        return micro, recording

    single, single_rows = reader(1, 0)
    expected = [single[k] for k in range(2 * steps)]
    for start_step in (0, 5):  # a resumed run (at any step, any process count) reads on from there
        ranks = [reader(2, rank) for rank in range(2)]
        for step in range(start_step, steps):
            for rank, (micro, _) in enumerate(ranks):
                inputs, labels = micro[step]
                want_inputs, want_labels = expected[2 * step + rank]
                assert torch.equal(inputs, want_inputs) and torch.equal(labels, want_labels)
        rows = [recording.rows for _, recording in ranks]
        assert len(rows[0]) == len(rows[1]) == 4 * (steps - start_step)
        by_index = {i: r for i, r in enumerate(order(np.arange(start_step * 8, steps * 8)))}
        read_0 = {i for i in by_index if (i // 4) % 2 == 0}  # rank 0 reads rows 0-3 of each step of 8, rank 1 4-7
        assert rows[0] == [by_index[i] for i in sorted(read_0)]
        assert rows[1] == [by_index[i] for i in sorted(set(by_index) - read_0)]
    assert single_rows.rows == order(np.arange(steps * 8)).tolist()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_ddp_from_shards_equals_single_process(tiny_phase1_config, tmp_path):
    config = _pretokenized({**tiny_phase1_config, **RUN, "max_steps": 4, "dataloader_num_workers": 1}, tmp_path / "b")
    single_losses, single_weights = _launch(config, tmp_path, "single", 1)
    ddp_losses, ddp_weights = _launch(config, tmp_path, "ddp", 2)
    assert len(single_losses) == len(ddp_losses) == 4
    assert ddp_losses == single_losses  # bit for bit: the same blocks, the same masks, the same sums
    for name, tensor in single_weights.items():
        assert torch.equal(ddp_weights[name], tensor), name


def test_kill_and_resume_from_shards_equals_an_uninterrupted_run(tiny_phase1_config, tmp_path, phase1_killer):
    config = _pretokenized({**tiny_phase1_config, **RUN}, tmp_path / "blocks")
    straight = phase1.run({**config, "output_dir": str(tmp_path / "straight")})
    assert straight.tokens_per_step == 256

    Killed = phase1_killer.Killed
    phase1_killer.arm()
    interrupted = {**config, "output_dir": str(tmp_path / "interrupted"), "checkpoint_every": 2}
    with pytest.raises(Killed) as killed:
        phase1.run(interrupted)
    assert Path(str(killed.value)).name == "checkpoint-00000002"
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    phase1_killer.disarm()
    resumed = phase1.run({**interrupted, "resume": "auto"})
    assert resumed.first_step == 2 and resumed.losses == straight.losses[2:]
    resumed_weights = load_file(resumed.final_dir / "model.safetensors")
    for name, tensor in load_file(straight.final_dir / "model.safetensors").items():
        assert torch.equal(resumed_weights[name], tensor), name


@pytest.mark.parametrize("path", ["pretokenized", "on_the_fly"])
def test_checkpoint_size_does_not_grow_with_steps(tiny_phase1_config, tmp_path, monkeypatch, path):
    """Checkpoints after N = 2 and 4N = 8 steps (the 40-text corpus is read about 4 times over): the same trainer
    state up to the digits of its counters, and at most one step's unread tokens beside it."""
    config = {**tiny_phase1_config, **RUN, "checkpoint_every": 2, "output_dir": str(tmp_path / "run")}
    if path == "pretokenized":
        config = _pretokenized(config, tmp_path / "blocks")
    sizes = {}
    real_save = common.save_checkpoint

    def save_and_measure(*args, **kwargs):
        folder = real_save(*args, **kwargs)
        state = json.loads((folder / TRAINER_STATE_FILE).read_text())
        buffer = folder / phase1.DATA_BUFFER_FILE
        sizes[state["step"]] = (len(json.dumps(state["data"])), buffer.stat().st_size if buffer.exists() else 0)
        return folder

    monkeypatch.setattr(common, "save_checkpoint", save_and_measure)
    phase1.run(config)
    (data_2, buffer_2), (data_8, buffer_8) = sizes[2], sizes[8]
    assert abs(data_8 - data_2) <= 4, sizes
    assert max(buffer_2, buffer_8) <= 256 * 8 + 128  # int64 tokens of less than one step, plus the .npy header
    assert data_8 < 200, sizes


def test_a_folder_built_for_another_config_is_refused(tiny_phase1_config, tmp_path):
    config = _pretokenized({**tiny_phase1_config, **RUN}, tmp_path / "blocks")
    with pytest.raises(ConfigError, match=r"'seq_len'=16 differs from the pre-tokenised folder .* built with 32"):
        phase1.run({**config, "seq_len": 16, "output_dir": str(tmp_path / "run")})
    with pytest.raises(ConfigError, match=r"'dataloader_num_workers'=-1: must be >= 0"):
        phase1.Phase1Config(**{**config, "dataloader_num_workers": -1})
    with pytest.raises(FileNotFoundError, match=r"nowhere is not a pre-tokenised folder \(manifest.json missing\)"):
        phase1.run({**config, "pretokenized": str(tmp_path / "nowhere"), "output_dir": str(tmp_path / "run")})
    phase1.run({**config, "max_steps": 2, "checkpoint_every": 2, "output_dir": str(tmp_path / "run")})
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    on_the_fly = {**config, "pretokenized": None, "max_steps": 4, "resume": "auto", "output_dir": str(tmp_path / "run")}
    with pytest.raises(ConfigError, match=r"written from pre-tokenised data, this run reads on-the-fly data"):
        phase1.run(on_the_fly)


def test_the_command_line_builds_from_the_phase1_config(tiny_phase1_config, tmp_path):
    """``python -m train.pretokenize --config YAML --output DIR key=value``: the config's data, filters and seed reach
    the blocks (the same blocks as the function called with them), and phase 1 accepts the folder."""
    config_file = tmp_path / "phase1.yaml"
    config_file.write_text(yaml.safe_dump({**tiny_phase1_config, **RUN}))
    pretokenize_main(["--config", str(config_file), "--output", str(tmp_path / "cli"), "--num-proc", "2", "seed=5"])
    config = _pretokenized({**tiny_phase1_config, **RUN, "seed": 5}, tmp_path / "direct")
    cli, direct = PackedBlockShards(tmp_path / "cli"), PackedBlockShards(config["pretokenized"])
    assert cli.manifest == direct.manifest and cli.manifest["seed"] == 5
    assert (cli.take(np.arange(len(cli))) == direct.take(np.arange(len(direct)))).all()
    opened = phase1.open_pretokenized(phase1.Phase1Config(**{**config, "pretokenized": str(tmp_path / "cli")}),
                                      AutoTokenizer.from_pretrained(config["tokenizer"]))  # fmt: skip
    assert len(opened) == len(cli) == cli.manifest["blocks"]
