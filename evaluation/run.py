"""One evaluation command for every model and task: ``python -m evaluation.run``.

Example::

    python -m evaluation.run --model bm25 --model minilm \\
        --task beir:../shared/data/retrieval/tatqa_finance_dev --task sts:../shared/data/sts/stsb_multi_mt_dev.tsv \\
        --output results.json --markdown results.md --plot results.png

Models: a sentence-transformers folder, ``bm25``, ``minilm``, or ``bm25+<minilm or folder>``: BM25 and the dense model
fused by reciprocal-rank fusion (Cormack, Clarke & Büttcher 2009; ``evaluation.models.HybridModel``), for the ranking
tasks (beir, esci); it has no embeddings of its own, so STS, probes and mteb skip it. Tasks (``KIND:TARGET``):

- ``beir:DIR``   retrieval over the whole corpus, top 100 kept per query → ``ndcg@10``, ``recall@100``, ``mrr@10``
- ``esci:DIR``   ESCI re-ranking: each query ranks only its judged products → the same metrics plus
  ``exact_over_substitute``
- ``beir:DIR@PROMPT`` / ``esci:DIR@PROMPT``: the queries are encoded with the model's prompt named ``PROMPT`` (the
  set's instruction task, e.g. ``finance_qa``; ours defines one per task) where the model has one, else with its
  ``query`` prompt; the prompt used is noted as ``query_prompt``
- ``sts:FILE``   ``spearman`` (mean over languages) and ``spearman_<lang>``
- ``probe:FILE`` TSV with ``text``/``label`` → ``accuracy``, ``macro_f1`` (cross-validated logistic regression) and
  ``v_measure`` (k-means)
- ``mteb:NAME``  an mteb task by name (its main score); skipped with a note when its data cannot be fetched

``results.json``::

    {"tasks":  {task: {model: {metric: value}}},
     "models": {model: {"params_total", "params_active", "embedding_dim", "max_seq_length", "similarity", ...,
                        "time_s": {task: seconds}}},
     "notes":  {task: {model: {"truncated_*", "skipped", ...}}},
     "data":   {task: {counts of the loaded set: queries evaluated, empty texts, ...}},
     "errors": {model: "ExceptionType: message"}}

A task is named ``KIND:<folder or file stem>`` (``beir:tatqa_finance_dev``); a model by its argument.

Every ``--model`` and ``--task`` is checked, and every task's data loaded, before any model runs: a bad value stops the
command at once with an error naming it. A model that fails while it runs is recorded under ``errors`` (traceback on
stderr); the other models still run, the results are written, and the command exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .models import HYBRID_PREFIX, Bm25Model, DenseModel, HybridModel, check_model_spec, load_model, rrf_fuse
from .tasks import (
    ProbeSet,
    RetrievalSet,
    StsSet,
    esci_grade_scheme,
    exact_over_substitute,
    load_beir,
    load_probe,
    load_sts,
    probe_metrics,
    rank_documents,
    retrieval_metrics,
    sts_spearman,
)

TASK_KINDS = ("beir", "esci", "sts", "probe", "mteb")


@dataclass
class TaskSpec:
    """A parsed ``KIND:TARGET[@PROMPT]`` task argument."""

    kind: str
    target: str
    query_prompt: str | None = None  # retrieval kinds: the name of the queries' prompt

    @property
    def name(self) -> str:
        """The task's key in results: the mteb name, the folder name (beir, esci) or the file stem (sts, probe)."""
        if self.kind == "mteb":
            return f"mteb:{self.target}"
        path = Path(self.target.rstrip("/"))
        return f"{self.kind}:{path.name if self.kind in ('beir', 'esci') else path.stem}"


def parse_task(spec: str) -> TaskSpec:
    """Split ``KIND:TARGET[@PROMPT]`` (``@PROMPT`` only for beir and esci: what follows the last ``@`` when it holds
    no path separator and the whole target is not an existing path); an unknown kind is an error listing the known
    ones."""
    kind, sep, target = spec.partition(":")
    if not sep or kind not in TASK_KINDS or not target:
        raise ValueError(f"--task {spec}: expected KIND:TARGET with KIND one of {', '.join(TASK_KINDS)}")
    path, at, prompt = target.rpartition("@")
    if not at or "/" in prompt or kind not in ("beir", "esci") or Path(target).exists():
        return TaskSpec(kind, target)
    if not path or not prompt:
        raise ValueError(f"--task {spec}: expected {kind}:DIR@PROMPT with both a folder and a prompt name")
    return TaskSpec(kind, path, prompt)


