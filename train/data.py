"""Data layer shared by phase 1 (masked-LM text) and phase 2 (contrastive pairs).

Phase 1 reads plain texts: every source becomes a ``datasets.IterableDataset`` with one ``text`` column, so the seed's
multi-terabyte Hub corpora stream without being downloaded, and local files and Hub datasets mix through one call to
``datasets.interleave_datasets``. ``TextStream`` adds the length filter and exact-repeat dedup on top, counts what each
one dropped, and checkpoints its position as the number of texts read.

Phase 2 reads (query, positive, hard negatives, task) records from the seed's Hub pair datasets, local pair ``.jsonl``
files and BEIR folders, and formats queries with the seed's instruction template.

Hub adapters are written against each dataset's published schema (stated beside each adapter). Repositories that still
ship a loading script are read through their raw data files, because ``datasets`` 4+ refuses to run loading scripts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import datasets
from datasets import interleave_datasets

from evaluation.tasks import RetrievalSet, iter_jsonl, load_beir  # iter_jsonl: the one jsonl reader, shared with evaluation

logger = logging.getLogger(__name__)

TEXT_FEATURES = datasets.Features({"text": datasets.Value("string")})
PAIR_FEATURES = datasets.Features(
    {
        "query": datasets.Value("string"),
        "positive": datasets.Value("string"),
        "negatives": datasets.List(datasets.Value("string")),
        "task": datasets.Value("string"),
    }
)
LOCAL_TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


def shared_data_dir() -> Path:
    """The shared public data folder: ``$CHROMA_SHARED_DATA`` if set, else ``<repo root>/../shared/data``."""
    configured = os.environ.get("CHROMA_SHARED_DATA")
    return Path(configured) if configured else Path(__file__).resolve().parents[1].parent / "shared" / "data"


# --------------------------------------------------------------------------------------------------------------------
# Small shared helpers.
# --------------------------------------------------------------------------------------------------------------------


def write_jsonl(rows: Iterable[Mapping[str, Any]], path: str | Path) -> int:
    """Write rows as jsonl atomically (temp file + rename, so a crash never leaves half a file); returns the count."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=target.parent, suffix=".tmp", delete=False) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    os.replace(handle.name, target)
    return count


def _required(row: Mapping[str, Any], key: str, where: str) -> Any:
    """``row[key]``, or a ValueError that says where the row came from and which fields it does have."""
    if key not in row:
        raise ValueError(f"{where}: no field {key!r} (fields: {sorted(row)})")
    return row[key]


def _text_hash(text: str) -> int:
    """A 64-bit hash that is stable across processes and runs (``hash()`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def _parse_hub_spec(spec: str) -> tuple[str, str | None, str]:
    """``HUB_ID[:CONFIG[:SPLIT]]`` → (hub_id, config or None, split; default ``train``)."""
    parts = spec.split(":")
    if len(parts) > 3 or "/" not in parts[0]:
        raise ValueError(f"bad dataset spec {spec!r}: expected a local file path or HUB_ID[:CONFIG[:SPLIT]]")
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    return parts[0], config, split


def _open_hub(
    hub_id: str, config: str | None, split: str, streaming: bool, *, data_files: str | None, builder: str
) -> datasets.Dataset | datasets.IterableDataset:
    """The one place that reaches the Hub (tests replace it). ``data_files`` bypasses a repository's loading script."""
    if data_files is not None:
        return datasets.load_dataset(builder, data_files=data_files, split="train", streaming=streaming)
    return datasets.load_dataset(hub_id, config, split=split, streaming=streaming)


def _rows_with_label_names(rows: datasets.Dataset | datasets.IterableDataset) -> Iterator[dict[str, Any]]:
    """Rows with ``ClassLabel`` ints replaced by their names: the int order of a label differs between versions of a
    dataset (financial-reports-sec lists its sections alphabetically in one and in filing order in another)."""
    labels = {name: feat for name, feat in (rows.features or {}).items() if isinstance(feat, datasets.ClassLabel)}
    for row in rows:
        if labels:
            row = {**row, **{name: feat.int2str(row[name]) for name, feat in labels.items() if row[name] is not None}}
        yield row


# --------------------------------------------------------------------------------------------------------------------
# Phase 1: Hub registry of the seed's text corpora.
# --------------------------------------------------------------------------------------------------------------------

TextAdapter = Callable[[Iterable[dict[str, Any]], str], Iterator[str]]
EDGAR_SECTIONS = ("section_1A", "section_7")  # Item 1A Risk Factors, Item 7 MD&A


def _field_texts(field_name: str) -> TextAdapter:
    def adapt(rows: Iterable[dict[str, Any]], source: str) -> Iterator[str]:
        for index, row in enumerate(rows):
            yield _required(row, field_name, f"{source} row {index}") or ""

    return adapt


def _edgar_corpus_texts(rows: Iterable[dict[str, Any]], source: str) -> Iterator[str]:
    """eloukas/edgar-corpus (EDGAR-CORPUS, Loukas et al. 2021): one row per 10-K filing with ``filename``, ``cik``,
    ``year`` and one string column per item, ``section_1`` … ``section_15``. The seed keeps Item 1A (Risk Factors) and
    Item 7 (MD&A): the narrative, forward-looking prose of a filing; the other items are mostly boilerplate, exhibits
    and financial tables. Both sections are yielded even when empty (older filings have no Item 1A), so the length
    filter counts them instead of losing them silently."""
    for index, row in enumerate(rows):
        for section in EDGAR_SECTIONS:
            yield _required(row, section, f"{source} row {index}") or ""


