"""Data layer shared by phase 1 (masked-LM text) and phase 2 (contrastive pairs).

Every source becomes a ``datasets.IterableDataset`` so that the seed's multi-terabyte Hub corpora stream without being
downloaded, local files and Hub datasets mix through one call to ``datasets.interleave_datasets``, and the trainers can
checkpoint the data position with ``IterableDataset.state_dict()``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import datasets
from datasets import interleave_datasets

TEXT_FEATURES = datasets.Features({"text": datasets.Value("string")})
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")


# --------------------------------------------------------------------------------------------------------------------
# Phase-1 Hub registry: adapters from each seed dataset's real row schema to plain texts.
# --------------------------------------------------------------------------------------------------------------------


def _edgar_texts(row: dict[str, Any]) -> list[str]:
    """EDGAR-CORPUS (eloukas/edgar-corpus): one row per 10-K filing, one string column per item
    (``section_1``, ``section_1A``, …, ``section_7``, …). The seed keeps only Item 1A (Risk Factors) and Item 7 (MD&A):
    they are the narrative, forward-looking parts of a filing; the other items are mostly boilerplate and exhibits."""
    return [row[key] for key in ("section_1A", "section_7") if row.get(key)]


def _text_field_adapter(field: str) -> Callable[[dict[str, Any]], list[str]]:
    def adapt(row: dict[str, Any]) -> list[str]:
        value = row.get(field)
        return [value] if value else []

    return adapt


def _amazon_review_texts(row: dict[str, Any]) -> list[str]:
    """Amazon Reviews 2023 (McAuley-Lab): ``title`` is the review headline, ``text`` its body; joined as one text."""
    parts = [part for part in (row.get("title"), row.get("text")) if part]
    return ["\n".join(parts)] if parts else []


HubAdapter = Callable[[dict[str, Any]], list[str]]
TEXT_REGISTRY: dict[str, HubAdapter] = {
    "eloukas/edgar-corpus": _edgar_texts,
    "Brianferrell787/financial-news-multisource": _text_field_adapter("text"),
    "thebajajra/Ecom-niverse": _text_field_adapter("text"),
    "McAuley-Lab/Amazon-Reviews-2023": _amazon_review_texts,
    "HuggingFaceFW/fineweb-edu": _text_field_adapter("text"),
}


# --------------------------------------------------------------------------------------------------------------------
# Loading one text source.
# --------------------------------------------------------------------------------------------------------------------


def _is_local_spec(spec: str) -> bool:
    return spec.endswith(LOCAL_SUFFIXES) or Path(spec).exists()


def _parse_hub_spec(spec: str) -> tuple[str, str | None, str]:
    """``HUB_ID[:CONFIG[:SPLIT]]`` → (hub_id, config or None, split; default ``train``)."""
    parts = spec.split(":")
    if len(parts) > 3 or not parts[0]:
        raise ValueError(f"bad dataset spec {spec!r}: expected a local .txt/.jsonl/.parquet path or HUB_ID[:CONFIG[:SPLIT]]")
    hub_id = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    return hub_id, config, split


def _load_hub(hub_id: str, config: str | None, split: str, streaming: bool) -> datasets.Dataset | datasets.IterableDataset:
    """The one place that reaches the Hub (tests monkeypatch it)."""
    return datasets.load_dataset(hub_id, config, split=split, streaming=streaming)


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (1-based line number, object) for each non-blank line; bad JSON raises naming file and line."""
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: invalid JSON ({err.msg})") from err
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
            yield line_no, obj


