"""Train Chroma-MoE's byte-level BPE tokenizer and save it as a ``PreTrainedTokenizerFast`` folder.

Why byte-level BPE (Radford et al. 2019, GPT-2 §2.2; Sennrich et al. 2016 for BPE): every UTF-8 byte is in the base
vocabulary, so text in any script or emoji encodes without an unknown token, while merges learned on finance and retail
text make domain terms ("EBITDA", "10-K", "HDMI", "polyester") single tokens instead of the fragments a general-purpose
WordPiece gives them. Shorter sequences mean cheaper attention and embeddings that see whole terms.

Conventions (RoBERTa's, Liu et al. 2019, which the model config mirrors): ``<s>``=0, ``<pad>``=1, ``</s>``=2,
``<unk>``=3, ``<mask>``=4; a sequence is ``<s> A </s>`` and a pair ``<s> A </s></s> B </s>``.

Text handling: NFKC folds compatibility forms (full-width letters, ligatures) into one spelling, a run of spaces
becomes one space (table cells "|  |" and "$  1,452" would otherwise cost a lone-space token each), a space is put
after every newline followed by text, and leading whitespace is stripped. Every text then gets one prefix space. So a
word has the same token at the start of a text or a line as in the middle: short shopping queries ("hdmi cable") and
table row labels would otherwise put their key term in a rarer space-less variant, and a table's cell separator " |"
is one piece BPE can merge. The decoder removes the prefix space and the space after each newline again, so
``decode(encode(text))`` is ``NFKC(text).lstrip()`` with runs of spaces as one (and no space right after a newline).

Pre-tokenization (the pieces BPE may merge within): GPT-2's regex cuts letters from digits and from punctuation, so
"10-K", "S&P", "USB-C" or "3.5mm" could never become one token however frequent. ``WORD_PATTERN`` keeps the GPT-2
classes (contractions, an optional leading space with a run of letters/digits, punctuation runs, whitespace) but lets
letters and digits join across ``- / . , &`` inside a word; a trailing "." or "," stays separate.

Training text (``read_language_texts``): every input is read as the kind of text the model will embed, each text
tagged with a language. A ``.jsonl`` record is a pair (``query``, ``positive``, ``negatives``: the positive and
negatives are in ``lang``, the query in ``query_lang``, both defaulting to ``--default-language``; the shared bitext
file pairs English queries with translations), or a text (``--text-field``, default ``text``, after the ``title`` when
there is one, as ``evaluation`` reads a BEIR document) in ``lang``. A ``.tsv`` is an STS file (``sentence1``,
``sentence2``, ``lang``). ``.txt``, ``.parquet`` and Hub datasets are in the default language. Exact repeats within a
language are read once (the bitext file repeats each English query once per target language).

Language balance (``balance_languages``): the pool's languages are resampled to probabilities
``q_l = n_l^α / Σ_k n_k^α`` (Conneau et al. 2020, XLM-R §3.1, α = 0.3; Lample & Conneau 2019), keeping the pool's
size, so a language with few texts is repeated and a large one subsampled; α = 1 keeps the pool as read.
Deterministic given ``--seed``.

Held-out documents (``is_held_out``): a fixed fifth of every BEIR corpus (by CRC-32 of ``_id``) that
``--exclude-heldout`` keeps out of training, so ``tokenization.report --heldout DIR`` measures on text the tokenizer
never saw.

Usage::

    python -m tokenization.train --output DIR --input a.jsonl b.txt --weights 2 1 --max-texts 100000
    python -m tokenization.train --output DIR --config tokenization/configs/seed_mix.yaml
    python -m tokenization.train --output DIR --vocab-size 32000 --exclude-heldout --input pairs.jsonl sts_train.tsv \\
        beir_folder/corpus.jsonl --language-alpha 0.3 --seed 0
"""

from __future__ import annotations

import argparse
import csv
import logging
import random
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence, Sized
from pathlib import Path
from typing import Any

import datasets

import yaml
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from train.common import run_command_line
from train.data import iter_jsonl, load_text_dataset, mix_text_datasets

