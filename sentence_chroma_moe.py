"""sentence-transformers integration of Chroma-MoE: one input module that tokenizes, runs `ChromaMoeForEmbedding` and
returns its pooled embedding, so `SentenceTransformer(folder, trust_remote_code=True)` uses the model's own pooling
head.

This file lives beside `modeling_chroma_moe.py` at the root of every published folder. It is kept out of the modeling
file on purpose: transformers checks every import of a `modeling_*.py` it loads as remote code, and plain `AutoModel`
users should not need sentence-transformers installed.

Instructions are attended to but not pooled (NV-Embed §3.3, arXiv:2405.17428; the same idea as sentence-transformers'
`Pooling(include_prompt=False)`). The instruction of a text is
- the prompt sentence-transformers prepends (`encode_query` uses the `query` prompt of
  `config_sentence_transformers.json`),
- plus, at the start of the text itself, an inline `Instruction: {task} Query: ` prefix (the phase-2 training format).
Leading and trailing whitespace of the text is not read (`strip_text`, queries and documents alike), so the pooled
tokens are exactly the tokens of the stripped text tokenised alone, plus `</s>`.
The token boundary is found from the tokenizer's character offsets, not by tokenizing the prompt alone: the byte-level
BPE joins the space that ends a prompt to the first word of the text, so a separately tokenized prompt is one token
longer than its share of the joined text and would hide the text's first word from pooling.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules.input_module import InputModule
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

try:
    from .modeling_chroma_moe import ChromaMoeForEmbedding
    from .quantization_chroma_moe import ChromaMoeInt8Config  # registers the int8 quantizer: int8 folders load too
except ImportError:
    from modeling_chroma_moe import ChromaMoeForEmbedding
    from quantization_chroma_moe import ChromaMoeInt8Config

logger = logging.getLogger(__name__)

INSTRUCTION_PREFIX = "Instruction: "
QUERY_MARKER = " Query: "
DEFAULT_QUERY_INSTRUCTION = "Given a search query, retrieve relevant passages that answer it"
# The serving length when none is given: the model's positions, capped here (longer texts cost quadratic attention and
# lie far beyond the lengths our training recipes use; pass a `max_seq_length` to serve longer).
DEFAULT_MAX_SEQ_LENGTH = 512
# The files a folder needs at its root to load as remote code through both transformers and sentence-transformers.
CODE_FILES = (
    "configuration_chroma_moe.py",
    "modeling_chroma_moe.py",
    "quantization_chroma_moe.py",
    "sentence_chroma_moe.py",
)
_INLINE_INSTRUCTION = re.compile(re.escape(INSTRUCTION_PREFIX) + r".*?" + re.escape(QUERY_MARKER), re.DOTALL)


def instruction_prompt(task: str) -> str:
    """The phase-2 query format's prefix, `Instruction: {task} Query: `; the text follows it directly."""
    return f"{INSTRUCTION_PREFIX}{task}{QUERY_MARKER}"


def instruction_chars(text: str) -> int:
    """Number of leading characters of `text` that form an inline `Instruction: ... Query: ` prefix (0 if none).

    Leading whitespace before the prefix counts as part of it (the tokenizer strips it anyway); the prefix ends at the
    FIRST ` Query: ` after `Instruction: `, so a query that itself contains "Query: " keeps that part.
    """
    stripped = text.lstrip()
    match = _INLINE_INSTRUCTION.match(stripped)
    return len(text) - len(stripped) + match.end() if match else 0


def default_max_seq_length(config: Any) -> int:
    """The serving length used when none is given: `min(max_position_embeddings, DEFAULT_MAX_SEQ_LENGTH)` tokens."""
    return min(config.max_position_embeddings, DEFAULT_MAX_SEQ_LENGTH)


