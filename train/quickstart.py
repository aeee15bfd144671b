"""The main job in one command: tokenizer → phase 1 → phase 2 → evaluation → export, on the bundled sample by default.

    python -m train.quickstart [--output runs/quickstart] [--data-dir DIR] [--budget-minutes N] [--config YAML]

Stages, each through the code its own command runs (no second implementation):

1. tokenizer: ``tokenization.train.main`` (byte-level BPE) on the kinds of text in ``tokenizer.text``: raw text, pair
   files, STS train sentences and retrieval corpora (their held-out fifth left out), languages resampled to n^α shares;
2. phase 1: ``train.phase1.run`` (masked-LM pretraining of chroma-moe-small), the function behind
   ``accelerate launch train/phase1.py``;
3. phase 2: ``train.phase2.train`` (contrastive instruction tuning with GradCache, distilling the configured teacher)
   from phase 1's model, the function behind ``accelerate launch train/phase2.py``;
4. evaluation: ``evaluation.run.main`` on the data folder's dev sets (and a fixed per-language sample of its STS dev
   file), for the trained model, the same architecture at its random initialisation, the ``bm25`` / ``minilm``
   baselines and ``bm25+`` the trained model (reciprocal-rank fusion); the trained and untrained folders truncate at
   ``evaluation.serving_length`` tokens, the length the Hub folder serves at, so the table measures what a user gets;
5. export: ``train.export.export`` writes the Hub folder (``max_seq_length`` = ``evaluation.serving_length``), with the
   evaluation table in its model card.

The phase configs are ``phase1`` / ``phase2`` of ``train/configs/quickstart.yaml`` with the run-dependent keys filled
in; they are written to ``<output>/configs/`` so any phase can be re-run alone (or on a GPU cluster) with
``accelerate launch``. ``--budget-minutes`` sets the phases' step counts from the step rates in the config's ``budget``
section (measured on a 2-core CPU). On failure the command names the stage, the error and the command that re-runs it.

Data folder layouts (both may be mixed in one folder):

- the sample's (``data/sample/``): ``raw_*.jsonl`` ({"text"}), ``pairs*.jsonl`` ({"query", "positive", "negatives",
  "task"}) and ``dev/`` (BEIR), a dev set whose queries are evaluated whole and never trained on (the tokenizer reads
  four fifths of its corpus, as it does every retrieval corpus);
- the shared folder's (``../shared/data``): ``raw/*.jsonl``, ``pairs/*.jsonl``, ``sts/*.tsv`` and ``retrieval/<name>/``
  (BEIR). A retrieval set is split by query (``train.data.split_beir_queries``, grouped by relevant document): the train
  side becomes phase-2 pairs, the held-out side is evaluated, so no evaluated query or its answer is trained on; a set
  marked ``train: false`` in the config is evaluated only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from configuration_chroma_moe import PRESETS, ChromaMoeConfig
from train.common import ConfigError, config_from_dict, expand_path
from train.data import INSTRUCTIONS, iter_jsonl, write_heldout_beir, write_jsonl

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "train" / "configs" / "quickstart.yaml"
RETRIEVAL_SET_KEYS = frozenset({"task", "kind", "train", "bm25_negatives"})
DEFAULT_DATA_DIR = REPO_ROOT / "data" / "sample"
CONFIG_KEYS = ("tokenizer", "phase1", "phase2", "default_pair_task", "pair_tasks", "max_pairs_per_source",
               "retrieval_sets", "evaluation", "budget")  # fmt: skip
TOKENIZER_KEYS = ("vocab_size", "language_alpha", "text")
TOKENIZER_TEXT = ("raw", "pairs", "sts", "corpora")
EVALUATION_KEYS = ("baselines", "untrained", "hybrid", "sts_pairs_per_language", "serving_length")
BUDGET_KEYS = ("default_minutes", "phase1_share", "phase2_share", "phase1_steps_per_minute",
               "phase2_steps_per_minute", "warmup_fraction", "min_steps")  # fmt: skip
EVAL_KINDS = ("beir", "esci")
MODEL_LABELS = {"bm25": "bm25", "minilm": "all-MiniLM-L6-v2"}
HEADLINE_METRICS = ("ndcg@10", "recall@100", "mrr@10", "spearman")

T = TypeVar("T")


class StageFailed(RuntimeError):
    """A stage raised: carries the stage's name and the command that re-runs it alone."""

    def __init__(self, stage: str, rerun: str | None, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.stage, self.rerun = stage, rerun


# --------------------------------------------------------------------------------------------------------------------
# Config and data discovery.
# --------------------------------------------------------------------------------------------------------------------


def load_quickstart_config(path: str | Path) -> dict[str, Any]:
    """The quickstart YAML as a mapping, with its top-level and ``budget`` keys checked."""
    with open(path, encoding="utf-8") as handle:
        config = yaml.safe_load(handle)
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a YAML mapping")
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    missing = sorted(set(CONFIG_KEYS) - set(config))
    if unknown or missing:
        raise ConfigError(f"{path}: unknown key(s) {unknown}, missing key(s) {missing}; expected {list(CONFIG_KEYS)}")
    for section, keys in (("tokenizer", TOKENIZER_KEYS), ("evaluation", EVALUATION_KEYS), ("budget", BUDGET_KEYS)):
        if not isinstance(config[section], dict) or sorted(config[section]) != sorted(keys):
            raise ConfigError(f"{path}: '{section}' must have exactly the keys {list(keys)}, got {config[section]!r}")
    text = config["tokenizer"]["text"]
    if not isinstance(text, list) or not text or not set(text) <= set(TOKENIZER_TEXT):
        raise ConfigError(f"{path}: tokenizer.text={text!r}: expected a non-empty list of {list(TOKENIZER_TEXT)}")
    serving = config["evaluation"]["serving_length"]
    if isinstance(serving, bool) or not isinstance(serving, int) or serving <= 0:
        raise ConfigError(f"{path}: evaluation.serving_length={serving!r}: expected a positive number of tokens")
    model = config["phase1"].get("model") or {}
    preset = model.get("preset")
    positions = model.get("max_position_embeddings") or (
        ChromaMoeConfig.from_preset(preset).max_position_embeddings if isinstance(preset, str) and preset in PRESETS else None
    )
    if positions is not None and serving > positions:  # else (init_from) the export checks it
        raise ConfigError(f"{path}: evaluation.serving_length={serving}: must be at most the model's "
                          f"max_position_embeddings={positions} (phase1.model)")  # fmt: skip
    budget = config["budget"]
    if budget["phase1_share"] + budget["phase2_share"] >= 1:
        raise ConfigError(f"{path}: budget.phase1_share + budget.phase2_share must be < 1 (the rest of the budget is for the tokenizer, teacher encoding and export)")
    for name, spec in config["retrieval_sets"].items():
        mined = spec.get("bm25_negatives", 0) if isinstance(spec, dict) else None
        unknown = sorted(set(spec) - RETRIEVAL_SET_KEYS) if isinstance(spec, dict) else []
        if (not isinstance(spec, dict) or unknown or spec.get("task") not in INSTRUCTIONS
                or spec.get("kind", "beir") not in EVAL_KINDS or not isinstance(spec.get("train", True), bool)
                or isinstance(mined, bool) or not isinstance(mined, int) or mined < 0):  # fmt: skip
            named = f"unknown key(s) {unknown}; " if unknown else ""
            raise ConfigError(f"{path}: retrieval_sets.{name}={spec!r}: {named}keys {sorted(RETRIEVAL_SET_KEYS)}; task one of "
                              f"{sorted(INSTRUCTIONS)}, kind one of {EVAL_KINDS}, train true or false, bm25_negatives "
                              "an integer >= 0")  # fmt: skip
        if mined and spec.get("train") is False:
            raise ConfigError(f"{path}: retrieval_sets.{name}: bm25_negatives={mined} mines negatives for training, but the "
                              "set has train: false (evaluation only)")  # fmt: skip
    return config


def _is_beir(folder: Path) -> bool:
    return (folder / "corpus.jsonl").is_file() and (folder / "queries.jsonl").is_file()


@dataclass
class DataFolder:
    """What a data folder holds (see the module docstring for the two layouts)."""

    root: Path
    raw: list[Path]
    pairs: list[Path]
    dev_sets: list[Path]  # evaluated whole
    split_sets: list[Path] = field(default_factory=list)  # train side → pairs, held-out side → evaluated
    sts_train: list[Path] = field(default_factory=list)  # sts/*train*.tsv: tokenizer text only
    sts_dev: list[Path] = field(default_factory=list)  # sts/*dev*.tsv: evaluated (a seeded sample per language)


def find_data(data_dir: str | Path) -> DataFolder:
    """Find raw text, pair files and retrieval sets in either layout; a folder missing one of them is an error that
    lists what was looked for."""
    root = Path(expand_path(str(data_dir))).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} not found")
    retrieval = root / "retrieval"
    found = DataFolder(
        root=root,
        raw=sorted(root.glob("raw_*.jsonl")) + sorted((root / "raw").glob("*.jsonl")),
        pairs=sorted(root.glob("pairs*.jsonl")) + sorted((root / "pairs").glob("*.jsonl")),
        dev_sets=[root / "dev"] if _is_beir(root / "dev") else [],
        split_sets=sorted(d for d in retrieval.iterdir() if _is_beir(d)) if retrieval.is_dir() else [],
        sts_train=sorted((root / "sts").glob("*train*.tsv")),
        sts_dev=sorted((root / "sts").glob("*dev*.tsv")),
    )
    problems = [
        what
        for what, present in (
            ("raw text (raw_*.jsonl or raw/*.jsonl)", found.raw),
            ("phase-2 pairs (pairs*.jsonl, pairs/*.jsonl or retrieval/<name>/ BEIR sets)", found.pairs or found.split_sets),
            ("a dev set (dev/ or retrieval/<name>/ with corpus.jsonl, queries.jsonl, qrels/test.tsv)", found.dev_sets or found.split_sets),
        )
        if not present
    ]
    if problems:
        raise FileNotFoundError(f"data folder {root} has no " + "; no ".join(problems))
    return found


