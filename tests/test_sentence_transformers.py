"""sentence-transformers wrapper and inference features on a tiny random model: the pooled embedding equals
`ChromaMoeForEmbedding` called with the instruction masked out, a saved folder reloads in a fresh offline process (also
after re-saving) and through the Auto classes, Matryoshka truncation and embedding quantization,
routing introspection, and the README's usage snippets."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer

from chroma_moe_inference import plot_routing, route, routing_shares
from configuration_chroma_moe import ChromaMoeConfig
from modeling_chroma_moe import ChromaMoeForEmbedding
from sentence_chroma_moe import (
    CODE_FILES,
    ChromaMoeSentenceEncoder,
    build_sentence_transformer,
    instruction_chars,
    instruction_prompt,
    save_sentence_transformer,
)
from tokenization.train import train_tokenizer

REPO = Path(__file__).resolve().parents[1]
CORPUS = [
    "Net revenue rose 12% to $4.1 billion in fiscal 2019, driven by higher interest income.",
    "The company reported an operating loss of EUR 3.2 million for the third quarter.",
    "Risk factors include changes in interest rates, credit spreads and foreign exchange.",
    "Free cash flow was used to repay the term loan and buy back shares.",
    "HDMI cable 2m, 4K 60Hz, gold-plated connectors, braided nylon.",
    "USB-C charger 65W with GaN technology, fits laptops and phones.",
    "Women's running shoes, breathable mesh upper, size 8.",
    "Stainless steel water bottle, 750 ml, keeps drinks cold for 24 hours.",
    "Der Umsatz stieg im Geschäftsjahr um zwölf Prozent.",
    "Le chiffre d'affaires a augmenté de douze pour cent.",
    "売上高は前年比12%増加しました。",
    "营业收入同比增长百分之十二。",
    "Выручка выросла на двенадцать процентов.",
]
QUERIES = ["What was the change in revenue between 2018 and 2019?", "hdmi cable", "Umsatz 2019"]
DOCUMENTS = [CORPUS[0], CORPUS[4], CORPUS[8]]
TASK = "Given a search query, retrieve relevant passages that answer it"


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS * 4, vocab_size=400, show_progress=False)


@pytest.fixture(scope="module")
def embedder() -> ChromaMoeForEmbedding:
    torch.manual_seed(0)
    return ChromaMoeForEmbedding(ChromaMoeConfig.from_preset("chroma-moe-tiny")).eval()


@pytest.fixture(scope="module")
def st_model(embedder, tokenizer) -> SentenceTransformer:
    return build_sentence_transformer(embedder, tokenizer)


@pytest.fixture(scope="module")
def st_dir(st_model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("st") / "chroma-moe-st"
    save_sentence_transformer(st_model, folder)
    return folder


def direct_embeddings(embedder, tokenizer, texts: list[str], prefix: str = "") -> torch.Tensor:
    """`ChromaMoeForEmbedding` on `prefix + text` with `<s>` and the prefix's tokens masked out of pooling. The prefix's
    token count is found without offsets: the text's own tokens must be the suffix of the joined text's tokens."""
    rows = []
    for text in texts:
        joined = tokenizer(prefix + text, return_tensors="pt")
        alone = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = joined["input_ids"]  # (1, T)
        assert ids[0, -1 - len(alone) : -1].tolist() == alone, "the text does not tokenize the same after the prefix"
        pooling_mask = torch.ones_like(ids)
        if prefix:
            pooling_mask[0, : ids.shape[1] - 1 - len(alone)] = 0
        with torch.no_grad():
            rows.append(embedder(input_ids=ids, attention_mask=joined["attention_mask"], pooling_mask=pooling_mask)
                        .sentence_embedding[0])  # fmt: skip
    return torch.stack(rows)


def test_query_prompt_is_attended_but_not_pooled(st_model, embedder, tokenizer):
    prompt = st_model.prompts["query"]
    assert prompt == instruction_prompt(TASK) == f"Instruction: {TASK} Query: "
    assert st_model.prompts["document"] == ""
    queries = st_model.encode_query(QUERIES, convert_to_tensor=True)
    torch.testing.assert_close(queries, direct_embeddings(embedder, tokenizer, QUERIES, prompt), atol=1e-5, rtol=1e-4)
    # pooling the instruction too would give another embedding: the exclusion is real
    pooled_all = direct_embeddings(embedder, tokenizer, [prompt + query for query in QUERIES])
    assert (queries - pooled_all).abs().max() > 1e-3
    documents = st_model.encode_document(DOCUMENTS, convert_to_tensor=True)
    torch.testing.assert_close(documents, direct_embeddings(embedder, tokenizer, DOCUMENTS), atol=1e-5, rtol=1e-4)


def test_inline_instruction_of_training_data_is_detected(st_model, embedder, tokenizer):
    task = "Given a product search query, retrieve matching products"
    inline = [instruction_prompt(task) + query for query in QUERIES]
    assert instruction_chars(inline[0]) == len(instruction_prompt(task))
    assert instruction_chars("  " + inline[0]) == len(instruction_prompt(task)) + 2
    assert instruction_chars("Instruction without the query marker") == 0
    expected = direct_embeddings(embedder, tokenizer, QUERIES, instruction_prompt(task))
    torch.testing.assert_close(st_model.encode(inline, convert_to_tensor=True), expected, atol=1e-5, rtol=1e-4)
    # a "Query: " inside the query itself stays part of the pooled text
    tricky = "what does Query: mean"
    assert instruction_chars(instruction_prompt(task) + tricky) == len(instruction_prompt(task))


def test_instruction_tokens_and_padding_in_pooling_mask(st_model, tokenizer):
    texts = ["hdmi", "a much longer product title about cables"]
    features = st_model.preprocess(texts, prompt=st_model.prompts["query"])
    attention, pooling = features["attention_mask"], features["pooling_mask"]
    assert not (pooling.bool() & ~attention.bool()).any()  # padding is never pooled
    text_tokens = len(tokenizer("hdmi", add_special_tokens=False)["input_ids"])
    assert int(pooling[0].sum()) == text_tokens + 1  # the text and </s>
    # truncation that leaves only the instruction still pools </s> instead of failing
    st_model.max_seq_length = 8
    try:
        clipped = st_model.preprocess(["hdmi"], prompt=st_model.prompts["query"])
        assert clipped["pooling_mask"].tolist() == [[0] * 7 + [1]]
    finally:
        st_model.max_seq_length = 512


def test_fresh_process_reload_resave_and_auto_classes(st_dir, st_model, embedder, tokenizer, tmp_path):
    """A fresh offline process without this repository on its path loads the folder through remote code only."""
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np, torch
        from sentence_transformers import SentenceTransformer
        from transformers import AutoModel, AutoModelForTextEncoding, AutoTokenizer
        assert "sentence_chroma_moe" not in sys.modules
        st = SentenceTransformer({str(st_dir)!r}, trust_remote_code=True)
        out = {{"module": type(st[0]).__module__}}
        np.save("queries.npy", st.encode_query({QUERIES!r}))
        np.save("documents.npy", st.encode_document({DOCUMENTS!r}))
        st.save("resaved")
        again = SentenceTransformer("resaved", trust_remote_code=True)
        np.save("resaved.npy", again.encode_query({QUERIES!r}))
        tokenizer = AutoTokenizer.from_pretrained({str(st_dir)!r}, trust_remote_code=True)
        batch = tokenizer({DOCUMENTS!r}, padding=True, return_tensors="pt")
        out["input_ids"] = batch["input_ids"].tolist()
        with torch.no_grad():
            encoder = AutoModelForTextEncoding.from_pretrained({str(st_dir)!r}, trust_remote_code=True)
            np.save("auto_embedding.npy", encoder(**batch).sentence_embedding.numpy())
            backbone = AutoModel.from_pretrained({str(st_dir)!r}, trust_remote_code=True)
            np.save("auto_hidden.npy", backbone(**batch).last_hidden_state.numpy())
        print(json.dumps(out))
    """)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["module"].startswith("transformers_modules.")  # loaded from the folder, not from this repository
    expected_queries = direct_embeddings(embedder, tokenizer, QUERIES, st_model.prompts["query"]).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "queries.npy"), expected_queries, atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "resaved.npy"), expected_queries, atol=1e-5)
    for name in CODE_FILES:
        assert (tmp_path / "resaved" / name).is_file()
    batch = tokenizer(DOCUMENTS, padding=True, return_tensors="pt")
    assert out["input_ids"] == batch["input_ids"].tolist()
    with torch.no_grad():
        full = embedder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    np.testing.assert_allclose(np.load(tmp_path / "auto_embedding.npy"), full.sentence_embedding.numpy(), atol=1e-5)
    # The model card's plain-transformers snippet: for documents, the same embeddings as encode_document.
    np.testing.assert_allclose(np.load(tmp_path / "auto_embedding.npy"), np.load(tmp_path / "documents.npy"), atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "auto_hidden.npy"), full.last_hidden_state.numpy(), atol=1e-5)