def _check_mteb_task(name: str) -> None:
    """An mteb task name must exist in mteb's registry (checked without fetching its data)."""
    import mteb

    try:
        mteb.get_task(name)
    except KeyError:
        raise ValueError("mteb has no task of that name") from None


def load_task_data(spec: TaskSpec) -> RetrievalSet | StsSet | ProbeSet | None:
    """Load and validate a task's data once, before any model runs (mteb tasks load inside mteb)."""
    if spec.kind in ("beir", "esci"):
        data = load_beir(spec.target)
        if spec.kind == "esci":
            esci_grade_scheme(data, spec.target)
        return data
    if spec.kind == "sts":
        return load_sts(spec.target)
    if spec.kind == "probe":
        return load_probe(spec.target)
    _check_mteb_task(spec.target)
    return None


class DenseScoreCache:
    """Score matrices ``[Q, D]`` of the dense models evaluated both alone and inside ``bm25+<model>``, per task: the
    second of the two rows reuses the first one's instead of encoding the task's queries and corpus again."""

    def __init__(self, model_names: list[str]) -> None:
        hybrids = {name.removeprefix(HYBRID_PREFIX) for name in model_names if name.startswith(HYBRID_PREFIX)}
        self.shared = hybrids & set(model_names)  # dense model names with both rows
        self.scores: dict[tuple[str, str], np.ndarray] = {}  # (dense model, task) -> [Q, D]

    def score_matrix(
        self, dense: DenseModel, data: RetrievalSet, spec: TaskSpec, documents: np.ndarray | None = None
    ) -> np.ndarray:
        """``dense``'s scores ``[Q, D]`` of ``data``'s queries (with ``spec``'s prompt) against its documents; with
        ``documents`` (indices), only those are encoded and every other column is ``-inf``."""
        key = (dense.name, spec.name)
        if key not in self.scores:
            scores = _dense_scores(dense, data, spec, documents)  # [Q, D]
            if dense.name not in self.shared:
                return scores
            self.scores[key] = scores
        return self.scores[key]


def _dense_scores(dense: DenseModel, data: RetrievalSet, spec: TaskSpec, documents: np.ndarray | None) -> np.ndarray:
    """Scores ``[Q, D]``: every document, or only the ``documents`` indices (the rest ``-inf``)."""
    if documents is None:
        return dense.score_matrix(data.query_texts, data.doc_texts, spec.query_prompt)  # [Q, D]
    scores = np.full((len(data.query_ids), len(data.doc_ids)), -np.inf, dtype=np.float32)  # [Q, D]
    texts = [data.doc_texts[i] for i in documents]
    scores[:, documents] = dense.score_matrix(data.query_texts, texts, spec.query_prompt)  # [Q, len(documents)]
    return scores


def _no_embeddings(model: Bm25Model | HybridModel, spec: TaskSpec) -> tuple[dict[str, float], dict[str, Any]]:
    if isinstance(model, HybridModel):
        reason = f"{model.name} is a fused ranking without embeddings of its own (see {model.dense.name})"
        return {}, {"skipped": f"{reason}; {spec.kind} needs embeddings"}
    return {}, {"skipped": f"bm25 produces no text embeddings, which {spec.kind} needs"}


def _fused_scores(
    model: HybridModel,
    data: RetrievalSet,
    spec: TaskSpec,
    candidates: list[np.ndarray] | None,
    judged: np.ndarray | None,
    doc_index: dict[str, int],
    cache: DenseScoreCache,
) -> np.ndarray:
    """RRF scores ``[Q, D]`` of BM25's and the dense model's rankings, each the top 100 (or every candidate; the
    dense model encodes only the ``judged`` documents when given)."""
    components = [
        model.bm25.score_matrix(data.query_texts, data.doc_texts),  # [Q, D]
        cache.score_matrix(model.dense, data, spec, judged),  # [Q, D]
    ]
    rankings = [
        [[data.doc_ids[i] for i in ranked] for ranked in rank_documents(scores, data.doc_ids, candidates)]
        for scores in components  # each [Q, D]
    ]
    return rrf_fuse(data.query_ids, rankings, doc_index)