def count_lines(path: Path) -> int:
    """Non-blank lines of a jsonl file: the records phase 1's mixture draws from it."""
    with path.open(encoding="utf-8") as handle:
        return sum(1 for line in handle if line.strip())


def pair_sources(pair_files: list[Path], config: Mapping[str, Any], work_dir: Path) -> list[dict[str, Any]]:
    """Phase-2 ``train_sources`` entries for the pair files.

    A phase-2 source has one instruction task. A file whose rows carry no ``task`` gets the config's task for its stem
    (else ``default_pair_task``); a file whose rows all carry one task is used as is; a file mixing tasks (the sample's
    ``pairs.jsonl``) is split into one file per task under ``work_dir``. Rows with and without ``task`` in one file,
    or an unknown task, are errors naming the file and line.
    """
    sources = []
    cap = config["max_pairs_per_source"]
    for path in pair_files:
        tasks: Counter[str] = Counter()
        without: int | None = None
        by_task: dict[str, list[dict[str, Any]]] = {}
        for line_no, row in iter_jsonl(path):
            task = row.get("task")
            if task is None:
                without = without or line_no
                continue
            if task not in INSTRUCTIONS:
                raise ValueError(f"{path}:{line_no}: field 'task'={task!r} is not one of {sorted(INSTRUCTIONS)}")
            tasks[task] += 1
            by_task.setdefault(task, []).append(row)
        if tasks and without is not None:
            raise ValueError(f"{path}:{without}: row has no 'task' field while other rows of the file have one")
        if not tasks:
            task = config["pair_tasks"].get(path.stem, config["default_pair_task"])
            sources.append({"path": str(path), "task": task, "max_pairs": cap})
        elif len(tasks) == 1:
            sources.append({"path": str(path), "task": next(iter(tasks)), "max_pairs": cap})
        else:
            for task, rows in by_task.items():
                target = work_dir / f"{path.stem}.{task}.jsonl"
                write_jsonl(rows, target)
                sources.append({"path": str(target), "task": task, "max_pairs": cap})
    return sources


