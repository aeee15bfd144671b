"""End-to-end test of ``python -m train.quickstart`` on the bundled sample at a reduced budget (about a minute).

One quickstart run (chroma-moe-tiny instead of chroma-moe-small, a 1-minute budget, bm25 as the only baseline) is shared
by the tests: every artefact exists, the exported Hub folder loads with SentenceTransformer and AutoModel, the trained
model beats its own random initialisation on the sample dev set, and the data-folder and failure handling are checked
on their own, without training.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from transformers import AutoTokenizer

from train import quickstart
from train.common import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE = REPO_ROOT / "data" / "sample"


def reduced_config(path: Path) -> Path:
    """The default quickstart config scaled down: chroma-moe-tiny, a 2k tokenizer, short sequences, bm25 only.
    Step rates are chosen so that a 1-minute budget gives 24 phase-1 and 60 phase-2 steps."""
    config = yaml.safe_load(quickstart.DEFAULT_CONFIG.read_text(encoding="utf-8"))
    config["tokenizer"]["vocab_size"] = 2000
    config["phase1"].update(model={"preset": "chroma-moe-tiny"}, per_device_batch_size=8, global_batch_tokens=512,
                            learning_rate=2e-3, min_learning_rate=2e-4)  # fmt: skip
    config["phase2"].update(max_query_length=64, global_batch_size=16, chunk_size=16)
    config["evaluation"]["baselines"] = ["bm25"]
    config["budget"].update(phase1_share=0.2, phase2_share=0.5, phase1_steps_per_minute=120, phase2_steps_per_minute=120)
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """One quickstart run in a fresh process (offline), as a user would start it."""
    tmp = tmp_path_factory.mktemp("quickstart")
    output = tmp / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "train.quickstart", "--output", str(output), "--budget-minutes", "1",
               "--config", str(reduced_config(tmp / "quickstart_test.yaml"))]  # fmt: skip
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"quickstart failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return output, done


def test_every_artefact_exists(run: tuple[Path, subprocess.CompletedProcess]) -> None:
    output, done = run
    expected = [
        "tokenizer/tokenizer.json",
        "configs/phase1.yaml",
        "configs/phase2.yaml",
        "phase1/final/config.json",
        "phase1/final/model.safetensors",
        "phase1/final/tokenizer.json",
        "phase2/final/modules.json",
        "phase2/final/model.safetensors",
        "phase2/train_log.jsonl",
        "untrained/modules.json",
        "eval/results.json",
        "eval/results.md",
        "eval/results.png",
        "hub/README.md",
        "hub/config.json",
        "hub/model.safetensors",
        "hub/modules.json",
        "hub/config_sentence_transformers.json",
        "hub/tokenizer.json",
        "hub/modeling_chroma_moe.py",
        "hub/configuration_chroma_moe.py",
        "hub/sentence_chroma_moe.py",
    ]
    missing = [name for name in expected if not (output / name).is_file()]
    assert not missing, f"missing artefacts: {missing}"
    assert list((output / "phase1" / "checkpoints").glob("checkpoint-*/routing_heatmap.png")), "no phase-1 routing heatmap"
    assert list((output / "phase1" / "logs").rglob("events.out.tfevents.*")), "no phase-1 tensorboard log"
    # The written phase configs are the ones that ran: steps from the 1-minute budget, phase 2 from phase 1's model.
    phase1 = yaml.safe_load((output / "configs" / "phase1.yaml").read_text(encoding="utf-8"))
    phase2 = yaml.safe_load((output / "configs" / "phase2.yaml").read_text(encoding="utf-8"))
    assert (phase1["max_steps"], phase2["max_steps"]) == (24, 60)
    assert Path(phase2["init_from"]) == output / "phase1" / "final"
    assert sorted(source["task"] for source in phase2["train_sources"]) == ["finance_qa", "product_search"]
    log = [json.loads(line) for line in (output / "phase2" / "train_log.jsonl").read_text(encoding="utf-8").splitlines()]
    assert max(record["step"] for record in log) == 60
    # Trained and untrained models are evaluated at the length the Hub folder serves, not at the training length.
    serving = yaml.safe_load(quickstart.DEFAULT_CONFIG.read_text(encoding="utf-8"))["evaluation"]["serving_length"]
    models = json.loads((output / "eval" / "results.json").read_text(encoding="utf-8"))["models"]
    assert serving >= max(phase2["max_query_length"], phase2["max_document_length"])
    assert models[str(output / "phase2" / "final")]["max_seq_length"] == serving
    assert models[str(output / "untrained")]["max_seq_length"] == serving
    assert json.loads((output / "hub" / "sentence_bert_config.json").read_text(encoding="utf-8"))["max_seq_length"] == serving
    hub_tokenizer = AutoTokenizer.from_pretrained(output / "hub")  # plain transformers truncates there too
    assert hub_tokenizer.model_max_length == serving
    assert len(hub_tokenizer("revenue " * 1000, truncation=True)["input_ids"]) == serving
    # The closing summary names the artefacts and prints the results table.
    assert "quickstart finished" in done.stdout and str(output / "hub") in done.stdout
    assert "| beir:dev | chroma-moe-tiny, quickstart |" in done.stdout


def test_trained_model_beats_untrained_on_the_sample_dev_set(run: tuple[Path, subprocess.CompletedProcess]) -> None:
    output, _ = run
    results = json.loads((output / "eval" / "results.json").read_text(encoding="utf-8"))["tasks"]["beir:dev"]
    trained = results[str(output / "phase2" / "final")]["ndcg@10"]
    untrained = results[str(output / "untrained")]["ndcg@10"]
    assert "bm25" in results
    assert trained > untrained + 0.02, f"nDCG@10 trained {trained:.4f} vs untrained {untrained:.4f}"


def test_exported_folder_loads_with_sentence_transformers_and_automodel(run: tuple[Path, subprocess.CompletedProcess]) -> None:
    output, _ = run
    hub = output / "hub"
    script = (
        "import sys, torch\n"
        "from sentence_transformers import SentenceTransformer\n"
        "from transformers import AutoModel, AutoTokenizer\n"
        "hub = sys.argv[1]\n"
        "st = SentenceTransformer(hub, trust_remote_code=True)\n"
        "emb = st.encode_query(['wireless earbuds noise cancel', 'Halvorsen capex fy22'], convert_to_tensor=True)\n"
        "assert emb.shape == (2, 32) and torch.isfinite(emb).all(), emb.shape\n"
        "assert torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-4)\n"
        "model = AutoModel.from_pretrained(hub, trust_remote_code=True)\n"
        "tokens = AutoTokenizer.from_pretrained(hub)(['usb c hub hdmi'], return_tensors='pt')\n"
        "hidden = model(**tokens).last_hidden_state\n"
        "assert hidden.shape == (1, tokens['input_ids'].shape[1], model.config.hidden_size)\n"
        "print('loaded', type(model).__name__)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script, str(hub)], cwd=output, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loaded ChromaMoe" in done.stdout


def test_find_data_reads_both_layouts_and_names_what_is_missing(tmp_path: Path) -> None:
    sample = quickstart.find_data(SAMPLE)
    assert [p.name for p in sample.raw] == ["raw_finance.jsonl", "raw_retail.jsonl"]
    assert [p.name for p in sample.pairs] == ["pairs.jsonl"] and sample.dev_sets == [SAMPLE / "dev"] and not sample.split_sets
    shared = tmp_path / "shared"
    for name in ("raw/text.jsonl", "pairs/bitext.jsonl", "retrieval/set_a/corpus.jsonl", "retrieval/set_a/queries.jsonl"):
        (shared / name).parent.mkdir(parents=True, exist_ok=True)
        (shared / name).write_text('{"text": "x"}\n', encoding="utf-8")
    found = quickstart.find_data(shared)
    assert [p.name for p in found.raw] == ["text.jsonl"] and [p.name for p in found.split_sets] == ["set_a"]
    (shared / "raw" / "text.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="has no raw text"):
        quickstart.find_data(shared)


def test_pair_files_are_split_by_task_and_bad_rows_are_named(tmp_path: Path) -> None:
    config = yaml.safe_load(quickstart.DEFAULT_CONFIG.read_text(encoding="utf-8"))
    row = {"query": "q", "positive": "p", "negatives": []}
    mixed = tmp_path / "pairs.jsonl"
    mixed.write_text("".join(json.dumps({**row, "task": t}) + "\n" for t in ("finance_qa", "product_search", "finance_qa")))
    untasked = tmp_path / "multilingual_parallel_stsb_train.jsonl"
    untasked.write_text(json.dumps(row) + "\n")
    sources = quickstart.pair_sources([mixed, untasked], config, tmp_path / "work")
    assert [(Path(s["path"]).name, s["task"]) for s in sources] == [
        ("pairs.finance_qa.jsonl", "finance_qa"),
        ("pairs.product_search.jsonl", "product_search"),
        ("multilingual_parallel_stsb_train.jsonl", "bitext"),
    ]
    assert len((tmp_path / "work" / "pairs.finance_qa.jsonl").read_text().splitlines()) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**row, "task": "finance_qa"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: row has no 'task'"):
        quickstart.pair_sources([bad], config, tmp_path / "work")
    bad.write_text(json.dumps({**row, "task": "shopping"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: field 'task'='shopping'"):
        quickstart.pair_sources([bad], config, tmp_path / "work")


def test_budget_sets_the_steps() -> None:
    budget = yaml.safe_load(quickstart.DEFAULT_CONFIG.read_text(encoding="utf-8"))["budget"]
    small, large = quickstart.phase_steps(budget, 15, "phase2"), quickstart.phase_steps(budget, 60, "phase2")
    assert 4 * small[0] <= large[0] <= 4 * small[0] + 4 and 1 <= small[1] < small[0]
    assert quickstart.phase_steps(budget, 0.01, "phase1") == (budget["min_steps"], 1)


def test_a_failing_stage_is_named_with_its_rerun_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "raw_text.jsonl").write_text('{"text": ""}\n', encoding="utf-8")  # nothing to train a tokenizer on
    (data / "pairs.jsonl").write_text(json.dumps({"query": "q", "positive": "p", "negatives": [], "task": "finance_qa"}) + "\n")
    (data / "dev").mkdir()
    for name in ("corpus.jsonl", "queries.jsonl"):
        (data / "dev" / name).write_text("{}\n", encoding="utf-8")
    assert quickstart.main(["--output", str(tmp_path / "out"), "--data-dir", str(data)]) == 1
    err = capsys.readouterr().err
    assert "quickstart FAILED in stage 'tokenizer'" in err and "python -m tokenization.train" in err
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "old.txt").write_text("an earlier run", encoding="utf-8")
    assert quickstart.main(["--output", str(tmp_path / "used"), "--data-dir", str(data)]) == 1
    assert "is not empty" in capsys.readouterr().err


def test_sample_sts_keeps_the_same_pairs_in_every_language(tmp_path) -> None:
    source = tmp_path / "sts.tsv"
    rows = [f"{lang}\tdev-{i}\ts{i} {lang}\tt{i} {lang}\t{i % 5}" for lang in ("en", "de") for i in range(10)]
    source.write_text("lang\tpair_id\tsentence1\tsentence2\tscore\n" + "\n".join(rows) + "\n", encoding="utf-8")
    sample = quickstart.sample_sts(source, 3, tmp_path / "out" / "sts.tsv")
    header, *kept = sample.read_text(encoding="utf-8").splitlines()
    assert header == "lang\tpair_id\tsentence1\tsentence2\tscore" and len(kept) == 6
    by_lang = {lang: {line.split("\t")[1] for line in kept if line.startswith(lang)} for lang in ("en", "de")}
    assert by_lang["en"] == by_lang["de"] and len(by_lang["en"]) == 3
    assert set(kept) <= set(rows)  # lines copied unchanged
    assert quickstart.sample_sts(source, 3, tmp_path / "again.tsv").read_text() == sample.read_text()


def test_held_out_sets_are_evaluated_with_their_instruction_task(tmp_path: Path) -> None:
    """Each held-out retrieval set is evaluated with the prompt of the task its train side was trained with
    (``retrieval_sets``), a whole ``dev/`` set with the model's default query prompt."""
    from test_evaluation import write_beir

    config = yaml.safe_load(quickstart.DEFAULT_CONFIG.read_text(encoding="utf-8"))
    shared = tmp_path / "shared"
    (shared / "raw").mkdir(parents=True)
    (shared / "raw" / "text.jsonl").write_text('{"text": "some finance text"}\n', encoding="utf-8")
    corpus = [{"_id": f"d{i}", "text": f"document {i}"} for i in range(10)]
    queries = [{"_id": f"q{i}", "text": f"question {i}"} for i in range(10)]
    for name in ("tatqa_finance_dev", "esci_us_dev"):
        write_beir(shared / "retrieval" / name, corpus, queries, [(f"q{i}", f"d{i}", 1) for i in range(10)])
    write_beir(shared / "dev", corpus, queries, [(f"q{i}", f"d{i}", 1) for i in range(10)])
    data = quickstart.find_data(shared)
    tasks = quickstart.eval_tasks(config, data, config["phase2"], tmp_path / "out")
    heldout = tmp_path / "out" / "data" / "heldout"
    assert tasks == [
        f"beir:{shared / 'dev'}",
        f"esci:{heldout / 'esci_us_dev'}@product_search",
        f"beir:{heldout / 'tatqa_finance_dev'}@finance_qa",
    ]


