"""Task data loaders and metrics for the evaluation suite.

Every loader validates its file row by row and raises ``ValueError`` naming the file, the line and the field when a
row breaks the schema, or ``FileNotFoundError`` naming the missing path: a bad benchmark file must stop the run, not
shift the numbers. Texts that are empty are kept (encoded as ``""``) and counted, so the count can be reported.

Metrics come from maintained libraries, never hand formulas: ranx for IR metrics (Bassani, "ranx: A Blazing-Fast
Python Library for Ranking Evaluation and Comparison", ECIR 2022), ``scipy.stats.spearmanr`` for STS and scikit-learn
for the probes.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

RETRIEVAL_METRICS: tuple[str, ...] = ("ndcg@10", "recall@100", "mrr@10")
TOP_K = 100
SEED = 0
QRELS_HEADER = ["query-id", "corpus-id", "score"]
STS_COLUMNS = ("lang", "sentence1", "sentence2", "score")
PROBE_COLUMNS = ("text", "label")
# ESCI (Reddy et al., "Shopping Queries Dataset", 2022) labels Exact/Substitute/Complement/Irrelevant. Shared copies
# store them either as graded qrels E=3/S=2/C=1/I=0 or as the official gains 1/0.1/0.01/0 times 100.
ESCI_GRADE_SCHEMES: dict[str, dict[str, int]] = {
    "E=3 S=2 C=1 I=0": {"E": 3, "S": 2, "C": 1, "I": 0},
    "E=100 S=10 C=1 I=0": {"E": 100, "S": 10, "C": 1, "I": 0},
}


@dataclass
class RetrievalSet:
    """A BEIR-layout retrieval set, reduced to the queries that can be scored.

    ``query_ids`` holds only queries with at least one judgment of grade > 0 (as trec_eval and mteb do, a query with
    nothing relevant has no defined nDCG); ``qrels`` keeps every grade of those queries exactly as given.
    """

    name: str
    doc_ids: list[str]
    doc_texts: list[str]
    query_ids: list[str]
    query_texts: list[str]
    qrels: dict[str, dict[str, int]]
    counts: dict[str, int]


@dataclass
class StsSet:
    """Sentence pairs with a gold similarity score and a language tag per pair."""

    name: str
    langs: list[str]
    sentences1: list[str]
    sentences2: list[str]
    scores: np.ndarray  # [N] float64
    counts: dict[str, int]


@dataclass
class ProbeSet:
    """Texts with a class label, for linear probes and clustering on frozen embeddings."""

    name: str
    texts: list[str]
    labels: list[str]
    counts: dict[str, int]


def _is_empty(text: str) -> bool:
    return not text.strip()


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found")


def iter_jsonl(
    path: str | Path, required: Sequence[str] = (), optional: Sequence[str] = ()
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(1-based line number, object)`` for each line of a jsonl file: the one reader of every jsonl file the
    project reads (training sources, pair files, BEIR corpora and queries, mined negatives).

    Blank and whitespace-only lines are skipped (a trailing empty line is common and carries no row); line numbers
    still count them. ``FileNotFoundError`` for a missing file; ``ValueError`` naming file and line for invalid JSON,
    a line that is not an object, a missing ``required`` field, a ``required``/``optional`` field that is not a
    string, or an empty ``_id`` when ``_id`` is required.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"jsonl file not found: {file}")
    with file.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{file}:{line_no}: invalid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{file}:{line_no}: expected a JSON object, got {type(record).__name__}")
            for field in required:
                if field not in record:
                    raise ValueError(f"{file}:{line_no}: missing field {field!r}")
            for field in (*required, *optional):
                if field in record and not isinstance(record[field], str):
                    raise ValueError(f"{file}:{line_no}: field {field!r} must be a string, got {record[field]!r}")
            if "_id" in required and not record["_id"]:
                raise ValueError(f"{file}:{line_no}: field '_id' is empty")
            yield line_no, record


def _read_texts_by_id(path: Path, with_title: bool) -> dict[str, str]:
    """Map ``_id`` to the text a model reads.

    A document is ``title + " " + text`` when it has a title, exactly as mteb builds it
    (``mteb/_create_dataloaders.py``), so our numbers and mteb's see the same input.
    """
    texts: dict[str, str] = {}
    for line_no, record in iter_jsonl(path, ("_id", "text"), ("title",) if with_title else ()):
        if record["_id"] in texts:
            raise ValueError(f"{path}:{line_no}: duplicate _id {record['_id']!r}")
        title = record.get("title", "") if with_title else ""
        texts[record["_id"]] = (title + " " + record["text"]).strip() if title else record["text"]
    return texts


def _read_qrels(path: Path, queries: dict[str, str], documents: dict[str, str]) -> dict[str, dict[str, int]]:
    """Read ``query-id  corpus-id  score`` rows; every id must exist and every grade must be an integer."""
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t")
        header = next(reader, None)
        if header != QRELS_HEADER:
            raise ValueError(f"{path}:1: header must be {QRELS_HEADER} (tab-separated), got {header!r}")
        for row in reader:
            line_no = reader.line_num
            if len(row) != 3:
                raise ValueError(f"{path}:{line_no}: expected 3 tab-separated fields, got {len(row)}: {row!r}")
            query_id, doc_id, grade_text = row
            try:
                grade = int(grade_text)
            except ValueError:
                raise ValueError(f"{path}:{line_no}: field 'score' must be an integer, got {grade_text!r}") from None
            if query_id not in queries:
                raise ValueError(f"{path}:{line_no}: query-id {query_id!r} is not in queries.jsonl")
            if doc_id not in documents:
                raise ValueError(f"{path}:{line_no}: corpus-id {doc_id!r} is not in corpus.jsonl")
            judged = qrels.setdefault(query_id, {})
            if doc_id in judged:
                raise ValueError(f"{path}:{line_no}: duplicate judgment for ({query_id!r}, {doc_id!r})")
            judged[doc_id] = grade
    if not qrels:
        raise ValueError(f"{path}: no judgments")
    return qrels


def load_beir(directory: str | Path) -> RetrievalSet:
    """Load ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/test.tsv`` from a BEIR folder (Thakur et al., 2021)."""
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: BEIR folder not found")
    corpus_path, queries_path, qrels_path = root / "corpus.jsonl", root / "queries.jsonl", root / "qrels" / "test.tsv"
    for path in (corpus_path, queries_path, qrels_path):
        _require_file(path, "BEIR file")
    documents = _read_texts_by_id(corpus_path, with_title=True)
    queries = _read_texts_by_id(queries_path, with_title=False)
    all_qrels = _read_qrels(qrels_path, queries, documents)
    # Keep the file's query order so runs are reproducible line for line.
    query_ids = [qid for qid in queries if any(grade > 0 for grade in all_qrels.get(qid, {}).values())]
    counts = {
        "documents": len(documents),
        "queries_in_file": len(queries),
        "queries_evaluated": len(query_ids),
        "queries_without_qrels": sum(qid not in all_qrels for qid in queries),
        "queries_without_positive": sum(qid in all_qrels for qid in queries) - len(query_ids),
        "empty_queries": sum(_is_empty(queries[qid]) for qid in query_ids),
        "empty_documents": sum(_is_empty(text) for text in documents.values()),
    }
    return RetrievalSet(
        name=root.name,
        doc_ids=list(documents),
        doc_texts=list(documents.values()),
        query_ids=query_ids,
        query_texts=[queries[qid] for qid in query_ids],
        qrels={qid: all_qrels[qid] for qid in query_ids},
        counts=counts,
    )


def esci_grade_scheme(data: RetrievalSet, directory: str | Path) -> tuple[str, dict[str, int]]:
    """Recognise which ESCI grade encoding a set uses from the grades present in its qrels."""
    grades = {grade for judged in data.qrels.values() for grade in judged.values()}
    for scheme_name, scheme in ESCI_GRADE_SCHEMES.items():
        if grades <= set(scheme.values()) and scheme["E"] in grades:
            if not any(
                scheme["E"] in judged.values() and scheme["S"] in judged.values() for judged in data.qrels.values()
            ):
                raise ValueError(f"{directory}: no query has both an Exact and a Substitute product")
            return scheme_name, scheme
    raise ValueError(
        f"{Path(directory) / 'qrels' / 'test.tsv'}: grades {sorted(grades)} match no ESCI encoding "
        f"({'; '.join(ESCI_GRADE_SCHEMES)})"
    )


def _read_tsv(path: Path, columns: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield ``(line number, row)`` from a tab-separated file with a header (Excel quoting, as the shared files use)."""
    _require_file(path, "TSV file")
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        header = reader.fieldnames or []
        missing = [column for column in columns if column not in header]
        if missing:
            raise ValueError(f"{path}:1: header lacks column(s) {missing}; it has {header}")
        for row in reader:
            line_no = reader.line_num
            if None in row or any(value is None for value in row.values()):
                raise ValueError(f"{path}:{line_no}: expected {len(header)} tab-separated fields")
            yield line_no, row