def _financial_reports_sec_texts(rows: Iterable[dict[str, Any]], source: str) -> Iterator[str]:
    """JanosAudran/financial-reports-sec: the same 10-K items split into one row per sentence, with ``docID``,
    ``sentenceID``, ``sentence`` and ``section`` (a ClassLabel, decoded to ``section_1A`` etc. by the loader). Rows of
    one filing's section are consecutive; they are joined back into one passage per (filing, section) so the masked-LM
    sees document context, and only Items 1A and 7 are kept."""
    current: tuple[Any, Any] | None = None
    sentences: list[str] = []
    for index, row in enumerate(rows):
        where = f"{source} row {index}"
        key = (_required(row, "docID", where), _required(row, "section", where))
        if key != current:
            if current is not None and current[1] in EDGAR_SECTIONS:
                yield " ".join(sentences)
            current, sentences = key, []
        sentences.append(_required(row, "sentence", where) or "")
    if current is not None and current[1] in EDGAR_SECTIONS:
        yield " ".join(sentences)


def _amazon_review_texts(rows: Iterable[dict[str, Any]], source: str) -> Iterator[str]:
    """McAuley-Lab/Amazon-Reviews-2023 review files: ``rating``, ``title`` (the review headline), ``text`` (its body),
    ``images``, ``asin``, ``parent_asin``, ``user_id``, ``timestamp``, ``helpful_vote``, ``verified_purchase``. Headline
    and body form one text."""
    for index, row in enumerate(rows):
        where = f"{source} row {index}"
        parts = [_required(row, "title", where), _required(row, "text", where)]
        yield "\n".join(part for part in parts if part)


def _edgar_data_files(config: str | None, split: str) -> str:
    """eloukas/edgar-corpus ships a loading script plus ``<year>/{train,validate,test}.jsonl``; CONFIG is a year
    (``2020`` or the card's ``year_2020``); no CONFIG, or the card's ``full``, reads every year."""
    year = "*" if config in (None, "full") else config.removeprefix("year_")
    return f"hf://datasets/eloukas/edgar-corpus/{year}/{split}.jsonl"


def _financial_reports_sec_data_files(config: str | None, split: str) -> str:
    """financial-reports-sec ships a loading script; its rows are read from the Hub's parquet export
    (``@~parquet/<config>/<split>/``); configs ``small_lite``, ``small_full``, ``large_lite``, ``large_full``."""
    return f"hf://datasets/JanosAudran/financial-reports-sec@~parquet/{config or 'small_lite'}/{split}/*.parquet"


def _amazon_reviews_data_files(config: str | None, split: str) -> str:
    """Amazon-Reviews-2023 ships a loading script plus ``raw/review_categories/<Category>.jsonl``; CONFIG is the
    category (``Electronics`` or the card's ``raw_review_Electronics``). The card's only split is ``full``, so SPLIT is
    not used."""
    if not config:
        raise ValueError("McAuley-Lab/Amazon-Reviews-2023 needs a category as CONFIG, e.g. ':raw_review_Electronics'")
    category = config.removeprefix("raw_review_")
    return f"hf://datasets/McAuley-Lab/Amazon-Reviews-2023/raw/review_categories/{category}.jsonl"


@dataclass(frozen=True)
class HubTextSource:
    """How to read one Hub corpus: its row adapter and, for script-based repositories, where its raw files are."""

    adapter: TextAdapter
    data_files: Callable[[str | None, str], str] | None = None
    builder: str = "json"


TEXT_REGISTRY: dict[str, HubTextSource] = {
    "eloukas/edgar-corpus": HubTextSource(_edgar_corpus_texts, _edgar_data_files),
    "JanosAudran/financial-reports-sec": HubTextSource(
        _financial_reports_sec_texts, _financial_reports_sec_data_files, builder="parquet"
    ),
    # FNSPID and more, merged into one table (parquet): ``date``, ``text`` (headline and article), ``extra_fields``
    # (a JSON string of source-specific metadata). Only ``text`` is read.
    "Brianferrell787/financial-news-multisource": HubTextSource(_field_texts("text")),
    # FineFineWeb documents filtered to e-commerce content (json); each row's document is in ``text``.
    "thebajajra/Ecom-niverse": HubTextSource(_field_texts("text")),
    "McAuley-Lab/Amazon-Reviews-2023": HubTextSource(_amazon_review_texts, _amazon_reviews_data_files),
    # ``text``, ``id``, ``dump``, ``url``, ``date``, ``file_path``, ``language``, ``language_score``, ``token_count``,
    # ``score``, ``int_score``; CONFIG is ``default``, ``sample-10BT``, … or a crawl such as ``CC-MAIN-2024-10``.
    "HuggingFaceFW/fineweb-edu": HubTextSource(_field_texts("text")),
}


# --------------------------------------------------------------------------------------------------------------------
# Phase 1: loading and mixing text sources.
# --------------------------------------------------------------------------------------------------------------------


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
                found = ("missing" if text_field not in obj else "null, not a string" if value is None
                         else f"a {type(value).__name__}, not a string")  # fmt: skip
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