logger = logging.getLogger(__name__)

BOS_TOKEN, PAD_TOKEN, EOS_TOKEN, UNK_TOKEN, MASK_TOKEN = SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
MODEL_MAX_LENGTH = 8192
BYTE_ALPHABET = pre_tokenizers.ByteLevel.alphabet()
MIN_VOCAB_SIZE = len(BYTE_ALPHABET) + len(SPECIAL_TOKENS)
WORD_PATTERN = r"'(?:[sdmt]|ll|ve|re)| ?[\p{L}\p{N}]+(?:[-/.,&][\p{L}\p{N}]+)*| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
CONFIG_KEYS = (
    "inputs", "datasets", "weights", "vocab_size", "max_texts", "text_field",
    "language_alpha", "default_language", "seed", "exclude_heldout",
)  # fmt: skip
LANGUAGE_ALPHA = 0.3
DEFAULT_LANGUAGE = "en"
HELDOUT_BUCKETS = 5
TEXT_LANGUAGE_FEATURES = datasets.Features({"text": datasets.Value("string"), "lang": datasets.Value("string")})


def _special_tokens() -> list[AddedToken]:
    """The specials in id order. ``<mask>`` swallows the space before it (lstrip) so "a <mask> b" has exactly one token
    where the masked word was, not a stray space token plus the mask."""
    return [AddedToken(token, special=True, normalized=False, lstrip=token == MASK_TOKEN) for token in SPECIAL_TOKENS]


