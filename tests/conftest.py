"""Fixtures shared by the multi-process phase-1 tests (DDP, DeepSpeed)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tokenization.train import train_tokenizer


def _texts(count: int, seed: int) -> list[str]:
    """Seeded pseudo-words: a corpus any tokenizer and tiny model handle in seconds."""
    rng = random.Random(seed)
    words = [rng.choice("bcdfgklmnprstv") + rng.choice("aeiou") + rng.choice("nrst") for _ in range(120)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(6, 14))) + "." for _ in range(count)]


@pytest.fixture
def tiny_phase1_config(tmp_path: Path) -> dict:
    """The keys every tiny multi-process phase-1 run shares: a 512-token BPE and a 40-text corpus in `tmp_path`, the
    tiny preset sized to that tokenizer, 32-token blocks of 4 per micro-batch. Tests add batch, steps and output."""
    tokenizer = train_tokenizer(_texts(300, seed=0), vocab_size=512, show_progress=False)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in _texts(40, seed=1)))
    return {
        "tokenizer": str(tmp_path / "tokenizer"),
        "data": [{"spec": str(corpus)}],
        "model": {"preset": "chroma-moe-tiny", "norm_topk_prob": True, "vocab_size": len(tokenizer)},
        "min_chars": 1,
        "seq_len": 32,
        "per_device_batch_size": 4,
    }


class KilledAfterCheckpoint(Exception):
    """A phase-1 run stopped right after writing a checkpoint, as a killed process would; the message is its path."""


class Phase1Killer:
    """`arm()` makes every phase-1 checkpoint save raise `KilledAfterCheckpoint(path)` once the checkpoint is written;
    `disarm()` restores the real save."""

    Killed = KilledAfterCheckpoint

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from train import common  # the trainer calls common.save_checkpoint through the module

        self._common, self._monkeypatch, self._real_save = common, monkeypatch, common.save_checkpoint

    def _save_then_die(self, *args, **kwargs):
        raise KilledAfterCheckpoint(self._real_save(*args, **kwargs))

    def arm(self) -> None:
        self._monkeypatch.setattr(self._common, "save_checkpoint", self._save_then_die)

    def disarm(self) -> None:
        self._monkeypatch.setattr(self._common, "save_checkpoint", self._real_save)


@pytest.fixture
def phase1_killer(monkeypatch: pytest.MonkeyPatch) -> Phase1Killer:
    return Phase1Killer(monkeypatch)