def _hub_texts(
    hub_id: str, config: str | None, split: str, text_field: str, streaming: bool
) -> Iterator[dict[str, str]]:
    source = TEXT_REGISTRY.get(hub_id, HubTextSource(_field_texts(text_field)))
    data_files = source.data_files(config, split) if source.data_files else None
    rows = _open_hub(hub_id, config, split, streaming, data_files=data_files, builder=source.builder)
    for text in source.adapter(_rows_with_label_names(rows), hub_id):
        yield {"text": text}


def _is_local_spec(spec: str) -> bool:
    return spec.endswith((".txt", ".jsonl", ".parquet", ".json", ".csv")) or Path(spec).exists()


def load_text_dataset(spec: str, *, text_field: str = "text", streaming: bool = True) -> datasets.IterableDataset:
    """One text source as an ``IterableDataset`` with the single column ``text``.

    ``spec`` is a local ``.txt`` (one text per non-empty line), ``.jsonl`` (field ``text_field``) or ``.parquet``
    (column ``text_field``) path, or ``HUB_ID[:CONFIG[:SPLIT]]``. Hub IDs in ``TEXT_REGISTRY`` go through their
    schema adapter; other Hub IDs read ``text_field``. With ``streaming=True`` rows are read lazily, so a bad jsonl
    row raises when iteration reaches it; with ``streaming=False`` the whole source is read and validated here.
    """
    if _is_local_spec(spec):
        if not Path(spec).is_file():
            raise FileNotFoundError(f"text dataset file not found: {spec}")
        if not spec.endswith(LOCAL_TEXT_SUFFIXES):
            raise ValueError(f"unsupported local file {spec!r}: use one of {', '.join(LOCAL_TEXT_SUFFIXES)}")
        generator, kwargs = _local_texts, {"path": spec, "text_field": text_field}
    else:
        hub_id, config, split = _parse_hub_spec(spec)
        generator = _hub_texts
        kwargs = {"hub_id": hub_id, "config": config, "split": split, "text_field": text_field, "streaming": streaming}
    if streaming:
        return datasets.IterableDataset.from_generator(generator, features=TEXT_FEATURES, gen_kwargs=kwargs)
    rows = list(generator(**kwargs))
    return datasets.Dataset.from_list(rows, features=TEXT_FEATURES).to_iterable_dataset()


def _normalised_weights(weights: list[float] | None, count: int) -> list[float]:
    if count == 0:
        raise ValueError("a mixture needs at least one dataset")
    weights = [1.0] * count if weights is None else list(weights)
    if len(weights) != count:
        raise ValueError(f"got {len(weights)} weights for {count} datasets")
    for index, weight in enumerate(weights):
        if not weight > 0:
            raise ValueError(f"weight {index} is {weight}: mixture weights must be positive")
    total = float(sum(weights))
    return [weight / total for weight in weights]


def mix_text_datasets(
    datasets: list[datasets.IterableDataset], weights: list[float] | None, seed: int = 0
) -> datasets.IterableDataset:
    """Sample from several text streams in proportion to ``weights`` (normalised; ``None`` = uniform).

    Uses ``datasets.interleave_datasets`` with ``stopping_strategy="all_exhausted_without_replacement"``: each row of
    each source is drawn once per pass, the weights hold while every source has rows left, and an exhausted source
    drops out (the others are renormalised). Oversampling would re-emit a small source's rows, which the exact-repeat
    dedup would then count as duplicates; for another pass, iterate again (``set_epoch``). Deterministic given ``seed``.
    """
    probabilities = _normalised_weights(weights, len(datasets))
    if len(datasets) == 1:
        return datasets[0]
    return interleave_datasets(
        datasets, probabilities=probabilities, seed=seed, stopping_strategy="all_exhausted_without_replacement"
    )


@dataclass(frozen=True)
class TextSourceSpec:
    """One entry of a phase-1 mixture: a ``load_text_dataset`` spec and its (unnormalised) weight."""

    spec: str
    weight: float = 1.0
    text_field: str = "text"


# The seed's phase-1 mixture. The seed fixes FineWeb-Edu at 15% (general text that keeps the model from forgetting
# ordinary English); the split of the other 85% is ours: finance (EDGAR risk factors / MD&A 25%, financial news 20%)
# and retail (e-commerce web text 25%, Amazon reviews 15% over three large categories), about even between the domains.
DEFAULT_TEXT_MIXTURE: tuple[TextSourceSpec, ...] = (
    TextSourceSpec("eloukas/edgar-corpus", 0.25),
    TextSourceSpec("Brianferrell787/financial-news-multisource", 0.20),
    TextSourceSpec("thebajajra/Ecom-niverse", 0.25),
    TextSourceSpec("McAuley-Lab/Amazon-Reviews-2023:raw_review_Electronics", 0.05),
    TextSourceSpec("McAuley-Lab/Amazon-Reviews-2023:raw_review_Home_and_Kitchen", 0.05),
    TextSourceSpec("McAuley-Lab/Amazon-Reviews-2023:raw_review_Clothing_Shoes_and_Jewelry", 0.05),
    TextSourceSpec("HuggingFaceFW/fineweb-edu:sample-100BT", 0.15),
)


@dataclass
class TextFilterStats:
    """What the phase-1 text filters saw and dropped; ``seen == kept + too_short + too_long + duplicate``."""

    seen: int = 0
    kept: int = 0
    too_short: int = 0
    too_long: int = 0
    duplicate: int = 0

    def summary(self) -> str:
        return (
            f"texts seen {self.seen}, kept {self.kept}; dropped: too short {self.too_short}, "
            f"too long {self.too_long}, exact repeats {self.duplicate}"
        )