def test_retrieval_sets_give_phase2_its_beir_sources_and_bad_entries_are_named(tmp_path: Path) -> None:
    """Each trained retrieval set becomes a ``beir`` source with its task and its ``bm25_negatives`` (only where set);
    an evaluation-only set is no source; a misspelt key or a bad value is an error naming the set."""
    config = yaml.safe_load(quickstart.DEFAULT_CONFIG.read_text(encoding="utf-8"))
    config["retrieval_sets"]["tatqa_finance_dev"]["bm25_negatives"] = 2
    shared = tmp_path / "shared"
    (shared / "raw").mkdir(parents=True)
    (shared / "raw" / "text.jsonl").write_text('{"text": "some finance text"}\n', encoding="utf-8")
    for name in ("tatqa_finance_dev", "esci_us_dev", "stsb_xling_to_en_dev"):
        for part in ("corpus.jsonl", "queries.jsonl"):
            (shared / "retrieval" / name).mkdir(parents=True, exist_ok=True)
            (shared / "retrieval" / name / part).write_text("{}\n", encoding="utf-8")
    sources = quickstart.phase2_sources(config, quickstart.find_data(shared), tmp_path / "work")
    cap = config["max_pairs_per_source"]
    assert sources == [
        {"beir": str(shared / "retrieval" / "esci_us_dev"), "task": "product_search", "max_pairs": cap},
        {"beir": str(shared / "retrieval" / "tatqa_finance_dev"), "task": "finance_qa", "max_pairs": cap,
         "bm25_negatives": 2},
    ]  # fmt: skip
    path = tmp_path / "quickstart.yaml"
    config["evaluation"]["serving_length"] = 8193  # chroma-moe-small: 8,192 positions; refused before any training
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"evaluation\.serving_length=8193: must be at most the model's "
                                          r"max_position_embeddings=8192 \(phase1\.model\)$"):  # fmt: skip
        quickstart.load_quickstart_config(path)
    config["evaluation"]["serving_length"] = 128
    for spec, field in (({"task": "finance_qa", "trian": False}, r"unknown key\(s\) \['trian'\]; keys"),
                        ({"task": "finance_qa", "bm25_negatives": -1}, "-1")):
        config["retrieval_sets"]["tatqa_finance_dev"] = spec
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        with pytest.raises(ConfigError, match=rf"retrieval_sets\.tatqa_finance_dev=.*{field}.*bm25_negatives an integer >= 0"):
            quickstart.load_quickstart_config(path)
    config["retrieval_sets"]["tatqa_finance_dev"] = {"task": "finance_qa"}
    config["retrieval_sets"]["stsb_xling_to_en_dev"] = {"task": "bitext", "train": False, "bm25_negatives": 1}
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"retrieval_sets\.stsb_xling_to_en_dev: bm25_negatives=1 mines negatives for "
                                          r"training, but the set has train: false \(evaluation only\)$"):  # fmt: skip
        quickstart.load_quickstart_config(path)


