"""Export a trained Chroma-MoE model as a complete Hugging Face Hub folder, and optionally upload it.

    python -m train.export --model DIR --output HUB_DIR [--results results.json] [--max-seq-length N]
        [--push-to-hub ORG/NAME]

`DIR` is a sentence-transformers folder (phase 2's final folder, with `modules.json`) or a transformers folder of a
`ChromaMoeForEmbedding` / `ChromaMoeForMaskedLM` with its tokenizer (wrapped with the default prompts). The Hub folder
gets the safetensors weights, `config.json` with the full `auto_map`, the three code files at the root, the tokenizer,
the sentence-transformers files (`modules.json`, `config_sentence_transformers.json`, `sentence_bert_config.json`) and a
model card (`README.md`) whose YAML metadata the Hub reads (library, pipeline tag, tags, license, datasets) with the
model's size (parameters total / active per token) and, given `--results` from `python -m evaluation.run`, its
evaluation table. The code files are this repository's current ones, so an export ships the code it was tested with.

Serving length: the folder's `max_seq_length` is `--max-seq-length` when given, else `min(max_position_embeddings,
512)` (`sentence_chroma_moe.default_max_seq_length`), never the training length the trained folder was saved with (48
tokens in the quickstart: documents would be cut there silently). The export prints the serving length it chose and
the training lengths, and the model card states both.
`--push-to-hub` uploads exactly the files listed after the export (`HfApi.upload_folder` with `allow_patterns`).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCardData
from sentence_transformers import SentenceTransformer

from configuration_chroma_moe import ChromaMoeConfig
from evaluation.run import markdown_table
from modeling_chroma_moe import count_parameters
from sentence_chroma_moe import (
    CODE_FILES,
    DEFAULT_MAX_SEQ_LENGTH,
    build_sentence_transformer,
    default_max_seq_length,
    save_sentence_transformer,
)
from train.common import RUN_CONFIG_FILE, latest_checkpoint, read_trainer_state, run_command_line

logger = logging.getLogger(__name__)

# Phase-1 pretraining mix (tokenization/configs/seed_mix.yaml) and the multilingual pair source; pass --datasets to
# name the actual training sets of a release.
DEFAULT_DATASETS = ("thebajajra/Ecom-niverse", "eloukas/edgar-corpus", "PhilipMay/stsb_multi_mt")
TAGS = (
    "sentence-transformers",
    "sentence-similarity",
    "feature-extraction",
    "text-embeddings",
    "mixture-of-experts",
    "moe",
    "finance",
    "retail",
    "custom_code",
)
REQUIRED_FILES = (
    "README.md",
    "config.json",
    "config_sentence_transformers.json",
    "modules.json",
    "sentence_bert_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    *CODE_FILES,
)


def load_for_export(model_dir: str | Path) -> SentenceTransformer:
    """The model of `model_dir` as a `SentenceTransformer`: loaded as is when the folder has `modules.json`, else
    wrapped from its transformers checkpoint and tokenizer with `build_sentence_transformer`'s defaults."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir / 'config.json'} not found: --model must be a saved Chroma-MoE folder")
    if (model_dir / "modules.json").is_file():
        return SentenceTransformer(str(model_dir), trust_remote_code=True, local_files_only=True, device="cpu")
    if not (model_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{model_dir / 'tokenizer.json'} not found: the model folder must hold its tokenizer")
    return build_sentence_transformer(model_dir, model_dir)


def training_run(model_dir: str | Path) -> dict[str, Any]:
    """The config of the phase-2 run whose `final/` folder this is: the run's `run_config.json` (phase 2 writes it
    beside `final/`) or its latest checkpoint's `trainer_state.json` (in `../checkpoints`), else `{}` (a folder moved
    away from its run, or a transformers checkpoint)."""
    model_dir = Path(model_dir)
    run_config = model_dir.parent / RUN_CONFIG_FILE
    checkpoint = latest_checkpoint(model_dir.parent / "checkpoints")
    if run_config.is_file():
        return json.loads(run_config.read_text(encoding="utf-8"))
    if checkpoint is not None:
        return read_trainer_state(checkpoint).get("config", {})
    return {}


def training_lengths(model_dir: str | Path) -> dict[str, int]:
    """The token lengths the model was trained at: `max_query_length` and `max_document_length` of its phase-2 run
    (`training_run`), else nothing. The folder's own `max_seq_length` is its serving length, not a training one."""
    run = training_run(model_dir)
    return {key: run[key] for key in ("max_query_length", "max_document_length") if isinstance(run.get(key), int)}


def describe_teacher(run: dict[str, Any]) -> str | None:
    """The distillation teacher of a phase-2 run config (`training_run`) in words, for the model card; None without
    one."""
    teacher = run.get("teacher")
    if not isinstance(teacher, str):
        return None
    limit = run.get("teacher_max_seq_length")
    reading = "its own maximum length" if limit is None else f"up to {limit} of its tokens"
    return f"{teacher} (reading {reading}; similarity matching and KL score distillation beside InfoNCE)"


def describe_training_lengths(lengths: dict[str, int]) -> str:
    """`lengths` of `training_lengths` in words, for the log and the model card."""
    if not lengths:
        return "not recorded in the trained folder"
    names = {"max_query_length": "queries", "max_document_length": "documents"}
    return ", ".join(f"{names[key]} {value} tokens" for key, value in lengths.items()) + " (the phase-2 run's config)"


def model_card(
    st_model: SentenceTransformer,
    *,
    model_id: str,
    datasets: list[str],
    results: dict[str, Any] | None = None,
    base_model: str | None = None,
    trained_lengths: dict[str, int] | None = None,
    distilled_from: str | None = None,
) -> str:
    """The README.md: Hub metadata (YAML front matter written by `huggingface_hub.ModelCardData`) and the body.
    `trained_lengths` (from `training_lengths`) is stated beside the serving length `st_model.max_seq_length`;
    `distilled_from` (from `describe_teacher`), when given, names the phase-2 teacher."""
    config: ChromaMoeConfig = st_model[0].model.config
    params = count_parameters(config)
    metadata = ModelCardData(
        library_name="sentence-transformers",
        pipeline_tag="sentence-similarity",
        license="apache-2.0",
        tags=list(TAGS),
        datasets=list(datasets),
        base_model=base_model,
    )
    attention = "grouped-query attention"
    if config.attention_type == "mla":
        attention = "Multi-Head Latent Attention (DeepSeek-V2)"
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    prompts = st_model.prompts
    details = [
        ("Architecture", (f"bidirectional sparse MoE encoder: {attention}, shared + routed SwiGLU experts "
                          f"(DeepSeekMoE), `{config.pooling_type}` pooling head")),
        ("Parameters", f"{params['total']:,} total, {params['active']:,} active per token"),
        ("Layers", f"{config.num_hidden_layers} ({config.num_hidden_layers - moe_layers} dense, {moe_layers} MoE)"),
        ("Hidden size", str(config.hidden_size)),
        ("Experts per MoE layer", (f"{config.n_routed_experts} routed (top-{config.num_experts_per_tok}, width "
                                   f"{config.moe_intermediate_size}) + {config.n_shared_experts} shared")),
        ("Embedding dimension", str(config.embedding_dim)),
        ("Max sequence length", (f"{st_model.max_seq_length} tokens when serving (longer texts are truncated; "
                                 f"positions up to {config.max_position_embeddings})")),
        ("Training sequence length", describe_training_lengths(trained_lengths or {})),
        *([("Distilled from", distilled_from)] if distilled_from else []),
        ("Similarity", st_model.similarity_fn_name),
        ("Query prompt", f"`{prompts.get('query', '')}`"),
        ("Document prompt", f"`{prompts.get('document', '')}`" if prompts.get("document") else "none"),
        ("Vocabulary", f"{config.vocab_size:,} byte-level BPE tokens"),
    ]  # fmt: skip
    lines = [
        "---",
        metadata.to_yaml(),
        "---",
        "",
        f"# {model_id.split('/')[-1]}",
        "",
        ("Chroma-MoE is a sparse Mixture-of-Experts text-embedding model for finance and retail search and "
         "multilingual use. Every token runs through a few of many small experts, so the model holds far more "
         "parameters than it computes with. The instruction of a query is attended to but left out of the pooled "
         "embedding."),
        "",
        "## Model details",
        "",
        "| | |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in details),
        "",
        "## Usage",
        "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "",
        f'model = SentenceTransformer("{model_id}", trust_remote_code=True)',
        'queries = model.encode_query(["What was the change in revenue between 2018 and 2019?"])',
        'documents = model.encode_document(["Revenue rose from $1.2m in 2018 to $1.5m in 2019."])',
        "print(model.similarity(queries, documents))",
        "```",
        "",
        ("With transformers only, for documents: `sentence_embedding` pools every token. A query's instruction "
         "prompt must be attended to but left out of the pooled tokens (`pooling_mask`), which sentence-transformers' "
         "`encode_query` does: use it for queries. sentence-transformers also strips leading and trailing whitespace "
         "from every text; strip yours to get its embeddings:"),
        "",
        "```python",
        "from transformers import AutoModelForTextEncoding, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{model_id}", trust_remote_code=True)',
        f'model = AutoModelForTextEncoding.from_pretrained("{model_id}", trust_remote_code=True)',
        'batch = tokenizer(["hdmi cable 2m"], padding=True, truncation=True, return_tensors="pt")',
        'embeddings = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).sentence_embedding',
        "```",
        "",
        "## Evaluation",
        "",
        markdown_table(results) if results else "No evaluation results were given to this export.",
        "",
        "## Training data",
        "",
        *([f"- [{name}](https://huggingface.co/datasets/{name})" for name in datasets]
          or ["Local files only: no Hub dataset was named at export (`python -m train.export --datasets ID ...`)."]),
        "",
        "## License",
        "",
        "Apache-2.0.",
        "",
    ]
    return "\n".join(lines)