def dedup_key(text: str) -> int:
    """The exact-repeat key of a phase-1 text: the 64-bit BLAKE2b of its whitespace-normalised form, in [0, 2**64)."""
    return _text_hash(" ".join(text.split()))


class TextStream:
    """Iterates the texts of a (mixed) text dataset through a length filter and exact-repeat dedup.

    Length is counted in characters after stripping. Dedup hashes the whitespace-normalised text (64-bit BLAKE2b, about
    100 bytes of memory per unique text) and drops a text whose hash was seen before in this stream; with several
    processes, split the dataset first (``datasets.distributed.split_dataset_by_node``) and each process dedups its own
    share. ``state_dict()`` is O(1): the number of texts read. ``load_state_dict`` makes the next iteration replay that
    many texts through the filters without yielding them (rebuilding the counters and the seen hashes), so a resumed
    stream yields exactly what an uninterrupted one would have; the replay re-reads the pass so far, which is what a
    small run can afford (at scale, pre-tokenise: ``train.pretokenize``).
    """

    def __init__(
        self,
        dataset: datasets.IterableDataset,
        *,
        min_chars: int = 20,
        max_chars: int | None = 1_000_000,
        dedup: bool = True,
    ) -> None:
        if min_chars < 0:
            raise ValueError(f"min_chars is {min_chars}: it must be >= 0")
        if max_chars is not None and max_chars < max(min_chars, 1):
            raise ValueError(f"max_chars ({max_chars}) must be >= min_chars ({min_chars}) and >= 1")
        self.dataset = dataset
        self.min_chars = min_chars
        self.max_chars = max_chars
        self.dedup = dedup
        self.stats = TextFilterStats()
        self._seen_hashes: set[int] = set()
        self._replay = 0

    def _accept(self, text: str) -> bool:
        """Count ``text`` and say whether it passes the filters (remembering its hash if it does)."""
        self.stats.seen += 1
        length = len(text.strip())
        if length < self.min_chars:
            self.stats.too_short += 1
            return False
        if self.max_chars is not None and length > self.max_chars:
            self.stats.too_long += 1
            return False
        if self.dedup:
            digest = dedup_key(text)
            if digest in self._seen_hashes:
                self.stats.duplicate += 1
                return False
            self._seen_hashes.add(digest)
        self.stats.kept += 1
        return True

    def __iter__(self) -> Iterator[str]:
        replay, self._replay = self._replay, 0
        self.stats, self._seen_hashes = TextFilterStats(), set()
        for row in self.dataset:
            text = row["text"]
            if self._accept(text) and self.stats.seen > replay:
                yield text

    def state_dict(self) -> dict[str, Any]:
        return {"texts_seen": self.stats.seen}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._replay = state["texts_seen"]


def build_text_stream(
    sources: Iterable[TextSourceSpec],
    *,
    seed: int = 0,
    min_chars: int = 20,
    max_chars: int | None = 1_000_000,
    dedup: bool = True,
    streaming: bool = True,
) -> TextStream:
    """Load every source, mix them by weight (``mix_text_datasets``) and wrap the mixture in a ``TextStream``."""
    sources = list(sources)
    loaded = [load_text_dataset(s.spec, text_field=s.text_field, streaming=streaming) for s in sources]
    mixed = mix_text_datasets(loaded, [s.weight for s in sources], seed=seed)
    return TextStream(mixed, min_chars=min_chars, max_chars=max_chars, dedup=dedup)


# --------------------------------------------------------------------------------------------------------------------
# Phase 2: instructions.
# --------------------------------------------------------------------------------------------------------------------

# Task name → the task description put into the seed's query template ``Instruction: {task} Query: {text}``
# (the E5-Mistral / NV-Embed convention: one short sentence naming what the query is and what should be retrieved).
INSTRUCTIONS: dict[str, str] = {
    "finance_qa": "Given a financial question, retrieve passages from financial reports that answer it",
    "product_search": "Given a shopping query, retrieve products that match the query",
    "passage_retrieval": "Given a web search query, retrieve passages that answer the query",
    "question_answering": "Given a question, retrieve Wikipedia passages that answer the question",
    "bitext": "Given a sentence, retrieve its translation in another language",
}


def format_query(text: str, task: str) -> tuple[str, int]:
    """The instructed query ``Instruction: {description} Query: {text}`` and the length of its instruction part.

    ``text`` enters without leading and trailing whitespace, the rule ``sentence_chroma_moe.strip_text`` states for
    every text the model reads (``"\nhdmi cable"`` gives the same query as ``"hdmi cable"``). Documents carry no
    instruction. The returned length ``n`` ends the instruction *before* the space that precedes
    ``text``: characters ``[0, n)`` are instruction, and a token belongs to the query iff its start offset is ``>= n``.
    That boundary holds whether the tokenizer's offsets include the leading space of the first query token (byte-level
    BPE without ``trim_offsets``) or not. The model attends to the instruction but leaves it out of pooling
    (NV-Embed, Lee et al. 2024).
    """
    if task not in INSTRUCTIONS:
        raise ValueError(f"unknown task {task!r}; known tasks: {sorted(INSTRUCTIONS)}")
    prefix = f"Instruction: {INSTRUCTIONS[task]} Query:"
    return f"{prefix} {text.strip()}", len(prefix)


