"""Every command a user runs answers bad input with one ``error: <message>`` line naming it and exit status 1, not a
traceback (``train.common.run_command_line``; phase 1 and 2's config mistakes: tests/test_phase2.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tokenization.train import train_tokenizer

REPO = Path(__file__).resolve().parents[1]
BAD_ROW = {"query": "net revenue 2019", "positive": ""}


def commands(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (arguments after ``python``, the expected last line of stderr)."""
    bad = tmp / "bad_pairs.jsonl"
    return {
        "export": (["-m", "train.export", "--model", str(tmp / "missing"), "--output", str(tmp / "hub")],
                   f"error: {tmp / 'missing' / 'config.json'} not found: --model must be a saved Chroma-MoE folder"),
        "mine_negatives": (["-m", "train.mine_negatives", "--pairs", str(bad), "--output", str(tmp / "mined.jsonl")],
                           f"error: {bad}:1: field 'positive' must be a non-empty string, found ''"),
        "tokenization.train": (["-m", "tokenization.train", "--input", str(tmp / "none.jsonl"), "--output", str(tmp / "tok")],
                               f"error: text dataset file not found: {tmp / 'none.jsonl'}"),
        "tokenization.report": (["-m", "tokenization.report", "--tokenizer", str(tmp / "none"), "--input", str(bad)],
                                f"error: tokenizer folder not found: {tmp / 'none'} (or use 'minilm')"),
        "pretokenize": (["-m", "train.pretokenize", "--config", str(tmp / "phase1.yaml"), "--output", str(tmp / "blocks")],
                        f"error: {tmp / 'phase1.yaml'}: required config key 'tokenizer' is missing"),
        "phase2 data row": ([str(REPO / "train" / "phase2.py"), "--config", str(REPO / "train" / "configs" / "phase2_tiny.yaml"),
                             f"output_dir={tmp / 'run'}", f"tokenizer={tmp / 'tokenizer'}", f"train_sources=[{{path: {bad}, task: bitext}}]",
                             "dev_beir=null"],
                            f"error: {bad}:1: field 'positive' must be a non-empty string, found ''"),
        "phase2 config folder": ([str(REPO / "train" / "phase2.py"), "--config", str(tmp)], f"error: config file not found: {tmp}"),
        "evaluation.run": (["-m", "evaluation.run", "--model", "bm25+", "--task", f"beir:{tmp}", "--output", str(tmp / "r.json")],
                           "error: --model bm25+: expected 'bm25', 'minilm', a sentence-transformers folder, or 'bm25+' and "
                           "'minilm' or a folder; '' is not a folder"),
    }  # fmt: skip


@pytest.mark.parametrize("name", list(commands(Path("/x"))))
def test_bad_input_is_one_error_line_and_exit_status_1(tmp_path: Path, name: str) -> None:
    (tmp_path / "bad_pairs.jsonl").write_text(json.dumps(BAD_ROW) + "\n", encoding="utf-8")
    (tmp_path / "phase1.yaml").write_text(f"output_dir: {tmp_path / 'p1'}\n", encoding="utf-8")
    train_tokenizer([BAD_ROW["query"]] * 3, vocab_size=300, min_frequency=1, show_progress=False).save_pretrained(
        tmp_path / "tokenizer"
    )
    argv, last_line = commands(tmp_path)[name]
    done = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True,
                          env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=300)  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == last_line


def test_a_config_that_is_not_yaml_is_named_with_its_parse_error(tmp_path: Path) -> None:
    from train.common import ConfigError, load_config
    from train.phase2 import Phase2Config

    config = tmp_path / "broken.yaml"
    config.write_text("max_steps: [\n", encoding="utf-8")
    with pytest.raises(ConfigError) as error:
        load_config(Phase2Config, config)
    assert str(error.value) == (
        f"{config}: not valid YAML (while parsing a flow node expected the node content, but found '<stream end>' "
        f'in "{config}", line 2, column 1)'
    )
