"""Tests for train/data.py: local loaders, Hub adapters on rows in each dataset's real schema (no network: the Hub
loader is replaced), the filtered/deduplicated text stream, mixture weights, instructions and BEIR pair building."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import datasets
import pytest

import train.data as data
from evaluation.tasks import load_beir
from train.data import (
    DEFAULT_TEXT_MIXTURE,
    INSTRUCTIONS,
    TEXT_REGISTRY,
    PairStats,
    TextSourceSpec,
    TextStream,
    build_pair_dataset_from_beir,
    build_text_stream,
    format_query,
    load_pair_dataset,
    load_text_dataset,
    mix_text_datasets,
    split_beir_queries,
    split_query_ids,
    write_heldout_beir,
)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _texts(dataset) -> list[str]:
    return [row["text"] for row in dataset]


@pytest.fixture
def fake_hub(monkeypatch):
    """Replace the Hub loader: ``fake_hub[hub_id] = rows or Dataset``; each call is recorded in ``fake_hub.calls``."""

    class FakeHub(dict):
        calls: list[dict] = []

        def open(self, hub_id, config, split, streaming, *, data_files, builder):
            self.calls.append(
                {"hub_id": hub_id, "config": config, "split": split, "data_files": data_files, "builder": builder}
            )
            rows = self[hub_id]
            dataset = rows if isinstance(rows, datasets.Dataset) else datasets.Dataset.from_list(rows)
            return dataset.to_iterable_dataset() if streaming else dataset

    hub = FakeHub()
    hub.calls = []
    monkeypatch.setattr(data, "_open_hub", hub.open)
    return hub


# ---------------------------------------------------------------------------------------------------------------
# Local text files.
# ---------------------------------------------------------------------------------------------------------------


def test_local_txt_jsonl_parquet(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first line\n\n   \nsecond line\n", encoding="utf-8")
    assert _texts(load_text_dataset(str(txt))) == ["first line", "second line"]

    jsonl = _write_jsonl(tmp_path / "b.jsonl", [{"body": "x one", "source": "s"}, {"body": "x two"}])
    assert _texts(load_text_dataset(str(jsonl), text_field="body")) == ["x one", "x two"]
    assert load_text_dataset(str(jsonl), text_field="body").column_names == ["text"]

    parquet = tmp_path / "c.parquet"
    datasets.Dataset.from_list([{"text": "p one", "n": 1}, {"text": "p two", "n": 2}]).to_parquet(str(parquet))
    assert _texts(load_text_dataset(str(parquet), streaming=False)) == ["p one", "p two"]


def test_local_errors_name_file_line_and_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_text_dataset(str(tmp_path / "nope.jsonl"))

    missing = _write_jsonl(tmp_path / "m.jsonl", [{"text": "ok"}, {"text": "ok too"}, {"txt": "typo"}])
    stream = iter(load_text_dataset(str(missing)))
    assert next(stream)["text"] == "ok" and next(stream)["text"] == "ok too"
    with pytest.raises(ValueError, match=r"m\.jsonl:3: field 'text' is missing"):
        next(stream)
    null = _write_jsonl(tmp_path / "null.jsonl", [{"text": None}])
    with pytest.raises(ValueError, match=r"null\.jsonl:1: field 'text' is null, not a string"):
        next(iter(load_text_dataset(str(null))))
    with pytest.raises(ValueError, match=r"m\.jsonl:3"):  # eager load reports it at once
        load_text_dataset(str(missing), streaming=False)

    bad_json = tmp_path / "j.jsonl"
    bad_json.write_text('{"text": "fine"}\n{"text": broken\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"j\.jsonl:2: invalid JSON"):
        list(load_text_dataset(str(bad_json)))

    not_string = _write_jsonl(tmp_path / "n.jsonl", [{"text": 5}])
    with pytest.raises(ValueError, match=r"n\.jsonl:1: field 'text' is a int"):
        list(load_text_dataset(str(not_string)))

    csv = tmp_path / "d.csv"
    csv.write_text("text\nhello\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unsupported local file"):
        load_text_dataset(str(csv))

    parquet = tmp_path / "e.parquet"
    datasets.Dataset.from_list([{"body": "a"}, {"body": None}]).to_parquet(str(parquet))
    with pytest.raises(ValueError, match=r"e\.parquet: row 1: column 'body' is None"):
        list(load_text_dataset(str(parquet), text_field="body"))
    with pytest.raises(ValueError, match="no column 'text'"):
        list(load_text_dataset(str(parquet)))


# ---------------------------------------------------------------------------------------------------------------
# Phase-1 Hub adapters, on rows in each dataset's published schema.
# ---------------------------------------------------------------------------------------------------------------

EDGAR_KEYS = [
    "section_1",
    "section_1A",
    "section_1B",
    "section_2",
    "section_3",
    "section_4",
    "section_5",
    "section_6",
    "section_7",
    "section_7A",
    "section_8",
    "section_9",
    "section_9A",
    "section_9B",
    "section_10",
    "section_11",
    "section_12",
    "section_13",
    "section_14",
    "section_15",
]


def _edgar_row(filename: str, **sections: str) -> dict:
    row = {"filename": filename, "cik": "320193", "year": "2020"}
    row.update({key: f"{key} boilerplate of {filename}" for key in EDGAR_KEYS})
    row.update(sections)
    return row


def test_edgar_corpus_keeps_risk_factors_and_mdna(fake_hub):
    fake_hub["eloukas/edgar-corpus"] = [
        _edgar_row("a.htm", section_1A="Our supply chain depends on few vendors.", section_7="Revenue grew 5%."),
        _edgar_row("b.htm", section_1A="", section_7="Net income fell on higher costs."),
    ]
    texts = _texts(load_text_dataset("eloukas/edgar-corpus:year_2020"))
    assert texts == [
        "Our supply chain depends on few vendors.",
        "Revenue grew 5%.",
        "",
        "Net income fell on higher costs.",
    ]
    assert fake_hub.calls[0]["data_files"] == "hf://datasets/eloukas/edgar-corpus/2020/train.jsonl"

    stream = TextStream(load_text_dataset("eloukas/edgar-corpus:year_2020"), min_chars=5)
    assert "" not in list(stream) and stream.stats.too_short == 1  # the empty Item 1A is counted, not lost


def test_financial_reports_sec_groups_sentences_by_filing_section(fake_hub):
    # The card's ClassLabel order is alphabetical: 7 = section_1A, 14 = section_7, 9 = section_2.
    names = sorted(EDGAR_KEYS)
    features = datasets.Features(
        {
            "cik": datasets.Value("string"),
            "sentence": datasets.Value("string"),
            "section": datasets.ClassLabel(names=names),
            "docID": datasets.Value("string"),
            "sentenceID": datasets.Value("string"),
            "sentenceCount": datasets.Value("int64"),
        }
    )
    sentence_rows = [
        ("d1", "section_1A", "Competition is intense."),
        ("d1", "section_1A", "Rates may rise."),
        ("d1", "section_2", "We lease offices."),
        ("d1", "section_7", "Sales rose."),
        ("d2", "section_7", "Margins fell."),
        ("d2", "section_7", "Costs rose."),
    ]
    rows = [
        {
            "cik": "1",
            "sentence": text,
            "section": names.index(section),
            "docID": doc,
            "sentenceID": f"{doc}_{i}",
            "sentenceCount": i,
        }
        for i, (doc, section, text) in enumerate(sentence_rows)
    ]
    assert names.index("section_1A") == 7 and names.index("section_7") == 14
    fake_hub["JanosAudran/financial-reports-sec"] = datasets.Dataset.from_list(rows, features=features)
    texts = _texts(load_text_dataset("JanosAudran/financial-reports-sec"))
    assert texts == ["Competition is intense. Rates may rise.", "Sales rose.", "Margins fell. Costs rose."]
    assert fake_hub.calls[0]["builder"] == "parquet"
    assert fake_hub.calls[0]["data_files"].endswith("@~parquet/small_lite/train/*.parquet")


def test_news_ecom_fineweb_read_their_text_column(fake_hub):
    fake_hub["Brianferrell787/financial-news-multisource"] = [
        {"date": "2020-01-02", "text": "Apple shares rose 2% after earnings.", "extra_fields": '{"ticker": "AAPL"}'}
    ]
    fake_hub["thebajajra/Ecom-niverse"] = [
        {"text": "Free shipping on orders over $35.", "url": "https://shop.example", "domain": "ecommerce"}
    ]
    fake_hub["HuggingFaceFW/fineweb-edu"] = [
        {
            "text": "Photosynthesis converts light.",
            "id": "<urn>",
            "dump": "CC-MAIN-2024-10",
            "url": "u",
            "date": "d",
            "file_path": "f",
            "language": "en",
            "language_score": 0.9,
            "token_count": 5,
            "score": 3.1,
            "int_score": 3,
        }
    ]
    assert _texts(load_text_dataset("Brianferrell787/financial-news-multisource")) == [
        "Apple shares rose 2% after earnings."
    ]
    assert _texts(load_text_dataset("thebajajra/Ecom-niverse")) == ["Free shipping on orders over $35."]
    assert _texts(load_text_dataset("HuggingFaceFW/fineweb-edu:sample-10BT")) == ["Photosynthesis converts light."]
    assert fake_hub.calls[-1]["config"] == "sample-10BT" and fake_hub.calls[-1]["data_files"] is None


def test_amazon_reviews_join_title_and_text(fake_hub):
    fake_hub["McAuley-Lab/Amazon-Reviews-2023"] = [
        {
            "rating": 5.0,
            "title": "Great cable",
            "text": "Charges fast.",
            "images": [],
            "asin": "B01",
            "parent_asin": "B01",
            "user_id": "U1",
            "timestamp": 1588687728923,
            "helpful_vote": 0,
            "verified_purchase": True,
        },
        {
            "rating": 1.0,
            "title": "",
            "text": "Broke in a week.",
            "images": [],
            "asin": "B02",
            "parent_asin": "B02",
            "user_id": "U2",
            "timestamp": 1588687728924,
            "helpful_vote": 3,
            "verified_purchase": False,
        },
    ]
    assert _texts(load_text_dataset("McAuley-Lab/Amazon-Reviews-2023:raw_review_Electronics")) == [
        "Great cable\nCharges fast.",
        "Broke in a week.",
    ]
    assert fake_hub.calls[0]["data_files"].endswith("raw/review_categories/Electronics.jsonl")
    with pytest.raises(ValueError, match="needs a category"):
        list(load_text_dataset("McAuley-Lab/Amazon-Reviews-2023"))


def test_unregistered_hub_id_uses_text_field_and_names_missing_field(fake_hub):
    fake_hub["someone/corpus"] = [{"content": "hello world", "id": 1}]
    assert _texts(load_text_dataset("someone/corpus::validation", text_field="content")) == ["hello world"]
    assert fake_hub.calls[0]["split"] == "validation"
    with pytest.raises(ValueError, match=r"someone/corpus row 0: no field 'text'"):
        list(load_text_dataset("someone/corpus"))
    with pytest.raises(ValueError, match="bad dataset spec"):
        load_text_dataset("a/b:c:d:e")


def test_default_mixture_is_the_seed_registry():
    weights = {source.spec: source.weight for source in DEFAULT_TEXT_MIXTURE}
    total = sum(weights.values())
    fineweb = [w for spec, w in weights.items() if spec.startswith("HuggingFaceFW/fineweb-edu")]
    assert fineweb == [pytest.approx(0.15 * total)]
    assert {spec.split(":")[0] for spec in weights} <= set(TEXT_REGISTRY)


# ---------------------------------------------------------------------------------------------------------------
# Mixture, filters, dedup, resume.
# ---------------------------------------------------------------------------------------------------------------


def _numbered(tmp_path: Path, name: str, count: int) -> datasets.IterableDataset:
    path = tmp_path / f"{name}.txt"
    path.write_text("".join(f"{name} text number {i}\n" for i in range(count)), encoding="utf-8")
    return load_text_dataset(str(path))


def test_mixture_follows_weights_and_is_deterministic(tmp_path):
    a, b = _numbered(tmp_path, "alpha", 2000), _numbered(tmp_path, "beta", 2000)
    first = [t.split()[0] for t in _texts(mix_text_datasets([a, b], [3.0, 1.0], seed=7))]
    head = Counter(first[:800])
    assert abs(head["alpha"] / 800 - 0.75) < 0.05  # 3:1 while both sources last (binomial sd ≈ 0.015)
    assert Counter(first) == {"alpha": 2000, "beta": 2000}  # every row once per pass
    assert first == [t.split()[0] for t in _texts(mix_text_datasets([a, b], [3.0, 1.0], seed=7))]
    assert first != [t.split()[0] for t in _texts(mix_text_datasets([a, b], [3.0, 1.0], seed=8))]


def test_mixture_weights_validated(tmp_path):
    a = _numbered(tmp_path, "alpha", 3)
    with pytest.raises(ValueError, match="2 weights for 1 datasets"):
        mix_text_datasets([a], [1.0, 2.0])
    with pytest.raises(ValueError, match="weight 1 is 0"):
        mix_text_datasets([a, a], [1.0, 0.0])
    with pytest.raises(ValueError, match="weight 0 is -1"):
        mix_text_datasets([a, a], [-1.0, 2.0])
    with pytest.raises(ValueError, match="at least one dataset"):
        mix_text_datasets([], None)


def test_text_stream_filters_and_counts(tmp_path):
    path = tmp_path / "t.txt"
    lines = [
        "short",
        "a text that is long enough",
        "a  text that is long   enough",
        "x" * 60,
        "another text long enough",
        "a text that is long enough",
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    stream = TextStream(load_text_dataset(str(path)), min_chars=10, max_chars=50)
    assert list(stream) == ["a text that is long enough", "another text long enough"]
    stats = stream.stats
    assert (stats.seen, stats.kept, stats.too_short, stats.too_long, stats.duplicate) == (6, 2, 1, 1, 2)
    assert "exact repeats 2" in stats.summary()

    no_dedup = TextStream(load_text_dataset(str(path)), min_chars=10, max_chars=50, dedup=False)
    assert len(list(no_dedup)) == 4 and no_dedup.stats.duplicate == 0
    with pytest.raises(ValueError, match="max_chars"):
        TextStream(load_text_dataset(str(path)), min_chars=10, max_chars=5)


def test_text_stream_resume_equals_one_run(tmp_path):
    corpus = [f"doc {i % 37} with enough characters" for i in range(120)]  # repeats, so dedup state matters
    (tmp_path / "a.txt").write_text("\n".join(corpus[:60]) + "\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("\n".join(corpus[60:]) + "\n", encoding="utf-8")
    sources = [TextSourceSpec(str(tmp_path / "a.txt"), 2.0), TextSourceSpec(str(tmp_path / "b.txt"), 1.0)]

    full_stream = build_text_stream(sources, seed=3)
    full = list(full_stream)
    assert len(full) == 37 and full_stream.stats.duplicate == 120 - 37

    first = build_text_stream(sources, seed=3)
    iterator = iter(first)
    head = [next(iterator) for _ in range(15)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip (checkpoint files)

    resumed = build_text_stream(sources, seed=3)
    resumed.load_state_dict(state)
    assert head + list(resumed) == full
    assert resumed.stats == full_stream.stats


# ---------------------------------------------------------------------------------------------------------------
# Instructions.
# ---------------------------------------------------------------------------------------------------------------


def test_format_query_prefix_boundary():
    text = "usb c cable 2m braided"
    full, prefix_len = format_query(text, "product_search")
    assert full == f"Instruction: {INSTRUCTIONS['product_search']} Query: {text}"
    assert full[:prefix_len].endswith("Query:") and full[prefix_len:] == " " + text
    with pytest.raises(ValueError, match="unknown task 'shopping'"):
        format_query(text, "shopping")


@pytest.mark.parametrize("trim_offsets", [False, True])
def test_prefix_length_gives_exact_token_mask(trim_offsets):
    """A token is a query token iff its start offset >= prefix_len, for a byte-level BPE with or without trimmed
    offsets (the leading space of the first query word belongs to the query token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=trim_offsets)
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator([INSTRUCTIONS["finance_qa"], "Instruction Query revenue growth 2019"], trainer)

    text = "revenue growth 2019"
    full, prefix_len = format_query(text, "finance_qa")
    encoding = tokenizer.encode(full)
    query_tokens = [tok for tok, (start, _) in zip(encoding.tokens, encoding.offsets) if start >= prefix_len]
    decoded = tokenizer.decoder.decode(query_tokens)
    assert decoded.strip() == text