def _local_texts(path: str, text_field: str) -> Iterator[dict[str, str]]:
    file = Path(path)
    if file.suffix == ".txt":
        with file.open(encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    yield {"text": line.rstrip("\n")}
    elif file.suffix == ".jsonl":
        for line_no, obj in iter_jsonl(file):
            value = obj.get(text_field)
            if not isinstance(value, str):
                found = "missing" if value is None else f"a {type(value).__name__}, not a string"
                raise ValueError(f"{file}:{line_no}: field {text_field!r} is {found}")
            yield {"text": value}
    else:
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(file)
        if text_field not in parquet.schema_arrow.names:
            raise ValueError(f"{file}: no column {text_field!r} (columns: {parquet.schema_arrow.names})")
        row_no = 0
        for batch in parquet.iter_batches(columns=[text_field]):
            for value in batch.column(0).to_pylist():
                if not isinstance(value, str):
                    raise ValueError(f"{file}: row {row_no}: column {text_field!r} is {value!r}, not a string")
                row_no += 1
                yield {"text": value}


def _hub_texts(hub_id: str, config: str | None, split: str, text_field: str, streaming: bool) -> Iterator[dict[str, str]]:
    adapter = TEXT_REGISTRY.get(hub_id, _text_field_adapter(text_field))
    for row in _load_hub(hub_id, config, split, streaming):
        for text in adapter(row):
            yield {"text": text}


def load_text_dataset(spec: str, *, text_field: str = "text", streaming: bool = True) -> datasets.IterableDataset:
    """One text source as an ``IterableDataset`` with the single column ``text``.

    ``spec`` is a local ``.txt`` (one text per non-empty line), ``.jsonl`` (field ``text_field``) or ``.parquet`` (column
    ``text_field``) path, or ``HUB_ID[:CONFIG[:SPLIT]]``. Hub IDs in ``TEXT_REGISTRY`` go through their schema adapter;
    other Hub IDs read ``text_field``. With ``streaming=True`` rows are read lazily, so a bad jsonl row raises when
    iteration reaches it; with ``streaming=False`` the whole source is read (and validated) here, in memory.
    """
    if _is_local_spec(spec):
        if not Path(spec).is_file():
            raise FileNotFoundError(f"text dataset file not found: {spec}")
        if not spec.endswith(LOCAL_SUFFIXES):
            raise ValueError(f"unsupported local file {spec!r}: use one of {', '.join(LOCAL_SUFFIXES)}")
        generator, kwargs = _local_texts, {"path": spec, "text_field": text_field}
    else:
        hub_id, config, split = _parse_hub_spec(spec)
        generator = _hub_texts
        kwargs = {"hub_id": hub_id, "config": config, "split": split, "text_field": text_field, "streaming": streaming}
    if streaming:
        return datasets.IterableDataset.from_generator(generator, features=TEXT_FEATURES, gen_kwargs=kwargs)
    rows = list(generator(**kwargs))
    return datasets.Dataset.from_list(rows, features=TEXT_FEATURES).to_iterable_dataset()


def mix_text_datasets(
    datasets: list[datasets.IterableDataset], weights: list[float] | None, seed: int = 0
) -> datasets.IterableDataset:
    """Sample from several text streams in proportion to ``weights`` (normalised; ``None`` = uniform).

    Uses ``datasets.interleave_datasets`` with ``stopping_strategy="all_exhausted_without_replacement"``: each row of
    each source is drawn exactly once per pass, the weights hold while every source has rows left, and an exhausted
    source drops out (the others are renormalised). Oversampling would re-emit rows of a small source, which the
    exact-repeat dedup downstream would then count as duplicates; for more passes, iterate again (``set_epoch``).
    """
    if not datasets:
        raise ValueError("mix_text_datasets needs at least one dataset")
    if weights is None:
        weights = [1.0] * len(datasets)
    if len(weights) != len(datasets):
        raise ValueError(f"got {len(weights)} weights for {len(datasets)} datasets")
    for index, weight in enumerate(weights):
        if not weight > 0:
            raise ValueError(f"weight {index} is {weight}: mixture weights must be positive")
    total = float(sum(weights))
    return interleave_datasets(
        datasets,
        probabilities=[w / total for w in weights],
        seed=seed,
        stopping_strategy="all_exhausted_without_replacement",
    )