def test_bad_phase_keys_and_teacher_length_are_refused_before_any_stage(tmp_path: Path) -> None:
    """A bad ``phase1`` / ``phase2`` key, or a teacher length above the teacher's own limit (MiniLM: 256), stops the
    quickstart before the tokenizer is trained, not in phase 2 minutes later."""
    base = yaml.safe_load(quickstart.DEFAULT_CONFIG.read_text(encoding="utf-8"))
    cases = [
        ("phase1", "seq_len", 0, ConfigError, r"^config key 'seq_len'=0: must be > 0$"),
        ("phase2", "teacher_max_seq_length", 0, ConfigError, r"^config key 'teacher_max_seq_length'=0: must be > 0 or null$"),
        ("phase2", "teacher_max_seq_length", 300, ValueError,
         r"^teacher 'all-MiniLM-L6-v2': max_seq_length=300 exceeds its own max_seq_length=256; teacher_max_seq_length "
         r"can only lower the teacher's limit$"),
    ]  # fmt: skip
    for index, (section, key, value, error, message) in enumerate(cases):
        config = yaml.safe_load(yaml.safe_dump(base))
        config[section][key] = value
        path = tmp_path / f"quickstart{index}.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        with pytest.raises(error, match=message):
            quickstart.quickstart(tmp_path / f"run{index}", SAMPLE, 1, path)
        assert not (tmp_path / f"run{index}" / "tokenizer").exists()