def read_results(path: str | Path) -> dict[str, Any]:
    """An `evaluation.run` results file:
    `{"tasks": {task: {model: {metric: value}}}, "models": {model: {...}}, ...}`."""
    path = Path(path)
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    for key in ("tasks", "models"):
        if not isinstance(results.get(key), dict):
            raise ValueError(
                f"{path}: field {key!r} missing or not an object; expected python -m evaluation.run output"
            )
    return results


def card_model_name(name: str, model_dir: Path, model_id: str) -> str:
    """How the model card names an evaluated model: the exported folder is `model_id`, another local folder its folder
    name (e.g. ``untrained``), ``bm25+<model>`` the same with its dense part renamed; ``bm25``, ``minilm`` and Hub ids
    as they are. Local paths of the machine that evaluated mean nothing on the Hub."""
    if name.startswith("bm25+"):
        return "bm25+" + card_model_name(name.removeprefix("bm25+"), model_dir, model_id)
    if Path(name).is_dir():
        return model_id if Path(name).resolve() == model_dir.resolve() else Path(name).resolve().name
    return name


def card_results(results: dict[str, Any], model_dir: Path, model_id: str) -> dict[str, Any]:
    """`results` (evaluation.run's) with every model renamed by `card_model_name`, for the model card."""

    def rename(per_model: dict[str, Any]) -> dict[str, Any]:
        return {card_model_name(name, model_dir, model_id): value for name, value in per_model.items()}

    def rename_inside(name: str, info: dict[str, Any]) -> dict[str, Any]:
        """A hybrid's ``similarity`` names its dense model (``rrf (k=60) of bm25 and <model>``): renamed too."""
        if not name.startswith("bm25+") or not isinstance(info.get("similarity"), str):
            return info
        dense = name.removeprefix("bm25+")
        return info | {"similarity": info["similarity"].replace(dense, card_model_name(dense, model_dir, model_id))}

    renamed = {key: {task: rename(per_model) for task, per_model in results.get(key, {}).items()}
               for key in ("tasks", "notes")}  # fmt: skip
    models = rename({name: rename_inside(name, info) for name, info in results["models"].items()})
    return results | renamed | {"models": models, "errors": rename(results.get("errors", {}))}