def _retrieval(
    model: Bm25Model | DenseModel | HybridModel, data: RetrievalSet, spec: TaskSpec, cache: DenseScoreCache
) -> tuple[dict, dict]:
    """Score matrix → top-100 ranking → ranx; ESCI ranks each query's judged products only, so a dense model encodes
    only those (BM25 still indexes the whole corpus: its IDF statistics are the corpus's). A hybrid's score matrix is
    the RRF fusion of its two rankings (each over the same candidates)."""
    doc_index = {doc_id: i for i, doc_id in enumerate(data.doc_ids)}
    candidates = judged = None
    if spec.kind == "esci":
        candidates = [np.array([doc_index[d] for d in data.qrels[qid]]) for qid in data.query_ids]
        judged = np.unique(np.concatenate(candidates))  # [J] document indices
    if isinstance(model, HybridModel):
        scores = _fused_scores(model, data, spec, candidates, judged, doc_index, cache)  # [Q, D]
    elif isinstance(model, DenseModel):
        scores = cache.score_matrix(model, data, spec, judged)  # [Q, D]
    else:
        scores = model.score_matrix(data.query_texts, data.doc_texts, spec.query_prompt)  # [Q, D]
    encoded = data.doc_texts if judged is None else [data.doc_texts[i] for i in judged]
    note: dict[str, Any] = {
        "truncated_queries": model.count_truncated(data.query_texts, "query", spec.query_prompt),
        "truncated_documents": model.count_truncated(encoded, "document"),
    }
    dense = model.dense if isinstance(model, HybridModel) else model
    if isinstance(dense, DenseModel):
        note["query_prompt"] = dense.prompt_name("query", spec.query_prompt)
    rankings = rank_documents(scores, data.doc_ids, candidates)
    metrics = retrieval_metrics(
        data.qrels, {qid: [data.doc_ids[i] for i in ranked] for qid, ranked in zip(data.query_ids, rankings)}
    )
    if spec.kind == "esci":
        scheme_name, scheme = esci_grade_scheme(data, spec.target)
        metrics["exact_over_substitute"], note["exact_substitute_pairs"] = exact_over_substitute(
            scores, data, scheme["E"], scheme["S"]
        )
        note["esci_grades"] = scheme_name
        note["protocol"] = "re-ranking of each query's judged products"
    return metrics, note


def run_task(
    model: Bm25Model | DenseModel | HybridModel, spec: TaskSpec, data: Any, cache: DenseScoreCache | None = None
) -> tuple[dict[str, float], dict[str, Any]]:
    """Evaluate one model on one task: ``(metrics, note)``; ``cache`` shares a dense model's retrieval scores with its
    ``bm25+`` row."""
    if spec.kind in ("beir", "esci"):
        return _retrieval(model, data, spec, cache or DenseScoreCache([]))
    if isinstance(model, HybridModel):
        return _no_embeddings(model, spec)
    if spec.kind == "mteb":
        from .mteb_tasks import run_mteb_task

        return run_mteb_task(spec.target, model)
    if not isinstance(model, DenseModel):
        return _no_embeddings(model, spec)
    if spec.kind == "sts":
        texts = list(dict.fromkeys(data.sentences1 + data.sentences2))
        metrics = sts_spearman(model.pair_scores(data.sentences1, data.sentences2), data)
        return metrics, {"unique_texts": len(texts), "truncated_texts": model.count_truncated(texts, "document")}
    normalize = model.model.similarity_fn_name == "cosine"
    metrics = probe_metrics(model.embed(data.texts), data.labels, normalize=normalize)
    return metrics, {"truncated_texts": model.count_truncated(data.texts, "query")}


def evaluate(models: list[str], tasks: list[str]) -> dict[str, Any]:
    """Evaluate every model on every task; returns the ``results.json`` structure (see the module docstring).

    Before any model runs, every model argument is checked (:func:`evaluation.models.check_model_spec`), names must
    be unique, and every task is parsed and its data loaded and validated: a bad value raises ``ValueError`` (or
    ``FileNotFoundError``) naming it within seconds, not after an hour of encoding. Each model is then loaded once and
    freed before the next; one that fails is recorded under ``errors`` and the others still run.
    """
    for model_spec in models:
        check_model_spec(model_spec)
    model_names = [model_spec.rstrip("/") for model_spec in models]
    repeated = sorted({name for name in model_names if model_names.count(name) > 1})
    if repeated:
        raise ValueError(f"--model {repeated[0]} given twice")
    specs = [parse_task(task) for task in tasks]
    names = [spec.name for spec in specs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"tasks {duplicates} given twice (a task is named by its folder or file stem)")
    data = {}
    for task, spec in zip(tasks, specs):
        try:
            data[spec.name] = load_task_data(spec)
        except (ValueError, FileNotFoundError) as error:
            raise type(error)(f"--task {task}: {error}") from error
    results: dict[str, Any] = {
        "tasks": {name: {} for name in names},
        "models": {},
        "notes": {name: {} for name in names},
        "data": {name: loaded.counts for name, loaded in data.items() if loaded is not None},
        "errors": {},
    }
    cache = DenseScoreCache(model_names)
    for model_spec, model_name in zip(models, model_names):
        try:
            _run_model(model_spec, model_name, specs, data, results, cache)
        except Exception as error:  # noqa: BLE001 - one model's failure must not lose the others' results
            traceback.print_exc()
            results["errors"][model_name] = f"{type(error).__name__}: {error}"
    return results