# ---------------------------------------------------------------------------------------------------------------
# Phase-2 pair adapters.
# ---------------------------------------------------------------------------------------------------------------


def _esci_row(query_id: int, query: str, product: str, label: str) -> dict:
    return {
        "example_id": hash((query_id, product)) % 10**6,
        "query": query,
        "query_id": query_id,
        "product_id": f"B0{product[:3].upper()}",
        "product_locale": "us",
        "esci_label": label,
        "small_version": 1,
        "large_version": 1,
        "product_title": f"{product} title",
        "product_description": f"{product} description",
        "product_bullet_point": f"{product} bullets",
        "product_brand": "Acme" if product != "nobrand" else None,
        "product_color": "Black",
        "product_text": "x",
    }


def test_esci_labels_map_to_positive_and_hard_negatives(fake_hub):
    fake_hub["tasksource/esci"] = [
        _esci_row(1, "usb c cable", "cable", "Exact"),
        _esci_row(1, "usb c cable", "adapter", "Substitute"),
        _esci_row(1, "usb c cable", "charger", "Complement"),
        _esci_row(1, "usb c cable", "banana", "Irrelevant"),
        _esci_row(1, "usb c cable", "cable2", "Exact"),
        _esci_row(2, "red dress", "skirt", "Substitute"),
        _esci_row(2, "red dress", "shoe", "Irrelevant"),
        _esci_row(3, "garden hose", "nobrand", "E"),
    ]
    stats = PairStats()
    pairs = load_pair_dataset("tasksource/esci", stats=stats)
    assert list(pairs["query"]) == ["usb c cable", "garden hose"]
    first = pairs[0]
    assert first["positive"] == "cable title\ncable bullets\ncable description\nBrand: Acme. Color: Black."
    assert [n.split()[0] for n in first["negatives"]] == ["banana", "charger", "adapter"]  # I, C, S: least relevant first
    assert first["task"] == "product_search"
    assert pairs[1]["positive"] == "nobrand title\nnobrand bullets\nnobrand description\nColor: Black."
    assert stats.records == 2
    assert stats.skipped == {"esci_query_without_exact": 1, "esci_extra_exact_unused": 1}


