"""Evaluation suite on tiny sets written here: hand-computed IR metrics (graded qrels, ties, empty rankings), ESCI
exact-over-substitute, STS Spearman, probes, bm25 and a tiny random sentence-transformers model end to end through the
CLI, truncation/empty-text counts, clear errors naming file and line, mteb agreement on NDCG@10 and the offline skip."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from evaluation.run import evaluate, main
from evaluation.tasks import (
    exact_over_substitute,
    load_beir,
    load_probe,
    load_sts,
    probe_metrics,
    rank_documents,
    retrieval_metrics,
    sts_spearman,
)

REPO = Path(__file__).resolve().parents[1]
VOCAB = (
    "[PAD] [UNK] [CLS] [SEP] [MASK] the a of in and for what was is red blue green cheap shoe shoes running phone "
    "case cable hdmi usb charger revenue profit loss net income 2018 2019 change quarter bank rate interest cash "
    "bottle water steel man woman child dog cat plays runs eats food guitar piano"
).split()


def write_beir(root: Path, corpus: list[dict], queries: list[dict], qrels: list[tuple[str, str, int]]) -> Path:
    """Write a BEIR folder: corpus.jsonl, queries.jsonl, qrels/test.tsv."""
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps(row) + "\n" for row in corpus))
    (root / "queries.jsonl").write_text("".join(json.dumps(row) + "\n" for row in queries))
    lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{g}" for q, d, g in qrels]
    (root / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def retail_dir(tmp_path_factory) -> Path:
    """Six products, four queries (one has an empty text), graded ESCI-style qrels E=3/S=2/C=1/I=0."""
    corpus = [
        {"_id": "p1", "title": "red running shoes", "text": "cheap red shoe for running"},
        {"_id": "p2", "title": "blue running shoes", "text": "blue shoe"},
        {"_id": "p3", "title": "phone case", "text": "red phone case"},
        {"_id": "p4", "title": "hdmi cable", "text": " ".join(["hdmi cable"] * 30)},  # over 16 tokens
        {"_id": "p5", "title": "usb charger", "text": ""},
        {"_id": "p6", "title": "", "text": "steel water bottle"},
    ]
    queries = [
        {"_id": "q1", "text": "red running shoes"},
        {"_id": "q2", "text": "hdmi cable"},
        {"_id": "q3", "text": "phone charger"},
        {"_id": "q4", "text": ""},
    ]
    qrels = [
        ("q1", "p1", 3), ("q1", "p2", 2), ("q1", "p3", 0), ("q1", "p6", 1),
        ("q2", "p4", 3), ("q2", "p5", 2), ("q2", "p6", 0),
        ("q3", "p3", 2), ("q3", "p5", 3), ("q3", "p1", 0),
        ("q4", "p6", 3), ("q4", "p2", 2),
    ]  # fmt: skip
    return write_beir(tmp_path_factory.mktemp("data") / "retail_toy", corpus, queries, qrels)


@pytest.fixture(scope="module")
def sts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "sts_toy.tsv"
    rows = [
        ("en", "a man plays guitar", "a man plays piano", 3.0),
        ("en", "a dog eats food", "a cat eats food", 2.5),
        ("en", "a child runs", "a child runs", 5.0),
        ("en", "net income was red", "the bank rate", 0.0),
        ("de", "a woman plays piano", "a woman plays piano", 5.0),
        ("de", "the cat", "cheap hdmi cable", 0.0),
        ("de", 'a "dog" runs', "a dog runs", 4.0),  # quoted field, as the shared files quote
    ]
    lines = ["lang\tpair_id\tsentence1\tsentence2\tscore"]
    for i, (lang, first, second, score) in enumerate(rows):
        quoted = f'"{first.replace(chr(34), chr(34) * 2)}"' if '"' in first else first
        lines.append(f"{lang}\tdev-{i}\t{quoted}\t{second}\t{score}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def probe_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "probe_toy.tsv"
    finance = ["net income", "revenue change", "profit and loss", "interest rate", "bank cash", "quarter revenue"]
    retail = ["red shoes", "phone case", "hdmi cable", "usb charger", "water bottle", "running shoe"]
    rows = [f"{text}\tfinance" for text in finance] + [f"{text}\tretail" for text in retail]
    path.write_text("text\tlabel\n" + "\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_st_dir(tmp_path_factory) -> Path:
    """A random-init 1-layer BERT with a WordPiece vocab, mean pooling, prompts, max_seq_length 16."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("tiny_st")
    (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(root / "hf")
    BertTokenizerFast(vocab_file=str(root / "vocab.txt")).save_pretrained(root / "hf")
    transformer = Transformer(str(root / "hf"), max_seq_length=16)
    model = SentenceTransformer(
        modules=[transformer, Pooling(transformer.get_embedding_dimension(), "mean")],
        prompts={"query": "what ", "document": ""},
    )
    model.save(str(root / "st"))
    return root / "st"


def test_metrics_equal_hand_computed_values_on_three_queries():
    """Graded qrels (grades 2/1 and a kept 0), a query with nothing retrieved, linear-gain nDCG."""
    doc_ids = ["d1", "d2", "d3", "d4", "d5"]
    qrels = {
        "q1": {"d1": 2, "d3": 1, "d4": 1},
        "q2": {"d4": 1, "d5": 0},
        "q3": {"d2": 3},
    }
    inf = -np.inf
    scores = np.array(
        [
            [0.5, 0.7, 0.9, inf, inf],  # q1 ranks d3, d2, d1; d4 not retrieved
            [inf, 0.5, inf, 0.1, 0.8],  # q2 ranks d5, d2, d4
            [inf, inf, inf, inf, inf],  # q3 retrieves nothing
        ]
    )
    rankings = rank_documents(scores, doc_ids)
    assert [[doc_ids[i] for i in r] for r in rankings] == [["d3", "d2", "d1"], ["d5", "d2", "d4"], []]
    metrics = retrieval_metrics(qrels, {q: [doc_ids[i] for i in r] for q, r in zip(qrels, rankings)})

    ndcg_q1 = (1 / math.log2(2) + 2 / math.log2(4)) / (2 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4))
    ndcg_q2 = (1 / math.log2(4)) / 1.0
    assert metrics["ndcg@10"] == pytest.approx((ndcg_q1 + ndcg_q2 + 0) / 3, abs=1e-9)
    assert metrics["recall@100"] == pytest.approx((2 / 3 + 1 + 0) / 3, abs=1e-9)
    assert metrics["mrr@10"] == pytest.approx((1 + 1 / 3 + 0) / 3, abs=1e-9)