def test_model_kwargs_reach_from_pretrained_bf16(st_dir, st_model):
    """`model_kwargs={"dtype": torch.bfloat16}` (the GPU setting) loads bf16 weights; checked on CPU."""
    bf16 = SentenceTransformer(str(st_dir), trust_remote_code=True, model_kwargs={"dtype": torch.bfloat16})
    assert bf16[0].model.dtype == torch.bfloat16
    reduced = bf16.encode_query(QUERIES, convert_to_tensor=True).float()
    cosine = F.cosine_similarity(reduced, st_model.encode_query(QUERIES, convert_to_tensor=True))
    assert cosine.min() > 0.99


def test_plain_save_copies_code_files_to_root(st_model, tmp_path):
    st_model.save(str(tmp_path / "plain"))
    modules = json.loads((tmp_path / "plain" / "modules.json").read_text())
    assert modules == [{"idx": 0, "name": "0", "path": "", "type": "sentence_chroma_moe.ChromaMoeSentenceEncoder"}]
    for name in CODE_FILES:
        assert (tmp_path / "plain" / name).read_bytes() == (REPO / name).read_bytes()
    config = json.loads((tmp_path / "plain" / "config_sentence_transformers.json").read_text())
    assert config["similarity_fn_name"] == "cosine" and config["prompts"]["query"].startswith("Instruction: ")
    assert json.loads((tmp_path / "plain" / "sentence_bert_config.json").read_text()) == {"max_seq_length": 512}