def retrieval_spec(config: Mapping[str, Any], folder: Path) -> dict[str, Any]:
    """The task, evaluation kind, ``train`` flag and ``bm25_negatives`` of a ``retrieval/<name>/`` set (unknown names:
    passage retrieval, ``beir``, trained on, none mined). ``train: false`` makes a set evaluation-only: neither its
    queries (phase-2 pairs) nor its corpus (tokenizer text) are trained on. ``bm25_negatives``: phase 2's BM25-mined
    negatives per training query (`train.data.build_pair_dataset_from_beir`)."""
    spec = config["retrieval_sets"].get(folder.name, {})
    return {"task": spec.get("task", config["default_pair_task"]), "kind": spec.get("kind", "beir"),
            "train": spec.get("train", True), "bm25_negatives": spec.get("bm25_negatives", 0)}  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# Budget → steps, and the phase configs.
# --------------------------------------------------------------------------------------------------------------------


def phase_steps(budget: Mapping[str, Any], minutes: float, phase: str) -> tuple[int, int]:
    """(max_steps, warmup_steps) of a phase: its share of the budget times its measured step rate."""
    steps = max(budget["min_steps"], math.floor(minutes * budget[f"{phase}_share"] * budget[f"{phase}_steps_per_minute"]))
    return steps, min(steps - 1, math.ceil(budget["warmup_fraction"] * steps))


