"""`python -m train.export`: the Hub folder has every file, loads, carries a model card with valid Hub metadata and the
evaluation table, and `--push-to-hub` uploads exactly those files (Hub API mocked: the tests run offline)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from sentence_transformers import SentenceTransformer

import train.export as export_module
from configuration_chroma_moe import ChromaMoeConfig
from modeling_chroma_moe import ChromaMoeForEmbedding, count_parameters
from tokenization.train import train_tokenizer

EXPECTED_FILES = [
    "README.md",
    "config.json",
    "config_sentence_transformers.json",
    "configuration_chroma_moe.py",
    "model.safetensors",
    "modeling_chroma_moe.py",
    "modules.json",
    "quantization_chroma_moe.py",
    "sentence_bert_config.json",
    "sentence_chroma_moe.py",
    "tokenizer.json",
    "tokenizer_config.json",
]
TEXTS = ["Net revenue rose 12% in fiscal 2019.", "HDMI cable 2m, 4K 60Hz.", "Der Umsatz stieg um zwölf Prozent."]
RESULTS = {
    "tasks": {
        "beir:tatqa_finance_dev": {"chroma": {"ndcg@10": 0.4321, "recall@100": 0.8765}, "bm25": {"ndcg@10": 0.31}}
    },
    "models": {
        "chroma": {"params_total": 244768, "params_active": 171040, "embedding_dim": 32, "max_seq_length": 512,
                   "similarity": "cosine", "time_s": {"beir:tatqa_finance_dev": 1.0}},
        "bm25": {"params_total": None, "params_active": None, "embedding_dim": None, "max_seq_length": None,
                 "similarity": "bm25", "time_s": {"beir:tatqa_finance_dev": 0.5}},
    },
    "notes": {"beir:tatqa_finance_dev": {}},
    "data": {},
}  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A transformers folder (no sentence-transformers files) with its tokenizer, as phase 1/2 checkpoints are."""
    folder = tmp_path_factory.mktemp("checkpoint")
    torch.manual_seed(0)
    ChromaMoeForEmbedding(ChromaMoeConfig.from_preset("chroma-moe-tiny")).save_pretrained(folder)
    train_tokenizer(TEXTS * 8, vocab_size=300, show_progress=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def results_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("results") / "results.json"
    path.write_text(json.dumps(RESULTS))
    return path


class FakeHfApi:
    """Records what `push_to_hub` would send to the Hub."""

    calls: ClassVar[list[tuple[str, tuple, dict]]] = []

    def create_repo(self, *args, **kwargs):
        self.calls.append(("create_repo", args, kwargs))

    def upload_folder(self, *args, **kwargs):
        self.calls.append(("upload_folder", args, kwargs))

        class Commit:
            commit_url = f"https://huggingface.co/{kwargs['repo_id']}/commit/0"

        return Commit()


def test_export_pushes_exactly_the_hub_files(model_dir, results_file, tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "HfApi", FakeHfApi)
    FakeHfApi.calls = []
    output = tmp_path / "hub"
    export_module.main(
        ["--model", str(model_dir), "--output", str(output), "--results", str(results_file),
         "--push-to-hub", "org/chroma-moe-tiny"]
    )  # fmt: skip
    assert sorted(p.name for p in output.iterdir()) == EXPECTED_FILES
    assert [call[0] for call in FakeHfApi.calls] == ["create_repo", "upload_folder"]
    assert FakeHfApi.calls[0][1] == ("org/chroma-moe-tiny",) and FakeHfApi.calls[0][2]["exist_ok"] is True
    upload = FakeHfApi.calls[1][2]
    assert upload["repo_id"] == "org/chroma-moe-tiny" and Path(upload["folder_path"]) == output
    assert upload["allow_patterns"] == EXPECTED_FILES

    card = (output / "README.md").read_text(encoding="utf-8")
    front_matter = yaml.safe_load(card.split("---\n")[1])
    data = ModelCard(card).data.to_dict()
    assert data == front_matter
    assert data["library_name"] == "sentence-transformers" and data["pipeline_tag"] == "sentence-similarity"
    assert data["license"] == "apache-2.0" and data["datasets"] == list(export_module.DEFAULT_DATASETS)
    assert {"sentence-transformers", "mixture-of-experts", "finance", "retail"} <= set(data["tags"])
    params = count_parameters(ChromaMoeConfig.from_pretrained(model_dir))
    assert f"{params['total']:,} total, {params['active']:,} active per token" in card
    assert "| beir:tatqa_finance_dev | ndcg@10 | 0.4321 | 0.3100 |" in card
    assert 'SentenceTransformer("org/chroma-moe-tiny", trust_remote_code=True)' in card

    config = json.loads((output / "config.json").read_text())
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForMaskedLM", "AutoModelForTextEncoding"}
    st_config = json.loads((output / "config_sentence_transformers.json").read_text())
    assert st_config["similarity_fn_name"] == "cosine" and st_config["prompts"]["query"].startswith("Instruction: ")


def test_exported_folder_loads_and_re_exports(model_dir, tmp_path):
    """A folder without sentence-transformers files is wrapped; a sentence-transformers folder is exported as is."""
    first = tmp_path / "first"
    files = export_module.export(model_dir, first, datasets=["org/finance-pairs"], base_model="org/chroma-moe-mlm")
    assert files == EXPECTED_FILES
    data = ModelCard.load(first / "README.md").data
    assert data.datasets == ["org/finance-pairs"] and data.base_model == "org/chroma-moe-mlm"
    assert "No evaluation results were given" in (first / "README.md").read_text()

    loaded = SentenceTransformer(str(first), trust_remote_code=True, local_files_only=True)
    embedder = ChromaMoeForEmbedding.from_pretrained(model_dir).eval()
    batch = loaded.preprocess(TEXTS)
    with torch.no_grad():
        expected = embedder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).sentence_embedding
    torch.testing.assert_close(loaded.encode_document(TEXTS, convert_to_tensor=True), expected, atol=1e-5, rtol=1e-4)

    second = tmp_path / "second"
    assert export_module.export(first, second) == EXPECTED_FILES
    for name in ("model.safetensors", "tokenizer.json", "modules.json", "sentence_chroma_moe.py"):
        assert (second / name).read_bytes() == (first / name).read_bytes()