def test_ties_break_by_doc_id_descending_and_rerank_keeps_all_candidates():
    doc_ids = ["a", "c", "b", "d"]
    scores = np.array([[1.0, 1.0, 1.0, -np.inf]])
    assert [doc_ids[i] for i in rank_documents(scores, doc_ids)[0]] == ["c", "b", "a"]
    reranked = rank_documents(scores, doc_ids, candidates=[np.array([3, 0, 2])])[0]
    assert [doc_ids[i] for i in reranked] == ["b", "a", "d"]  # the -inf candidate is ranked last, not dropped
    with pytest.raises(ValueError, match="NaN"):
        rank_documents(np.array([[np.nan, 1.0, 0.0, 0.0]]), doc_ids)


def test_beir_loader_keeps_grades_counts_and_filters(retail_dir):
    data = load_beir(retail_dir)
    assert data.qrels["q1"] == {"p1": 3, "p2": 2, "p3": 0, "p6": 1}
    assert data.query_ids == ["q1", "q2", "q3", "q4"]
    assert data.doc_texts[0] == "red running shoes cheap red shoe for running"  # title + " " + text, as mteb
    assert data.doc_texts[4] == "usb charger" and data.doc_texts[5] == "steel water bottle"
    assert data.counts["empty_queries"] == 1
    assert data.counts["queries_without_positive"] == 0


def test_exact_over_substitute_hand_computed(retail_dir):
    data = load_beir(retail_dir)
    scores = np.zeros((4, 6))
    scores[0, [0, 1]] = [0.9, 0.1]  # q1: E p1 > S p2 → 1 win of 1
    scores[1, [3, 4]] = [0.2, 0.2]  # q2: E p4 ties S p5 → 0 of 1
    scores[2, [4, 2]] = [0.1, 0.3]  # q3: E p5 < S p3 → 0 of 1
    scores[3, [5, 1]] = [0.5, 0.4]  # q4: E p6 > S p2 → 1 of 1
    assert exact_over_substitute(scores, data, exact_grade=3, substitute_grade=2) == (0.5, 4)