def test_the_ablation_adds_one_ingredient_per_row_and_ends_at_the_quickstart_recipe() -> None:
    """benchmarks/quality_ablation.py: each row changes exactly the settings of its ingredient from the row above, and
    the last row trains as the quickstart does (only the evaluation's extra rows are off)."""
    from benchmarks.quality_ablation import ablation_configs

    def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(tree, dict):
            return {prefix: tree}
        return {key: value for name, sub in tree.items() for key, value in flat(sub, f"{prefix}{name}.").items()}

    base = yaml.safe_load(quickstart.DEFAULT_CONFIG.read_text(encoding="utf-8"))
    rows = [flat(config) for config in ablation_configs(base).values()]
    changed = [{key for key in rows[i].keys() | rows[i + 1].keys() if rows[i].get(key) != rows[i + 1].get(key)}
               for i in range(len(rows) - 1)]  # fmt: skip
    assert changed == [
        {"tokenizer.text.", "tokenizer.language_alpha.", "tokenizer.vocab_size."},
        {"phase2.teacher."},
        {"phase2.batch_sampling."},
        {"retrieval_sets.tatqa_finance_dev.bm25_negatives."},
        {"phase2.teacher_max_seq_length."},
        {"max_pairs_per_source.", "phase2.source_alpha."},
    ]
    quickstart_recipe = flat(base)
    assert {key for key in quickstart_recipe.keys() | rows[-1].keys() if quickstart_recipe.get(key) != rows[-1].get(key)} == {
        "evaluation.baselines.", "evaluation.untrained.", "evaluation.hybrid."}  # fmt: skip