def test_esci_bad_rows_are_explicit(fake_hub):
    fake_hub["tasksource/esci"] = [
        _esci_row(1, "q", "a", "Exact"),
        _esci_row(2, "r", "b", "Exact"),
        _esci_row(1, "q", "c", "Exact"),
    ]
    with pytest.raises(ValueError, match="query_id 1 reappears"):
        load_pair_dataset("tasksource/esci")
    fake_hub["tasksource/esci"] = [_esci_row(1, "q", "a", "Perfect")]
    with pytest.raises(ValueError, match="tasksource/esci row 0: unknown esci_label 'Perfect'"):
        load_pair_dataset("tasksource/esci")


def test_convfinqa_question_and_evidence(fake_hub):
    base = {
        "pre_text": ["Revenue was strong.", "See table."],
        "post_text": ["Figures in millions."],
        "table": [["", "2009", "2008"], ["net revenue", "120", "100"]],
        "annotation": {"dialogue_break": ["..."]},
    }
    no_qa = {"qa": None, "qa_0": None, "qa_1": None}  # a table has every column; a row fills its own
    fake_hub["MehdiHosseiniMoghadam/ConvFinQA"] = [
        {
            **base,
            **no_qa,
            "id": "Single_JKHY/2009/page_28.pdf-3",
            "qa": {"question": "what was the change in net revenue?", "answer": "20"},
        },
        {
            **base,
            **no_qa,
            "id": "Double_X/2010/page_3.pdf",
            "qa_0": {"question": "q zero?", "answer": "1"},
            "qa_1": {"question": "q one?", "answer": "2"},
        },
        {**base, **no_qa, "id": "broken"},
    ]
    stats = PairStats()
    pairs = load_pair_dataset("MehdiHosseiniMoghadam/ConvFinQA", stats=stats)
    assert list(pairs["query"]) == ["what was the change in net revenue?", "q zero?", "q one?"]
    assert pairs[0]["positive"] == (
        "Revenue was strong. See table.\n | 2009 | 2008\nnet revenue | 120 | 100\nFigures in millions."
    )
    assert set(list(pairs["task"])) == {"finance_qa"} and stats.skipped == {"convfinqa_row_without_question": 1}


