"""Ablation of the quickstart recipe: what each ingredient buys in held-out quality at the same CPU budget.

Rows, each one full quickstart run (tokenizer → phase 1 → phase 2 → evaluation) at the same ``--budget-minutes`` on
the same data, each adding one ingredient to the row above it:

1. ``today``: the recipe before the quality work: a tokenizer trained on the raw English text alone (languages as
   read), InfoNCE alone, every global batch mixed over all pair sources;
2. ``+ multilingual tokenizer``: the tokenizer reads every kind of text the model embeds (pairs, STS train sentences,
   retrieval corpora) with languages resampled to n^0.3 shares, at the quickstart's vocabulary size;
3. ``+ distillation``: phase 2 also distils all-MiniLM-L6-v2 (similarity matching + KL score distillation), the
   teacher reading up to its own 256 tokens;
4. ``+ per-source batches``: every global batch from one source (sources ∝ size^``phase2.source_alpha``);
5. ``+ BM25-mined negatives``: the retrieval sets' ``bm25_negatives`` as the quickstart config sets them (TAT-QA: one
   BM25-mined negative per training query);
6. ``+ teacher at the student's length``: the teacher reads at most ``phase2.teacher_max_seq_length`` tokens (the
   quickstart: 128 = the student's document length);
7. ``+ every parallel pair``: ``max_pairs_per_source`` and ``phase2.source_alpha`` as the quickstart config sets them
   (every one of the 57,490 parallel pairs, α 0.25); rows 1-6 keep the earlier data mix, a seeded 20,000 of them per
   source and α 0.35: the quickstart's recipe.

Every row is evaluated at the quickstart's ``evaluation.serving_length``.

Only our model is evaluated in each run (the baselines do not change between rows; the quickstart's own run reports
them beside ours). Run on an idle machine; the load average is printed before and after:

    python -m benchmarks.quality_ablation --data-dir ../shared/data --budget-minutes 10 --output runs/ablation

Prints a markdown table of nDCG@10 per held-out retrieval set and the mean STS Spearman, one row per recipe.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.machine import report_load
from train.quickstart import DEFAULT_CONFIG


def ablation_configs(base: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The seven cumulative recipes (see the module docstring), derived from the quickstart config ``base``."""
    recipe = copy.deepcopy(base)
    recipe["evaluation"].update(baselines=[], untrained=False, hybrid=False)
    recipe["phase2"].update(teacher=None, teacher_max_seq_length=None, batch_sampling="mixed", source_alpha=0.35)
    recipe["max_pairs_per_source"] = 20000
    for spec in recipe["retrieval_sets"].values():
        spec.pop("bm25_negatives", None)
    today = copy.deepcopy(recipe)
    today["tokenizer"].update(text=["raw"], language_alpha=1.0, vocab_size=32000)
    multilingual = copy.deepcopy(recipe)
    distilled = copy.deepcopy(multilingual)
    distilled["phase2"]["teacher"] = base["phase2"]["teacher"]
    per_source = copy.deepcopy(distilled)
    per_source["phase2"]["batch_sampling"] = "per_source"
    mined = copy.deepcopy(per_source)
    mined["retrieval_sets"] = copy.deepcopy(base["retrieval_sets"])
    student_length = copy.deepcopy(mined)
    student_length["phase2"]["teacher_max_seq_length"] = base["phase2"]["teacher_max_seq_length"]
    every_pair = copy.deepcopy(student_length)
    every_pair["max_pairs_per_source"] = base["max_pairs_per_source"]
    every_pair["phase2"]["source_alpha"] = base["phase2"]["source_alpha"]
    return {
        "today": today,
        "+ multilingual tokenizer": multilingual,
        "+ distillation": distilled,
        "+ per-source batches": per_source,
        "+ BM25-mined negatives": mined,
        "+ teacher at the student's length": student_length,
        "+ every parallel pair": every_pair,
    }


def headline(results: dict[str, Any]) -> dict[str, float]:
    """Per task, ndcg@10 (retrieval) or spearman (STS) of the one model evaluated."""
    row = {}
    for task, per_model in results["tasks"].items():
        (metrics,) = per_model.values()
        metric = "spearman" if "spearman" in metrics else "ndcg@10"
        row[f"{task} {metric}"] = metrics.get(metric)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality_ablation", description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--budget-minutes", type=float, default=10.0)
    parser.add_argument("--output", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="the quickstart config the rows derive from")
    parser.add_argument("--only", nargs="+", help="run only these rows (by name)")
    args = parser.parse_args(argv)
    report_load("start")
    base = yaml.safe_load(args.config.read_text(encoding="utf-8"))
    rows: dict[str, dict[str, float]] = {}
    minutes: dict[str, float] = {}
    for index, (name, config) in enumerate(ablation_configs(base).items()):
        if args.only and name not in args.only:
            continue
        folder = args.output / f"row{index}"
        config_path = args.output / f"row{index}.yaml"
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        command = [sys.executable, "-m", "train.quickstart", "--data-dir", args.data_dir, "--budget-minutes",
                   str(args.budget_minutes), "--config", str(config_path), "--output", str(folder)]  # fmt: skip
        print(f"=== {name}: {' '.join(command)}", flush=True)
        started = time.perf_counter()
        subprocess.run(command, check=True)
        minutes[name] = (time.perf_counter() - started) / 60
        rows[name] = headline(json.loads((folder / "eval" / "results.json").read_text(encoding="utf-8")))
        report_load(f"after_{index}")
    columns = sorted({column for row in rows.values() for column in row})
    print("\n| recipe | wall min | " + " | ".join(columns) + " |")
    print("|---|---:|" + "---:|" * len(columns))
    for name, row in rows.items():
        cells = [f"{row[c]:.4f}" if isinstance(row.get(c), float) else "n/a" for c in columns]
        print(f"| {name} | {minutes[name]:.1f} | " + " | ".join(cells) + " |")
    report_load("end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