def phase1_config(config: Mapping[str, Any], data: DataFolder, tokenizer_dir: Path, vocab_size: int, out: Path,
                  minutes: float) -> dict[str, Any]:  # fmt: skip
    """Phase 1's config: the ``phase1`` section, the raw files weighted by their record counts (so the mixture keeps
    their natural proportions), the trained tokenizer and its size, and the budget's steps."""
    max_steps, warmup = phase_steps(config["budget"], minutes, "phase1")
    raw = dict(config["phase1"])
    raw.update(
        tokenizer=str(tokenizer_dir),
        data=[{"spec": str(path), "weight": float(count_lines(path))} for path in data.raw],
        model={**raw.get("model", {}), "vocab_size": vocab_size},
        output_dir=str(out / "phase1"),
        max_steps=max_steps,
        warmup_steps=warmup,
    )
    return raw


def phase2_sources(config: Mapping[str, Any], data: DataFolder, work_dir: Path) -> list[dict[str, Any]]:
    """Phase 2's ``train_sources``: the pair files (``pair_sources``) and the train side of every retrieval set not
    marked ``train: false``."""
    sources = pair_sources(data.pairs, config, work_dir)
    for folder in data.split_sets:
        spec = retrieval_spec(config, folder)
        if spec["train"]:
            entry = {"beir": str(folder), "task": spec["task"], "max_pairs": config["max_pairs_per_source"]}
            sources.append(entry | ({"bm25_negatives": spec["bm25_negatives"]} if spec["bm25_negatives"] else {}))
    return sources


def phase2_config(config: Mapping[str, Any], sources: list[dict[str, Any]], phase1_final: Path, out: Path,
                  minutes: float) -> dict[str, Any]:  # fmt: skip
    """Phase 2's config: the ``phase2`` section, starting from phase 1's model, on ``sources``, with the budget's
    steps."""
    max_steps, warmup = phase_steps(config["budget"], minutes, "phase2")
    raw = dict(config["phase2"])
    raw.update(
        init_from=str(phase1_final),
        tokenizer=None,
        train_sources=sources,
        output_dir=str(out / "phase2"),
        dev_beir=None,
        max_steps=max_steps,
        warmup_steps=warmup,
    )
    return raw