def folder_files(folder: Path) -> list[str]:
    """Every file under `folder`, as sorted POSIX paths relative to it."""
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())


def export(
    model_dir: str | Path,
    output_dir: str | Path,
    *,
    results_path: str | Path | None = None,
    datasets: list[str] | None = None,
    model_id: str | None = None,
    base_model: str | None = None,
    max_seq_length: int | None = None,
) -> list[str]:
    """Write the Hub folder and return the files in it (relative paths, sorted). `output_dir` must be new or empty,
    so nothing stale is uploaded with it.

    The folder serves at `max_seq_length` tokens (default `min(max_position_embeddings, 512)`; `ValueError` outside
    1..max_position_embeddings); the choice and the training lengths are printed and stated in the model card.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"{output_dir} is not empty: export into a new folder")
    results = read_results(results_path) if results_path else None
    st_model = load_for_export(model_dir)
    config = st_model[0].model.config
    if max_seq_length is None:
        max_seq_length = default_max_seq_length(config)
        how = f"min(max_position_embeddings={config.max_position_embeddings}, {DEFAULT_MAX_SEQ_LENGTH})"
    else:
        how = "--max-seq-length"
    st_model.max_seq_length = max_seq_length
    st_model.tokenizer.model_max_length = max_seq_length  # transformers users' truncation=True cuts where ST's does
    trained = training_lengths(model_dir)
    print(f"export: serving max_seq_length={max_seq_length} tokens ({how}); trained at: "
          f"{describe_training_lengths(trained)}")  # fmt: skip
    save_sentence_transformer(st_model, output_dir)
    model_id = model_id or output_dir.name
    card = model_card(
        st_model,
        model_id=model_id,
        datasets=list(DEFAULT_DATASETS if datasets is None else datasets),
        results=card_results(results, Path(model_dir), model_id) if results else None,
        base_model=base_model,
        trained_lengths=trained,
        distilled_from=describe_teacher(training_run(model_dir)),
    )
    (output_dir / "README.md").write_text(card, encoding="utf-8")
    files = folder_files(output_dir)
    missing = [name for name in REQUIRED_FILES if name not in files]
    if not any(name.endswith(".safetensors") for name in files):
        missing.append("model.safetensors")
    if missing:
        raise FileNotFoundError(f"export to {output_dir} is missing {missing}")
    return files


def push_to_hub(output_dir: str | Path, repo_id: str, files: list[str], api: HfApi | None = None) -> str:
    """Create `repo_id` if needed and upload exactly `files` of `output_dir` in one commit; returns the commit URL."""
    api = api or HfApi()
    api.create_repo(repo_id, repo_type="model", exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(output_dir),
        repo_type="model",
        allow_patterns=files,
        commit_message="Upload Chroma-MoE export",
    )
    return str(commit.commit_url)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="sentence-transformers or transformers folder of the model")
    parser.add_argument("--output", required=True, help="new (or empty) folder for the Hub files")
    parser.add_argument("--results", help="results.json of python -m evaluation.run, shown in the model card")
    parser.add_argument("--push-to-hub", metavar="ORG/NAME", help="upload the folder to this Hub model repository")
    parser.add_argument(
        "--datasets", nargs="+", help=f"Hub ids of the training data (default: {' '.join(DEFAULT_DATASETS)})"
    )
    parser.add_argument("--base-model", help="Hub id of the checkpoint this model was trained from, for the metadata")
    parser.add_argument(
        "--max-seq-length", type=int,
        help=f"serving length in tokens (default: min(max_position_embeddings, {DEFAULT_MAX_SEQ_LENGTH}))",
    )  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    files = export(
        args.model,
        args.output,
        results_path=args.results,
        datasets=args.datasets,
        model_id=args.push_to_hub,
        base_model=args.base_model,
        max_seq_length=args.max_seq_length,
    )
    logger.info("wrote %d files to %s: %s", len(files), args.output, ", ".join(files))
    if args.push_to_hub:
        logger.info("uploaded to %s", push_to_hub(args.output, args.push_to_hub, files))


if __name__ == "__main__":
    run_command_line(main)