def _untrained_tokenizer() -> Tokenizer:
    """The pipeline around the BPE model: normaliser, byte-level pre-tokenizer, decoder (see the module docstring)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.Replace(Regex(" {2,}"), " "),
            normalizers.Replace(Regex(r"\n(?=\S)"), "\n "),
            normalizers.Strip(left=True, right=False),
            normalizers.Prepend(" "),
        ]
    )
    # The prefix space comes from the normaliser: ByteLevel's own add_prefix_space would prefix every regex piece.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.Sequence(
        [decoders.ByteLevel(), decoders.Replace("\n ", "\n"), decoders.Strip(content=" ", left=1, right=0)]
    )
    return tokenizer


def _checked_texts(texts: Iterable[str], counts: dict[str, int], show_progress: bool) -> Iterator[str]:
    """Yield the texts under a progress bar, counting texts, empty texts and UTF-8 bytes into ``counts``."""
    total = len(texts) if isinstance(texts, Sized) else None
    for index, text in enumerate(
        tqdm(texts, total=total, desc="reading texts", unit=" texts", disable=not show_progress)
    ):
        if not isinstance(text, str):
            raise TypeError(f"text #{index} has type {type(text).__name__}, expected str: {text!r:.80}")
        counts["texts"] += 1
        counts["bytes"] += len(text.encode("utf-8"))
        if not text.strip():
            counts["empty"] += 1
        yield text


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 32000, *, min_frequency: int = 2, show_progress: bool = True
) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE on ``texts`` (consumed once, so a stream works) and wrap it for ``transformers``.

    ``vocab_size`` counts the 256 byte symbols and the 5 specials; a small corpus may stop with fewer merges, so check
    ``len(tokenizer)``. ``min_frequency`` is the fewest occurrences a pair needs to be merged.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE needs the {len(BYTE_ALPHABET)} byte symbols plus "
            f"{len(SPECIAL_TOKENS)} special tokens, i.e. at least {MIN_VOCAB_SIZE}"
        )
    tokenizer = _untrained_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=_special_tokens(),
        initial_alphabet=BYTE_ALPHABET,
        show_progress=show_progress,
    )
    counts = {"texts": 0, "empty": 0, "bytes": 0}
    tokenizer.train_from_iterator(_checked_texts(texts, counts, show_progress), trainer=trainer)
    if counts["texts"] == counts["empty"]:
        raise ValueError(f"no text to train on: got {counts['texts']} texts, {counts['empty']} of them empty or blank")
    logger.info(
        "trained on %d texts (%d empty or blank), %.1f MB: vocabulary %d of %d requested",
        counts["texts"], counts["empty"], counts["bytes"] / 1e6, tokenizer.get_vocab_size(), vocab_size,
    )  # fmt: skip
    # RobertaProcessing(sep, cls): positional, the keyword names are not accepted by tokenizers 0.23.
    tokenizer.post_processor = processors.RobertaProcessing(
        (EOS_TOKEN, tokenizer.token_to_id(EOS_TOKEN)),
        (BOS_TOKEN, tokenizer.token_to_id(BOS_TOKEN)),
        add_prefix_space=True,
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        cls_token=BOS_TOKEN,
        sep_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        mask_token=MASK_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
    )


def is_held_out(doc_id: str) -> bool:
    """Whether a BEIR document is in the held-out fifth: ``crc32(_id) % 5 == 0`` (stable across runs and machines)."""
    return zlib.crc32(doc_id.encode("utf-8")) % HELDOUT_BUCKETS == 0


def _string(record: Mapping[str, Any], key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        found = "missing" if value is None else f"a {type(value).__name__}, not a string"
        raise ValueError(f"{where}: field {key!r} is {found}")
    return value


def _jsonl_texts(
    path: Path, text_field: str, default_language: str, exclude_heldout: bool
) -> Iterator[tuple[str, str]]:
    """``(text, lang)`` of a pair file, a BEIR corpus or queries file, or a raw-text file (see the module docstring)."""
    held_out = 0
    for line_no, record in iter_jsonl(path):
        where = f"{path}:{line_no}"
        language = record.get("lang") or default_language
        if "query" in record and "positive" in record:
            yield _string(record, "query", where), record.get("query_lang") or default_language
            yield _string(record, "positive", where), language
            negatives = record.get("negatives") or []
            if not isinstance(negatives, list) or not all(isinstance(text, str) for text in negatives):
                raise ValueError(f"{where}: field 'negatives' must be a list of strings, got {negatives!r:.80}")
            yield from ((text, language) for text in negatives)
            continue
        if exclude_heldout and isinstance(record.get("_id"), str) and is_held_out(record["_id"]):
            held_out += 1
            continue
        text = _string(record, text_field, where)
        title = record.get("title") or ""
        yield ((title + " " + text).strip() if title else text), language
    if held_out:
        logger.info("%s: %d held-out documents skipped (--exclude-heldout)", path, held_out)


def sts_texts(path: Path, default_language: str = DEFAULT_LANGUAGE) -> Iterator[tuple[str, str]]:
    """``(sentence, lang)`` for both sentences of every row of an STS ``.tsv`` (header ``lang pair_id sentence1
    sentence2 score``; CSV-quoted fields)."""
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        missing = [column for column in ("sentence1", "sentence2") if column not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: no column(s) {missing} in the header {reader.fieldnames}")
        for row in reader:
            if None in row or row["sentence1"] is None or row["sentence2"] is None:
                raise ValueError(f"{path}:{reader.line_num}: expected {len(reader.fieldnames)} tab-separated fields")
            language = row.get("lang") or default_language
            yield row["sentence1"], language
            yield row["sentence2"], language


def read_language_texts(
    spec: str,
    *,
    text_field: str = "text",
    default_language: str = DEFAULT_LANGUAGE,
    exclude_heldout: bool = False,
) -> datasets.IterableDataset:
    """One training source as an ``IterableDataset`` of ``{"text", "lang"}`` rows (schemas: see the module docstring).

    ``.jsonl`` and ``.tsv`` files are read here; ``.txt``, ``.parquet`` and Hub IDs through
    ``train.data.load_text_dataset``, in ``default_language``. With ``exclude_heldout``, BEIR documents for which
    :func:`is_held_out` holds are skipped (and counted in the log). A bad row raises ``ValueError``
    naming file, line and field when iteration reaches it.
    """
    path = Path(spec)
    if spec.endswith((".jsonl", ".tsv")):
        if not path.is_file():
            raise FileNotFoundError(f"text dataset file not found: {spec}")
        kwargs = {
            "path": path, "text_field": text_field, "default_language": default_language,
            "exclude_heldout": exclude_heldout,
        }  # fmt: skip
        return datasets.IterableDataset.from_generator(_file_rows, features=TEXT_LANGUAGE_FEATURES, gen_kwargs=kwargs)
    return load_text_dataset(spec, text_field=text_field).map(
        lambda row: {"text": row["text"], "lang": default_language}, features=TEXT_LANGUAGE_FEATURES
    )


def _file_rows(path: Path, text_field: str, default_language: str, exclude_heldout: bool) -> Iterator[dict[str, str]]:
    rows = (
        sts_texts(path, default_language)
        if path.suffix == ".tsv"
        else _jsonl_texts(path, text_field, default_language, exclude_heldout)
    )
    for text, language in rows:
        yield {"text": text, "lang": language}


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha <= 1:
        raise ValueError(f"language_alpha={alpha} must be in (0, 1]: 1 keeps the pool's proportions, 0.3 is XLM-R's")


def language_sample_counts(sizes: Mapping[str, int], alpha: float, total: int) -> dict[str, int]:
    """How many of ``total`` texts each language gets: ``total · q_l`` with ``q_l = n_l^α / Σ_k n_k^α`` (XLM-R,
    Conneau et al. 2020, §3.1), rounded by largest remainder (ties to the first language in sorted order) so the
    counts sum to ``total``. ``sizes`` maps language → texts available (> 0); ``alpha`` in (0, 1]."""
    _check_alpha(alpha)
    languages = sorted(sizes)
    weights = [sizes[language] ** alpha for language in languages]
    exact = [total * weight / sum(weights) for weight in weights]
    counts = [int(value) for value in exact]
    by_remainder = sorted(range(len(languages)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return dict(zip(languages, counts))


def balance_languages(texts_by_language: Mapping[str, Sequence[str]], alpha: float, seed: int) -> list[str]:
    """Resample a pool to the languages' α-smoothed shares (:func:`language_sample_counts`), keeping its size.

    A language drawn ``m`` times from ``n`` texts contributes every text ``m // n`` times plus ``m % n`` texts
    sampled without replacement by ``random.Random(f"{seed}:{lang}")``, so each text appears as evenly as possible
    and the result depends only on the pool, ``alpha`` and ``seed``. Returned grouped by language, in sorted order.
    """
    sizes = {language: len(texts) for language, texts in texts_by_language.items() if texts}
    counts = language_sample_counts(sizes, alpha, sum(sizes.values()))
    sample: list[str] = []
    for language, count in counts.items():
        texts = list(texts_by_language[language])
        repeats, rest = divmod(count, len(texts))
        sample += texts * repeats + random.Random(f"{seed}:{language}").sample(texts, rest)
    logger.info(
        "languages at alpha %s (texts -> drawn): %s", alpha,
        ", ".join(f"{language} {sizes[language]} -> {count}" for language, count in counts.items()),
    )  # fmt: skip
    return sample


def _read_config(path: str) -> dict[str, Any]:
    """A YAML mapping with some of ``CONFIG_KEYS`` (see ``tokenization/configs/seed_mix.yaml``)."""
    with open(path, encoding="utf-8") as handle:
        config = yaml.safe_load(handle) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a YAML mapping, got {type(config).__name__}")
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; allowed: {list(CONFIG_KEYS)}")
    return config


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tokenization.train",
        description="Train the byte-level BPE tokenizer and save it as a folder AutoTokenizer.from_pretrained loads.",
    )
    parser.add_argument("--output", required=True, help="folder to write the tokenizer to")
    parser.add_argument("--vocab-size", type=int, help="vocabulary size incl. bytes and specials (default 32000)")
    parser.add_argument(
        "--config",
        help=f"YAML with any of: {', '.join(CONFIG_KEYS)}. Command-line values win; "
        "naming any --input/--dataset replaces the config's inputs, datasets and weights together",
    )
    parser.add_argument(
        "--input", nargs="+", action="extend", help="local .jsonl (texts, pairs, BEIR), .tsv (STS), .txt or .parquet"
    )
    parser.add_argument("--dataset", nargs="+", action="extend", help="Hub dataset(s) as HUB_ID[:CONFIG[:SPLIT]]")
    parser.add_argument(
        "--weights", nargs="+", action="extend", type=float,
        help="mixture weights, one per source, in the order: all --input files, then all --dataset IDs",
    )  # fmt: skip
    parser.add_argument("--max-texts", type=int, help="stop after this many texts of the mixture")
    parser.add_argument("--text-field", help="JSONL field / parquet column / Hub column to read (default: text)")
    parser.add_argument(
        "--language-alpha", type=float,
        help=f"resample languages to n^alpha shares, in (0, 1]; 1 = as read (default {LANGUAGE_ALPHA}, XLM-R's)",
    )  # fmt: skip
    parser.add_argument(
        "--default-language", help=f"language of texts without a lang field (default {DEFAULT_LANGUAGE})"
    )
    parser.add_argument("--seed", type=int, help="seed of the mixture and of the language resampling (default 0)")
    parser.add_argument(
        "--exclude-heldout", action="store_true", default=None,
        help="skip the held-out fifth of every BEIR corpus (tokenization.train.is_held_out)",
    )  # fmt: skip
    return parser.parse_args(argv)


def _resolve_options(args: argparse.Namespace) -> dict[str, Any]:
    """Merge command line over config over defaults; sources and their weights travel together."""
    config = _read_config(args.config) if args.config else {}
    if args.input or args.dataset:
        sources = {"inputs": args.input or [], "datasets": args.dataset or [], "weights": args.weights}
    else:
        sources = {
            "inputs": config.get("inputs") or [],
            "datasets": config.get("datasets") or [],
            "weights": args.weights if args.weights is not None else config.get("weights"),
        }
    defaults = {
        "vocab_size": 32000, "max_texts": None, "text_field": "text", "language_alpha": LANGUAGE_ALPHA,
        "default_language": DEFAULT_LANGUAGE, "seed": 0, "exclude_heldout": False,
    }  # fmt: skip
    options = {**sources}
    for key, default in defaults.items():
        given = getattr(args, key)
        options[key] = given if given is not None else config.get(key, default)
    options["specs"] = [*options["inputs"], *options["datasets"]]
    if not options["specs"]:
        raise SystemExit("error: no training text: give --input FILE, --dataset HUB_ID or a --config that names them")
    if options["max_texts"] is not None and options["max_texts"] < 1:
        raise SystemExit(f"error: --max-texts must be at least 1, got {options['max_texts']}")
    _check_alpha(options["language_alpha"])
    return options


def main(argv: list[str] | None = None) -> None:
    """Read the sources, mix and cap them, balance languages, train, and save to ``--output``."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parse_args(argv)
    options = _resolve_options(args)
    specs = options["specs"]
    sources = [
        read_language_texts(
            spec, text_field=options["text_field"], default_language=options["default_language"],
            exclude_heldout=options["exclude_heldout"],
        )
        for spec in specs
    ]  # fmt: skip
    stream = mix_text_datasets(sources, options["weights"], seed=options["seed"])
    if options["max_texts"] is not None:
        stream = stream.take(options["max_texts"])
    logger.info("sources %s, weights %s, max_texts %s", specs, options["weights"], options["max_texts"])
    pool: dict[str, dict[str, None]] = {}
    read = 0
    for row in stream:
        read += 1
        pool.setdefault(row["lang"], {})[row["text"]] = None  # a dict keeps first-seen order and drops repeats
    unique = sum(len(texts) for texts in pool.values())
    logger.info("read %d texts: %d exact repeats within a language dropped", read, read - unique)
    pool_lists = {language: list(texts) for language, texts in pool.items()}
    texts = balance_languages(pool_lists, options["language_alpha"], options["seed"])
    tokenizer = train_tokenizer(texts, options["vocab_size"])
    tokenizer.save_pretrained(args.output)
    logger.info("saved to %s", args.output)


if __name__ == "__main__":
    run_command_line(main)