def test_msmarco_selected_passage_is_positive(fake_hub):
    fake_hub["microsoft/ms_marco"] = [
        {
            "answers": ["42"],
            "passages": {
                "is_selected": [0, 1, 0],
                "passage_text": ["neg a", "the answer is 42", "neg b"],
                "url": ["u1", "u2", "u3"],
            },
            "query": "what is the answer",
            "query_id": 1,
            "query_type": "NUMERIC",
            "wellFormedAnswers": [],
        },
        {
            "answers": ["No Answer Present."],
            "passages": {"is_selected": [0, 0], "passage_text": ["x", "y"], "url": ["a", "b"]},
            "query": "unanswerable",
            "query_id": 2,
            "query_type": "DESCRIPTION",
            "wellFormedAnswers": [],
        },
    ]
    stats = PairStats()
    pairs = load_pair_dataset("microsoft/ms_marco:v1.1:train", stats=stats)
    assert pairs[0] == {
        "query": "what is the answer",
        "positive": "the answer is 42",
        "negatives": ["neg a", "neg b"],
        "task": "passage_retrieval",
    }
    assert len(pairs) == 1 and stats.skipped == {"msmarco_query_without_selected_passage": 1}
    assert fake_hub.calls[0]["config"] == "v1.1"


def test_nq_and_finmteb_style_triples(fake_hub):
    fake_hub["sentence-transformers/natural-questions"] = [
        {"query": "when was the eiffel tower built", "answer": "The Eiffel Tower was built 1887-1889."}
    ]
    nq = load_pair_dataset("sentence-transformers/natural-questions")
    assert nq[0] == {
        "query": "when was the eiffel tower built",
        "positive": "The Eiffel Tower was built 1887-1889.",
        "negatives": [],
        "task": "question_answering",
    }

    fake_hub["FinanceMTEB/lists"] = [
        {
            "query": "What is EBITDA?",
            "positive": ["EBITDA is earnings before interest..."],
            "negative": ["P/E is ...", "ROE is ..."],
        }
    ]
    fake_hub["FinanceMTEB/strings"] = [
        {"query": "Define beta", "positive": "Beta measures volatility.", "negative": "Alpha is excess return."},
        {"query": "", "positive": "orphan", "negative": None},
    ]
    fin = load_pair_dataset("FinanceMTEB/lists")
    assert fin[0] == {
        "query": "What is EBITDA?",
        "positive": "EBITDA is earnings before interest...",
        "negatives": ["P/E is ...", "ROE is ..."],
        "task": "finance_qa",
    }
    stats = PairStats()
    fin = load_pair_dataset("FinanceMTEB/strings", task="passage_retrieval", stats=stats)
    assert fin[0] == {
        "query": "Define beta",
        "positive": "Beta measures volatility.",
        "negatives": ["Alpha is excess return."],
        "task": "passage_retrieval",
    }
    assert len(fin) == 1 and stats.skipped == {"empty_query_or_positive": 1}
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        load_pair_dataset("FinanceMTEB/lists", task="nope")