def strip_text(text: str) -> str:
    """The text the model reads: `text` without leading and trailing whitespace (`str.strip`, so newlines, tabs and
    Unicode spaces too).

    One rule for queries and documents, applied by `ChromaMoeSentenceEncoder.preprocess` (inference and phase-2
    training) and `train.data.format_query`: the tokenizer strips only the start of the whole prompt + text string, so
    without it whitespace that opens a query is pooled as tokens of its own, and trailing whitespace adds tokens to any
    text. `"\nhdmi cable"`, `"  hdmi cable  "` and `"hdmi cable"` are therefore the same input.
    """
    return text.strip()


class ChromaMoeSentenceEncoder(InputModule):
    """sentence-transformers input module holding a tokenizer and a `ChromaMoeForEmbedding`.

    `preprocess` returns `input_ids`, `attention_mask` and `pooling_mask` (0 on padding and on the instruction);
    `forward` sets `token_embeddings` (final token states), `sentence_embedding` (the pooling head's output,
    L2-normalised when the config says so) and `expert_counts` (per MoE layer `(E,)`, for `model.update_router_bias`
    in training).
    The module is saved in the folder root as a transformers model folder plus `sentence_bert_config.json`, and copies
    the code files there on every save, so any save (`model.save`, a trainer checkpoint) leaves a folder that loads.
    """

    config_file_name = "sentence_bert_config.json"
    config_keys: ClassVar[list[str]] = ["max_seq_length"]
    save_in_root = True

    def __init__(
        self,
        model: ChromaMoeForEmbedding,
        tokenizer: PreTrainedTokenizerBase,
        max_seq_length: int | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_seq_length = default_max_seq_length(model.config) if max_seq_length is None else max_seq_length

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Checked on every assignment (the constructor and `SentenceTransformer.tokenizer = ...` alike): a fast
        tokenizer whose vocabulary fits the model and whose pad id is the model's, else `ValueError`."""
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"tokenizer {type(tokenizer).__name__} is not a fast tokenizer: character offsets are needed to keep "
                "the instruction out of pooling"
            )
        if len(tokenizer) > self.model.config.vocab_size:
            raise ValueError(
                f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {self.model.config.vocab_size}"
            )
        if tokenizer.pad_token_id != self.model.config.pad_token_id:
            raise ValueError(
                f"tokenizer pad_token_id={tokenizer.pad_token_id} differs from the model's pad_token_id="
                f"{self.model.config.pad_token_id}"
            )
        self._tokenizer = tokenizer

    @property
    def max_seq_length(self) -> int:
        return self._max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        """Checked on every assignment (the constructor, `sentence_bert_config.json` on load and
        `SentenceTransformer.max_seq_length = ...` alike), so a value that is accepted also saves a folder that loads:
        `ValueError` unless it is an int in 1..`max_position_embeddings`."""
        limit = self.model.config.max_position_embeddings
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
            raise ValueError(f"max_seq_length={value!r} must be in 1..max_position_embeddings={limit}")
        self._max_seq_length = value

    def get_embedding_dimension(self) -> int:
        return self.model.config.embedding_dim

    def preprocess(
        self, inputs: Sequence[str], prompt: str | None = None, max_length: int | None = None, **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        """Tokenize `prompt + text` for every text, padded to the longest in the batch and truncated to
        `max_length` (default `max_seq_length`; sentence-transformers' data collator passes it per task).

        Whitespace rule: the text (what follows the prompt and any inline instruction) is read as `strip_text(text)`,
        without leading and trailing whitespace, for queries and documents alike, in training and in inference.

        `pooling_mask` (B, T) zeroes the leading instruction tokens: `<s>` and every token that ends inside the prompt
        plus inline instruction, so the pooled tokens are the ones the text has when tokenized on its own, plus `</s>`.
        At least the last real token (`</s>`) is always pooled, so a text that truncation reduced to its instruction
        still gets an embedding.
        """
        prompt = prompt or ""
        texts, instruction_lengths = [], []
        for text in inputs:
            if not isinstance(text, str):
                # ValueError, not TypeError: sentence-transformers retries preprocess without the prompt on TypeError.
                raise ValueError(
                    f"expected texts (str), got a {type(text).__name__}: {text!r:.80} (pairs are not supported)"
                )
            split = instruction_chars(text)
            instruction = prompt + text[:split].lstrip()
            texts.append(instruction + strip_text(text[split:]))
            instruction_lengths.append(len(instruction))
        boundary = torch.tensor(instruction_lengths)  # (B,) characters of prompt + inline instruction
        encoded = self.tokenizer(
            texts,
            padding=True,
            padding_side="right",  # the instruction is counted from position 0
            truncation=True,
            max_length=max_length or self.max_seq_length,
            return_tensors="pt",
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
        )
        attention_mask = encoded["attention_mask"]  # (B, T)
        special = encoded["special_tokens_mask"].bool()  # (B, T)
        token_start, token_end = encoded["offset_mapping"].unbind(dim=-1)  # (B, T) character span of each token
        # A token ending before the boundary is instruction; one ending on it too, unless it is a zero-width space
        # token: the tokenizer gives the space before an unmerged first word its own token, which the text alone has.
        ends_inside = (token_end < boundary[:, None]) | ((token_end == boundary[:, None]) & (token_start < token_end))
        positions = torch.arange(attention_mask.shape[1])  # (T,)
        in_instruction = (~special & ends_inside) | (special & (positions == 0))  # (B, T)
        instruction_tokens = in_instruction.long().cumprod(dim=1).sum(dim=1)  # (B,) length of the leading run
        instruction_tokens = torch.where(boundary > 0, instruction_tokens, 0)
        instruction_tokens = torch.minimum(instruction_tokens, attention_mask.sum(dim=1) - 1)
        pooling_mask = attention_mask * (positions[None, :] >= instruction_tokens[:, None])
        return {"input_ids": encoded["input_ids"], "attention_mask": attention_mask, "pooling_mask": pooling_mask}

    def forward(self, features: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        output = self.model(
            input_ids=features["input_ids"],
            attention_mask=features["attention_mask"],
            pooling_mask=features["pooling_mask"],
        )
        features["token_embeddings"] = output.last_hidden_state
        features["sentence_embedding"] = output.sentence_embedding
        features["expert_counts"] = output.expert_counts
        return features

    def save(self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any) -> None:
        self.max_seq_length = self.max_seq_length  # re-checked: the config's positions may have changed since it was set
        self.model.save_pretrained(output_path)
        self.save_tokenizer(output_path)
        self.save_config(output_path)
        copy_code_files(output_path)

    @classmethod
    def load(
        cls,
        model_name_or_path: str,
        subfolder: str = "",
        token: bool | str | None = None,
        cache_folder: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        processor_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> ChromaMoeSentenceEncoder:
        """Load from a local folder or a Hub id. `model_kwargs` go to `ChromaMoeForEmbedding.from_pretrained` (e.g.
        `{"dtype": torch.bfloat16}` for GPU inference), `processor_kwargs` to `PreTrainedTokenizerFast.from_pretrained`
        (not `AutoTokenizer`: that reads `config.json`, whose `auto_map` would ask for `trust_remote_code` again)."""
        if kwargs.get("backend", "torch") != "torch":
            raise ValueError(f"backend={kwargs['backend']!r}: Chroma-MoE runs on the torch backend only")
        hub = {"subfolder": subfolder, "token": token, "cache_dir": cache_folder, "revision": revision,
               "local_files_only": local_files_only}  # fmt: skip
        config = cls.load_config(
            model_name_or_path, subfolder=subfolder, token=token, cache_folder=cache_folder, revision=revision,
            local_files_only=local_files_only,
        )  # fmt: skip
        model = ChromaMoeForEmbedding.from_pretrained(model_name_or_path, **hub, **(model_kwargs or {}))
        tokenizer = PreTrainedTokenizerFast.from_pretrained(model_name_or_path, **hub, **(processor_kwargs or {}))
        return cls(model, tokenizer, **config)


def copy_code_files(output_dir: str | os.PathLike) -> None:
    """Copy the three code files from beside this module into `output_dir` (skipping a file onto itself)."""
    source_dir = Path(__file__).resolve().parent
    for name in CODE_FILES:
        source, target = source_dir / name, Path(output_dir) / name
        if not source.is_file():
            raise FileNotFoundError(f"{source} is missing: a Chroma-MoE folder cannot load without it")
        if not (target.exists() and target.samefile(source)):
            shutil.copyfile(source, target)


def build_sentence_transformer(
    model_dir_or_model: str | os.PathLike | ChromaMoeForEmbedding,
    tokenizer: str | os.PathLike | PreTrainedTokenizerBase,
    output_dir: str | os.PathLike | None = None,
    *,
    query_instruction: str = DEFAULT_QUERY_INSTRUCTION,
    max_seq_length: int | None = None,
) -> SentenceTransformer:
    """Wrap a Chroma-MoE embedding model (a model, or a folder with a `ChromaMoeForEmbedding` or phase-1
    `ChromaMoeForMaskedLM` checkpoint: its pooling head is then freshly initialised) as a `SentenceTransformer`.

    Prompts: `query` = `Instruction: {query_instruction} Query: `, `document` = "" (documents get no instruction);
    similarity cosine. `max_seq_length` defaults to `default_max_seq_length(model.config)`. With `output_dir`, the folder is written with `save_sentence_transformer`.
    """
    if isinstance(model_dir_or_model, (str, os.PathLike)):
        model = ChromaMoeForEmbedding.from_pretrained(model_dir_or_model)
    elif type(model_dir_or_model).__name__ == "ChromaMoeForEmbedding":
        model = model_dir_or_model
    else:
        raise TypeError(f"expected a ChromaMoeForEmbedding or a folder, got {type(model_dir_or_model).__name__}")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer)
    st_model = SentenceTransformer(
        modules=[ChromaMoeSentenceEncoder(model, tokenizer, max_seq_length=max_seq_length)],
        prompts={"query": instruction_prompt(query_instruction), "document": ""},
        similarity_fn_name="cosine",
    )
    if output_dir is not None:
        save_sentence_transformer(st_model, output_dir)
    return st_model


def save_sentence_transformer(st_model: SentenceTransformer, output_dir: str | os.PathLike) -> None:
    """`st_model.save(output_dir)`, then check that the folder has what `SentenceTransformer(output_dir,
    trust_remote_code=True)` and `AutoModel.from_pretrained(output_dir, trust_remote_code=True)` need.

    sentence-transformers copies a custom module's file only where the module is saved and only when the module was
    itself loaded as remote code; `ChromaMoeSentenceEncoder.save` already copies the code files to the root, and this
    copies them again for a model whose first module was saved by an older version of this file.
    """
    output_dir = Path(output_dir)
    st_model.save(str(output_dir))
    copy_code_files(output_dir)
    modules = json.loads((output_dir / "modules.json").read_text(encoding="utf-8"))
    first = modules[0]
    if first["path"] != "" or not first["type"].endswith(f"sentence_chroma_moe.{ChromaMoeSentenceEncoder.__name__}"):
        raise ValueError(f"{output_dir / 'modules.json'}: first module {first} is not a root ChromaMoeSentenceEncoder")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "config_sentence_transformers.json"):
        if not (output_dir / name).is_file():
            raise FileNotFoundError(f"saving the sentence-transformers model left no {output_dir / name}")


__all__ = [
    "CODE_FILES",
    "DEFAULT_MAX_SEQ_LENGTH",
    "DEFAULT_QUERY_INSTRUCTION",
    "ChromaMoeSentenceEncoder",
    "build_sentence_transformer",
    "copy_code_files",
    "default_max_seq_length",
    "instruction_chars",
    "instruction_prompt",
    "save_sentence_transformer",
    "strip_text",
]
