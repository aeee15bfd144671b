"""Mine hard negatives for a pair jsonl file, with a positive-aware false-negative filter.

For each query the corpus is scored (BM25 through bm25s, or cosine similarity with a trained SentenceTransformer), the
top ``--top-k`` candidates are walked in rank order, the first ``--skip-top`` of them are skipped (the very top ranks of
a large corpus hold many unlabelled positives), and any candidate scoring at least ``--margin`` × the positive's own
score is dropped as a probable false negative: the "TopK-PercPos" positive-aware mining of NV-Retriever (Moreira et
al. 2024, "NV-Retriever: Improving text embedding models with effective hard-negative mining"), which bounds a
negative's score relative to the positive instead of by an absolute threshold. Candidates scoring <= 0 (for BM25: no
term shared with the query) are not hard negatives and are never taken. Up to ``--num-negatives`` survivors are
appended to the row's existing negatives; every other field of the row is written back unchanged (with ``--model``,
the row's instruction ``task`` is written too).

    python -m train.mine_negatives --pairs IN.jsonl --output OUT.jsonl [--corpus corpus.jsonl|pairs] [--model ST_DIR]
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from train.common import run_command_line
from train.data import format_query, iter_jsonl, pair_from_json, validate_pair_row, write_jsonl

ENCODE_BATCH = 64


def _key(text: str) -> str:
    """Texts that differ only in whitespace are the same document."""
    return " ".join(text.split())


def build_corpus(corpus: str, rows: Sequence[dict[str, Any]]) -> list[str]:
    """Candidate documents, deduplicated: every positive and negative of the pairs (``"pairs"``) or the rows of a
    jsonl corpus (BEIR ``corpus.jsonl`` with title/text, or raw text rows with ``text``). The pairs' positives are
    always added, so each positive is scored by the same index as its candidates."""
    texts: list[str] = []
    if corpus == "pairs":
        for row in rows:
            texts.extend(row["negatives"])
    else:
        for line_no, obj in iter_jsonl(corpus):
            if not isinstance(obj.get("text"), str):
                raise ValueError(f"{corpus}:{line_no}: corpus rows need a string field 'text'")
            title = (obj.get("title") or "").strip()
            texts.append(f"{title} {obj['text']}".strip() if title else obj["text"])  # mteb's title + text
    texts.extend(row["positive"] for row in rows)
    unique: dict[str, str] = {}
    for text in texts:
        unique.setdefault(_key(text), text)
    return [text for key, text in unique.items() if key]


class BM25Scorer:
    """BM25 (bm25s, Lucene variant, English stopwords) over the whole corpus; queries are scored as written."""

    def __init__(self, corpus: list[str]) -> None:
        import bm25s

        self._bm25s = bm25s
        self.retriever = bm25s.BM25()
        self.retriever.index(bm25s.tokenize(corpus, stopwords="en", show_progress=False), show_progress=False)

    def score(self, queries: list[str], tasks: list[str | None]) -> Iterator[np.ndarray]:
        tokens = self._bm25s.tokenize(queries, stopwords="en", return_ids=False, show_progress=False)
        for query_tokens in tokens:
            yield self.retriever.get_scores(query_tokens)  # (n_docs,)


class DenseScorer:
    """Cosine similarity with a SentenceTransformer folder. Each query gets its task's instruction as an ST ``prompt``
    (so the model knows the prompt length and can leave it out of pooling, as in training); documents get none."""

    def __init__(self, corpus: list[str], model_dir: str) -> None:
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(model_dir, device="cpu", trust_remote_code=True)
        self.doc_embeddings = self._encode(corpus, prompt="")  # (n_docs, dim)

    def _encode(self, texts: list[str], prompt: str) -> np.ndarray:
        return self.model.encode(
            texts, prompt=prompt, batch_size=ENCODE_BATCH, normalize_embeddings=True, convert_to_numpy=True
        )

    def score(self, queries: list[str], tasks: list[str | None]) -> Iterator[np.ndarray]:
        query_embeddings = np.zeros((len(queries), self.doc_embeddings.shape[1]), dtype=np.float32)  # (n_q, dim)
        for task in dict.fromkeys(tasks):
            rows = [i for i, row_task in enumerate(tasks) if row_task == task]
            prompt = format_query("", task)[0]  # "Instruction: … Query: "; ST prepends it to each query
            query_embeddings[rows] = self._encode([queries[i] for i in rows], prompt)
        for start in range(0, len(queries), ENCODE_BATCH):
            yield from query_embeddings[start : start + ENCODE_BATCH] @ self.doc_embeddings.T  # each (n_docs,)


@dataclass(frozen=True)
class MiningConfig:
    top_k: int = 30
    skip_top: int = 3
    margin: float = 0.95
    num_negatives: int = 5

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.skip_top < 0 or self.num_negatives < 1:
            raise ValueError(f"need top_k >= 1, skip_top >= 0, num_negatives >= 1; got {self}")
        if not self.margin > 0:
            raise ValueError(f"margin is {self.margin}: it must be > 0 (a fraction of the positive's score)")


def mine_row(
    row: dict[str, Any],
    scores: np.ndarray,
    corpus: list[str],
    index: dict[str, int],
    cfg: MiningConfig,
    counts: Counter,
    judged: frozenset[str] = frozenset(),
) -> list[str]:
    """Negatives mined for one pair row from its score vector (``scores``: (n_docs,)); updates ``counts``. ``judged``:
    keys (``_key``) of documents judged for the query, never taken (another positive is no negative)."""
    positive_key, query_key = _key(row["positive"]), _key(row["query"])
    positive_score = float(scores[index[positive_key]])
    if positive_score <= 0:
        counts["queries_with_positive_score_<=0"] += 1
    known = {_key(text) for text in row["negatives"]}
    candidates = np.argsort(-scores, kind="stable")[: cfg.top_k]
    mined: list[str] = []
    rank = 0
    for doc in candidates:
        score, key = float(scores[doc]), _key(corpus[doc])
        if key in (positive_key, query_key):
            counts["candidate_is_positive_or_query"] += 1
            continue
        if key in judged and key not in known:
            counts["candidate_is_judged"] += 1
            continue
        rank += 1
        if rank <= cfg.skip_top:
            counts["skipped_top_rank"] += 1
        elif score <= 0:
            counts["no_match_score_<=0"] += 1
        elif score >= cfg.margin * positive_score:
            counts["false_negative_filtered"] += 1
        elif key in known:
            counts["already_a_negative"] += 1
        elif len(mined) < cfg.num_negatives:
            mined.append(corpus[doc])
            known.add(key)
    counts["negatives_mined"] += len(mined)
    if len(mined) < cfg.num_negatives:
        counts["queries_with_fewer_than_num_negatives"] += 1
    return mined


def mine(
    rows: list[dict[str, Any]],
    corpus: list[str],
    cfg: MiningConfig,
    *,
    model_dir: str | None = None,
    judged: Sequence[set[str]] | None = None,
) -> tuple[list[dict[str, Any]], Counter]:
    """Return the rows with mined negatives appended, and the counters of what was dropped and why.
    With ``model_dir`` each row needs a ``task`` (see ``read_pair_rows``). ``judged[i]``: texts of the documents judged
    for row i's query, which are never mined (graded qrels: its other positives)."""
    index = {_key(text): position for position, text in enumerate(corpus)}
    scorer = BM25Scorer(corpus) if model_dir is None else DenseScorer(corpus, model_dir)
    counts: Counter = Counter(queries=len(rows), corpus_documents=len(corpus))
    scores = scorer.score([row["query"] for row in rows], [row.get("task") for row in rows])
    keys = [frozenset(_key(text) for text in texts) for texts in judged] if judged is not None else None
    out = []
    for i, (row, row_scores) in enumerate(tqdm(zip(rows, scores), total=len(rows), desc="mining", unit="query")):
        exclude = keys[i] if keys is not None else frozenset()
        out.append({**row, "negatives": list(row["negatives"]) + mine_row(row, row_scores, corpus, index, cfg, counts, exclude)})
    return out, counts