def test_local_pair_jsonl(tmp_path):
    good = _write_jsonl(
        tmp_path / "p.jsonl",
        [
            {
                "query": "A plane is taking off.",
                "positive": "Ein Flugzeug hebt ab.",
                "negatives": ["Ein Mann spielt."],
                "lang": "de",
                "src_id": "train-0",
            },
            {
                "query": "A cat sleeps.",
                "positive": "Un gato duerme.",
                "negatives": [],
                "lang": "es",
                "src_id": "train-1",
            },
        ],
    )
    pairs = load_pair_dataset(str(good), task="bitext")
    assert pairs.column_names == ["query", "positive", "negatives", "task"]
    assert pairs[0] == {
        "query": "A plane is taking off.",
        "positive": "Ein Flugzeug hebt ab.",
        "negatives": ["Ein Mann spielt."],
        "task": "bitext",
    }
    stats = PairStats()
    streamed = load_pair_dataset(str(good), task="bitext", streaming=True, stats=stats)
    assert isinstance(streamed, datasets.IterableDataset) and len(list(streamed)) == 2 and stats.records == 2

    with pytest.raises(ValueError, match=r"p\.jsonl:1: no task"):
        load_pair_dataset(str(good))
    row_task = _write_jsonl(tmp_path / "t.jsonl", [{"query": "q", "positive": "p", "task": "finance_qa"}])
    assert load_pair_dataset(str(row_task))[0]["task"] == "finance_qa"

    cases = [
        ({"query": "q", "negatives": []}, r"x\.jsonl:2: field 'positive' must be a non-empty string, found missing"),
        ({"query": "q", "positive": "p", "negatives": "n"}, r"x\.jsonl:2: field 'negatives' must be a list"),
        ({"query": " ", "positive": "p"}, r"x\.jsonl:2: field 'query' must be a non-empty string"),
    ]
    for bad_row, message in cases:
        bad = _write_jsonl(tmp_path / "x.jsonl", [{"query": "q", "positive": "p"}, bad_row])
        with pytest.raises(ValueError, match=message):
            load_pair_dataset(str(bad), task="bitext")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_pair_dataset(str(tmp_path / "missing.jsonl"), task="bitext")