def _run_model(
    model_spec: str,
    model_name: str,
    specs: list[TaskSpec],
    data: dict[str, Any],
    results: dict[str, Any],
    cache: DenseScoreCache,
) -> None:
    """Load one model and run every task, filling ``results`` as each task finishes; the model is freed on return."""
    from tqdm.auto import tqdm

    model = load_model(model_spec)
    info = model.info()
    info["time_s"] = {}
    results["models"][model_name] = info
    for spec in tqdm(specs, desc=f"tasks for {model_name}", unit="task"):
        start = time.perf_counter()
        metrics, note = run_task(model, spec, data[spec.name], cache)
        info["time_s"][spec.name] = round(time.perf_counter() - start, 1)
        results["tasks"][spec.name][model_name] = metrics
        results["notes"][spec.name][model_name] = note


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN: a metric that is undefined (e.g. Spearman of constant scores) is written as null."""
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _format(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def markdown_table(results: dict[str, Any]) -> str:
    """Side-by-side table (rows task/metric, columns models), a model table and the notes that qualify numbers."""
    models = list(results["models"])
    lines = ["| task | metric | " + " | ".join(models) + " |", "|---|---|" + "---|" * len(models)]
    for task, per_model in results["tasks"].items():
        skipped = {model for model in models if "skipped" in results["notes"][task].get(model, {})}
        metrics = list(dict.fromkeys(metric for model in models for metric in per_model.get(model, {})))
        for metric in metrics or ["—"]:
            cells = [
                "skipped" if model in skipped else _format(per_model.get(model, {}).get(metric)) for model in models
            ]
            lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    lines += ["", "| model | params total | params active | embedding dim | max tokens | similarity | time (s) |"]
    lines.append("|---|---|---|---|---|---|---|")
    for model, info in results["models"].items():
        row = [info.get(key) for key in ("params_total", "params_active", "embedding_dim", "max_seq_length")]
        cells = [f"{value:,}" if isinstance(value, int) else _format(value) for value in row]
        total_time = sum(info["time_s"].values())
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {info['similarity']} | {total_time:.0f} |")
    notes = [
        f"- {task} / {model}: " + ", ".join(f"{key}={_format(value)}" for key, value in note.items())
        for task, per_model in results["notes"].items()
        for model, note in per_model.items()
        if note
    ]
    notes += [f"- error: {model} failed: {message}" for model, message in results.get("errors", {}).items()]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def bar_chart(results: dict[str, Any], path: str | Path) -> None:
    """Grouped bar chart: one group per (task, metric), one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    groups = [
        (task, metric)
        for task, per_model in results["tasks"].items()
        for metric in dict.fromkeys(m for model in models for m in per_model.get(model, {}))
    ]
    positions = np.arange(len(groups))
    width = 0.8 / max(len(models), 1)
    figure, axes = plt.subplots(figsize=(max(6.0, 0.6 * len(groups) * max(len(models), 1)), 5))
    for i, model in enumerate(models):
        values = [results["tasks"][task].get(model, {}).get(metric) for task, metric in groups]
        heights = [value if value is not None and math.isfinite(value) else 0.0 for value in values]
        axes.bar(positions + (i - (len(models) - 1) / 2) * width, heights, width, label=model)
    axes.set_xticks(positions, [f"{task}\n{metric}" for task, metric in groups], rotation=60, ha="right", fontsize=7)
    axes.set_ylabel("score")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m evaluation.run", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", action="append", required=True, help="ST folder, 'bm25', 'minilm' or bm25+<model> (repeat)"
    )
    parser.add_argument("--task", action="append", required=True, help=f"KIND:TARGET, KIND in {TASK_KINDS} (repeat)")
    parser.add_argument("--output", required=True, type=Path, help="results.json to write")
    parser.add_argument("--markdown", type=Path, help="write a side-by-side markdown table here")
    parser.add_argument("--plot", type=Path, help="write a grouped bar chart (PNG) here")
    args = parser.parse_args(argv)
    try:
        results = _finite_or_none(evaluate(args.model, args.task))
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    table = markdown_table(results)
    if args.markdown:
        args.markdown.write_text(table)
    if args.plot:
        bar_chart(results, args.plot)
    sys.stdout.write(table)
    for model, message in results["errors"].items():
        sys.stderr.write(f"error: --model {model} failed: {message} (the other results are in {args.output})\n")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