def _require_two_each(path: Path, counts: Counter, what: str, reason: str) -> None:
    """Raise naming every group (language, label) with fewer than two rows."""
    rare = sorted(key for key, n in counts.items() if n < 2)
    if rare:
        raise ValueError(f"{path}: {what} {rare} have fewer than 2 {reason}")


def load_sts(path: str | Path) -> StsSet:
    """Load an STS file with columns ``lang``, ``sentence1``, ``sentence2`` and a finite ``score``."""
    path = Path(path)
    langs: list[str] = []
    first: list[str] = []
    second: list[str] = []
    gold: list[float] = []
    for line_no, row in _read_tsv(path, STS_COLUMNS):
        try:
            score = float(row["score"])
        except ValueError:
            raise ValueError(f"{path}:{line_no}: field 'score' must be a number, got {row['score']!r}") from None
        if not math.isfinite(score):
            raise ValueError(f"{path}:{line_no}: field 'score' must be finite, got {row['score']!r}")
        if not row["lang"]:
            raise ValueError(f"{path}:{line_no}: field 'lang' is empty")
        langs.append(row["lang"])
        first.append(row["sentence1"])
        second.append(row["sentence2"])
        gold.append(score)
    pairs_per_lang = Counter(langs)
    if not pairs_per_lang:
        raise ValueError(f"{path}: no sentence pairs")
    _require_two_each(path, pairs_per_lang, "language(s)", "pairs; Spearman needs at least 2")
    return StsSet(
        name=path.stem,
        langs=langs,
        sentences1=first,
        sentences2=second,
        scores=np.asarray(gold, dtype=np.float64),
        counts={
            "pairs": len(gold),
            "languages": len(pairs_per_lang),
            "empty_sentences": sum(_is_empty(text) for text in first + second),
        },
    )