# ---------------------------------------------------------------------------------------------------------------
# BEIR folders and the query-level split.
# ---------------------------------------------------------------------------------------------------------------


def _beir(tmp_path: Path, qrels: list[tuple[str, str, int]], n_queries: int = 40) -> Path:
    root = tmp_path / "beir"
    (root / "qrels").mkdir(parents=True)
    docs = sorted({doc for _, doc, _ in qrels})
    _write_jsonl(
        root / "corpus.jsonl",
        [{"_id": d, "title": f"T{d}" if d.endswith("t") else "", "text": f"text of {d}"} for d in docs],
    )
    _write_jsonl(
        root / "queries.jsonl", [{"_id": f"q{i}", "text": f"question {i}", "lang": "en"} for i in range(n_queries)]
    )
    (root / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in qrels), encoding="utf-8"
    )
    return root


def test_split_query_ids_is_deterministic_disjoint_and_stable():
    queries = {f"q{i}": f"question number {i}" for i in range(2000)}
    train, heldout = split_query_ids(queries, train_fraction=0.8, seed=1)
    assert set(train).isdisjoint(heldout) and sorted(train + heldout) == sorted(queries)
    assert abs(len(train) / len(queries) - 0.8) < 0.03
    assert (train, heldout) == split_query_ids(queries, train_fraction=0.8, seed=1)
    assert train != split_query_ids(queries, train_fraction=0.8, seed=2)[0]
    more = {**queries, **{f"new{i}": f"another question {i}" for i in range(50)}}
    assert set(train) <= set(split_query_ids(more, train_fraction=0.8, seed=1)[0])  # existing queries never move
    reordered = dict(reversed(list(queries.items())))
    assert set(split_query_ids(reordered, train_fraction=0.8, seed=1)[0]) == set(train)
    # The same text under different ids (and spacing/case) always lands on one side.
    twins = {
        f"t{i}": ("What was the change in revenue?" if i % 2 else "what was the  change in REVENUE?") for i in range(50)
    }
    twin_train, twin_heldout = split_query_ids(twins, train_fraction=0.5, seed=0)
    assert not twin_train or not twin_heldout
    with pytest.raises(ValueError, match="train_fraction"):
        split_query_ids(queries, train_fraction=1.0)