def check_phase_configs(config: Mapping[str, Any], data: DataFolder, sources: list[dict[str, Any]], out: Path,
                        minutes: float) -> None:  # fmt: skip
    """Both phase configs as the run will resolve them (the tokenizer's requested size and phase 1's folder stand in
    until they exist), checked before any stage runs, so a bad ``phase1`` / ``phase2`` key costs seconds, not the
    tokenizer and phase 1; with a teacher length, the teacher is loaded to check it against the teacher's own limit."""
    from train.distill import load_teacher_at
    from train.phase1 import Phase1Config
    from train.phase2 import Phase2Config

    phase1_raw = phase1_config(config, data, out / "tokenizer", config["tokenizer"]["vocab_size"], out, minutes)
    config_from_dict(Phase1Config, phase1_raw, source="quickstart phase1")
    phase2_raw = phase2_config(config, sources, out / "phase1" / "final", out, minutes)
    phase2 = config_from_dict(Phase2Config, phase2_raw, source="quickstart phase2")
    if phase2.teacher is not None and phase2.teacher_max_seq_length is not None:
        load_teacher_at(phase2.teacher, phase2.teacher_max_seq_length, device="cpu")


def write_yaml(mapping: Mapping[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dict(mapping), sort_keys=False), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------------------------
# Stages.
# --------------------------------------------------------------------------------------------------------------------


def run_stage(index: int, total: int, name: str, rerun: str | None, body: Callable[[], T]) -> T:
    """Run one stage under a banner; any exception becomes ``StageFailed`` naming the stage."""
    print(f"\n=== [{index}/{total}] {name} ===", flush=True)
    started = time.perf_counter()
    try:
        result = body()
    except Exception as err:
        raise StageFailed(name, rerun, err) from err
    print(f"=== [{index}/{total}] {name}: done in {time.perf_counter() - started:.0f} s ===", flush=True)
    return result


def tokenizer_inputs(config: Mapping[str, Any], data: DataFolder) -> list[Path]:
    """The kinds of text named in ``tokenizer.text``, each file read with its languages by ``tokenization.train``:
    ``raw`` text, both sides of the ``pairs`` files, the ``sts`` train sentences and the retrieval ``corpora`` (their
    held-out fifth left out by ``--exclude-heldout``, so the fertility report has unseen tables and paragraphs to
    measure) of every set not marked ``train: false``."""
    split_sets = [folder for folder in data.split_sets if retrieval_spec(config, folder)["train"]]
    kinds = {
        "raw": data.raw, "pairs": data.pairs, "sts": data.sts_train,
        "corpora": [folder / "corpus.jsonl" for folder in data.dev_sets + split_sets],
    }  # fmt: skip
    return [path for kind in config["tokenizer"]["text"] for path in kinds[kind]]


def train_tokenizer(inputs: list[Path], tokenizer_config: Mapping[str, Any], output: Path) -> int:
    """``python -m tokenization.train`` on ``inputs``, languages balanced with ``language_alpha``; returns the
    tokenizer's real size (the model's vocab_size)."""
    from transformers import AutoTokenizer

    from tokenization import train as tokenization_train

    tokenization_train.main([
        "--output", str(output), "--vocab-size", str(tokenizer_config["vocab_size"]),
        "--language-alpha", str(tokenizer_config["language_alpha"]), "--exclude-heldout", "--input", *map(str, inputs),
    ])  # fmt: skip
    return len(AutoTokenizer.from_pretrained(output))


def run_phase1(raw: Mapping[str, Any]) -> Path:
    from train.phase1 import Phase1Config, run

    result = run(config_from_dict(Phase1Config, raw, source="quickstart phase1"))
    print(f"phase 1: loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f} over {len(result.losses)} steps, "
          f"{result.tokens_per_second:.0f} tokens/s")  # fmt: skip
    return result.final_dir


def run_phase2(raw: Mapping[str, Any]) -> Path:
    from train.phase2 import Phase2Config, train

    train(config_from_dict(Phase2Config, raw, source="quickstart phase2"))
    return Path(raw["output_dir"]) / "final"


def save_untrained(phase1_raw: Mapping[str, Any], phase2_raw: Mapping[str, Any], target: Path) -> Path:
    """The trained model's architecture at its random initialisation (phase 1's seed), saved the way phase 2 saves its
    final folder: the reference that shows what training added."""
    import torch
    from transformers import PreTrainedTokenizerFast

    from modeling_chroma_moe import ChromaMoeForEmbedding
    from train.phase1 import Phase1Config
    from train.phase2 import Phase2Config, save_final

    phase1 = config_from_dict(Phase1Config, phase1_raw, source="quickstart phase1")
    torch.manual_seed(phase1.seed)
    model = ChromaMoeForEmbedding(phase1.model_config()).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(phase1.tokenizer)
    save_final(model, tokenizer, config_from_dict(Phase2Config, phase2_raw, source="quickstart phase2"), target)
    return target


def eval_tasks(config: Mapping[str, Any], data: DataFolder, phase2_raw: Mapping[str, Any], out: Path) -> list[str]:
    """``evaluation.run`` task arguments: every ``dev/`` set whole (queries with the model's default ``query``
    prompt, as ``encode_query`` gives a user), and the held-out side of every retrieval set (written with the split
    phase 2 trained on), its queries with the prompt of the set's instruction task (``@task``), as trained."""
    tasks = [f"beir:{folder}" for folder in data.dev_sets]
    for folder in data.split_sets:
        heldout = write_heldout_beir(
            folder, out / "data" / "heldout" / folder.name,
            train_fraction=phase2_raw["split_fraction"], seed=phase2_raw["split_seed"],
        )  # fmt: skip
        spec = retrieval_spec(config, folder)
        tasks.append(f"{spec['kind']}:{heldout}@{spec['task']}")
    per_language = config["evaluation"]["sts_pairs_per_language"]
    for path in data.sts_dev:
        tasks.append(f"sts:{sample_sts(path, per_language, out / 'data' / 'heldout' / path.name)}")
    return tasks


def sample_sts(path: Path, pairs_per_language: int, target: Path) -> Path:
    """The lines of ``path`` (STS tsv with a ``pair_id`` column) whose ``pair_id`` is among the first
    ``pairs_per_language`` by a stable hash: the same pairs in every language, a fixed sample that keeps the
    per-language Spearman comparable while costing a fraction of the whole file's encodes. Lines are copied as is."""
    header, *lines = path.read_text(encoding="utf-8").splitlines()
    columns = header.split("\t")
    if "pair_id" not in columns:
        raise ValueError(f"{path}: no 'pair_id' column to sample the same pairs in every language (columns {columns})")
    column = columns.index("pair_id")
    pair_ids = [line.split("\t")[column] if line.strip() else None for line in lines]
    ranked = sorted({p for p in pair_ids if p is not None}, key=lambda p: hashlib.sha256(p.encode()).digest())
    kept = set(ranked[:pairs_per_language])
    target.parent.mkdir(parents=True, exist_ok=True)
    chosen = [line for line, pair_id in zip(lines, pair_ids) if pair_id in kept]
    target.write_text("\n".join([header, *chosen]) + "\n", encoding="utf-8")
    return target


def evaluate(models: list[str], tasks: list[str], out: Path) -> dict[str, Any]:
    """``python -m evaluation.run`` for every model on every task; returns results.json's content."""
    from evaluation import run as evaluation_run

    argv = [arg for model in models for arg in ("--model", model)] + [arg for task in tasks for arg in ("--task", task)]
    argv += ["--output", str(out / "results.json"), "--markdown", str(out / "results.md"), "--plot", str(out / "results.png")]
    evaluation_run.main(argv)
    return json.loads((out / "results.json").read_text(encoding="utf-8"))


def set_serving_length(folder: Path, max_seq_length: int) -> None:
    """Make a saved sentence-transformers folder of ours truncate at ``max_seq_length`` tokens (its
    ``sentence_bert_config.json``; the weights are untouched), so it is evaluated at the length the Hub folder serves."""
    path = folder / "sentence_bert_config.json"
    settings = json.loads(path.read_text(encoding="utf-8"))
    settings["max_seq_length"] = max_seq_length
    path.write_text(json.dumps(settings, indent=4) + "\n", encoding="utf-8")


def export_hub(model_dir: Path, results: Path, target: Path, model_id: str, max_seq_length: int) -> list[str]:
    from train.export import export

    return export(model_dir, target, results_path=results, datasets=[], model_id=model_id, max_seq_length=max_seq_length)


def results_table(results: Mapping[str, Any], labels: Mapping[str, str]) -> str:
    """A markdown table: one row per (task, model) with the retrieval headline metrics."""
    lines = ["| task | model | " + " | ".join(HEADLINE_METRICS) + " |", "|---|---|" + "---:|" * len(HEADLINE_METRICS)]
    for task, per_model in results["tasks"].items():
        for model, metrics in per_model.items():
            cells = [f"{metrics[m]:.4f}" if isinstance(metrics.get(m), float) else "n/a" for m in HEADLINE_METRICS]
            lines.append(f"| {task} | {labels.get(model, model)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# The command.
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class QuickstartResult:
    """Where everything went, the results and the wall time of each stage."""

    output_dir: Path
    artefacts: dict[str, Path]
    results: dict[str, Any]
    labels: dict[str, str]
    seconds: dict[str, float]


def quickstart(output: str | Path, data_dir: str | Path, budget_minutes: float | None, config_path: str | Path) -> QuickstartResult:
    """Run the five stages into ``output`` (which must be new or empty); raises ``StageFailed`` naming the stage."""
    config = load_quickstart_config(config_path)
    minutes = float(budget_minutes if budget_minutes is not None else config["budget"]["default_minutes"])
    if minutes <= 0:
        raise ConfigError(f"--budget-minutes must be > 0, got {minutes}")
    out = Path(output).resolve()
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output folder {out} is not empty: remove it or pass --output NEW_FOLDER")
    data = find_data(data_dir)
    sources = phase2_sources(config, data, out / "data" / "pairs")  # checks the pair files before any training
    check_phase_configs(config, data, sources, out, minutes)
    print(f"data: {data.root}\n  raw text: {len(data.raw)} file(s); pair files: {len(data.pairs)}; dev sets: "
          f"{len(data.dev_sets)}; split retrieval sets: {len(data.split_sets)}\nbudget: {minutes:g} minutes; "
          f"output: {out}")  # fmt: skip
    paths = {
        "tokenizer": out / "tokenizer",
        "phase1_config": out / "configs" / "phase1.yaml",
        "phase2_config": out / "configs" / "phase2.yaml",
        "untrained_model": out / "untrained",
        "evaluation": out / "eval",
        "hub_folder": out / "hub",
    }
    seconds: dict[str, float] = {}

    def timed(name: str, index: int, rerun: str | None, body: Callable[[], T]) -> T:
        started = time.perf_counter()
        result = run_stage(index, 5, name, rerun, body)
        seconds[name] = round(time.perf_counter() - started, 1)
        return result

    vocab_size = timed(
        "tokenizer", 1, f"python -m tokenization.train --output {paths['tokenizer']} --input ...",
        lambda: train_tokenizer(tokenizer_inputs(config, data), config["tokenizer"], paths["tokenizer"]),
    )  # fmt: skip
    phase1_raw = phase1_config(config, data, paths["tokenizer"], vocab_size, out, minutes)
    write_yaml(phase1_raw, paths["phase1_config"])
    paths["phase1_model"] = timed(
        "phase 1 (masked-LM pretraining)", 2, f"accelerate launch train/phase1.py --config {paths['phase1_config']}",
        lambda: run_phase1(phase1_raw),
    )  # fmt: skip
    phase2_raw = phase2_config(config, sources, paths["phase1_model"], out, minutes)
    write_yaml(phase2_raw, paths["phase2_config"])
    paths["trained_model"] = timed(
        "phase 2 (contrastive instruction tuning)", 3, f"accelerate launch train/phase2.py --config {paths['phase2_config']}",
        lambda: run_phase2(phase2_raw),
    )  # fmt: skip

    preset = phase1_raw["model"]["preset"]
    labels = {model: MODEL_LABELS[model] for model in config["evaluation"]["baselines"]}
    if config["evaluation"]["untrained"]:
        labels[str(paths["untrained_model"])] = f"{preset}, untrained"
    labels[str(paths["trained_model"])] = f"{preset}, quickstart"
    if config["evaluation"]["hybrid"]:
        labels[f"bm25+{paths['trained_model']}"] = f"bm25 + {preset}, quickstart (RRF)"

    serving_length = config["evaluation"]["serving_length"]

    def evaluation_stage() -> dict[str, Any]:
        set_serving_length(paths["trained_model"], serving_length)
        if config["evaluation"]["untrained"]:
            set_serving_length(save_untrained(phase1_raw, phase2_raw, paths["untrained_model"]), serving_length)
        return evaluate(list(labels), eval_tasks(config, data, phase2_raw, out), paths["evaluation"])

    results = timed("evaluation", 4, f"python -m evaluation.run --model {paths['trained_model']} --task ...", evaluation_stage)
    timed(
        "export", 5, f"python -m train.export --model {paths['trained_model']} --output {paths['hub_folder']} "
        f"--max-seq-length {serving_length}",
        lambda: export_hub(paths["trained_model"], paths["evaluation"] / "results.json", paths["hub_folder"],
                           f"{preset}-quickstart", serving_length),
    )  # fmt: skip
    return QuickstartResult(out, paths, results, labels, seconds)


def summary(result: QuickstartResult) -> str:
    """The closing report: where everything is, the results table and stage times."""
    lines = ["", "=== quickstart finished ===", ""]
    width = max(len(name) for name in result.artefacts)
    lines += [f"  {name.ljust(width)}  {path}" for name, path in result.artefacts.items()]
    lines += ["", results_table(result.results, result.labels), ""]
    lines.append("stage times: " + ", ".join(f"{name} {sec:.0f} s" for name, sec in result.seconds.items())
                 + f"; total {sum(result.seconds.values()):.0f} s")  # fmt: skip
    hub = result.artefacts["hub_folder"]
    lines += ["", "use it:", f'  SentenceTransformer("{hub}", trust_remote_code=True).encode_query(["wireless earbuds noise cancel"])']
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.quickstart", description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="runs/quickstart", help="new or empty folder for every artefact (default: %(default)s)")
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="data folder (default: the bundled sample, data/sample)")
    parser.add_argument("--budget-minutes", type=float, help="time budget that sets the training steps (default: the config's budget.default_minutes)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="quickstart YAML (default: train/configs/quickstart.yaml)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("train", "tokenization", "evaluation", "__main__"):
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        result = quickstart(args.output, args.data_dir, args.budget_minutes, args.config)
    except StageFailed as failure:
        traceback.print_exception(failure.__cause__)
        print(f"\nquickstart FAILED in stage '{failure.stage}': {failure}", file=sys.stderr)
        if failure.rerun:
            print(f"re-run that stage alone with: {failure.rerun}", file=sys.stderr)
        return 1
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"quickstart FAILED before training: {err}", file=sys.stderr)
        return 1
    print(summary(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