def load_probe(path: str | Path) -> ProbeSet:
    """Load a probe file: TSV with a header holding ``text`` and ``label`` columns.

    Stratified cross-validation needs two examples of every label, so a rarer label is an error naming it.
    """
    path = Path(path)
    texts: list[str] = []
    labels: list[str] = []
    for line_no, row in _read_tsv(path, PROBE_COLUMNS):
        if not row["label"]:
            raise ValueError(f"{path}:{line_no}: field 'label' is empty")
        texts.append(row["text"])
        labels.append(row["label"])
    per_label = Counter(labels)
    if len(per_label) < 2:
        raise ValueError(f"{path}: a probe needs at least 2 labels, found {sorted(per_label)}")
    _require_two_each(path, per_label, "label(s)", "examples; cross-validation needs 2")
    return ProbeSet(
        name=path.stem,
        texts=texts,
        labels=labels,
        counts={"examples": len(texts), "labels": len(per_label), "empty_texts": sum(map(_is_empty, texts))},
    )


def rank_documents(
    scores: np.ndarray, doc_ids: Sequence[str], candidates: Sequence[np.ndarray] | None = None, k: int = TOP_K
) -> list[np.ndarray]:
    """Indices of the top-``k`` documents per query, best first.

    Ties are broken by document id, descending, as trec_eval and pytrec_eval do (mteb follows them), so a run does
    not depend on sort stability. In full retrieval a score of ``-inf`` means "not retrieved" (BM25 uses it for
    documents sharing no term with the query, as an inverted index would not return them). With ``candidates``
    (re-ranking), each query ranks exactly its candidate documents, every one of them, ``-inf`` last.
    """
    if np.isnan(scores).any():
        bad = int(np.flatnonzero(np.isnan(scores).any(axis=1))[0])
        raise ValueError(f"the model produced NaN scores (first for query #{bad})")
    tie_rank = np.empty(len(doc_ids), dtype=np.int64)  # [D], 0 = largest id
    tie_rank[np.argsort(np.asarray(doc_ids, dtype=object))[::-1]] = np.arange(len(doc_ids))
    rankings: list[np.ndarray] = []
    if candidates is not None:
        for row, pool in zip(scores, candidates):
            order = np.lexsort((tie_rank[pool], -row[pool]))[:k]  # [<=k]
            rankings.append(pool[order])
        return rankings
    chunk = 1024  # bounds the [chunk, D] sort buffers
    for start in range(0, scores.shape[0], chunk):
        block = scores[start : start + chunk]  # [b, D]
        order = np.lexsort((np.broadcast_to(tie_rank, block.shape), -block), axis=-1)[:, :k]  # [b, k]
        top = np.take_along_axis(block, order, axis=-1)  # [b, k]
        rankings.extend(row_order[np.isfinite(row_top)] for row_order, row_top in zip(order, top))
    return rankings


