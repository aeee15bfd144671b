"""Local BEIR folders as mteb tasks, and named mteb tasks run with an offline-safe skip.

mteb users can evaluate any model on our local sets without the Hub::

    import mteb
    from evaluation.mteb_tasks import local_retrieval_task
    mteb.evaluate(model, tasks=[local_retrieval_task("../shared/data/retrieval/tatqa_finance_dev")], cache=None)

The wrapper subclasses mteb's ``AbsTaskRetrieval`` and overrides ``load_data`` to fill ``self.dataset`` from the
folder (mteb 2.26's in-memory layout), so mteb's own pipeline (encoding, search, pytrec_eval) runs unchanged. The
metadata fields mteb requires but a local set does not have (dataset path and revision, language) are placeholders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .models import Bm25Model, DenseModel
from .tasks import load_beir

MTEB_BM25 = "mteb/baseline-bm25s"


def local_retrieval_task(directory: str | Path, rerank: bool = False) -> Any:
    """An mteb ``AbsTaskRetrieval`` over a BEIR folder.

    With ``rerank`` each query ranks only its judged documents (mteb's ``top_ranked``), the ESCI protocol. Queries
    with no grade > 0 are left out, as in :func:`evaluation.tasks.load_beir`.
    """
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.task_metadata import TaskMetadata

    data = load_beir(directory)
    kind = "Reranking" if rerank else "Retrieval"

    class LocalBeirTask(AbsTaskRetrieval):
        metadata = TaskMetadata(
            name=f"Local{kind}_{data.name}",
            description=f"Local BEIR folder {Path(directory).resolve()}",
            dataset={"path": f"local/{data.name}", "revision": "local"},
            type=kind,
            category="t2t",
            eval_splits=["test"],
            eval_langs=["eng-Latn"],
            main_score="ndcg_at_10",
        )

        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            """Fill mteb's in-memory split from the loaded folder."""
            self.dataset = {
                "default": {
                    "test": {
                        "corpus": Dataset.from_dict({"id": data.doc_ids, "text": data.doc_texts}),
                        "queries": Dataset.from_dict({"id": data.query_ids, "text": data.query_texts}),
                        "relevant_docs": data.qrels,
                        "top_ranked": {qid: list(judged) for qid, judged in data.qrels.items()} if rerank else None,
                    }
                }
            }
            self.data_loaded = True

    return LocalBeirTask()


def run_mteb_task(name: str, model: Bm25Model | DenseModel) -> tuple[dict[str, float], dict[str, Any]]:
    """Run the mteb task ``name``; return ``({main score name: value}, note)``.

    A dense model runs as itself; ``bm25`` runs as mteb's own bm25s baseline (``mteb/baseline-bm25s``), which picks
    its stemmer per task language. When the task's data is neither cached nor reachable (``HF_HUB_OFFLINE=1`` or no
    network) the result is an empty metric dict and a note saying why, not a crash. An unknown name is an error.
    """
    import mteb
    from huggingface_hub import constants

    try:
        task = mteb.get_task(name)
    except KeyError:
        raise ValueError(f"mteb:{name}: mteb has no task of that name") from None
    engine = mteb.get_model(MTEB_BM25) if isinstance(model, Bm25Model) else model.model
    try:
        result = mteb.evaluate(engine, tasks=[task], cache=None)
    except ConnectionError as error:
        reason = "HF_HUB_OFFLINE=1 is set" if constants.HF_HUB_OFFLINE else "the Hugging Face Hub cannot be reached"
        return {}, {"skipped": f"mteb task {name} needs its data from the Hugging Face Hub and {reason} ({error})"}
    main_score = task.metadata.main_score
    note = {"engine": MTEB_BM25 if isinstance(model, Bm25Model) else "this model via mteb", "main_score": main_score}
    return {main_score: float(result.task_results[0].get_score())}, note