def test_sts_spearman_on_a_toy(sts_file):
    data = load_sts(sts_file)
    assert data.sentences1[6] == 'a "dog" runs'
    predicted = np.array([1.0, 3.0, 2.0, 4.0, 3.0, 2.0, 1.0])
    # en: gold ranks (3, 2, 4, 1) vs predicted ranks (1, 3, 2, 4): d² = 4+1+4+9 = 18 → 1 - 6·18/(4·15) = -0.8
    # de: gold (5, 0, 4) vs predicted (3, 2, 1): ranks (3, 1, 2) vs (3, 2, 1): d² = 0+1+1 → 1 - 6·2/(3·8) = 0.5
    metrics = sts_spearman(predicted, data)
    assert metrics["spearman_en"] == pytest.approx(-0.8)
    assert metrics["spearman_de"] == pytest.approx(0.5)
    assert metrics["spearman"] == pytest.approx(-0.15)


def test_probe_metrics_on_separable_features():
    rng = np.random.default_rng(0)
    labels = ["a"] * 10 + ["b"] * 10
    features = np.concatenate([rng.normal(5, 0.1, (10, 4)), rng.normal(-5, 0.1, (10, 4))])
    metrics = probe_metrics(features, labels, normalize=False)
    assert metrics == {"accuracy": 1.0, "macro_f1": 1.0, "v_measure": pytest.approx(1.0)}


def test_bm25_and_tiny_model_through_the_cli(retail_dir, sts_file, probe_file, tiny_st_dir, tmp_path):
    tasks = [f"beir:{retail_dir}", f"esci:{retail_dir}", f"sts:{sts_file}", f"probe:{probe_file}"]
    output, table, chart = tmp_path / "results.json", tmp_path / "table.md", tmp_path / "chart.png"
    argv = ["--model", "bm25", "--model", str(tiny_st_dir), "--output", str(output)]
    argv += [arg for task in tasks for arg in ("--task", task)] + ["--markdown", str(table), "--plot", str(chart)]
    assert main(argv) == 0
    results = json.loads(output.read_text())
    model = str(tiny_st_dir)
    assert list(results["models"]) == ["bm25", model]
    beir, esci = results["tasks"]["beir:retail_toy"], results["tasks"]["esci:retail_toy"]
    # BM25 on the toy: q1 ranks p1 (E) first; q2 ranks p4 (E) first; q3 ("phone charger") matches p3 and p5 with
    # one term each; q4 is empty and retrieves nothing. MRR@10 counts any grade > 0 as relevant.
    assert beir["bm25"]["mrr@10"] == pytest.approx(3 / 4)
    assert set(esci["bm25"]) == {"ndcg@10", "recall@100", "mrr@10", "exact_over_substitute"}
    assert esci["bm25"]["recall@100"] == 1.0  # re-ranking ranks every judged product, the empty query's too
    assert set(beir[model]) == {"ndcg@10", "recall@100", "mrr@10"}
    assert all(0.0 <= value <= 1.0 for value in beir[model].values())
    assert set(results["tasks"]["sts:sts_toy"][model]) == {"spearman", "spearman_en", "spearman_de"}
    assert set(results["tasks"]["probe:probe_toy"][model]) == {"accuracy", "macro_f1", "v_measure"}
    assert results["tasks"]["sts:sts_toy"]["bm25"] == {}
    assert "skipped" in results["notes"]["sts:sts_toy"]["bm25"]
    # Only p4 (title and text: 62 words) is over the 16-token limit.
    assert results["notes"]["beir:retail_toy"][model]["truncated_documents"] == 1
    assert results["data"]["beir:retail_toy"]["empty_queries"] == 1
    info = results["models"][model]
    assert info["embedding_dim"] == 32 and info["params_total"] == info["params_active"] > 0
    assert info["prompts"] == {"query": "what ", "document": ""}
    assert results["models"]["bm25"]["params_total"] == 0
    assert "| esci:retail_toy | exact_over_substitute |" in table.read_text()
    assert "| sts:sts_toy | spearman | skipped |" in table.read_text()
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluation_is_deterministic(retail_dir, tiny_st_dir):
    first = evaluate([str(tiny_st_dir)], [f"beir:{retail_dir}"])["tasks"]
    second = evaluate([str(tiny_st_dir)], [f"beir:{retail_dir}"])["tasks"]
    assert first == second


def test_mteb_agrees_with_our_ndcg(retail_dir, tiny_st_dir):
    import mteb
    from sentence_transformers import SentenceTransformer

    from evaluation.mteb_tasks import local_retrieval_task

    ours = evaluate([str(tiny_st_dir)], [f"beir:{retail_dir}", f"esci:{retail_dir}"])["tasks"]
    model = SentenceTransformer(str(tiny_st_dir))
    for rerank, task in ((False, "beir:retail_toy"), (True, "esci:retail_toy")):
        result = mteb.evaluate(model, tasks=[local_retrieval_task(retail_dir, rerank=rerank)], cache=None)
        theirs = result.task_results[0].scores["test"][0]["ndcg_at_10"]
        assert theirs == pytest.approx(ours[task][str(tiny_st_dir)]["ndcg@10"], abs=1e-5)  # mteb rounds to 5 places