def test_similarity_truncate_dim_and_precision(st_model):
    full = st_model.encode_document(DOCUMENTS, convert_to_tensor=True)
    queries = st_model.encode_query(QUERIES, convert_to_tensor=True)
    torch.testing.assert_close(st_model.similarity(queries, full), F.normalize(queries) @ F.normalize(full).T)
    short = st_model.encode_document(DOCUMENTS, convert_to_tensor=True, truncate_dim=16)
    assert short.shape == (3, 16)
    torch.testing.assert_close(short, full[:, :16])
    int8 = st_model.encode_document(DOCUMENTS, precision="int8")
    assert int8.dtype == np.int8 and int8.shape == (3, 32)
    binary = st_model.encode_document(DOCUMENTS, precision="binary")
    assert binary.dtype == np.int8 and binary.shape == (3, 4)  # 32 sign bits packed into 4 bytes
    ubinary = st_model.encode_document(DOCUMENTS, precision="ubinary")
    np.testing.assert_array_equal(np.unpackbits(ubinary, axis=1), (full.numpy() > 0).astype(np.uint8))


def test_bad_inputs_give_clear_errors(st_model, embedder, tokenizer):
    with pytest.raises(ValueError, match=r"got a tuple: \('a', 'pair'\)"):
        st_model.encode(["fine", ("a", "pair")])
    with pytest.raises(ValueError, match="max_seq_length=1024"):
        ChromaMoeSentenceEncoder(embedder, tokenizer, max_seq_length=1024)
    with pytest.raises(TypeError, match="expected a ChromaMoeForEmbedding"):
        build_sentence_transformer(torch.nn.Linear(2, 2), tokenizer)