# --------------------------------------------------------------------------------------------------------------------
# Phase 2: pair records and their Hub adapters.
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class PairExample:
    """One contrastive training record: a query, its positive document, hard negatives, and the instruction task."""

    query: str
    positive: str
    negatives: list[str] = field(default_factory=list)
    task: str = "passage_retrieval"


@dataclass
class PairStats:
    """Records made and rows or groups skipped (by reason) while reading pair data."""

    records: int = 0
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(self.skipped.items())) or "none"
        return f"pair records {self.records}; skipped: {reasons}"


PairAdapter = Callable[[Iterable[dict[str, Any]], str, str, PairStats], Iterator[PairExample]]
ESCI_LABELS = {
    "exact": "E",
    "substitute": "S",
    "complement": "C",
    "irrelevant": "I",
    "e": "E",
    "s": "S",
    "c": "C",
    "i": "I",
}


def _esci_product_text(row: Mapping[str, Any], where: str) -> str:
    """Title, bullet points, description, then brand and colour: the shared ESCI dev corpus's order, so training
    documents look like the evaluation ones."""
    parts = [_required(row, key, where) for key in ("product_title", "product_bullet_point", "product_description")]
    extras = [
        f"{label}: {value}."
        for label, key in (("Brand", "product_brand"), ("Color", "product_color"))
        if (value := _required(row, key, where))
    ]
    return "\n".join([part for part in parts if part] + ([" ".join(extras)] if extras else []))


def _esci_pairs(rows: Iterable[dict[str, Any]], source: str, task: str, stats: PairStats) -> Iterator[PairExample]:
    """tasksource/esci (Shopping Queries Dataset, Reddy et al. 2022): one row per (query, product) judgment with
    ``query``, ``query_id``, ``product_id``, ``product_locale``, ``esci_label`` (``Exact``/``Substitute``/
    ``Complement``/``Irrelevant``; the raw release's ``E``/``S``/``C``/``I`` are accepted too) and the product's
    ``product_title``, ``product_description``, ``product_bullet_point``, ``product_brand``, ``product_color``.

    Rows are grouped by ``query_id`` (consecutive in the release; a query that reappears later is an error rather than
    a silent second record). One record per query: its first Exact product is the positive, the other judged products
    are hard negatives, least relevant first (Irrelevant, Complement, Substitute: the ESCI gains 0, 1, 2), so a row's
    first ``max_negatives_per_query`` are the ones a ranking must push furthest below the Exact ones. Further Exact
    products are neither positive nor negative: two records of one query in a batch would make each other's positive
    an in-batch false negative. Queries without any Exact are counted and skipped.
    """
    finished: set[Any] = set()
    current_id: Any = None
    query = ""
    positive: str | None = None
    negatives: dict[str, list[str]] = {}

    def flush() -> Iterator[PairExample]:
        if positive is None:
            stats.skipped["esci_query_without_exact"] += 1
        else:
            stats.records += 1
            yield PairExample(query, positive, [text for label in "ICS" for text in negatives.get(label, [])], task)

    for index, row in enumerate(rows):
        where = f"{source} row {index}"
        query_id = _required(row, "query_id", where)
        if query_id != current_id:
            if current_id is not None:
                yield from flush()
                finished.add(current_id)
            if query_id in finished:
                raise ValueError(
                    f"{where}: query_id {query_id!r} reappears after its group ended; rows must be grouped by query"
                )
            current_id, query, positive, negatives = query_id, _required(row, "query", where), None, {}
        raw_label = _required(row, "esci_label", where)
        label = ESCI_LABELS.get(str(raw_label).strip().lower())
        if label is None:
            raise ValueError(
                f"{where}: unknown esci_label {raw_label!r} (expected Exact/Substitute/Complement/Irrelevant)"
            )
        if label != "E":
            negatives.setdefault(label, []).append(_esci_product_text(row, where))
        elif positive is None:
            positive = _esci_product_text(row, where)
        else:
            stats.skipped["esci_extra_exact_unused"] += 1
    if current_id is not None:
        yield from flush()


def _table_text(table: list[list[Any]]) -> str:
    """Cells joined by `` | ``, rows by newlines: the table layout of the shared TAT-QA finance dev corpus."""
    return "\n".join(" | ".join(str(cell) for cell in row) for row in table)


def _convfinqa_pairs(rows: Iterable[dict[str, Any]], source: str, task: str, stats: PairStats) -> Iterator[PairExample]:
    """ConvFinQA (Chen et al. 2022) conversation-level rows, as in the release's ``train.json``: ``id``, ``pre_text``
    and ``post_text`` (lists of sentences around the table), ``table`` (rows of cells), ``annotation`` (the dialogue)
    and the original FinQA question(s): ``qa`` for a simple conversation, ``qa_0`` and ``qa_1`` for a hybrid one, each
    with ``question`` and ``answer``. The self-contained FinQA questions are used (the dialogue turns lean on earlier
    turns); the evidence passage is the report page: pre-text, table, post-text."""
    for index, row in enumerate(rows):
        where = f"{source} row {index}"
        pre, table, post = (_required(row, key, where) for key in ("pre_text", "table", "post_text"))
        evidence = "\n".join(part for part in (" ".join(pre), _table_text(table), " ".join(post)) if part)
        questions = [qa["question"] for key in ("qa", "qa_0", "qa_1") if (qa := row.get(key)) and qa.get("question")]
        if not questions:
            stats.skipped["convfinqa_row_without_question"] += 1
        for question in questions:
            stats.records += 1
            yield PairExample(question, evidence, [], task)