def test_mteb_task_offline_is_skipped_with_a_message(tiny_st_dir):
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        pytest.skip("needs HF_HUB_OFFLINE=1 (without it mteb retries the Hub for tens of seconds)")
    results = evaluate([str(tiny_st_dir)], ["mteb:SciFact"])
    assert results["tasks"]["mteb:SciFact"][str(tiny_st_dir)] == {}
    assert "HF_HUB_OFFLINE=1" in results["notes"]["mteb:SciFact"][str(tiny_st_dir)]["skipped"]
    with pytest.raises(ValueError, match="mteb:NoSuchTask"):
        evaluate([str(tiny_st_dir)], ["mteb:NoSuchTask"])


def test_chroma_moe_folder_counts_active_parameters_with_its_own_code(tmp_path):
    """A folder with model_type chroma_moe is counted by the folder's modeling_chroma_moe.count_parameters."""
    from configuration_chroma_moe import ChromaMoeConfig
    from evaluation.models import chroma_parameter_counts
    from modeling_chroma_moe import AUTO_MAP, count_parameters

    config = ChromaMoeConfig.from_preset("chroma-moe-tiny")
    config.auto_map = dict(AUTO_MAP)
    config.save_pretrained(tmp_path)
    for name in ("configuration_chroma_moe.py", "modeling_chroma_moe.py", "quantization_chroma_moe.py"):
        shutil.copyfile(REPO / name, tmp_path / name)
    expected = count_parameters(config)
    assert chroma_parameter_counts(tmp_path) == (expected["total"], expected["active"])
    assert expected["active"] < expected["total"]


def test_missing_files_and_bad_rows_name_file_and_line(retail_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_beir(tmp_path / "nowhere")
    broken = write_beir(tmp_path / "broken", [{"_id": "d1", "text": "x"}], [{"_id": "q1", "text": "y"}], [])
    (broken / "qrels" / "test.tsv").unlink()
    with pytest.raises(FileNotFoundError, match=r"qrels/test\.tsv"):
        load_beir(broken)

    bad_json = write_beir(tmp_path / "bad_json", [{"_id": "d1", "text": "x"}], [{"_id": "q1", "text": "y"}], [])
    (bad_json / "corpus.jsonl").write_text('{"_id": "d1", "text": "x"}\n{"_id": "d2", "text": 7}\n')
    with pytest.raises(ValueError, match=r"corpus\.jsonl:2: field 'text' must be a string"):
        load_beir(bad_json)

    bad_grade = write_beir(
        tmp_path / "bad_grade", [{"_id": "d1", "text": "x"}], [{"_id": "q1", "text": "y"}], [("q1", "d1", "high")]
    )
    with pytest.raises(ValueError, match=r"test\.tsv:2: field 'score' must be an integer, got 'high'"):
        load_beir(bad_grade)
    unknown = write_beir(
        tmp_path / "unknown", [{"_id": "d1", "text": "x"}], [{"_id": "q1", "text": "y"}], [("q1", "d9", 1)]
    )
    with pytest.raises(ValueError, match=r"test\.tsv:2: corpus-id 'd9' is not in corpus\.jsonl"):
        load_beir(unknown)

    sts = tmp_path / "sts.tsv"
    sts.write_text("lang\tsentence1\tsentence2\tscore\nen\ta\tb\t1\nen\ta\tb\tfive\n")
    with pytest.raises(ValueError, match=r"sts\.tsv:3: field 'score' must be a number, got 'five'"):
        load_sts(sts)
    probe = tmp_path / "probe.tsv"
    probe.write_text("text\tlabel\na\tx\nb\tx\nc\ty\n")
    with pytest.raises(ValueError, match=r"probe\.tsv: label\(s\) \['y'\] have fewer than 2 examples"):
        load_probe(probe)
    with pytest.raises(ValueError, match="KIND:TARGET"):
        evaluate(["bm25"], ["trec:whatever"])
    binary = write_beir(
        tmp_path / "binary", [{"_id": "d1", "text": "x"}], [{"_id": "q1", "text": "y"}], [("q1", "d1", 1)]
    )
    with pytest.raises(ValueError, match=r"test\.tsv: grades \[1\] match no ESCI encoding"):
        evaluate(["bm25"], [f"esci:{binary}"])