def test_route_matches_router_logits(st_model, embedder, tokenizer):
    texts = ["revenue", "a 4k hdmi cable with gold connectors", "Umsatz"]
    routing = route(st_model, texts, batch_size=2)  # batches with padding, split back per text
    config = embedder.config
    layers = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
    assert [r.text for r in routing] == texts
    for item in routing:
        ids = tokenizer(item.text)["input_ids"]
        assert item.tokens == tokenizer.convert_ids_to_tokens(ids)
        assert sorted(item.experts) == sorted(item.weights) == layers
        with torch.no_grad():
            logits = embedder(input_ids=torch.tensor([ids]), output_router_logits=True).router_logits
        for position, layer in enumerate(layers):
            experts, weights = item.experts[layer], item.weights[layer]
            assert experts.shape == weights.shape == (len(ids), config.num_experts_per_tok)
            assert torch.all(weights[:, :-1] >= weights[:, 1:])  # sorted by weight
            assert all(len(set(row.tolist())) == config.num_experts_per_tok for row in experts)
            probabilities = logits[position].softmax(dim=-1)  # (T, E): norm_topk_prob is False in the tiny preset
            top = probabilities.topk(config.num_experts_per_tok, dim=-1)
            torch.testing.assert_close(weights, top.values)
            torch.testing.assert_close(weights.sum(dim=-1), top.values.sum(dim=-1))
            assert torch.equal(experts, top.indices)


def test_route_with_normalised_top_k_sums_to_one(embedder, tokenizer):
    torch.manual_seed(1)
    config = ChromaMoeConfig.from_preset("chroma-moe-tiny", norm_topk_prob=True)
    model = build_sentence_transformer(ChromaMoeForEmbedding(config).eval(), tokenizer)
    for item in route(model, ["net interest margin", "usb-c charger"]):
        for weights in item.weights.values():
            torch.testing.assert_close(weights.sum(dim=-1), torch.ones(len(item.tokens)))


def test_plot_routing_writes_heatmap(st_model, tmp_path):
    groups = {"finance": CORPUS[:4], "retail": CORPUS[4:8], "languages": CORPUS[8:]}
    shares = plot_routing(st_model, groups, tmp_path / "routing.png")
    assert (tmp_path / "routing.png").stat().st_size > 1000
    top_k = st_model[0].model.config.num_experts_per_tok
    for share in shares.values():
        assert share.shape == (2, 8)
        np.testing.assert_allclose(share.sum(axis=1), top_k)  # each token picks top-k experts
    np.testing.assert_allclose(routing_shares(st_model, {"finance": CORPUS[:4]})["finance"], shares["finance"])


def readme_usage_blocks() -> list[str]:
    """The ```python blocks of README.md's "## Usage" section (up to the next level-2 heading)."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Usage\s*$(.*?)(?=^## |\Z)", readme, flags=re.MULTILINE | re.DOTALL)
    if section is None:
        pytest.skip('README.md has no "## Usage" section yet')
    return re.findall(r"^```python\n(.*?)^```", section.group(1), flags=re.MULTILINE | re.DOTALL)


def test_readme_usage_snippets_run(st_model, tmp_path, monkeypatch):
    """The README's snippets run as written against a tiny model saved where they expect the phase-2 folder."""
    blocks = readme_usage_blocks()
    assert blocks, 'README.md\'s "## Usage" section has no ```python block'
    save_sentence_transformer(st_model, tmp_path / "outputs" / "chroma-moe-st")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for number, block in enumerate(blocks, start=1):
        exec(compile(block, f"README.md ## Usage block {number}", "exec"), namespace)