def test_export_refuses_bad_inputs(model_dir, tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "stale.bin").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="used is not empty"):
        export_module.export(model_dir, tmp_path / "used")
    bad = tmp_path / "results.json"
    bad.write_text('{"chroma": {"beir:x": {"ndcg@10": 0.5}}}')
    with pytest.raises(ValueError, match=r"results.json: field 'tasks' missing"):
        export_module.export(model_dir, tmp_path / "out", results_path=bad)
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        export_module.export(tmp_path / "nowhere", tmp_path / "out")


def test_the_model_card_names_evaluated_folders_by_hub_id_and_folder_name_not_local_path(model_dir, tmp_path):
    """The exported folder is the model's Hub id (also inside bm25+<model>), another local folder its folder name."""
    untrained = tmp_path / "runs" / "untrained"
    untrained.mkdir(parents=True)
    names = {str(model_dir): "org/chroma-moe-tiny", f"bm25+{model_dir}": "bm25+org/chroma-moe-tiny",
             str(untrained): "untrained", "bm25": "bm25", "minilm": "minilm"}  # fmt: skip
    chroma = RESULTS["models"]["chroma"]
    results = {
        "tasks": {"beir:tatqa_finance_dev": {name: {"ndcg@10": 0.1 * i} for i, name in enumerate(names)}},
        "models": {name: chroma for name in names}
        | {f"bm25+{model_dir}": chroma | {"similarity": f"rrf (k=60) of bm25 and {model_dir}"}},
        "notes": {"beir:tatqa_finance_dev": {}},
        "errors": {str(untrained): "out of memory"},
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    export_module.export(model_dir, tmp_path / "hub", results_path=path, model_id="org/chroma-moe-tiny")
    card = (tmp_path / "hub" / "README.md").read_text(encoding="utf-8")
    assert "| task | metric | org/chroma-moe-tiny | bm25+org/chroma-moe-tiny | untrained | bm25 | minilm |" in card
    assert "| beir:tatqa_finance_dev | ndcg@10 | 0.0000 | 0.1000 | 0.2000 | 0.3000 | 0.4000 |" in card
    assert "- error: untrained failed: out of memory" in card
    assert "rrf (k=60) of bm25 and org/chroma-moe-tiny |" in card
    assert "- [PhilipMay/stsb_multi_mt](https://huggingface.co/datasets/PhilipMay/stsb_multi_mt)" in card
    export_module.export(model_dir, tmp_path / "local", datasets=[])
    card = (tmp_path / "local" / "README.md").read_text(encoding="utf-8")
    local = "## Training data\n\nLocal files only: no Hub dataset was named at export (`python -m train.export --datasets"
    assert local in card
    assert str(tmp_path) not in card