def _msmarco_pairs(rows: Iterable[dict[str, Any]], source: str, task: str, stats: PairStats) -> Iterator[PairExample]:
    """microsoft/ms_marco ``v1.1``: ``query``, ``query_id``, ``query_type``, ``answers``, ``wellFormedAnswers`` and
    ``passages`` = {``is_selected``, ``passage_text``, ``url``} (parallel lists: the Bing top passages for the query,
    ``is_selected`` = 1 where the annotator used the passage for the answer). The first selected passage is the
    positive, unselected ones are hard negatives (retrieved for this query, so close); queries with no selected
    passage are counted and skipped."""
    for index, row in enumerate(rows):
        where = f"{source} row {index}"
        passages = _required(row, "passages", where)
        selected = _required(passages, "is_selected", f"{where} passages")
        texts = _required(passages, "passage_text", f"{where} passages")
        if len(selected) != len(texts):
            raise ValueError(f"{where}: passages.is_selected has {len(selected)} entries, passage_text {len(texts)}")
        positives = [text for flag, text in zip(selected, texts) if flag]
        if not positives:
            stats.skipped["msmarco_query_without_selected_passage"] += 1
            continue
        stats.records += 1
        yield PairExample(
            _required(row, "query", where), positives[0], [t for f, t in zip(selected, texts) if not f], task
        )


def _first_text(value: Any) -> str | None:
    if isinstance(value, list):
        return value[0] if value else None
    return value


def _text_list(value: Any) -> list[str]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _query_positive_negative_pairs(query_key: str, positive_key: str, negative_key: str | None) -> PairAdapter:
    """Rows that already are pairs: ``query_key``, ``positive_key`` (a string or a list whose first item is used) and
    optionally ``negative_key`` (a string or a list). Covers NQ and FinMTEB-style training triples."""

    def adapt(rows: Iterable[dict[str, Any]], source: str, task: str, stats: PairStats) -> Iterator[PairExample]:
        for index, row in enumerate(rows):
            where = f"{source} row {index}"
            query = _required(row, query_key, where)
            positive = _first_text(_required(row, positive_key, where))
            if not query or not positive:
                stats.skipped["empty_query_or_positive"] += 1
                continue
            negatives = _text_list(row.get(negative_key)) if negative_key else []
            stats.records += 1
            yield PairExample(query, positive, [n for n in negatives if n], task)

    return adapt


@dataclass(frozen=True)
class HubPairSource:
    """How to read one Hub pair dataset: its row adapter and the instruction task its queries get by default."""

    adapter: PairAdapter
    task: str
    data_files: Callable[[str | None, str], str] | None = None
    builder: str = "json"


# FinMTEB-style training triples (``query``, ``positive``, ``negative``) are read by the generic adapter used for any
# Hub ID not listed here, with the task given to ``load_pair_dataset`` (default ``finance_qa``).
GENERIC_PAIR_SOURCE = HubPairSource(_query_positive_negative_pairs("query", "positive", "negative"), "finance_qa")
PAIR_REGISTRY: dict[str, HubPairSource] = {
    "tasksource/esci": HubPairSource(_esci_pairs, "product_search"),
    "MehdiHosseiniMoghadam/ConvFinQA": HubPairSource(_convfinqa_pairs, "finance_qa"),
    "microsoft/ms_marco": HubPairSource(_msmarco_pairs, "passage_retrieval"),
    # sentence-transformers/natural-questions: ``query`` (the NQ question), ``answer`` (the Wikipedia passage).
    "sentence-transformers/natural-questions": HubPairSource(
        _query_positive_negative_pairs("query", "answer", None), "question_answering"
    ),
}


def _check_task(task: str, where: str) -> str:
    if task not in INSTRUCTIONS:
        raise ValueError(f"{where}: unknown task {task!r}; known tasks: {sorted(INSTRUCTIONS)}")
    return task


def validate_pair_row(obj: Mapping[str, Any], where: str) -> None:
    """Check one row of the pair jsonl schema ``{"query", "positive", "negatives": [...]}`` (extra fields allowed)."""
    for key in ("query", "positive"):
        value = obj.get(key)
        if not isinstance(value, str) or not value.strip():
            found = "missing" if value is None else repr(value)
            raise ValueError(f"{where}: field {key!r} must be a non-empty string, found {found}")
    negatives = obj.get("negatives", [])
    if not isinstance(negatives, list) or not all(isinstance(n, str) for n in negatives):
        raise ValueError(f"{where}: field 'negatives' must be a list of strings, found {negatives!r}")


def pair_from_json(obj: Mapping[str, Any], where: str, task: str | None = None) -> PairExample:
    """One validated pair row as a ``PairExample`` (extra fields ignored). The task is ``task`` if given, else the
    row's own ``task`` field; one of them is required."""
    validate_pair_row(obj, where)
    row_task = task if task is not None else obj.get("task")
    if row_task is None:
        raise ValueError(f"{where}: no task: pass task= (one of {sorted(INSTRUCTIONS)}) or add a 'task' field")
    return PairExample(obj["query"], obj["positive"], list(obj.get("negatives", [])), _check_task(row_task, where))