def read_pair_rows(path: str, *, task: str | None, need_task: bool) -> list[dict[str, Any]]:
    """Validated rows of a pair jsonl. When the dense model scores (``need_task``), every row needs an instruction
    task: ``task`` overrides the row's own ``task`` field, and it is written back into the row."""
    rows = []
    for line_no, obj in iter_jsonl(path):
        where = f"{path}:{line_no}"
        validate_pair_row(obj, where)
        row = {**obj, "negatives": list(obj.get("negatives", []))}
        if need_task:
            row["task"] = pair_from_json(obj, where, task).task
        rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> Counter:
    parser = argparse.ArgumentParser(
        prog="python -m train.mine_negatives",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--pairs", required=True, help="input pair jsonl: {query, positive, negatives, ...}")
    parser.add_argument("--output", required=True, help="output pair jsonl (same schema, negatives extended)")
    parser.add_argument(
        "--corpus", default="pairs", help="'pairs' (the pairs' own texts) or a corpus jsonl with 'text'"
    )
    parser.add_argument("--model", default=None, help="SentenceTransformer folder to score with instead of BM25")
    parser.add_argument("--task", default=None, help="instruction task of --model queries (default: each row's 'task')")
    parser.add_argument("--top-k", type=int, default=30, help="candidates examined per query")
    parser.add_argument("--skip-top", type=int, default=3, help="top-ranked candidates skipped (likely positives)")
    parser.add_argument("--margin", type=float, default=0.95, help="drop candidates scoring >= margin x positive")
    parser.add_argument("--num-negatives", type=int, default=5, help="negatives mined per query")
    args = parser.parse_args(argv)

    cfg = MiningConfig(args.top_k, args.skip_top, args.margin, args.num_negatives)
    if not Path(args.pairs).is_file():
        raise FileNotFoundError(f"pairs file not found: {args.pairs}")
    rows = read_pair_rows(args.pairs, task=args.task, need_task=args.model is not None)
    corpus = build_corpus(args.corpus, rows)
    out, counts = mine(rows, corpus, cfg, model_dir=args.model)
    written = write_jsonl(out, args.output)
    print(f"wrote {written} pairs to {args.output}")
    for name, value in counts.items():
        print(f"  {name}: {value}")
    return counts


if __name__ == "__main__":
    run_command_line(main)