def retrieval_metrics(qrels: dict[str, dict[str, int]], rankings: dict[str, list[str]]) -> dict[str, float]:
    """nDCG@10 (linear gain = grade, as trec_eval/pytrec_eval/BEIR), Recall@100 and MRR@10 from ranx, mean over qrels.

    ranx sorts a run with an unstable sort, so each document gets a pseudo-score that is strictly decreasing in our
    tie-broken rank; the ranking ranx evaluates is then exactly ours. Grades > 0 count as relevant. A query with an
    empty ranking scores 0 on all three metrics by their definitions; ranx cannot take an empty ranking, so those
    zeros are added to the mean here. Plain dicts go to ranx (its ``Qrels``/``Run`` objects cost seconds of numba
    compilation per process); it pairs them by position, so both are built in the same query order.
    """
    import ranx
    from numba.core.errors import NumbaTypeSafetyWarning

    scored = [qid for qid in qrels if rankings.get(qid)]
    if not scored:
        return dict.fromkeys(RETRIEVAL_METRICS, 0.0)
    run = {qid: {doc: float(len(rankings[qid]) - rank) for rank, doc in enumerate(rankings[qid])} for qid in scored}
    with warnings.catch_warnings():
        # ranx casts hashed ids inside numba and warns on every call; the cast does not affect the metric values.
        warnings.simplefilter("ignore", NumbaTypeSafetyWarning)
        per_query = ranx.evaluate({qid: qrels[qid] for qid in scored}, run, list(RETRIEVAL_METRICS), return_mean=False)
    return {metric: float(np.sum(per_query[metric]) / len(qrels)) for metric in RETRIEVAL_METRICS}


def exact_over_substitute(
    scores: np.ndarray,
    data: RetrievalSet,
    exact_grade: int,
    substitute_grade: int,
) -> tuple[float, int]:
    """Share of (Exact, Substitute) product pairs of a query where the Exact product scores strictly higher.

    Micro-averaged: pooled over all pairs of all queries, so a query counts in proportion to its pairs. A tie counts
    as a miss. Returns the share and the number of pairs.
    """
    doc_index = {doc_id: i for i, doc_id in enumerate(data.doc_ids)}
    wins = pairs = 0
    for row, qid in zip(scores, data.query_ids):
        judged = data.qrels[qid]
        exact = row[[doc_index[d] for d, grade in judged.items() if grade == exact_grade]]  # [E]
        substitute = row[[doc_index[d] for d, grade in judged.items() if grade == substitute_grade]]  # [S]
        wins += int((exact[:, None] > substitute[None, :]).sum())
        pairs += exact.size * substitute.size
    return wins / pairs, pairs


def sts_spearman(predicted: np.ndarray, data: StsSet) -> dict[str, float]:
    """Spearman correlation between model and gold scores per language (``spearman_<lang>``) and their mean."""
    from scipy.stats import spearmanr

    langs = np.asarray(data.langs)
    metrics = {
        f"spearman_{lang}": float(spearmanr(predicted[langs == lang], data.scores[langs == lang]).statistic)
        for lang in dict.fromkeys(data.langs)
    }
    return {"spearman": float(np.mean(list(metrics.values()))), **metrics}


def probe_metrics(embeddings: np.ndarray, labels: Sequence[str], normalize: bool) -> dict[str, float]:
    """Frozen-feature probe: cross-validated logistic regression and k-means V-measure.

    Logistic regression on frozen embeddings is the linear-probe protocol of MTEB classification (Muennighoff et al.,
    2023); k-means with k = number of labels scored by V-measure (Rosenberg & Hirschberg, 2007) follows its clustering
    task. With a cosine model the embeddings are L2-normalised first, so k-means' Euclidean distance orders points as
    the model's similarity does. Folds: stratified, ``min(5, rarest label count)``, shuffled with a fixed seed.
    """
    from sklearn.cluster import KMeans
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import v_measure_score
    from sklearn.model_selection import StratifiedKFold, cross_validate

    features = np.asarray(embeddings, dtype=np.float64)  # [N, dim]
    if normalize:
        features = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    y = np.asarray(labels)
    folds = StratifiedKFold(n_splits=min(5, min(Counter(labels).values())), shuffle=True, random_state=SEED)
    cv = cross_validate(LogisticRegression(max_iter=1000), features, y, cv=folds, scoring=("accuracy", "f1_macro"))
    clusters = KMeans(n_clusters=len(set(labels)), n_init=10, random_state=SEED).fit_predict(features)
    return {
        "accuracy": float(np.mean(cv["test_accuracy"])),
        "macro_f1": float(np.mean(cv["test_f1_macro"])),
        "v_measure": float(v_measure_score(y, clusters)),
    }
