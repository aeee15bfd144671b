"""Benchmark: tokens/s that phase 1's input pipeline delivers to one training process, on-the-fly vs pre-tokenised.

    OMP_NUM_THREADS=1 python -m benchmarks.data_throughput --megabytes 300

The raw text of ``../shared/data/raw`` is repeated into a ``--megabytes`` jsonl corpus (dedup is off: the repeats are
the point). Both paths deliver what ``train/phase1.py`` trains on: masked micro-batches (input_ids, labels) of
``--batch-size`` × ``--seq-len`` tokens for rank 0 of ``--processes``, built by phase 1's own functions:

- on the fly (``onthefly_micro_batches``): read and filter the whole stream, tokenise and pack this process's share
  of the texts (every ``--processes``-th) in the loop;
- shards (``ShardMicroBatches`` through ``shard_loader``, ``--workers`` DataLoader workers): the corpus is
  pre-tokenised once (``train.pretokenize``, ``--num-proc``; its rate is printed, not part of the per-process figure)
  and the process reads only its own rows.

Each path runs ``--seconds`` after one warm-up micro-batch. The last two lines are
``shard_tokens_per_s_per_process: N`` and ``onthefly_tokens_per_s_per_process: N``.
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from transformers import AutoTokenizer

from benchmarks.machine import report_load
from tokenization.train import train_tokenizer
from train.data import TextSourceSpec, build_text_stream, shared_data_dir
from train.mlm_data import (
    BatchLayout,
    MlmMasker,
    PackedBlocks,
    ShardMicroBatches,
    onthefly_micro_batches,
    shard_loader,
)
from train.pretokenize import BlockOrder, PackedBlockShards, pretokenize

MLM_PROBABILITY = 0.15


def write_corpus(path: Path, megabytes: float) -> int:
    """Repeat the texts of ``shared_data_dir()/raw/*.jsonl`` into ``path`` until it holds ``megabytes``; returns the
    number of texts written. FileNotFoundError if that folder holds no text."""
    raw = shared_data_dir() / "raw"
    texts = [json.loads(line)["text"] for file in sorted(raw.glob("*.jsonl"))
             for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]  # fmt: skip
    if not texts:
        raise FileNotFoundError(f"no text in {raw}/*.jsonl to repeat (set CHROMA_SHARED_DATA to the shared data folder)")
    lines = [json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in texts]
    target, written, count = megabytes * 1e6, 0, 0
    with path.open("w", encoding="utf-8") as handle:
        while written < target:
            for line in lines:
                handle.write(line)
                written += len(line.encode("utf-8"))
                count += 1
                if written >= target:
                    break
    return count


def measure(next_micro: Callable[[], tuple[torch.Tensor, torch.Tensor]], seconds: float) -> float:
    """Tokens/s of ``next_micro`` over ``seconds`` of calls, after one warm-up call (workers start, files open)."""
    next_micro()
    tokens, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        inputs, _ = next_micro()
        tokens += inputs.numel()
    return tokens / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=float, default=300.0, help="size of the repeated raw-text corpus")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8, help="blocks per micro-batch")
    parser.add_argument("--processes", type=int, default=1, help="training processes; the figures are rank 0's")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers of the shard path")
    parser.add_argument("--num-proc", type=int, default=2, help="pre-tokenisation processes")
    parser.add_argument("--seconds", type=float, default=20.0, help="measuring time per path")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: an 8,192-token BPE trained on the raw text)")
    parser.add_argument("--workdir", help="where the corpus and the shards go (default: a temporary folder)")
    args = parser.parse_args(argv)
    report_load("start")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        corpus = work / "corpus.jsonl"
        texts = write_corpus(corpus, args.megabytes)
        print(f"corpus: {texts} texts, {corpus.stat().st_size / 1e6:.1f} MB ({corpus})", flush=True)
        if args.tokenizer:
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        else:
            raw = [json.loads(line)["text"] for line in (shared_data_dir() / "raw" / "finance_text.jsonl").open()]
            tokenizer = train_tokenizer(raw, vocab_size=8192, show_progress=False)
        masker = MlmMasker(tokenizer, MLM_PROBABILITY, span_masking=False, seed=0)
        layout = BatchLayout(args.batch_size * args.processes, args.batch_size, 1, args.processes, rank=0)
        sources = [TextSourceSpec(str(corpus))]

        started = time.perf_counter()
        manifest = pretokenize(sources, tokenizer, work / "shards", seq_len=args.seq_len, dedup=False,
                               num_proc=args.num_proc)  # fmt: skip
        seconds = time.perf_counter() - started
        print(f"pretokenize: {manifest['blocks']} blocks, {manifest['tokens']} tokens in {seconds:.1f} s "
              f"(num_proc {args.num_proc}): {manifest['tokens'] / seconds:.0f} tokens/s", flush=True)  # fmt: skip
        shards = PackedBlockShards(work / "shards")
        micro_batches = ShardMicroBatches(shards, BlockOrder(len(shards), seed=0), masker, layout)
        loader = shard_loader(micro_batches, range(2**62), args.workers)
        shard_rate = measure(functools.partial(next, loader), args.seconds)
        del loader

        blocks = PackedBlocks(lambda epoch: build_text_stream(sources, seed=epoch, dedup=False), tokenizer,
                              args.seq_len, rank=0, processes=args.processes, verbose=False)  # fmt: skip

        def steps() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            while True:
                yield from onthefly_micro_batches(blocks, masker, layout)

        onthefly = steps()
        onthefly_rate = measure(functools.partial(next, onthefly), args.seconds)
    print(f"setup: seq_len {args.seq_len}, {args.batch_size} blocks per micro-batch, rank 0 of {args.processes} "
          f"process(es), {args.workers} DataLoader worker(s), {torch.get_num_threads()} torch thread(s)")  # fmt: skip
    report_load("end")
    print(f"shard_tokens_per_s_per_process: {shard_rate:.0f}")
    print(f"onthefly_tokens_per_s_per_process: {onthefly_rate:.0f}")
    return {"shard": shard_rate, "onthefly": onthefly_rate}


if __name__ == "__main__":
    main()