def test_beir_pairs_graded_qrels_and_heldout_folder(tmp_path):
    qrels = [(f"q{i}", f"d{i}t", 3) for i in range(40)] + [(f"q{i}", f"s{i}", 2) for i in range(40)]
    qrels += [(f"q{i}", f"i{i}", 0) for i in range(40)] + [("q0", "c0", 1), ("q40", "i0", 0)]
    root = _beir(tmp_path, qrels, n_queries=42)  # q40: only a grade-0 judgment, q41: none; neither can make a pair
    stats = PairStats()
    train = build_pair_dataset_from_beir(root, "train", task="product_search", train_fraction=0.7, seed=5, stats=stats)
    heldout = build_pair_dataset_from_beir(root, "heldout", task="product_search", train_fraction=0.7, seed=5)
    assert set(train["query"]).isdisjoint(heldout["query"]) and len(train) + len(heldout) == 40
    assert stats.records == len(train) and 0 < len(heldout) < 25
    by_query = {row["query"]: row for row in build_pair_dataset_from_beir(root, "all", task="product_search")}
    assert by_query["question 0"]["positive"] == "Td0t text of d0t"
    assert by_query["question 0"]["negatives"] == ["text of i0", "text of c0", "text of s0"]  # lowest grade first

    out = write_heldout_beir(root, tmp_path / "heldout", train_fraction=0.7, seed=5)
    held = load_beir(out)
    assert sorted(held.query_texts) == sorted(heldout["query"])
    assert len(held.doc_ids) == len(load_beir(root).doc_ids)
    assert json.loads((out / "queries.jsonl").read_text().splitlines()[0])["lang"] == "en"
    with pytest.raises(ValueError, match="unknown task"):
        build_pair_dataset_from_beir(root, task="ranking")


def test_beir_errors_name_the_line(tmp_path):
    root = _beir(tmp_path, [("q0", "d0", 1)], n_queries=2)
    with (root / "qrels" / "test.tsv").open("a") as handle:
        handle.write("q1\tmissing-doc\t1\n")
    with pytest.raises(ValueError, match=r"test\.tsv:3: corpus-id 'missing-doc'"):
        build_pair_dataset_from_beir(root, task="finance_qa")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_pair_dataset_from_beir(tmp_path / "nowhere", task="finance_qa")


def test_shared_finance_dev_split(tmp_path):
    tatqa = data.shared_data_dir() / "retrieval" / "tatqa_finance_dev"
    if not tatqa.is_dir():
        pytest.skip(f"shared data not found at {tatqa} (set CHROMA_SHARED_DATA)")
    train = build_pair_dataset_from_beir(tatqa, "train", task="finance_qa")
    held = load_beir(write_heldout_beir(tatqa, tmp_path / "tatqa_heldout"))
    assert len(train) > 1000 and len(held.query_ids) > 200
    assert set(held.query_texts).isdisjoint(train["query"])  # no held-out question text is trained on


def test_split_groups_queries_that_share_a_relevant_document():
    """Translations of one sentence (or questions on one table) share their relevant document: they land on one side,
    so a held-out query's answer is never a training positive; unrelated queries still split by the fraction."""
    queries, relevant = {}, {}
    for sentence in range(300):
        for lang in ("de", "fr", "ja"):
            queries[f"{lang}-{sentence}"] = f"{lang} sentence {sentence}"
            relevant[f"{lang}-{sentence}"] = [f"en-{sentence}"]
    train, heldout = split_query_ids(queries, train_fraction=0.8, seed=0, relevant=relevant)
    side = {query_id: "train" for query_id in train} | {query_id: "heldout" for query_id in heldout}
    for sentence in range(300):
        assert side[f"de-{sentence}"] == side[f"fr-{sentence}"] == side[f"ja-{sentence}"]
    assert abs(len(train) / len(queries) - 0.8) < 0.06
    ungrouped_train, _ = split_query_ids(queries, train_fraction=0.8, seed=0)
    assert ungrouped_train != train  # without `relevant` the translations scatter over both sides
    # A chain q0 -d1- q1 -d2- q2 is one group, keyed by its smallest document.
    chain = {"q0": "a", "q1": "b", "q2": "c"}
    links = {"q0": ["d1"], "q1": ["d1", "d2"], "q2": ["d2"]}
    for seed in range(20):
        chain_train, chain_heldout = split_query_ids(chain, train_fraction=0.5, seed=seed, relevant=links)
        assert sorted(chain_train) == ["q0", "q1", "q2"] or sorted(chain_heldout) == ["q0", "q1", "q2"]


def test_xling_heldout_targets_are_never_training_positives(tmp_path):
    """On the shared cross-lingual set: no held-out query's English target is the positive of a training pair."""
    folder = data.shared_data_dir() / "retrieval" / "stsb_xling_to_en_dev"
    if not folder.is_dir():
        pytest.skip(f"shared data not present at {folder}")
    beir = load_beir(folder)
    train, heldout = split_beir_queries(beir, 0.8, 0)
    train_targets = {doc for qid in train for doc, grade in beir.qrels[qid].items() if grade > 0}
    heldout_targets = {doc for qid in heldout for doc, grade in beir.qrels[qid].items() if grade > 0}
    assert heldout and train_targets.isdisjoint(heldout_targets)


