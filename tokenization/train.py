"""Train Chroma-MoE's byte-level BPE tokenizer and save it as a ``PreTrainedTokenizerFast`` folder.

Why byte-level BPE (Radford et al. 2019, GPT-2 §2.2; Sennrich et al. 2016 for BPE): every UTF-8 byte is in the base
vocabulary, so text in any script or emoji encodes without an unknown token, while merges learned on finance and retail
text make domain terms ("EBITDA", "10-K", "HDMI", "polyester") single tokens instead of the fragments a general-purpose
WordPiece gives them. Shorter sequences mean cheaper attention and embeddings that see whole terms.

Conventions (RoBERTa's, Liu et al. 2019, which the model config mirrors): ``<s>``=0, ``<pad>``=1, ``</s>``=2,
``<unk>``=3, ``<mask>``=4; a sequence is ``<s> A </s>`` and a pair ``<s> A </s></s> B </s>``.

Text handling: NFKC folds compatibility forms (full-width letters, ligatures) into one spelling, and leading whitespace
is stripped. Every text then gets one prefix space, so a word has the same token at the start of a text as in the
middle; short shopping queries ("hdmi cable") would otherwise put their key term in a rarer space-less variant. The
decoder removes that prefix space again, so ``decode(encode(text)) == NFKC(text).lstrip()``.

Pre-tokenization (the pieces BPE may merge within): GPT-2's regex cuts letters from digits and from punctuation, so
"10-K", "S&P", "USB-C" or "3.5mm" could never become one token however frequent. ``WORD_PATTERN`` keeps the GPT-2
classes (contractions, an optional leading space with a run of letters/digits, punctuation runs, whitespace) but lets
letters and digits join across ``- / . , &`` inside a word; a trailing "." or "," stays separate.

Usage::

    python -m tokenization.train --output DIR --input a.jsonl b.txt --weights 2 1 --max-texts 100000
    python -m tokenization.train --output DIR --config tokenization/configs/seed_mix.yaml
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable, Iterator, Sized
from typing import Any

import yaml
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from train.data import load_text_dataset, mix_text_datasets

logger = logging.getLogger(__name__)

BOS_TOKEN, PAD_TOKEN, EOS_TOKEN, UNK_TOKEN, MASK_TOKEN = SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
MODEL_MAX_LENGTH = 8192
BYTE_ALPHABET = pre_tokenizers.ByteLevel.alphabet()
MIN_VOCAB_SIZE = len(BYTE_ALPHABET) + len(SPECIAL_TOKENS)
WORD_PATTERN = r"'(?:[sdmt]|ll|ve|re)| ?[\p{L}\p{N}]+(?:[-/.,&][\p{L}\p{N}]+)*| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
CONFIG_KEYS = ("inputs", "datasets", "weights", "vocab_size", "max_texts", "text_field")


def _special_tokens() -> list[AddedToken]:
    """The specials in id order. ``<mask>`` swallows the space before it (lstrip) so "a <mask> b" has exactly one token
    where the masked word was, not a stray space token plus the mask."""
    return [AddedToken(token, special=True, normalized=False, lstrip=token == MASK_TOKEN) for token in SPECIAL_TOKENS]


def _untrained_tokenizer() -> Tokenizer:
    """The pipeline around the BPE model: normaliser, byte-level pre-tokenizer, decoder (see the module docstring)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Strip(left=True, right=False), normalizers.Prepend(" ")]
    )
    # The prefix space comes from the normaliser: ByteLevel's own add_prefix_space would prefix every regex piece.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Strip(content=" ", left=1, right=0)])
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
        help="YAML with any of: inputs, datasets, weights, vocab_size, max_texts, text_field. Command-line values win; "
        "naming any --input/--dataset replaces the config's inputs, datasets and weights together",
    )
    parser.add_argument("--input", nargs="+", action="extend", help="local .txt, .jsonl or .parquet file(s)")
    parser.add_argument("--dataset", nargs="+", action="extend", help="Hub dataset(s) as HUB_ID[:CONFIG[:SPLIT]]")
    parser.add_argument(
        "--weights", nargs="+", action="extend", type=float,
        help="mixture weights, one per source, in the order: all --input files, then all --dataset IDs",
    )  # fmt: skip
    parser.add_argument("--max-texts", type=int, help="stop after this many texts of the mixture")
    parser.add_argument("--text-field", help="JSONL field / parquet column / Hub column to read (default: text)")
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
    options = {
        **sources,
        "vocab_size": args.vocab_size if args.vocab_size is not None else config.get("vocab_size", 32000),
        "max_texts": args.max_texts if args.max_texts is not None else config.get("max_texts"),
        "text_field": args.text_field if args.text_field is not None else config.get("text_field", "text"),
    }
    options["specs"] = [*options["inputs"], *options["datasets"]]
    if not options["specs"]:
        raise SystemExit("error: no training text: give --input FILE, --dataset HUB_ID or a --config that names them")
    if options["max_texts"] is not None and options["max_texts"] < 1:
        raise SystemExit(f"error: --max-texts must be at least 1, got {options['max_texts']}")
    return options


def main(argv: list[str] | None = None) -> None:
    """Read the sources (through ``train.data``), mix and cap them, train, and save to ``--output``."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parse_args(argv)
    options = _resolve_options(args)
    specs = options["specs"]
    sources = [load_text_dataset(spec, text_field=options["text_field"]) for spec in specs]
    stream = mix_text_datasets(sources, options["weights"])
    if options["max_texts"] is not None:
        stream = stream.take(options["max_texts"])
    logger.info("sources %s, weights %s, max_texts %s", specs, options["weights"], options["max_texts"])
    tokenizer = train_tokenizer((row["text"] for row in stream), options["vocab_size"])
    tokenizer.save_pretrained(args.output)
    logger.info("saved to %s", args.output)


if __name__ == "__main__":
    main()