def _local_pairs(path: str, task: str | None, stats: PairStats) -> Iterator[PairExample]:
    for line_no, obj in iter_jsonl(path):
        record = pair_from_json(obj, f"{path}:{line_no}", task)
        stats.records += 1
        yield record


def _hub_pairs(
    hub_id: str, config: str | None, split: str, task: str | None, streaming: bool, stats: PairStats
) -> Iterator[PairExample]:
    source = PAIR_REGISTRY.get(hub_id, GENERIC_PAIR_SOURCE)
    task = _check_task(task or source.task, hub_id)
    data_files = source.data_files(config, split) if source.data_files else None
    rows = _open_hub(hub_id, config, split, streaming, data_files=data_files, builder=source.builder)
    yield from source.adapter(_rows_with_label_names(rows), hub_id, task, stats)


def _pair_rows(spec: str, task: str | None, streaming: bool, stats: PairStats) -> Iterator[dict[str, Any]]:
    if _is_local_spec(spec):
        if not spec.endswith(".jsonl"):
            raise ValueError(f"unsupported local pair file {spec!r}: use .jsonl with query/positive/negatives")
        records = _local_pairs(spec, task, stats)
    else:
        hub_id, config, split = _parse_hub_spec(spec)
        records = _hub_pairs(hub_id, config, split, task, streaming, stats)
    for record in records:
        yield asdict(record)
    logger.info("%s: %s", spec, stats.summary())


def load_pair_dataset(
    spec: str, *, task: str | None = None, streaming: bool = False, stats: PairStats | None = None
) -> datasets.Dataset | datasets.IterableDataset:
    """Pair records (columns ``query``, ``positive``, ``negatives``, ``task``) from a local pair ``.jsonl`` or a Hub
    dataset ``HUB_ID[:CONFIG[:SPLIT]]`` (adapters in ``PAIR_REGISTRY``; other Hub IDs are read as query/positive/
    negative triples).

    ``task`` overrides the source's default instruction task. ``streaming=False`` (the default: pair sets fit in
    memory and the trainer wants a shuffleable map-style ``Dataset``) reads everything now; ``streaming=True`` returns
    an ``IterableDataset``. Skipped rows are counted in ``stats`` (updated as rows are read) and logged.
    """
    stats = stats if stats is not None else PairStats()
    if task is not None:
        _check_task(task, spec)
    if _is_local_spec(spec) and not Path(spec).is_file():
        raise FileNotFoundError(f"pair dataset file not found: {spec}")
    kwargs = {"spec": spec, "task": task, "streaming": streaming, "stats": stats}
    if streaming:
        return datasets.IterableDataset.from_generator(_pair_rows, features=PAIR_FEATURES, gen_kwargs=kwargs)
    return datasets.Dataset.from_list(list(_pair_rows(**kwargs)), features=PAIR_FEATURES)


# --------------------------------------------------------------------------------------------------------------------
# Phase 2: pairs from a BEIR folder, with a query-level train / held-out split.
# --------------------------------------------------------------------------------------------------------------------


def split_query_ids(
    queries: Mapping[str, str],
    *,
    train_fraction: float = 0.8,
    seed: int = 0,
    relevant: Mapping[str, Iterable[str]] | None = None,
) -> tuple[list[str], list[str]]:
    """Deterministic query-level split of ``queries`` (id → text) into (train ids, held-out ids).

    Queries are grouped, and a group's side is set by a hash of ``seed`` and the group's key, not by file order:
    queries with the same normalised text (lower-cased, whitespace collapsed; TAT-QA repeats generic questions across
    reports) form one group, and with ``relevant`` (query id → its relevant document ids) so do queries that share a
    relevant document, transitively (the translations of one sentence in a cross-lingual set, the questions on one
    table): no held-out query's answer is ever trained on through another query. A group's key is its smallest
    document id when it has documents, else its text, so without shared documents adding queries never moves
    existing ones.

    Raises:
        ValueError: ``train_fraction`` not strictly between 0 and 1.
    """
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction is {train_fraction}: it must be strictly between 0 and 1")
    parent: dict[str, str] = {}

    def find(node: str) -> str:
        while parent.setdefault(node, node) != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    def union(a: str, b: str) -> None:
        roots = sorted((find(a), find(b)))  # "d:" < "t:": a group with a document is keyed by its smallest one
        parent[roots[1]] = roots[0]

    node_of = {query_id: "t:" + " ".join(text.lower().split()) for query_id, text in queries.items()}
    for query_id, node in node_of.items():
        for doc_id in (relevant or {}).get(query_id, ()):
            union(node, f"d:{doc_id}")
    train, heldout = [], []
    for query_id, node in node_of.items():
        key = find(node)
        unit = _text_hash(f"{seed}:{key[2:]}" if key.startswith("t:") else f"{seed}:doc:{key[2:]}") / 2.0**64
        (train if unit < train_fraction else heldout).append(query_id)
    return train, heldout


def split_beir_queries(beir: RetrievalSet, train_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train ids, held-out ids) of a retrieval set's judged queries: ``split_query_ids`` grouped by relevant
    document, the one split that phase 2's pairs, its dev set and ``write_heldout_beir`` all use."""
    relevant = {query_id: [doc for doc, grade in grades.items() if grade > 0] for query_id, grades in beir.qrels.items()}
    return split_query_ids(
        dict(zip(beir.query_ids, beir.query_texts)), train_fraction=train_fraction, seed=seed, relevant=relevant
    )