def test_beir_bm25_negatives_skip_judged_documents_and_stay_on_the_chosen_side(tmp_path):
    """qa has two judged positives (a1, a2): a2 is never its negative although BM25 ranks it high; b1 (qb's positive,
    sharing 'revenue 2019') is; c1 shares no term with qa and is never taken. Documents of held-out queries are not
    in the mining corpus."""
    root = tmp_path / "beir"
    (root / "qrels").mkdir(parents=True)
    texts = {"a1": "revenue 2019 revenue 2019 total table", "a2": "revenue 2019 growth paragraph",
             "b1": "segment revenue 2019 for the cloud business unit", "c1": "employee headcount at year end"}  # fmt: skip
    _write_jsonl(root / "corpus.jsonl", [{"_id": d, "title": "", "text": t} for d, t in texts.items()])
    questions = {"qa": "revenue 2019", "qb": "cloud segment revenue", "qc": "employee headcount"}
    _write_jsonl(root / "queries.jsonl", [{"_id": q, "text": t} for q, t in questions.items()])
    qrels = [("qa", "a1", 1), ("qa", "a2", 1), ("qb", "b1", 1), ("qc", "c1", 1)]
    (root / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in qrels), encoding="utf-8"
    )
    rows = {row["query"]: row for row in build_pair_dataset_from_beir(root, "all", task="finance_qa", bm25_negatives=2)}
    assert rows["revenue 2019"]["positive"] == texts["a1"]
    assert rows["revenue 2019"]["negatives"] == [texts["b1"]]
    assert rows["employee headcount"]["negatives"] == []
    plain = build_pair_dataset_from_beir(root, "all", task="finance_qa")
    assert all(row["negatives"] == [] for row in plain)

    tatqa = data.shared_data_dir() / "retrieval" / "tatqa_finance_dev"
    if not tatqa.is_dir():
        pytest.skip(f"shared data not found at {tatqa} (set CHROMA_SHARED_DATA)")
    beir = load_beir(tatqa)
    documents = dict(zip(beir.doc_ids, beir.doc_texts))
    train_side, heldout = split_beir_queries(beir, 0.8, 0)
    train_documents = {documents[doc] for query in train_side for doc in beir.qrels[query]}
    heldout_only = {documents[doc] for query in heldout for doc in beir.qrels[query]} - train_documents
    train = build_pair_dataset_from_beir(tatqa, "train", task="finance_qa", bm25_negatives=1)
    mined = {text for row in train for text in row["negatives"]}
    assert sum(len(row["negatives"]) for row in train) > 0.6 * len(train)
    assert mined <= train_documents and len(heldout_only) > 100 and heldout_only.isdisjoint(mined)


def test_beir_empty_texts_are_counted_skips_and_an_empty_side_is_an_error(tmp_path):
    """An empty query or positive skips its query and an empty negative is left out, each counted (no empty text is
    trained on, and BM25 mining never sees one); a side with no pair left is a ValueError naming the folder."""
    root = tmp_path / "beir"
    (root / "qrels").mkdir(parents=True)
    texts = {"a1": "revenue 2019 total", "b1": "   ", "c1": "cloud revenue 2019", "c0": "", "d1": "headcount table"}
    _write_jsonl(root / "corpus.jsonl", [{"_id": d, "title": "", "text": t} for d, t in texts.items()])
    questions = {"qa": "revenue 2019", "qb": "cloud revenue", "qc": "cloud segment revenue", "qd": " "}
    _write_jsonl(root / "queries.jsonl", [{"_id": q, "text": t} for q, t in questions.items()])
    qrels = [("qa", "a1", 1), ("qb", "b1", 1), ("qc", "c1", 2), ("qc", "c0", 1), ("qd", "d1", 1)]
    (root / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in qrels), encoding="utf-8"
    )
    stats = PairStats()
    rows = build_pair_dataset_from_beir(root, "all", task="finance_qa", stats=stats, bm25_negatives=1)
    assert rows["query"] == ["revenue 2019", "cloud segment revenue"]
    # Mined from the two non-empty positives only; qa's one candidate (c1) scores within the 0.95 margin of its positive.
    assert rows["negatives"] == [[], [texts["a1"]]]
    assert stats.records == 2
    assert dict(stats.skipped) == {"beir_empty_positive": 1, "beir_empty_query": 1, "beir_empty_negative": 1}
    (root / "queries.jsonl").write_text(json.dumps({"_id": "qa", "text": "revenue 2019"}) + "\n", encoding="utf-8")
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nqa\ta1\t1\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(root))}: no heldout-side pairs \(0 of 1 judged queries on that "
                                         r"side at train_fraction=0\.8; pair records 0; skipped: none\)$"):  # fmt: skip
        build_pair_dataset_from_beir(root, "heldout", task="finance_qa")  # its one query trains