def build_pair_dataset_from_beir(
    beir_dir: str | Path,
    split_queries: Literal["train", "heldout", "all"] = "train",
    *,
    task: str,
    train_fraction: float = 0.8,
    seed: int = 0,
    stats: PairStats | None = None,
    bm25_negatives: int = 0,
) -> datasets.Dataset:
    """Pairs from a BEIR folder's judged queries, restricted to one side of ``split_query_ids`` (``"all"``: no split).

    The folder is read by ``evaluation.tasks.load_beir`` (validated; only queries with a relevant document; documents
    as ``title + " " + text``, the way mteb and our evaluation feed them to the model). Per query, one record (see
    ``_esci_pairs`` for why): the positive is the first document with the query's highest grade, the other judged
    documents of lower grade are hard negatives, lowest grade first (graded ESCI qrels: Exact positive; Irrelevant,
    judged 0, then Complement and Substitute), so a row's first ``max_negatives_per_query`` are the ones a ranking must
    push furthest down.

    An empty (whitespace-only) query or positive skips its query, an empty negative is left out; both are counted in
    ``stats`` (``beir_empty_query``, ``beir_empty_positive``, ``beir_empty_negative``). ``ValueError`` when the chosen
    side has no pair (e.g. every query held out), naming the folder and the counts.

    ``bm25_negatives`` > 0 appends up to that many BM25-mined negatives per record (after the judged ones), drawn only
    from the documents of highest grade of the *chosen* side's queries, so the other side's documents are never read
    (`train.mine_negatives`: positive-aware margin 0.95, no top ranks skipped, any document judged for the query
    excluded). Binary qrels such as TAT-QA's have no judged negatives; these are the other tables and paragraphs a
    question's words also match (Karpukhin et al. 2020, DPR: one BM25 negative per question).
    """
    _check_task(task, str(beir_dir))
    stats = stats if stats is not None else PairStats()
    beir = load_beir(beir_dir)
    documents = dict(zip(beir.doc_ids, beir.doc_texts))
    queries = dict(zip(beir.query_ids, beir.query_texts))
    train_ids, heldout_ids = split_beir_queries(beir, train_fraction, seed)
    chosen = {"train": train_ids, "heldout": heldout_ids, "all": beir.query_ids}[split_queries]
    records, judged_texts, tops = [], [], {}
    for query_id in chosen:
        judged = beir.qrels[query_id]
        top = max(judged.values())
        positive_id = next(doc_id for doc_id, grade in judged.items() if grade == top)
        if not queries[query_id].strip() or not documents[positive_id].strip():
            stats.skipped["beir_empty_query" if not queries[query_id].strip() else "beir_empty_positive"] += 1
            continue
        by_grade = sorted(judged.items(), key=lambda item: item[1])  # stable: file order within a grade
        negatives = [documents[doc_id] for doc_id, grade in by_grade if grade < top]
        kept = [text for text in negatives if text.strip()]
        if len(kept) < len(negatives):
            stats.skipped["beir_empty_negative"] += len(negatives) - len(kept)
        negatives = kept
        records.append(asdict(PairExample(queries[query_id], documents[positive_id], negatives, task)))
        judged_texts.append({documents[doc_id] for doc_id in judged})
        tops.update((documents[doc_id], None) for doc_id, grade in judged.items()
                    if grade == top and documents[doc_id].strip())  # texts, deduplicated, none empty
        stats.records += 1
    logger.info("%s (%s queries): %s", beir_dir, split_queries, stats.summary())
    if not records:
        raise ValueError(f"{beir_dir}: no {split_queries}-side pairs ({len(chosen)} of {len(beir.query_ids)} judged "
                         f"queries on that side at train_fraction={train_fraction}; {stats.summary()})")
    if bm25_negatives > 0:
        from train.mine_negatives import MiningConfig, mine  # mine_negatives imports this module

        config = MiningConfig(skip_top=0, num_negatives=bm25_negatives)
        records, counts = mine(records, list(tops), config, judged=judged_texts)
        logger.info("%s: BM25 negatives: %s", beir_dir, dict(counts))
    return datasets.Dataset.from_list(records, features=PAIR_FEATURES)


def write_heldout_beir(
    beir_dir: str | Path, out_dir: str | Path, *, train_fraction: float = 0.8, seed: int = 0
) -> Path:
    """Write the held-out side of the split that ``build_pair_dataset_from_beir`` uses with the same ``train_fraction``
    and ``seed`` as a BEIR folder (full corpus, held-out queries and their qrels) for evaluation. Query lines are
    copied unchanged, so extra fields survive."""
    source, target = Path(beir_dir), Path(out_dir)
    keep = set(split_beir_queries(load_beir(source), train_fraction, seed)[1])
    (target / "qrels").mkdir(parents=True, exist_ok=True)
    (target / "corpus.jsonl").write_bytes((source / "corpus.jsonl").read_bytes())
    write_jsonl(
        (obj for _, obj in iter_jsonl(source / "queries.jsonl") if obj["_id"] in keep), target / "queries.jsonl"
    )
    lines = (source / "qrels" / "test.tsv").read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines[1:] if line.split("\t")[0] in keep]
    (target / "qrels" / "test.tsv").write_text("\n".join(lines[:1] + kept) + "\n", encoding="utf-8")
    return target
